"""scikit-learn's bundled handwritten digits: a real dataset that needs no download (powers quickstart)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from acnet_pl.data.base import HALF, check_positive_int, check_value
from acnet_pl.data.tensors import TensorDataModule, TensorImageDataset


class DigitsDataModule(TensorDataModule):
    """The 1797 8x8 digits of `sklearn.datasets.load_digits`, scaled to [0, 1], 3 channels, resized once.

    The train/val split is stratified and fixed by `seed`; training augmentation is a padded random crop
    only (flipping would change what some digits mean).
    """

    own_augment = "crop"
    num_classes = 10
    class_names = [str(d) for d in range(10)]
    mean = std = HALF
    default_batch_size = 64

    def __init__(self, image_size: int = 32, val_fraction: float = 0.2, seed: int = 0, **options: Any):
        super().__init__(**options)
        what = "between 0 and 1 (exclusive)"
        self.val_fraction = check_value(
            val_fraction, "data.val_fraction", what, lambda v: 0 < v < 1, (int, float)
        )
        self.image_size = check_positive_int(image_size, "data.image_size")
        self.seed = seed
        self.input_size = (3, image_size, image_size)
        normalise = v2.Normalize(list(self.mean), list(self.std))
        self.train_transform = self.compose_train_transform(image_size, [normalise])
        self.val_transform = v2.Compose([normalise, v2.ToPureTensor()])

    @functools.cached_property
    def splits(self) -> dict[str, TensorImageDataset]:
        """The stratified train/val split of the images (N, 3, S, S) in [0, 1], with their transforms."""
        # scikit-learn takes about a second to import; only data=digits needs it
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # values are 0..16
        size = (self.image_size, self.image_size)
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
        images, labels = images.repeat(1, 3, 1, 1), torch.from_numpy(digits.target).long()
        train, val = train_test_split(
            np.arange(len(labels)),
            test_size=self.val_fraction,
            stratify=digits.target,
            random_state=self.seed,
        )
        return {
            "train": TensorImageDataset(images[train], labels[train], self.train_transform),
            "val": TensorImageDataset(images[val], labels[val], self.val_transform),
        }
