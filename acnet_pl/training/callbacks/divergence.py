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

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss or non-finite weights.

    train.py prints the message as one line and exits with ``exit_code``; in a multirun the job fails
    and the sweep goes on.
    """

    #: Exit status of train.py for a diverged run (1 is a crash, 2 a config mistake, 130/143 a stop signal).
    exit_code = 3
    #: True on the DDP ranks that stop with it but do not print it (another rank does).
    quiet = False


class DivergenceCallback(Callback):
    """Raise `TrainingDiverged` at the first non-finite training loss, before it changes the weights.

    The loss is checked in ``on_before_backward``: the backward pass and optimizer step that would
    spread NaN/Inf into every weight never run (that batch's forward pass has already put its NaN into
    the BatchNorm running statistics; nothing is saved after it).
    Under DDP the processes agree on the decision (one all-reduce per step: the lowest rank with a
    non-finite loss), so they stop together instead of waiting for each other; that rank prints the
    error line, the others stop without one (`quiet`). There is no patience: after one optimizer step on a
    non-finite loss the weights are NaN and never recover (fp16's GradScaler already skips the steps
    whose *gradients* overflow; their loss is finite).
    Two more guards keep a broken model out of the checkpoints: after validation (before
    ModelCheckpoint, which Lightning always calls last, saves) a NaN/Inf `monitor` value stops the run
    too, e.g. a finite last loss whose step blew the weights up; and a checkpoint whose weights or
    BatchNorm statistics hold NaN/Inf is refused (``on_save_checkpoint``).

    The check reads one flag per step from the device (a sync point before the backward pass; the next
    batch is loaded by the workers meanwhile). The fuse callback writes ``deploy/report.json`` with
    ``"status": "diverged"`` and no ``deploy.pt``; the exception carries train.py's exit status 3.

    Args:
        monitor: a logged metric that must be finite after every validation (None: not checked). The
            module's losses keep NaN (torchmetrics would drop it by default), so one NaN batch shows.
    """

    def __init__(self, monitor: str | None = "val/loss") -> None:
        super().__init__()
        self.monitor = monitor

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        """Raise `TrainingDiverged` when the loss of this step (on any process) is NaN or Inf."""
        finite = bool(torch.isfinite(loss.detach()).all())
        rank = trainer.global_rank
        # The lowest rank whose loss is NaN/Inf (world_size: none): it prints the error, the others stop quietly.
        mine = torch.tensor(trainer.world_size if finite else rank, device=pl_module.device)
        first = int(trainer.strategy.reduce(mine, reduce_op="min"))
        if first == trainer.world_size:
            return
        where = f"at epoch {trainer.current_epoch}, step {trainer.global_step}"
        if first != rank:
            raise self._diverged(trainer, f"the training loss of rank {first} is NaN/Inf {where}", quiet=True)
        raise self._diverged(
            trainer, f"the training loss is {loss.detach().float().sum().item()} {where}", quiet=False
        )

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
        ckpts = getattr(trainer, "checkpoint_callbacks", None) or []
        ckpt = next((c.last_model_path for c in ckpts if getattr(c, "last_model_path", "")), None)
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
