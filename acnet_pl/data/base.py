"""The base LightningDataModule every dataset here shares: global batch split, loaders, metadata."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from acnet_pl.data.augment import (
    batch_mix,
    check_alpha,
    check_probability,
    instantiate_transforms,
    random_erasing,
    resolve_augment,
)
from acnet_pl.data.device import BatchCropFlip, DeviceBatches, RankStream, batched_form

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


def per_process_batch_size(global_batch: int, world_size: int, name: str = "data.batch_size") -> int:
    """Split a global batch over `world_size` processes; ValueError when it does not divide."""
    if global_batch % world_size != 0:
        raise ValueError(
            f"{name}={global_batch} does not divide by the {world_size} processes "
            f"(trainer.devices x num_nodes); choose a multiple of {world_size}"
        )
    return global_batch // world_size


def check_positive_int(value: int, name: str) -> int:
    """Return `value` when it is an int > 0, else raise a ValueError naming the config key."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class TensorImageDataset(Dataset):
    """Images already held as one (N, C, H, W) tensor, with an optional per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def pil_to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    """The tail of a PIL pipeline: to a float tensor in [0, 1], normalise (then `ToPureTensor`)."""
    return [v2.ToImage(), *uint8_to_normalised_tensor(mean, std)]


def uint8_to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    """The tail of a uint8 tensor pipeline: to float in [0, 1], normalise (then `ToPureTensor`)."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


class ClassificationDataModule(L.LightningDataModule):
    """Shared by every image-classification datamodule here.

    Subclasses set (or provide as properties) `num_classes`, `class_names`, `input_size`, `mean`, `std`,
    all readable right after construction, and implement `build_train_dataset` / `build_val_dataset`.
    `batch_size` and `val_batch_size` are GLOBAL: each process gets `batch_size // trainer.world_size`.

    Augmentation (see `acnet_pl.data.augment`): `augment` is a preset name or a list of presets and
    `_target_` transform configs (None = the data set's own preset, `own_augment`); `random_erasing` is a
    probability applied after normalisation; `mixup_alpha` / `cutmix_alpha` (0 = off) mix training batches
    after they reach the device, giving (N, num_classes) soft targets.

    In-memory data sets (`TensorImageDataset` training sets) can keep their training images on the device
    and augment whole batches there (`acnet_pl.data.device`): `device_batches=true`, or `auto` (the
    default) = on a CUDA device when every augmentation has a batched form (padded crop, flip).
    """

    #: The preset `augment=None` means; subclasses set the original's augmentation for their data.
    own_augment = "none"

    num_classes: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(
        self,
        batch_size: int,
        num_workers: int | str = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        val_batch_size: int | None = None,
        augment: str | Sequence[Any] | None = None,
        random_erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        device_batches: bool | str = "auto",
    ):
        super().__init__()
        self.batch_size = check_positive_int(batch_size, "data.batch_size")
        self.val_batch_size = check_positive_int(
            batch_size if val_batch_size is None else val_batch_size, "data.val_batch_size"
        )
        if num_workers != "auto" and (
            isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0
        ):
            raise ValueError(f"data.num_workers must be an integer >= 0 or auto, got {num_workers!r}")
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.augment = self.own_augment if augment is None else augment
        self.random_erasing = check_probability(random_erasing, "data.random_erasing")
        self.mixup_alpha = check_alpha(mixup_alpha, "data.mixup_alpha")
        self.cutmix_alpha = check_alpha(cutmix_alpha, "data.cutmix_alpha")
        self._batch_mix: Callable | None = None
        self._rank_stream: RankStream | None = None
        if device_batches not in (True, False, "auto"):
            raise ValueError(f"data.device_batches must be true, false or auto, got {device_batches!r}")
        self.device_batches = device_batches
        self.augment_transforms: list[Callable] = []
        # Set by subclasses whose loaders yield uint8 training batches: to float and normalise on the device.
        self.device_tail: Callable | None = None
        self.train_collate: Callable | None = None
        self.per_process_batch_size: int | None = None
        self.per_process_val_batch_size: int | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def class_names(self) -> list[str] | None:
        """Names of the classes in label order, or None when the data has none."""
        return None

    @property
    def world_size(self) -> int:
        """Number of processes sharing the global batch (1 without a trainer)."""
        trainer = self.trainer
        return 1 if trainer is None else int(trainer.world_size)

    def augment_configs(self, image_size: int) -> list[dict[str, Any]]:
        """The `_target_` configs of the training augmentation (`augment` resolved for `image_size`)."""
        return resolve_augment(self.augment, image_size, self.own_augment)

    def compose_train_transform(self, image_size: int, tail: Sequence[Callable]) -> v2.Compose:
        """Augmentation, then `tail` (to float, normalise), random erasing, and `ToPureTensor`."""
        self.augment_transforms = instantiate_transforms(self.augment_configs(image_size))
        return v2.Compose(
            [
                *self.augment_transforms,
                *tail,
                *random_erasing(self.random_erasing),
                v2.ToPureTensor(),
            ]
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 batches to normalised floats (`device_tail`), then MixUp/CutMix of training batches.

        Lightning also sends the module's `example_input_array` through this hook (the model summary at fit
        start, while `trainer.training` is already true; TensorBoard's graph; `to_onnx`/`to_torchscript`):
        a forward input, one tensor here, not an (images, labels) batch. It is only brought to the device's
        form, never mixed.
        """
        if isinstance(batch, torch.Tensor):  # a forward input: the loaders here yield [images, labels]
            if self.device_tail is not None and batch.dtype == torch.uint8:
                return self.device_tail(batch)
            return batch
        if self.device_tail is not None and batch[0].dtype == torch.uint8:
            batch = [self.device_tail(batch[0]), *batch[1:]]
        trainer = self.trainer
        if trainer is None or not trainer.training or not (self.mixup_alpha or self.cutmix_alpha):
            return batch
        if self._batch_mix is None:
            self._batch_mix = batch_mix(self.mixup_alpha, self.cutmix_alpha, int(self.num_classes))
        with self.batch_randomness():
            images, targets = self._batch_mix(batch[0], batch[1])
        return [images, targets, *batch[2:]]

    def batch_randomness(self) -> contextlib.AbstractContextManager:
        """A block whose global-RNG draws (batch augmentation in the main process) are this rank's own.

        See `acnet_pl.data.device.RankStream`: different on every rank, the same for a seed and rank.
        """
        rank = int(getattr(self.trainer, "global_rank", 0))
        if self._rank_stream is None or self._rank_stream.rank != rank:
            self._rank_stream = RankStream(rank)
        return self._rank_stream.drawing(int(getattr(self.trainer, "current_epoch", 0)))

    def build_train_dataset(self) -> Dataset:
        """The training set, with its augmentation."""
        raise NotImplementedError

    def build_val_dataset(self) -> Dataset:
        """The validation set (also used as the test set), with its evaluation transform."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Split the global batches over the processes and build the datasets this stage needs."""
        world = self.world_size
        self.per_process_batch_size = per_process_batch_size(self.batch_size, world, "data.batch_size")
        self.per_process_val_batch_size = per_process_batch_size(
            self.val_batch_size, world, "data.val_batch_size"
        )
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self.build_train_dataset()
            # drop_last=True would otherwise silently give an empty epoch.
            per_rank = len(self.train_set) // world
            if per_rank < self.per_process_batch_size:
                raise ValueError(
                    f"data.batch_size={self.batch_size} is larger than the training set "
                    f"({len(self.train_set)} samples over {world} processes); lower data.batch_size"
                )
        if self.val_set is None:
            self.val_set = self.build_val_dataset()

    def workers_per_process(self) -> int:
        """`num_workers`, with `auto` = the CPU cores this process may use / the devices of this node."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        devices = getattr(self.trainer, "num_devices", None) or max(1, torch.cuda.device_count())
        return max(1, cores // int(devices))

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        workers = self.workers_per_process()
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
            collate_fn=self.train_collate if train else None,
        )

    @property
    def device(self) -> torch.device:
        """The training device: the trainer's, else the CPU."""
        strategy = getattr(self.trainer, "strategy", None)
        return torch.device("cpu") if strategy is None else strategy.root_device

    def batched_augment(self) -> BatchCropFlip | None:
        """The batched form of the training augmentation, or None when some of it has none."""
        if self.random_erasing > 0 or not isinstance(self.train_set, TensorImageDataset):
            return None
        size = self.train_set.images.shape[-1]
        return batched_form(self.augment_transforms, size)

    def device_batches_refusal(self) -> str | None:
        """Why the training data cannot be batched on the device, or None when they can."""
        if self.train_set is not None and not isinstance(self.train_set, TensorImageDataset):
            return f"{type(self).__name__} reads files, not an in-memory tensor"
        if self.random_erasing > 0:
            return "random erasing"
        if batched_form(self.augment_transforms, self.input_size[-1]) is None:
            return ", ".join(type(t).__name__ for t in self.augment_transforms)
        return None

    def check_device_batches(self) -> None:
        """ValueError when `device_batches=true` cannot be honoured; in-memory data sets call it when built,
        so that the run refuses before anything starts."""
        reason = self.device_batches_refusal() if self.device_batches is True else None
        if reason is not None:
            raise ValueError(
                f"data.device_batches=true but the training data cannot be batched on the device ({reason}); "
                f"it needs an in-memory data set augmented by padded random crop and/or flip only; set "
                f"data.device_batches=auto or false"
            )

    def uses_device_batches(self) -> bool:
        """Whether the training batches are drawn on the device (`device_batches`, see the class doc)."""
        if self.device_batches is False:
            return False
        self.check_device_batches()
        batched = self.batched_augment()
        return batched is not None and (self.device_batches is True or self.device.type == "cuda")

    def device_train_batches(self) -> DeviceBatches:
        """The training set on the device, in per-rank batches augmented and normalised as tensors."""
        trainer = self.trainer
        dataset = self.train_set
        device = self.device
        images = dataset.images.to(device)
        labels = dataset.labels.to(device)
        normalised = tuple(self.mean) != (0.0,) * len(self.mean) or tuple(self.std) != (1.0,) * len(self.std)
        return DeviceBatches(
            images,
            labels,
            self.per_process_batch_size,
            augment=self.batched_augment(),
            mean=self.mean if normalised else None,
            std=self.std if normalised else None,
            num_replicas=1 if trainer is None else int(trainer.world_size),
            rank=int(getattr(trainer, "global_rank", 0)),
            # The seed Lightning gives its own DistributedSampler.
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
        )

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        """Shuffled training batches of the per-process size; the last partial batch is dropped."""
        if self.train_set is None or self.per_process_batch_size is None:
            self.setup("fit")
        if self.uses_device_batches():
            return self.device_train_batches()
        return self._loader(self.train_set, self.per_process_batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        if self.val_set is None or self.per_process_val_batch_size is None:
            self.setup("validate")
        return self._loader(self.val_set, self.per_process_val_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        """The validation set again: none of these datasets ships a separate labelled test split."""
        return self.val_dataloader()
