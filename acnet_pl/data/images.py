"""Reading image files (PIL, or libjpeg-turbo for JPEGs): one-line errors naming the file, 16-bit scaling, a
decompression-bomb limit, and `SkipBadImages` (`data.skip_bad_images=true`)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from acnet_pl.data.base import check_value

log = logging.getLogger(__name__)

#: PIL's own default limit (about 89.5 megapixels), kept as `data.max_image_pixels`' default.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
#: How many neighbours `SkipBadImages` tries before it gives up (a folder of nothing but bad files).
MAX_CONSECUTIVE_BAD = 64
_JPEG_MAGIC = b"\xff\xd8\xff"
_SKIP_HINT = "replace or delete the file, or set data.skip_bad_images=true to skip unreadable images"


class BadImageError(ValueError):
    """An image file that cannot be used; the one-line message names the file and the fix."""

    def __init__(self, message: str) -> None:
        # A DataLoader worker's error reaches the main process as `BadImageError("Caught BadImageError in
        # DataLoader worker process N. Original Traceback ... BadImageError: <message>")`: keep the message.
        text = str(message)
        if text.startswith("Caught BadImageError"):
            found = [line for line in text.splitlines() if "BadImageError: " in line]
            text = found[-1].split("BadImageError: ", 1)[1].strip() if found else text
        super().__init__(text)


def _missing_reason(path: str) -> str:
    if os.path.islink(path) and not os.path.exists(path):
        return f"broken symbolic link (to '{os.readlink(path)}')"
    return "file not found"


def _unreadable(path: str, reason: str) -> BadImageError:
    return BadImageError(f"cannot read image '{path}': {reason}; {_SKIP_HINT}")


def _too_large(path: str, width: int, height: int, limit: int) -> BadImageError:
    return BadImageError(
        f"image '{path}' has {width}x{height} = {width * height} pixels, more than "
        f"data.max_image_pixels={limit} (a guard against decompression bombs); raise data.max_image_pixels "
        f"(null = no limit) if the file is trusted, or {_SKIP_HINT}"
    )


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    # torchvision's C++ errors start with "<function>, <source file>:<line>, ".
    text = re.sub(r"^\w+, \S+:\d+, ", "", text)
    return f"{type(error).__name__}: {text}"


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return image.convert("RGB")
    # PIL's convert("RGB") clips 16-bit values at 255; scale 0..65535 to 0..255 instead.
    array = np.asarray(image, dtype=np.float64)
    scaled = np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L").convert("RGB")


def _open_unchecked(file: Any) -> Image.Image:
    # PIL's own bomb check (Image.MAX_IMAGE_PIXELS, a process-wide global) is switched off while the header
    # is read: `max_pixels` replaces it, checked before decoding, with a message that names the file.
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(file)
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def open_rgb(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The image at `path` as a loaded RGB PIL image (16-bit greyscale scaled to 8 bits, not clipped);
    BadImageError naming the file when unusable or over `max_pixels` pixels (None = no limit)."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            image = _open_unchecked(f)
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise _too_large(path, width, height, max_pixels)
            image.load()
    except BadImageError:
        raise
    except FileNotFoundError:
        raise _unreadable(path, _missing_reason(path)) from None
    except UnidentifiedImageError:
        size = os.path.getsize(path)
        what = "empty file (0 bytes)" if size == 0 else f"not an image format PIL can read ({size} bytes)"
        raise _unreadable(path, what) from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt data; PIL raises all three
        raise _unreadable(path, f"truncated or corrupt image data ({_reason(error)})") from None
    return _to_rgb(image)


def _jpeg_size(raw: memoryview) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame marker, or None when the header cannot be read (a
    walk of the markers: 8 us per JPEG, PIL's header parser 117 us, on the device loader's worker path)."""
    position = 2
    while position + 9 < len(raw):
        if raw[position] != 0xFF:
            return None
        marker = raw[position + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height = int.from_bytes(raw[position + 5 : position + 7], "big")
            return int.from_bytes(raw[position + 7 : position + 9], "big"), height
        position += 2 + int.from_bytes(raw[position + 2 : position + 4], "big")
    return None


def _read_bytes(path: str) -> torch.Tensor:
    """The bytes of the file at `path` (uint8 tensor); BadImageError naming the file when unreadable."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise _unreadable(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # see decode_jpeg_on_cpu
            return read_file(path)
    except (FileNotFoundError, RuntimeError) as error:
        if not os.path.exists(path):
            raise _unreadable(path, _missing_reason(path)) from None
        raise _unreadable(path, _reason(error)) from None


def read_encoded(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """A JPEG file's bytes (1-D uint8, its pixel count checked on the header), any other format decoded by
    PIL as (3, H, W) uint8; BadImageError naming the file."""
    path = str(path)
    data = _read_bytes(path)
    raw = memoryview(data.numpy())  # no copy
    if raw[:3] != _JPEG_MAGIC:
        image = open_rgb(path, max_pixels)  # PNG, BMP, WebP, 16-bit ...: PIL, with the same checks
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()
    size = _jpeg_size(raw) if max_pixels is not None else None
    if size is not None and size[0] * size[1] > max_pixels:
        raise _too_large(path, size[0], size[1], max_pixels)
    return data


def decode_rgb_tensor(
    path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> torch.Tensor:
    """The image at `path` as a (3, H, W) uint8 tensor: libjpeg-turbo for JPEGs, `open_rgb` for the rest."""
    data = read_encoded(path, max_pixels)
    return data if data.ndim == 3 else decode_jpeg_on_cpu(data, str(path))


def decode_jpeg_on_cpu(data: torch.Tensor, path: str) -> torch.Tensor:
    """JPEG bytes as a (3, H, W) uint8 tensor (libjpeg-turbo: grey, YCbCr, CMYK/YCCK to RGB); BadImageError
    naming the file `path` when the data are truncated or corrupt."""
    try:
        with warnings.catch_warnings():
            # libjpeg-turbo only warns about a truncated file ("Premature end of JPEG file"): refuse it.
            warnings.simplefilter("error", UserWarning)
            # torchvision 0.29 deprecates its decoders for TorchCodec; they remain the libjpeg-turbo path.
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.RGB)
    except (RuntimeError, UserWarning) as error:
        raise _unreadable(path, f"truncated or corrupt JPEG data ({_reason(error)})") from None


class PILImageLoader:
    """`open_rgb` as a picklable loader (ImageFolder, the list-file dataset)."""

    read = staticmethod(open_rgb)

    def __init__(self, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        if max_pixels is not None:
            what = "a positive integer or null (no limit)"
            check_value(max_pixels, "data.max_image_pixels", what, lambda v: v > 0)
        self.max_pixels = max_pixels

    def __call__(self, path: str) -> Any:
        return self.read(path, self.max_pixels)


class TensorImageLoader(PILImageLoader):
    """`decode_rgb_tensor` as a loader: (3, H, W) uint8 tensors."""

    read = staticmethod(decode_rgb_tensor)


class SkipBadImages(Dataset):
    """`dataset`, where an item whose image raises BadImageError is replaced by the next readable one;
    each skipped file is logged with the running count, shared by all DataLoader workers."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        # Shared memory: workers (forked or spawned) add to the same count the main process reads.
        self._count = multiprocessing.get_context().Value("i", 0)

    @property
    def skipped(self) -> int:
        return int(self._count.value)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        # `targets`, `classes`, `samples` ... of the wrapped dataset.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def record(self, error: BadImageError) -> None:
        """Count and log one skipped image (also one dropped from a batch decoded on the device)."""
        with self._count.get_lock():
            self._count.value += 1
            count = self._count.value
        log.warning("skipped a bad image (%d so far, data.skip_bad_images=true): %s", count, error)

    def __getitem__(self, index: int) -> Any:
        size = len(self.dataset)
        for attempt in range(min(MAX_CONSECUTIVE_BAD, size)):
            try:
                return self.dataset[(index + attempt) % size]
            except BadImageError as error:
                self.record(error)
        raise BadImageError(
            f"{min(MAX_CONSECUTIVE_BAD, size)} images in a row from index {index} cannot be read "
            f"(see the log); check the data set"
        )
