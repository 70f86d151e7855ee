"""Data sets held in memory as one tensor (CIFAR, digits, fake), optionally batched on the training device."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from acnet_pl.data.base import ClassificationDataModule
from acnet_pl.data.fast import BatchCropFlip, DeviceBatches, batched_form


class TensorImageDataset(Dataset):
    """Images already held as one (N, C, H, W) tensor, with an optional per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels.long(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        return (image if self.transform is None else self.transform(image)), int(self.labels[index])


class TensorDataModule(ClassificationDataModule):
    """A datamodule whose data sets are `TensorImageDataset`s (`splits`, or its own `build_*_dataset`).

    Args:
        device_batches: keep the training images on the device and augment whole batches there
            (`DeviceBatches`): true, false, or auto = on a CUDA device, or with no loader workers, when
            every augmentation has a batched form (padded crop, flip).
    """

    train_set: TensorImageDataset | None

    def __init__(self, device_batches: bool | str = "auto", **options: Any):
        super().__init__(**options)
        if device_batches not in (True, False, "auto"):
            raise ValueError(f"data.device_batches must be true, false or auto, got {device_batches!r}")
        self.device_batches = device_batches

    def compose_train_transform(self, image_size: int, tail: Any) -> Any:
        """As the base's; `device_batches=true` with an augmentation it cannot batch is refused here, when the
        module is built (before a run starts)."""
        composed = super().compose_train_transform(image_size, tail)
        if self.device_batches is True and self.batched_augment() is None:
            names = ", ".join(type(t).__name__ for t in self.augment_transforms)
            reason = "random erasing" if self.random_erasing else names
            raise ValueError(
                f"data.device_batches=true but the training data cannot be batched on the device ({reason}); "
                f"it needs an in-memory data set augmented by padded random crop and/or flip only; set "
                f"data.device_batches=auto or false"
            )
        return composed

    def batched_augment(self) -> BatchCropFlip | None:
        """The batched form of the training augmentation, or None when some of it has none."""
        return None if self.random_erasing else batched_form(self.augment_transforms, self.input_size[-1])

    def uses_device_batches(self) -> bool:
        """Whether the training batches are drawn on the device (`device_batches`)."""
        if self.device_batches is False or self.batched_augment() is None:
            return False
        # auto: on a GPU, or wherever the per-sample transforms would run in this process (no workers)
        return self.device_batches is True or self.device.type == "cuda" or self.workers_per_process() == 0

    def build_train_dataset(self) -> TensorImageDataset:
        return self.splits["train"]

    def build_val_dataset(self) -> TensorImageDataset:
        return self.splits["val"]

    def train_dataloader(self) -> Any:
        """When `uses_device_batches`: the training set on the device in per-rank batches augmented and
        normalised as tensors (`DeviceBatches`); else the base's shuffled per-sample loader."""
        if not self.uses_device_batches():
            return super().train_dataloader()
        if self.train_set is None or self.per_process_batch_size is None:
            self.setup("fit")
        return DeviceBatches(
            self.train_set.images.to(self.device),
            self.train_set.labels.to(self.device),
            self.per_process_batch_size,
            augment=self.batched_augment(),
            mean=self.mean,
            std=self.std,
            num_replicas=self.world_size,
            rank=int(getattr(self.trainer, "global_rank", 0)),
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),  # the seed of Lightning's own DistributedSampler
        )
