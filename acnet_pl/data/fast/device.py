"""In-memory training sets on the device (CIFAR, digits, fake): whole-batch crop/flip as tensor ops, with the
distribution of torchvision's per-sample `RandomCrop(size, padding)` + `RandomHorizontalFlip(p)`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler
from torchvision.transforms import v2

from acnet_pl.data.base import DeviceNormalise, epoch_generator


class BatchCropFlip:
    """Padded random crop (zero fill, same size out) and horizontal flip of a (N, C, H, W) batch, with
    per-sample offsets (uniform in [0, 2 x padding]) and flips (probability `flip_p`), as one gather."""

    def __init__(self, padding: int = 0, flip_p: float = 0.0) -> None:
        self.padding = int(padding)
        self.flip_p = float(flip_p)

    def __repr__(self) -> str:
        return f"BatchCropFlip(padding={self.padding}, flip_p={self.flip_p})"

    def apply(
        self, images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor
    ) -> torch.Tensor:
        """Crop every image of the zero-padded batch at (top, left), then mirror those with `flip`."""
        n, _, height, width = images.shape
        p = self.padding
        padded = F.pad(images, (p, p, p, p)) if p else images
        rows = top[:, None] + torch.arange(height, device=images.device)  # (N, H)
        cols = torch.arange(width, device=images.device).expand(n, width)
        cols = left[:, None] + torch.where(flip[:, None], width - 1 - cols, cols)  # (N, W)
        batch = torch.arange(n, device=images.device)[:, None, None]
        # Advanced indices around a slice: the result is (N, H, W, C); the permuted view is channels-last.
        return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The augmented batch, fresh draws for every sample."""
        n, device, span = len(images), images.device, 2 * self.padding + 1
        top = torch.randint(0, span, (n,), device=device, generator=generator)
        left = torch.randint(0, span, (n,), device=device, generator=generator)
        return self.apply(images, top, left, torch.rand(n, device=device, generator=generator) < self.flip_p)


def batched_form(transforms: Sequence[object], image_size: int) -> BatchCropFlip | None:
    """The `BatchCropFlip` equal in distribution to `transforms`, or None when one has no batched form (only
    `RandomCrop(image_size, padding=p)` with zero fill and `RandomHorizontalFlip(p)` have one, once each)."""
    padding, flip_p, seen = 0, 0.0, set()
    for transform in transforms:
        kind = type(transform)
        if kind in seen:
            return None
        seen.add(kind)
        if kind is v2.RandomCrop:
            pads, fill = transform.padding or [0, 0, 0, 0], transform.fill  # fill: a number or {type: number}
            if (
                tuple(transform.size) != (image_size, image_size)
                or len(set(pads)) != 1
                or (transform.padding_mode, transform.pad_if_needed) != ("constant", False)
                or any(v not in (0, None) for v in (fill.values() if isinstance(fill, dict) else [fill]))
            ):
                return None
            padding = pads[0]
        elif kind is v2.RandomHorizontalFlip:
            flip_p = float(transform.p)
        else:
            return None
    return BatchCropFlip(padding, flip_p)


class DeviceBatches:
    """Training batches of tensors on the device, augmented and normalised a batch at a time.

    Args:
        images: (N, C, H, W) uint8 (scaled to [0, 1]) or float images, already on the device.
        batch_size: per process; the last partial batch is dropped (as the per-sample training loader).
        mean, std: per-channel normalisation after scaling; None = none.
        num_replicas, rank, seed: as `DistributedSampler` (shuffled, reshuffled by `set_epoch`: Lightning
            calls it every epoch, so a resumed run replays the same order).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        augment: BatchCropFlip | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        identity = augment is not None and augment.padding == 0 and augment.flip_p == 0
        self.augment = None if identity else augment
        self.normalise = DeviceNormalise(mean, std)
        self.rank, self.seed = rank, seed
        self.sampler = DistributedSampler(
            range(len(labels)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed
        )

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.images.device
        order = torch.as_tensor(list(iter(self.sampler)), device=device)
        generator = epoch_generator(device, self.seed, self.sampler.epoch, self.rank)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            images = (
                self.images[index] if self.augment is None else self.augment(self.images[index], generator)
            )
            yield self.normalise(images), self.labels[index]
