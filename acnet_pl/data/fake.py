"""Synthetic, learnable image data generated from a seed: no files, no PIL."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from acnet_pl.data.base import check_positive_int, check_value
from acnet_pl.data.tensors import TensorDataModule, TensorImageDataset


class FakeDataModule(TensorDataModule):
    """Each class is a smooth random colour pattern; every sample is its class pattern plus Gaussian noise.

    The patterns are low-frequency (a 4x4 grid upsampled), so a small CNN with pooling learns them within
    a few steps, and a nearest-class-mean classifier is near perfect. Same `seed` -> identical tensors.
    The samples are already roughly zero-mean/unit-variance, so `mean`/`std` are the identity.
    """

    noise_std = 1.0
    pattern_grid = 4
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)
    default_batch_size = 32

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        train_size: int = 256,
        val_size: int = 64,
        seed: int = 0,
        **options: Any,
    ):
        super().__init__(**options)
        self.num_classes = check_value(num_classes, "data.num_classes", "an integer >= 2", lambda v: v >= 2)
        self.image_size = check_positive_int(image_size, "data.image_size")
        self.train_size = check_positive_int(train_size, "data.train_size")
        self.val_size = check_positive_int(val_size, "data.val_size")
        self.seed = seed
        self.input_size = (3, image_size, image_size)
        # No augmentation unless asked for: the samples are noise around class patterns already.
        wanted = self.augment_configs(image_size) or self.random_erasing
        self.train_transform = self.compose_train_transform(image_size, []) if wanted else None

    @functools.cached_property
    def splits(self) -> dict[str, TensorImageDataset]:
        """The class patterns, then the train and val samples, from one seeded generator."""
        generator = torch.Generator().manual_seed(self.seed)
        size = self.image_size
        coarse = torch.randn(self.num_classes, 3, self.pattern_grid, self.pattern_grid, generator=generator)
        patterns = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

        def draw(n: int, transform: Any = None) -> TensorImageDataset:
            # Balanced classes in a random order.
            labels = (torch.arange(n) % self.num_classes)[torch.randperm(n, generator=generator)]
            noise = torch.randn(n, 3, size, size, generator=generator)
            return TensorImageDataset(patterns[labels] + self.noise_std * noise, labels, transform)

        return {"train": draw(self.train_size, self.train_transform), "val": draw(self.val_size)}
