"""Test helper: a callback that sends signals to its own process at given training steps.

Used as `+callbacks.signals._target_=signal_callback.SendSignals +callbacks.signals.at=1:SIGUSR1,3:SIGTERM`
(tests/ on PYTHONPATH): each signal is sent at the end of the batch that makes `trainer.global_step` reach
its step, a deterministic point instead of a sleep guessing where training is.
"""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class SendSignals(Callback):
    """`at`: "step:SIGNAME,step:SIGNAME,..." (e.g. "1:SIGUSR1,3:SIGTERM")."""

    def __init__(self, at: str) -> None:
        self.at: dict[int, list[signal.Signals]] = {}
        for item in str(at).split(","):
            step, name = item.split(":")
            self.at.setdefault(int(step), []).append(signal.Signals[name.strip()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for signum in self.at.pop(trainer.global_step, []):
            os.kill(os.getpid(), signum)
