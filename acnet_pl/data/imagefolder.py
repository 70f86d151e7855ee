"""Image trees (`train/<class>/*`, `val/<class>/*`) and ImageNet (same layout, or list files)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes
from torchvision.transforms import v2

from acnet_pl.data.augment import instantiate_transforms, v2_config
from acnet_pl.data.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassificationDataModule,
    DeviceNormalise,
    check_positive_int,
    to_normalised_float,
)
from acnet_pl.data.fast import EncodedImageLoader, collate_encoded, decode_batch
from acnet_pl.data.images import DEFAULT_MAX_IMAGE_PIXELS, PILImageLoader, SkipBadImages, TensorImageLoader

log = logging.getLogger(__name__)

#: Transforms after which every image has the configured size (compared with the end of `_target_`).
_SIZE_SETTING = ("RandomResizedCrop", "RandomCrop", "CenterCrop", "Resize", "FiveCrop", "TenCrop")
#: `data.decoder`: PIL (the original's), libjpeg-turbo in the workers, or batched on the training device.
DECODERS = ("pil", "torchvision", "device")


class ImageFolderDataModule(ClassificationDataModule):
    """Any tree `root/train/<class>/*` + `root/val/<class>/*`; classes are the sorted `train/` subfolders.

    The tree is read lazily: constructing the module touches no file; the first read of
    `class_names`/`num_classes` (or `setup`) raises FileNotFoundError when the tree is missing.
    An unreadable image (truncated, empty, not an image, broken link, more than `max_image_pixels`
    pixels) stops the run with one line naming the file, or is skipped and counted in the log when
    `skip_bad_images` is set. 16-bit images are scaled to 8 bits.
    """

    own_augment = "imagenet"
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    default_batch_size = 256
    missing_root = (
        "image folder not found at '{root}': expected train/<class>/<images> and val/<class>/<images> under "
        "it; set data.root=/path/to/tree"
    )

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        skip_bad_images: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        decoder: str = "torchvision",
        **options: Any,
    ):
        super().__init__(**options)
        self.root = Path(root).expanduser()
        self.skip_bad_images = bool(skip_bad_images)
        self.image_size = check_positive_int(image_size, "data.image_size")
        if decoder not in DECODERS:
            raise ValueError(f"data.decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        if decoder == "device" and self.random_erasing > 0:
            raise ValueError("data.random_erasing needs data.decoder=torchvision or pil, not device")
        self.decoder = decoder
        self.input_size = (3, image_size, image_size)
        pil = decoder == "pil"  # the original's pipeline: PIL decode, PIL augmentation, float in the workers
        self.loader: Callable = (PILImageLoader if pil else TensorImageLoader)(max_image_pixels)
        normalise = ([v2.ToImage()] if pil else []) + to_normalised_float(self.mean, self.std)
        # Otherwise libjpeg-turbo into uint8 tensors, augmentation on uint8; the float conversion and
        # normalisation run on the training device (4x less to copy there), unless random erasing needs floats.
        on_device = not pil and self.random_erasing == 0
        self.train_transform = self.compose_train_transform(image_size, [] if on_device else normalise)
        self.device_tail = DeviceNormalise(self.mean, self.std) if on_device else None
        self.train_reader: Callable = self.loader
        if decoder == "device":
            # Workers only read bytes; JPEGs are decoded a batch at a time on the device (nvJPEG on CUDA) and
            # augmented there (on_before_batch_transfer); validation keeps the torchvision path.
            self.train_reader = EncodedImageLoader(max_image_pixels)
            self.device_augment = v2.Compose([*self.augment_transforms, v2.ToPureTensor()])
            self.train_transform = None
            self.train_collate = collate_encoded
        self.val_transform = v2.Compose(
            [*instantiate_transforms(self.eval_geometry()), *normalise, v2.ToPureTensor()]
        )

    def require_folder(self, split: str) -> Path:
        """`root/<split>` as a Path, or FileNotFoundError saying what is missing."""
        if not self.root.is_dir():
            raise FileNotFoundError(self.missing_root.format(root=self.root.resolve()))
        folder = self.root / split
        if not folder.is_dir():
            raise FileNotFoundError(
                f"no '{split}/' folder under '{self.root.resolve()}': expected {split}/<class>/<images>; "
                f"set data.root=/path/to/tree"
            )
        return folder

    @functools.cached_property
    def class_names(self) -> list[str] | None:
        """Class names in label order: the sorted subfolders of `train/`, read on first access."""
        return find_classes(str(self.require_folder("train")))[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def eval_geometry(self) -> list[dict[str, Any]]:
        """The validation resize + center crop (the original's: shorter side to 256/224 x size, crop size)."""
        size = self.image_size
        return [
            v2_config("Resize", size=int(size * 256 / 224), antialias=True),
            v2_config("CenterCrop", size=size),
        ]

    def augment_configs(self, image_size: int) -> list[Any]:
        """The augmentation; preceded by the validation resize + crop when none of it sets the image size."""
        configs = super().augment_configs(image_size)
        names = [str(c.get("_target_", "")) if isinstance(c, Mapping) else type(c).__name__ for c in configs]
        if not any(name.endswith(_SIZE_SETTING) for name in names):
            # Trees hold images of any size; batches need one: `augment=none` trains on what val sees.
            configs = [*self.eval_geometry(), *configs]
        return configs

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """`decoder=device`: decode a training batch's JPEGs on the device in one call, augment them there
        from this rank's own stream (other crops on every GPU); skip_bad_images drops what none decodes."""
        if self.decoder != "device" or isinstance(batch, torch.Tensor) or not isinstance(batch[0], list):
            return batch
        on_bad = self.train_set.record if isinstance(self.train_set, SkipBadImages) else None
        return decode_batch(batch, self.device, self.device_augment, self.batch_randomness(), on_bad)

    def read_split(self, split: str, transform: Callable | None, reader: Callable) -> Dataset:
        """`root/<split>` as a dataset; `val/` must have `train/`'s classes."""
        folder = self.require_folder(split)
        classes = find_classes(str(folder))[0]
        if classes != self.class_names:
            missing = sorted(set(self.class_names) - set(classes))
            extra = sorted(set(classes) - set(self.class_names))
            raise ValueError(
                f"val/ and train/ under '{self.root.resolve()}' have different classes "
                f"(missing in val: {missing[:5]}, only in val: {extra[:5]}); "
                f"give val/ one subfolder per train/ class, with the same names"
            )
        return ImageFolder(str(folder), transform=transform, loader=reader)

    def build_train_dataset(self) -> Dataset:
        dataset = self.read_split("train", self.train_transform, self.train_reader)
        return SkipBadImages(dataset) if self.skip_bad_images else dataset

    def build_val_dataset(self) -> Dataset:
        dataset = self.read_split("val", self.val_transform, self.loader)
        return SkipBadImages(dataset) if self.skip_bad_images else dataset

    def teardown(self, stage: str) -> None:
        """Say how many bad images were skipped (when `skip_bad_images` is set)."""
        for name, dataset in (("training", self.train_set), ("validation", self.val_set)):
            if isinstance(dataset, SkipBadImages) and dataset.skipped:
                log.warning(
                    "%d unreadable %s images were skipped (data.skip_bad_images=true); see the warnings above",
                    dataset.skipped,
                    name,
                )


def read_list_file(path: Path) -> list[tuple[str, int]]:
    """Lines `relative/path label` (blank lines skipped) as (path under `path`'s folder, label); ValueError
    naming the bad line."""
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or not parts[-1].isdigit():
            raise ValueError(
                f"{path}:{number}: expected 'relative/path label' with an integer label >= 0, "
                f"got {line.strip()!r}"
            )
        samples.append((str(path.parent / line.strip().rsplit(maxsplit=1)[0]), int(parts[-1])))
    if not samples:
        raise ValueError(f"{path} lists no images; write one 'relative/path label' per line")
    return samples


class ListFileDataset(Dataset):
    """Listed (path, label) samples, read by `loader`, then `transform`ed."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable | None, loader: Callable) -> None:
        self.samples, self.transform, self.loader = samples, transform, loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = self.loader(path)
        return (image if self.transform is None else self.transform(image)), label


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet as `root/train/<class>/*.JPEG` + `root/val/<class>/*.JPEG`.

    When `root/train_list.txt` / `root/val_list.txt` exist, their lines `relative/path label` are used
    instead of scanning folders; `num_classes` is then the largest label + 1 and the class names are the
    sorted `train/` subfolders when there are exactly that many of them, else None.
    """

    missing_root = (
        "ImageNet not found at '{root}': link it with `ln -s /path/to/imagenet imagenet_data` (folders train/ "
        "and val/), set data.root=..., or try experiment=quickstart"
    )

    def __init__(self, root: str = "imagenet_data", **options: Any):
        super().__init__(root, **options)

    @property
    def uses_list_files(self) -> bool:
        """True when `root` holds train_list.txt or val_list.txt (then both are required)."""
        return any((self.root / f"{split}_list.txt").is_file() for split in ("train", "val"))

    @functools.cached_property
    def list_files(self) -> dict[str, list[tuple[str, int]]]:
        """The parsed `train_list.txt` and `val_list.txt` (read only when one of them exists)."""
        lists = {}
        for split in ("train", "val"):
            path = self.root / f"{split}_list.txt"
            if not path.is_file():
                raise FileNotFoundError(
                    f"'{path.resolve()}' is missing but the other list file exists: give both "
                    f"train_list.txt and val_list.txt, or neither to scan train/ and val/"
                )
            lists[split] = read_list_file(path)
        return lists

    @functools.cached_property
    def class_names(self) -> list[str] | None:
        if not self.uses_list_files:
            return super().class_names
        folder = self.root / "train"
        names = sorted(e.name for e in folder.iterdir() if e.is_dir()) if folder.is_dir() else []
        return names if len(names) == self.num_classes else None

    @functools.cached_property
    def num_classes(self) -> int:
        if not self.uses_list_files:
            return len(self.class_names)
        return 1 + max(label for samples in self.list_files.values() for _, label in samples)

    def read_split(self, split: str, transform: Callable | None, reader: Callable) -> Dataset:
        """The images of `split`, from `<split>_list.txt` when the list files are there."""
        if not self.uses_list_files:
            return super().read_split(split, transform, reader)
        return ListFileDataset(self.list_files[split], transform, reader)
