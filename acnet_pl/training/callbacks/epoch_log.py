"""One log line per epoch (train.log, SLURM logs, `| tee`) and the training throughput as metrics."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def _value(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class EpochLog(Callback):
    """Log one line per training epoch through Python logging, and log the throughput as metrics.

    The line (rank zero only) reads, for example::

        epoch 3/100  train loss 1.234 top-1 45.67%  val top-1 50.12% top-5 90.00% (best 50.12%)
        lr 0.0998  1234 img/s  0:01:23

    (lr: the first parameter group's at the start of the epoch.)
    It goes wherever logging goes (Hydra: the console and `<run>/train.log`), with or without a terminal,
    unlike a progress bar. Metrics (every logger): `perf/images_per_sec` (training images of all processes
    per second of the epoch's training part, data loading included, validation excluded),
    `perf/step_time` (seconds per optimizer step, mean over the epoch) and `perf/epoch_time` (seconds,
    validation included), each the mean over the DDP ranks.
    """

    def __init__(self) -> None:
        super().__init__()
        self._epoch_start = 0.0
        self._train_end = 0.0
        self._images = 0
        self._step_seconds = 0.0
        self._steps = 0
        self._batch_start = 0.0
        self._validated_epoch = -1
        self._lr: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the epoch's clocks."""
        self._epoch_start = self._train_end = time.perf_counter()
        self._images, self._step_seconds, self._steps = 0, 0.0, 0
        self._lr = _learning_rate(trainer)  # the epoch's starting lr (at the end a cosine reaches 0)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Time the step from here (the batch is already loaded)."""
        self._batch_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count the batch's images (all processes) and its step time."""
        now = time.perf_counter()
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        self._images += len(images) * trainer.world_size
        self._step_seconds += now - self._batch_start
        self._steps += 1
        self._train_end = now

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remember that this epoch has fresh validation numbers (not the sanity check's)."""
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the throughput metrics and the epoch's line."""
        now = time.perf_counter()
        train_seconds = max(self._train_end - self._epoch_start, 1e-9)
        epoch_seconds = now - self._epoch_start
        perf = {
            "perf/images_per_sec": self._images / train_seconds,
            "perf/step_time": self._step_seconds / max(self._steps, 1),
            "perf/epoch_time": epoch_seconds,
        }
        if self._steps:
            # The mean over the ranks (each measures its own clock; images count every rank's).
            pl_module.log_dict(perf, on_step=False, on_epoch=True, sync_dist=True)
        if not trainer.is_global_zero:
            return
        metrics = dict(trainer.callback_metrics)
        parts = [self._epoch_text(trainer)]
        loss, top1 = _value(metrics, "train/loss"), _value(metrics, "train/acc_top1")
        parts.append(f"train loss {'-' if loss is None else f'{loss:.4f}'} top-1 {_percent(top1)}")
        if self._validated_epoch == trainer.current_epoch:
            parts.append(
                f"val top-1 {_percent(_value(metrics, 'val/acc_top1'))} "
                f"top-5 {_percent(_value(metrics, 'val/acc_top5'))} "
                f"(best {_percent(_value(metrics, 'val/acc_top1_best'))})"
            )
        if self._lr is not None:
            parts.append(f"lr {self._lr:.4g}")
        parts.append(f"{perf['perf/images_per_sec']:.0f} img/s")
        parts.append(_duration(epoch_seconds))
        log.info("  ".join(parts))

    @staticmethod
    def _epoch_text(trainer: L.Trainer) -> str:
        epoch = trainer.current_epoch + 1
        total = trainer.max_epochs
        return f"epoch {epoch}/{total}" if total is not None and total > 0 else f"epoch {epoch}"


def _learning_rate(trainer: L.Trainer) -> float | None:
    """The lr of the first parameter group (the weights) of the first optimizer, as it is now."""
    if not trainer.optimizers or not trainer.optimizers[0].param_groups:
        return None
    return float(trainer.optimizers[0].param_groups[0]["lr"])
