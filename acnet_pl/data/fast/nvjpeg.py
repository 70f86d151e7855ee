"""`data.decoder=device`: the workers read bytes; a batch of JPEGs is decoded in one call on the training
device (nvJPEG on CUDA) and augmented there."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from acnet_pl.data.images import BadImageError, TensorImageLoader, decode_jpeg_on_cpu, read_encoded


class EncodedImageLoader(TensorImageLoader):
    """(a JPEG file's bytes, or any other format decoded, path): the path names the file a batch fails on."""

    def __call__(self, path: str) -> tuple[torch.Tensor, str]:  # type: ignore[override]
        return read_encoded(path, self.max_pixels), str(path)


def collate_encoded(batch: list[tuple[tuple[torch.Tensor, str], int]]) -> list[Any]:
    """[list of encoded/decoded images, labels, paths] of (EncodedImageLoader sample, label) pairs."""
    samples, labels = zip(*batch, strict=True)
    return [[image for image, _ in samples], torch.tensor(labels), [path for _, path in samples]]


def _decode_jpegs(device: torch.device, data: torch.Tensor | list[torch.Tensor]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # see decode_jpeg_on_cpu
        warnings.simplefilter("error", UserWarning)  # a truncated file only warns
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _decode_one_on(
    device: torch.device, data: torch.Tensor, path: str, on_bad: Callable[[BadImageError], None] | None
) -> torch.Tensor | None:
    with contextlib.suppress(RuntimeError, UserWarning):
        return _decode_jpegs(device, data)
    try:
        return decode_jpeg_on_cpu(data, path).to(device, non_blocking=True)
    except BadImageError as error:
        if on_bad is None:
            raise
        on_bad(error)
        return None


def decode_batch(
    batch: list[Any],
    device: torch.device,
    augment: Callable,
    randomness: contextlib.AbstractContextManager,
    on_bad: Callable[[BadImageError], None] | None = None,
) -> list[torch.Tensor]:
    """[images, labels] of a `collate_encoded` batch: its JPEGs decoded on `device` in one call, then
    `augment`ed image by image inside `randomness` (the rank's own stream).

    When the batched call fails, each JPEG is decoded alone on the device, and what the device decoder
    rejects goes to the CPU decoder (`decode_jpeg_on_cpu`): nvJPEG decodes no CMYK/YCCK JPEGs (about 22
    files of ImageNet's training set) and some other valid files. A file no decoder reads is a BadImageError
    naming it, or, with `on_bad` (skip_bad_images), goes to `on_bad` and is dropped from the batch.
    """
    encoded, paths = batch[0], batch[2]
    jpegs = [i for i, image in enumerate(encoded) if image.ndim == 1]
    images = [image if image.ndim == 1 else image.to(device, non_blocking=True) for image in encoded]
    if jpegs:
        try:
            decoded = _decode_jpegs(device, [encoded[i] for i in jpegs])
        except (RuntimeError, UserWarning):
            decoded = [_decode_one_on(device, encoded[i], paths[i], on_bad) for i in jpegs]
        for i, image in zip(jpegs, decoded, strict=True):
            images[i] = image
    keep = [i for i, image in enumerate(images) if image is not None]
    if not keep:
        raise BadImageError(
            f"none of the {len(images)} images of a training batch can be decoded (see the log); "
            "check the data set"
        )
    with randomness:
        augmented = torch.stack([augment(images[i]) for i in keep])
    return [augmented, batch[1] if len(keep) == len(images) else batch[1][torch.tensor(keep)]]
