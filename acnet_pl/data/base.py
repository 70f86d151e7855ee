"""The LightningDataModule every data set here shares: loader options, global batch split, MixUp/CutMix."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from acnet_pl.data import augment as aug

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


def check_value(value: Any, name: str, what: str, ok: Callable[[Any], bool], types: Any = int) -> Any:
    """`value` when it is a `types` (not a bool) and `ok(value)`, else a ValueError naming the config key."""
    if isinstance(value, bool) or not isinstance(value, types) or not ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def check_positive_int(value: int, name: str) -> int:
    return check_value(value, name, "a positive integer", lambda v: v > 0)


def to_normalised_float(mean: Sequence[float], std: Sequence[float]) -> list:
    """uint8 tensor (or PIL image, after `v2.ToImage`) to float in [0, 1], then normalised."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


class DeviceNormalise:
    """Batches (uint8: scaled to [0, 1]) normalised with mean/std cached on their device: no copy per batch;
    mean 0 and std 1 (or None) skip the normalisation."""

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        identity = all(m == 0 for m in mean or ()) and all(s == 1 for s in std or ())
        self.mean, self.std = (None, None) if identity else (mean, std)
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = v2.functional.to_dtype(images, torch.float32, scale=True)
        if self.mean is None:
            return images
        stats = self._stats
        if stats is None or (stats[0].device, stats[0].dtype) != (images.device, images.dtype):
            self._stats = tuple(  # type: ignore[assignment]
                torch.tensor(v, dtype=images.dtype, device=images.device).view(-1, 1, 1)
                for v in (self.mean, self.std)
            )
        mean, std = self._stats  # type: ignore[misc]
        return (images - mean) / std


def epoch_generator(device: torch.device, seed: int, epoch: int, rank: int) -> torch.Generator:
    """The generator of one rank's augmentation in one epoch: a function of (seed, epoch, rank) only."""
    generator = torch.Generator(device=device)
    # Modulo 2**64, the range manual_seed takes (an unseeded process's own seed is a 64-bit number).
    generator.manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + rank) % 2**64)
    return generator


class RankStream:
    """One rank's randomness for main-process batch augmentation, a function of (seed, epoch, rank).

    torchvision's transforms and MixUp/CutMix draw from the global CPU generator, seeded alike on every rank
    by `seed_everything`; inside `drawing(epoch)` it runs this rank's stream instead (PL_GLOBAL_SEED, else
    the process's seed) and is put back after: other draws per rank, the same after a resume.
    """

    def __init__(self, rank: int) -> None:
        self.rank = int(rank)
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
        self.epoch: int | None = None
        self.state = torch.empty(0, dtype=torch.uint8)  # the CPU generator's state where this stream stopped

    @contextlib.contextmanager
    def drawing(self, epoch: int) -> Iterator[None]:
        """Run the global CPU generator on this rank's stream of `epoch` for the duration of the block."""
        if epoch != self.epoch:
            self.state = epoch_generator(torch.device("cpu"), self.seed, epoch, self.rank).get_state()
            self.epoch = epoch
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.state)
            try:
                yield
            finally:
                self.state = torch.get_rng_state()


class ClassificationDataModule(L.LightningDataModule):
    """The loader options every datamodule here takes; subclasses declare only their own and pass `**options`.

    Subclasses set `num_classes`, `input_size`, `mean`, `std` (and `class_names`, `default_batch_size`),
    readable right after construction, and implement `build_train_dataset` / `build_val_dataset`.

    Args:
        batch_size, val_batch_size: GLOBAL (None = `default_batch_size`, batch_size); each process gets a
            `world_size`-th.
        num_workers: per process; `auto` = the CPU cores this process may use / the devices of its node.
        augment: a preset name, or a list of presets and `_target_` transform configs
            (`acnet_pl.data.augment`); None = the data set's own preset (`own_augment`).
        random_erasing: probability, applied after normalisation.
        mixup_alpha, cutmix_alpha: MixUp / CutMix of the training batches on the device, soft targets
            (0 = off).
        mean, std: the normalisation; None = the data set's own (train.py sets a pretrained model's).
    """

    own_augment = "none"
    default_batch_size: int | None = None
    class_names: list[str] | None = None
    num_classes: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(
        self,
        batch_size: int | None = None,
        *,
        num_workers: int | str = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        val_batch_size: int | None = None,
        augment: str | Sequence[Any] | None = None,
        random_erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        **unknown: Any,
    ):
        if unknown:  # Python's own words, naming the class the config chose (cli/common.py reads them)
            key = next(iter(unknown))
            raise TypeError(f"{type(self).__name__}.__init__() got an unexpected keyword argument '{key}'")
        super().__init__()
        if mean is not None:
            self.mean = tuple(float(v) for v in mean)
        if std is not None:
            self.std = tuple(float(v) for v in std)
        batch_size = self.default_batch_size if batch_size is None else batch_size
        self.batch_size = check_positive_int(batch_size, "data.batch_size")
        self.val_batch_size = check_positive_int(
            batch_size if val_batch_size is None else val_batch_size, "data.val_batch_size"
        )
        if num_workers != "auto":
            check_value(num_workers, "data.num_workers", "an integer >= 0 or auto", lambda v: v >= 0)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.augment = self.own_augment if augment is None else augment
        probability = ("a probability in [0, 1]", lambda v: 0 <= v <= 1, (int, float))
        alpha = ("a number >= 0 (0 = off)", lambda v: v >= 0, (int, float))
        self.random_erasing = float(check_value(random_erasing, "data.random_erasing", *probability))
        self.mixup_alpha = float(check_value(mixup_alpha, "data.mixup_alpha", *alpha))
        self.cutmix_alpha = float(check_value(cutmix_alpha, "data.cutmix_alpha", *alpha))
        self._batch_mix: Callable | None = None
        self._rank_stream: RankStream | None = None
        self.augment_transforms: list[Callable] = []
        # Set where the loaders yield uint8 training batches: to float and normalised on the device.
        self.device_tail: Callable | None = None
        self.train_collate: Callable | None = None
        self.per_process_batch_size: int | None = None
        self.per_process_val_batch_size: int | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def world_size(self) -> int:
        return 1 if self.trainer is None else int(self.trainer.world_size)

    @property
    def device(self) -> torch.device:
        """The training device: the trainer's, else the CPU."""
        strategy = getattr(self.trainer, "strategy", None)
        return torch.device("cpu") if strategy is None else strategy.root_device

    def augment_configs(self, image_size: int) -> list[Any]:
        return aug.resolve_augment(self.augment, image_size, self.own_augment)

    def compose_train_transform(self, image_size: int, tail: Sequence[Callable]) -> v2.Compose:
        """Augmentation, then `tail` (to float, normalise), random erasing, and `ToPureTensor`."""
        self.augment_transforms = aug.instantiate_transforms(self.augment_configs(image_size))
        return v2.Compose(
            [*self.augment_transforms, *tail, *aug.random_erasing(self.random_erasing), v2.ToPureTensor()]
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 batches to normalised floats (`device_tail`), then MixUp/CutMix of training batches."""
        tail = self.device_tail
        if isinstance(batch, torch.Tensor):  # `example_input_array` (model summary, to_onnx): never mixed
            return tail(batch) if tail is not None and batch.dtype == torch.uint8 else batch
        if tail is not None and batch[0].dtype == torch.uint8:
            batch = [tail(batch[0]), *batch[1:]]
        trainer = self.trainer
        if trainer is None or not trainer.training or not (self.mixup_alpha or self.cutmix_alpha):
            return batch
        if self._batch_mix is None:
            self._batch_mix = aug.batch_mix(self.mixup_alpha, self.cutmix_alpha, int(self.num_classes))
        with self.batch_randomness():
            images, targets = self._batch_mix(batch[0], batch[1])
        return [images, targets, *batch[2:]]

    def batch_randomness(self) -> contextlib.AbstractContextManager:
        """A block whose global-RNG draws (batch augmentation in the main process) are this rank's own."""
        rank = int(getattr(self.trainer, "global_rank", 0))
        if self._rank_stream is None or self._rank_stream.rank != rank:
            self._rank_stream = RankStream(rank)
        return self._rank_stream.drawing(int(getattr(self.trainer, "current_epoch", 0)))

    def build_train_dataset(self) -> Dataset:
        raise NotImplementedError

    def build_val_dataset(self) -> Dataset:
        """The validation set (also the test set)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Split the global batches over the processes and build the datasets this stage needs."""
        world = self.world_size
        self.per_process_batch_size = per_process_batch_size(self.batch_size, world)
        self.per_process_val_batch_size = per_process_batch_size(
            self.val_batch_size, world, "data.val_batch_size"
        )
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self.build_train_dataset()
            # drop_last=True would otherwise silently give an empty epoch.
            if len(self.train_set) // world < self.per_process_batch_size:
                raise ValueError(
                    f"data.batch_size={self.batch_size} is larger than the training set "
                    f"({len(self.train_set)} samples over {world} processes); lower data.batch_size"
                )
        if self.val_set is None:
            self.val_set = self.build_val_dataset()

    def workers_per_process(self) -> int:
        if self.num_workers != "auto":
            return int(self.num_workers)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        devices = getattr(self.trainer, "num_devices", None) or max(1, torch.cuda.device_count())
        return max(1, cores // int(devices))

    def _loader(self, train: bool) -> DataLoader:
        if (self.train_set if train else self.val_set) is None or self.per_process_batch_size is None:
            self.setup("fit" if train else "validate")
        workers = self.workers_per_process()
        return DataLoader(
            self.train_set if train else self.val_set,
            batch_size=self.per_process_batch_size if train else self.per_process_val_batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
            collate_fn=self.train_collate if train else None,
        )

    def train_dataloader(self) -> Any:
        """Shuffled training batches of the per-process size; the last partial batch is dropped."""
        return self._loader(train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(train=False)

    def test_dataloader(self) -> DataLoader:
        """The validation set again: none of these data sets ships a separate labelled test split."""
        return self.val_dataloader()
