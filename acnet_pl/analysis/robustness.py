"""Top-1 under flips and rotations of the validation images (the paper credits part of ACB's gain to them)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["CACHE_BYTES", "TRANSFORMS", "cached_batches", "evaluate_top1", "robustness"]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


#: Name -> transform of an image batch (N, C, H, W). Rotations are counter-clockwise as the image is
#: shown (row 0 at the top): ``rot90`` moves the top-right corner to the top-left.
TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "original": _identity,
    "flip_lr": lambda x: torch.flip(x, dims=(-1,)),
    "flip_ud": lambda x: torch.flip(x, dims=(-2,)),
    "rot90": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "rot180": lambda x: torch.rot90(x, 2, dims=(-2, -1)),
    "rot270": lambda x: torch.rot90(x, 3, dims=(-2, -1)),
}


#: The analyses' batches are read once and kept up to this size (CIFAR, 20 batches of 128: 31 MB); larger
#: (ImageNet, 20 batches of 256: 3 GB) each pass reads the loader again.
CACHE_BYTES = 512 * 2**20


def cached_batches(
    loader: Iterable, device: torch.device | str = "cpu", limit_batches: int | None = None
) -> Iterable:
    """The first ``limit_batches`` (image, label) batches of ``loader`` on ``device`` as a list, read once; or
    ``loader`` itself when they would take more than ``CACHE_BYTES``."""
    kept, size = [], 0
    for batch in itertools.islice(loader, limit_batches):
        x, y = batch[0].to(device, dtype=torch.float32), batch[1].to(device)
        size += x.nbytes + y.nbytes
        if size > CACHE_BYTES:
            return loader
        kept.append((x, y))
    return kept


@torch.no_grad()
def evaluate_top1(
    model: nn.Module,
    loader: Iterable,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    limit_batches: int | None = None,
) -> float:
    """Top-1 accuracy of ``model`` (eval mode, float32) on ``loader``'s (image, label) batches.

    Args:
        transform: applied to each image batch first (normalisation is per channel, so flips and
            rotations of normalised images equal normalised flipped images).
        limit_batches: at most this many batches; None = all.
    """
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for index, batch in enumerate(loader):
            if limit_batches is not None and index >= limit_batches:
                break
            x = batch[0].to(device, dtype=torch.float32)
            y = batch[1].to(device)
            if transform is not None:
                x = transform(x)
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("the validation set is empty: nothing to measure accuracy on")
    return correct / total


def robustness(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str = "cpu",
    limit_batches: int | None = None,
) -> dict[str, float]:
    """Top-1 on the validation images as they are, flipped left-right / up-down and rotated 90/180/270."""
    return {
        name: evaluate_top1(model, loader, transform, device, limit_batches)
        for name, transform in TRANSFORMS.items()
    }
