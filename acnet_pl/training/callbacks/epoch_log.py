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
    """Log one line per training epoch (rank zero), and the throughput as metrics (every logger).

    The line goes wherever logging goes (Hydra: the console and `<run>/train.log`), with or without a
    terminal, unlike a progress bar: `epoch 3/100  train loss 1.2340 top-1 45.67%  val top-1 50.12% top-5
    90.00% (best 50.12%)  lr 0.0998  1234 img/s  0:01:23` (lr: the first group's at the epoch start).
    Metrics, each the mean over the DDP ranks: `perf/images_per_sec` (training images of all ranks per
    second of the epoch's training part, data loading included), `perf/step_time` (seconds per optimizer
    step) and `perf/epoch_time` (seconds, validation included).
    """

    def __init__(self) -> None:
        super().__init__()
        # Set here too: a resume from a mid-epoch checkpoint does not call on_train_epoch_start.
        self._epoch_start = self._train_end = self._batch_start = self._step_seconds = 0.0
        self._images, self._steps, self._lr = 0, 0, None
        self._validated_epoch = -1  # the last epoch with fresh validation numbers (not the sanity check's)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the epoch's clocks."""
        self._epoch_start = self._train_end = time.perf_counter()
        self._images, self._step_seconds, self._steps = 0, 0.0, 0
        # The epoch's starting lr (at the end a cosine reaches 0): the first group's (the weights).
        groups = trainer.optimizers[0].param_groups if trainer.optimizers else []
        self._lr = float(groups[0]["lr"]) if groups else None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Time the step from here (the batch is already loaded)."""
        self._batch_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count the batch's images (all processes) and its step time."""
        self._train_end = time.perf_counter()
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        self._images += len(images) * trainer.world_size
        self._step_seconds += self._train_end - self._batch_start
        self._steps += 1

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remember that this epoch has fresh validation numbers."""
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the throughput metrics and the epoch's line."""
        epoch_seconds = time.perf_counter() - self._epoch_start
        perf = {
            "perf/images_per_sec": self._images / max(self._train_end - self._epoch_start, 1e-9),
            "perf/step_time": self._step_seconds / max(self._steps, 1),
            "perf/epoch_time": epoch_seconds,
        }
        if self._steps:
            # The mean over the ranks (each measures its own clock; images count every rank's).
            pl_module.log_dict(perf, on_step=False, on_epoch=True, sync_dist=True)
        if not trainer.is_global_zero:
            return
        metrics, total = dict(trainer.callback_metrics), trainer.max_epochs
        parts = [
            f"epoch {trainer.current_epoch + 1}" + (f"/{total}" if total is not None and total > 0 else "")
        ]
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
        parts += [f"{perf['perf/images_per_sec']:.0f} img/s", _duration(epoch_seconds)]
        log.info("  ".join(parts))
