"""LightningDataModules for image classification; all share `ClassificationDataModule`."""

from acnet_pl.data.base import ClassificationDataModule
from acnet_pl.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from acnet_pl.data.digits import DigitsDataModule
from acnet_pl.data.fake import FakeDataModule
from acnet_pl.data.imagefolder import ImageFolderDataModule, ImageNetDataModule

__all__ = [
    "ClassificationDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "FakeDataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
]
