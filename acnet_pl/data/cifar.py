"""CIFAR-10 / CIFAR-100 from torchvision's on-disk format, with the original ACNet augmentation."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torchvision.transforms import v2

from acnet_pl.data.base import HALF, to_normalised_float
from acnet_pl.data.tensors import TensorDataModule, TensorImageDataset

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


def load_cifar_batches(folder: Path, files: list[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read torchvision-format CIFAR pickles into (N, 3, 32, 32) uint8 images and (N,) int64 labels."""
    images, labels = [], []
    for name in files:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry[label_key])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long)


class CIFAR10DataModule(TensorDataModule):
    """CIFAR-10 from `<root>/cifar-10-batches-py` (downloaded by `prepare_data` when `download`)."""

    dataset_name = "CIFAR-10"
    base_folder = "cifar-10-batches-py"
    default_root = "data/cifar10"
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    test_files = ["test_batch"]
    label_key = "labels"
    class_names = CIFAR10_CLASSES
    torchvision_class = torchvision.datasets.CIFAR10
    own_augment = "cifar"
    num_classes = 10
    input_size = (3, 32, 32)
    mean = std = HALF
    default_batch_size = 128

    def __init__(self, root: str | None = None, download: bool = True, **options: Any):
        """`root` None = `default_root`."""
        super().__init__(**options)
        self.root = Path(root or self.default_root).expanduser()
        self.folder = self.root / self.base_folder
        self.download = download
        self.train_transform = self.compose_train_transform(32, to_normalised_float(self.mean, self.std))
        self.val_transform = v2.Compose([*to_normalised_float(self.mean, self.std), v2.ToPureTensor()])

    def missing(self) -> list[str]:
        return [n for n in self.train_files + self.test_files if not (self.folder / n).is_file()]

    def check_files(self, context: str = "") -> None:
        """FileNotFoundError with the fix when a batch file is missing."""
        if self.missing():
            self.not_found(f"missing {', '.join(self.missing())}{context}")

    def not_found(self, reason: str) -> None:
        raise FileNotFoundError(
            f"{self.dataset_name} not found at '{self.folder.resolve()}' ({reason}): put the extracted "
            f"'{self.base_folder}' folder under '{self.root.resolve()}' or set data.root=/path/containing/it"
        )

    def prepare_data(self) -> None:
        """Download and extract the archive into `root` when the files are absent and `download` is set."""
        if self.download and self.missing():
            # torchvision's downloader sets no timeout; without network it must fail fast, not hang.
            previous = socket.getdefaulttimeout()
            socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
            try:
                self.torchvision_class(str(self.root), train=True, download=True)
            except Exception as error:  # any network/extraction failure ends in the same fix
                self.not_found(" ".join(f"download failed: {type(error).__name__}: {error}".split()))
            finally:
                socket.setdefaulttimeout(previous)
            self.check_files(" after download")
        self.check_files("; data.download=false")

    def _read(self, files: list[str], transform: Any) -> TensorImageDataset:
        self.check_files()
        return TensorImageDataset(*load_cifar_batches(self.folder, files, self.label_key), transform)

    def build_train_dataset(self) -> TensorImageDataset:
        return self._read(self.train_files, self.train_transform)

    def build_val_dataset(self) -> TensorImageDataset:
        """The 10k test images, normalised only."""
        return self._read(self.test_files, self.val_transform)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels) from `<root>/cifar-100-python`."""

    dataset_name = "CIFAR-100"
    base_folder = "cifar-100-python"
    default_root = "data/cifar100"
    train_files = ["train"]
    test_files = ["test"]
    label_key = "fine_labels"
    class_names = CIFAR100_CLASSES
    torchvision_class = torchvision.datasets.CIFAR100
    num_classes = 100
