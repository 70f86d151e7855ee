"""Stop a run whose training diverged: a NaN/Inf loss ends it at once, and no NaN/Inf weights are saved."""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics import Metric

from acnet_pl.deploy.verification import nonfinite_entries, nonfinite_message
from acnet_pl.training.checkpointing import last_checkpoint

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss or weights: one line, exit `exit_code` (a multirun goes on)."""

    #: Exit status of train.py for a diverged run (1 is a crash, 2 a config mistake, 130/143 a stop signal).
    exit_code = 3
    #: True on the DDP ranks that stop with it but do not print it (another rank does).
    quiet = False


class DivergenceCallback(Callback):
    """Raise `TrainingDiverged` at the first check after a non-finite training loss.

    Every step marks, on the device, the first step whose loss was NaN/Inf; a check (a host read, the
    ranks agreeing in one all-reduce) reads the mark every N steps, before that step's backward, and after
    an epoch's last step, before its validation. So the run stops at most N-1 steps after the first bad
    loss and nothing is saved after them. No patience: one optimizer step on a non-finite loss makes the
    weights NaN for good (fp16's GradScaler already skips steps whose *gradients* overflow). Two more
    guards keep a broken model out of the checkpoints: a NaN/Inf `monitor` after validation (before
    ModelCheckpoint saves: a finite last loss whose step blew the weights up), and `on_save_checkpoint`.

    Args:
        monitor: a logged metric that must be finite after every validation (None: not checked). The
            module's losses keep NaN (torchmetrics would drop it by default), so one NaN batch shows.
        check_every_n_steps: read the mark every N optimizer steps (the default 50, Lightning's logging
            interval, is one sync in 50 steps).
    """

    def __init__(self, monitor: str | None = "val/loss", check_every_n_steps: int = 50) -> None:
        super().__init__()
        if check_every_n_steps < 1:
            raise ValueError(
                f"DivergenceCallback check_every_n_steps must be >= 1, got {check_every_n_steps}"
            )
        self.monitor = monitor
        self.check_every_n_steps = check_every_n_steps
        # On the device: the first step with a NaN/Inf loss (-1: none) and that loss.
        self._first_bad: torch.Tensor | None = None
        self._bad_loss: torch.Tensor | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_bad = torch.full((), -1, dtype=torch.long, device=pl_module.device)
        self._bad_loss = torch.zeros((), device=pl_module.device)

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        """Mark this step on the device when its loss is NaN/Inf; every N steps, stop on a mark."""
        loss = loss.detach().float().sum()
        new = ~torch.isfinite(loss) & (self._first_bad < 0)
        self._first_bad = torch.where(new, trainer.global_step, self._first_bad)
        self._bad_loss = torch.where(new, loss, self._bad_loss)
        if trainer.global_step % self.check_every_n_steps == 0:
            self._check(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After the last step of an epoch: stop on a mark before the validation and its checkpoints."""
        if batch_idx + 1 == trainer.num_training_batches:
            self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        """Raise `TrainingDiverged` when a process has marked a step (one host read, one all-reduce)."""
        rank = trainer.global_rank
        # The lowest rank with a mark (world_size: none): it prints the error, the others stop quietly.
        mine = torch.where(self._first_bad < 0, trainer.world_size, rank)
        first = int(trainer.strategy.reduce(mine, reduce_op="min"))
        if first == trainer.world_size:
            return
        where = f"at epoch {trainer.current_epoch}, step {trainer.global_step}"
        if first != rank:
            raise self._diverged(trainer, f"the training loss of rank {first} is NaN/Inf {where}", quiet=True)
        step, what = int(self._first_bad), f"the training loss is {float(self._bad_loss)}"
        if step != trainer.global_step:  # found by a later check: the steps since have run
            where = f"at step {step} (found {where}; checked every {self.check_every_n_steps} steps)"
        raise self._diverged(trainer, f"{what} {where}", quiet=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Raise `TrainingDiverged` when `monitor` is NaN/Inf after a validation (not the sanity check)."""
        if trainer.sanity_checking or not self.monitor:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None and not bool(torch.isfinite(torch.as_tensor(value)).all()):
            where = f"after the validation of epoch {trainer.current_epoch}, step {trainer.global_step}"
            raise self._diverged(trainer, f"{self.monitor} is {float(value)} {where}")

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Refuse to save a checkpoint whose weights or buffers hold NaN/Inf (metric states may be -inf)."""
        metrics = tuple(f"{name}." for name, m in pl_module.named_modules() if name and isinstance(m, Metric))
        state_dict = {
            k: v for k, v in (checkpoint.get("state_dict") or {}).items() if not k.startswith(metrics)
        }
        bad = nonfinite_entries(state_dict)
        if bad:
            where = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
            message = nonfinite_message(bad, len(state_dict))
            raise self._diverged(trainer, f"the weights hold NaN/Inf at {where}: {message}")

    @staticmethod
    def _diverged(trainer: L.Trainer, what: str, quiet: bool | None = None) -> TrainingDiverged:
        """The error to raise; `quiet` (default: on ranks but zero, which all see the same) prints no line."""
        ckpt = last_checkpoint(trainer)
        ckpt = ckpt if ckpt and os.path.isfile(ckpt) else None  # a LastCheckpoint names it before it exists
        resume = (
            f"the last checkpoint, {ckpt}, is from before; resume from it with a lower optimizer.lr"
            if ckpt
            else "no checkpoint was saved; rerun with a lower optimizer.lr"
        )
        error = TrainingDiverged(f"training diverged: {what}; stopped, no deploy.pt written; {resume}")
        error.quiet = trainer.global_rank != 0 if quiet is None else quiet
        if not error.quiet:
            log.error("%s", error)
        return error
