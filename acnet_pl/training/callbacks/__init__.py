"""Lightning callbacks: deploy files when training ends, ACB diagnostics, a line per epoch, divergence stops."""

from acnet_pl.training.callbacks.diagnostics import DiagnosticsCallback
from acnet_pl.training.callbacks.divergence import DivergenceCallback, TrainingDiverged
from acnet_pl.training.callbacks.epoch_log import EpochLog
from acnet_pl.training.callbacks.fuse import FuseCallback

__all__ = [
    "DiagnosticsCallback",
    "DivergenceCallback",
    "EpochLog",
    "FuseCallback",
    "TrainingDiverged",
]
