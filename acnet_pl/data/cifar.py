"""CIFAR-10 / CIFAR-100 from torchvision's on-disk format, with the original ACNet augmentation."""

from __future__ import annotations

import contextlib
import pickle
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torchvision.transforms import v2

from acnet_pl.data.base import (
    HALF,
    ClassificationDataModule,
    TensorImageDataset,
    uint8_to_normalised_tensor,
)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# The fine labels in label order (alphabetical), as in CIFAR-100's `meta` file.
# fmt: off
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl",
    "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair",
    "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin",
    "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp",
    "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck",
    "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television",
    "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm",
]
# fmt: on

DOWNLOAD_SOCKET_TIMEOUT_S = 20.0


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torchvision's downloader sets no timeout; without network it must fail fast, not hang.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def load_cifar_batches(folder: Path, files: list[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read torchvision-format CIFAR pickles into (N, 3, 32, 32) uint8 images and (N,) int64 labels."""
    images, labels = [], []
    for name in files:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry[label_key])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long)


class CIFAR10DataModule(ClassificationDataModule):
    """CIFAR-10 from `<root>/cifar-10-batches-py` (downloaded by `prepare_data` when `download`)."""

    dataset_name = "CIFAR-10"
    base_folder = "cifar-10-batches-py"
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    test_files = ["test_batch"]
    label_key = "labels"
    classes = CIFAR10_CLASSES
    torchvision_class = torchvision.datasets.CIFAR10
    own_augment = "cifar"

    def __init__(
        self,
        root: str = "data/cifar10",
        batch_size: int = 128,
        download: bool = True,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        val_batch_size: int | None = None,
        augment: str | Sequence[Any] | None = None,
        random_erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        device_batches: bool | str = "auto",
    ):
        super().__init__(
            batch_size,
            num_workers,
            pin_memory,
            persistent_workers,
            val_batch_size,
            augment=augment,
            random_erasing=random_erasing,
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            device_batches=device_batches,
        )
        self.root = Path(root).expanduser()
        self.download = download
        self.num_classes = len(self.classes)
        self.input_size = (3, 32, 32)
        self.mean = HALF
        self.std = HALF
        self.train_transform = self.compose_train_transform(
            32, uint8_to_normalised_tensor(self.mean, self.std)
        )
        self.val_transform = v2.Compose([*uint8_to_normalised_tensor(self.mean, self.std), v2.ToPureTensor()])
        self.check_device_batches()  # device_batches=true with an augmentation it cannot batch: refused now

    @property
    def class_names(self) -> list[str]:
        """The dataset's class names in label order."""
        return list(self.classes)

    @property
    def folder(self) -> Path:
        """Where the extracted batches are expected."""
        return self.root / self.base_folder

    def missing_files(self) -> list[str]:
        """Names of the expected batch files that are not on disk."""
        return [n for n in self.train_files + self.test_files if not (self.folder / n).is_file()]

    def _not_found(self, reason: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"{self.dataset_name} not found at '{self.folder.resolve()}' ({reason}): put the extracted "
            f"'{self.base_folder}' folder under '{self.root.resolve()}' or set data.root=/path/containing/it"
        )

    def prepare_data(self) -> None:
        """Download and extract the archive into `root` when the files are absent and `download` is set."""
        missing = self.missing_files()
        if not missing:
            return
        if not self.download:
            raise self._not_found(f"missing {', '.join(missing)}; data.download=false")
        try:
            with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT_S):
                self.torchvision_class(str(self.root), train=True, download=True)
        except Exception as error:  # any network/extraction failure ends in the same fix
            reason = " ".join(f"download failed: {type(error).__name__}: {error}".split())
            raise self._not_found(reason) from error
        missing = self.missing_files()
        if missing:
            raise self._not_found(f"missing {', '.join(missing)} after download")

    def _check_files(self) -> None:
        missing = self.missing_files()
        if missing:
            raise self._not_found(f"missing {', '.join(missing)}")

    def build_train_dataset(self) -> TensorImageDataset:
        """The 50k training images with the augmentation (the original's: random crop with padding 4, flip)."""
        self._check_files()
        images, labels = load_cifar_batches(self.folder, self.train_files, self.label_key)
        return TensorImageDataset(images, labels, self.train_transform)

    def build_val_dataset(self) -> TensorImageDataset:
        """The 10k test images, normalised only."""
        self._check_files()
        images, labels = load_cifar_batches(self.folder, self.test_files, self.label_key)
        return TensorImageDataset(images, labels, self.val_transform)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels) from `<root>/cifar-100-python`."""

    dataset_name = "CIFAR-100"
    base_folder = "cifar-100-python"
    train_files = ["train"]
    test_files = ["test"]
    label_key = "fine_labels"
    classes = CIFAR100_CLASSES
    torchvision_class = torchvision.datasets.CIFAR100

    def __init__(
        self,
        root: str = "data/cifar100",
        batch_size: int = 128,
        download: bool = True,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        val_batch_size: int | None = None,
        augment: str | Sequence[Any] | None = None,
        random_erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        device_batches: bool | str = "auto",
    ):
        super().__init__(
            root,
            batch_size,
            download,
            num_workers,
            pin_memory,
            persistent_workers,
            val_batch_size,
            augment=augment,
            random_erasing=random_erasing,
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            device_batches=device_batches,
        )
