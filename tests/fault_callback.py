"""Test helper: a callback that injects one fault on one DDP rank at a given training step.

Used as `+callbacks.fault._target_=fault_callback.Fault +callbacks.fault.rank=1 +callbacks.fault.step=2
+callbacks.fault.do=raise` (tests/ on PYTHONPATH). `do`:
- `raise`: a ValueError (a user-caused error: one line, exit 2) at the end of batch `step`;
- `nan`: the inputs of batch `step` (global_step == step when it starts) are NaN, so its loss is NaN;
- `SIGTERM` / `SIGINT` / ...: that signal to this process at the end of batch `step`;
  `group:SIGTERM`: to the whole process group (every rank and the launching process);
- `enospc`: from `setup` on, every checkpoint this rank writes fails with ENOSPC (a full disk).
"""

from __future__ import annotations

import errno
import os
import signal

from lightning.pytorch.callbacks import Callback

import acnet_pl.training.checkpointing as checkpointing


class Fault(Callback):
    """`do` on global rank `rank` at training step `step` (see the module docstring)."""

    def __init__(self, do: str, rank: int = 0, step: int = 1) -> None:
        self.do, self.rank, self.step = str(do), int(rank), int(step)

    def _here(self, trainer, step: int) -> bool:
        return trainer.global_rank == self.rank and step == self.step

    def setup(self, trainer, pl_module, stage) -> None:
        if self.do == "enospc" and trainer.global_rank == self.rank:

            def full_disk(*args, **kwargs):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            checkpointing.atomic_torch_save = full_disk  # what AtomicCheckpointIO writes with

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.do == "nan" and self._here(trainer, trainer.global_step):
            batch[0].fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._here(trainer, trainer.global_step):
            return
        if self.do == "raise":
            raise ValueError(f"injected fault on rank {self.rank} at step {self.step}")
        if self.do.startswith("group:"):
            os.killpg(os.getpgrp(), signal.Signals[self.do.split(":", 1)[1]])
        elif self.do in signal.Signals.__members__:
            os.kill(os.getpid(), signal.Signals[self.do])
