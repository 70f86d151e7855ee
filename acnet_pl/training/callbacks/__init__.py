"""Lightning callbacks: `FuseCallback` writes the fused deploy files when training ends; `DiagnosticsCallback`
shows what ACB does in the dashboard (kernel maps, branch gammas, robustness, pruning); `EpochLog` logs a line
per epoch; `DivergenceCallback` stops a run at the first
NaN/Inf loss (`TrainingDiverged`)."""

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
