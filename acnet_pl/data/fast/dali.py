"""ImageNet training batches read, decoded and augmented by NVIDIA DALI on the GPU (`data=imagenet_dali`,
`pip install -e ".[dali]"`); DALI is imported only when the training loader is built. Validation keeps
`ImageNetDataModule`'s torchvision path. No GPU test here: this is kept to the few DALI calls below."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from acnet_pl.data.imagefolder import ImageNetDataModule


def _import_dali() -> Any:
    try:
        import nvidia.dali as dali
    except ImportError as error:
        raise ValueError(
            f"data=imagenet_dali needs NVIDIA DALI ({error}): pip install -e '.[dali]' on a machine with a "
            f"CUDA GPU, or use data=imagenet (data.decoder=device decodes on the GPU with torchvision)"
        ) from None
    if not torch.cuda.is_available():
        raise ValueError("data=imagenet_dali needs a CUDA GPU (none is visible); use data=imagenet")
    return dali


def shard_sizes(num_samples: int, num_shards: int) -> list[int]:
    """The samples in each of DALI's shards (its formula): shard i reads [floor(iN/S), floor((i+1)N/S))."""
    return [(i + 1) * num_samples // num_shards - i * num_samples // num_shards for i in range(num_shards)]


def batches_per_rank(num_samples: int, num_shards: int, batch_size: int) -> int:
    """Full batches every rank runs per epoch: the smallest shard's (30 files, 4 ranks, batch 4: shards of
    7, 8, 7, 8 files, 1 batch each). A rank running its own count would wait at the epoch's end in a
    collective the others never join."""
    return min(shard_sizes(num_samples, num_shards)) // batch_size


class _DALIBatches:
    """A DALI classification iterator (`auto_reset=True`) as exactly `batches` (images, labels) per epoch,
    whatever DALI's own epoch holds: when DALI ends its epoch the batches go on from its next one."""

    def __init__(self, iterator: Any, batches: int) -> None:
        self.iterator, self.batches = iterator, batches

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.batches):
            try:
                output = next(self.iterator)
            except StopIteration:  # DALI's epoch ended here; it has reset itself
                output = next(self.iterator)
            yield output[0]["data"], output[0]["label"].squeeze(-1).long()


class DALIImageNetDataModule(ImageNetDataModule):
    """`ImageNetDataModule` whose training batches come from DALI: GPU decoding, random-resized crop, flip
    and normalisation fused; `augment=imagenet` only; each rank reads its shard of the file list."""

    def prepare_data(self) -> None:
        """Refuse another augmentation before a run starts (train() calls this before any logger); DALI itself
        is looked for only when the training batches are built (evaluating a checkpoint needs none)."""
        if self.augment != "imagenet" or self.random_erasing:
            raise ValueError(
                "data=imagenet_dali offers data.augment=imagenet only (no random erasing); use data=imagenet "
                "for other augmentations"
            )

    def train_dataloader(self) -> Any:
        """DALI's training batches of this rank (normalised floats on this rank's GPU)."""
        self.prepare_data()
        dali = _import_dali()
        from nvidia.dali import fn, types
        from nvidia.dali.plugin.pytorch import DALIClassificationIterator, LastBatchPolicy

        files, labels = self.train_files()  # after setup: the per-process batch size is known
        rank, world = int(getattr(self.trainer, "global_rank", 0)), self.world_size
        size = self.image_size

        @dali.pipeline_def
        def pipeline() -> Any:
            jpegs, targets = fn.readers.file(
                files=files,
                labels=labels,
                random_shuffle=True,
                shard_id=rank,
                num_shards=world,
                name="reader",
            )
            images = fn.decoders.image_random_crop(jpegs, device="mixed", output_type=types.RGB)
            images = fn.resize(images, resize_x=size, resize_y=size)
            return fn.crop_mirror_normalize(
                images,
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=[255 * m for m in self.mean],
                std=[255 * s for s in self.std],
                mirror=fn.random.coin_flip(probability=0.5),
            ), targets.gpu()

        device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        pipe = pipeline(
            batch_size=self.per_process_batch_size,
            num_threads=max(1, self.workers_per_process()),
            device_id=device_id,
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)) + rank,
        )
        pipe.build()
        iterator = DALIClassificationIterator(
            pipe, reader_name="reader", last_batch_policy=LastBatchPolicy.DROP, auto_reset=True
        )
        return _DALIBatches(iterator, batches_per_rank(len(files), world, self.per_process_batch_size))

    def train_files(self) -> tuple[list[str], list[int]]:
        """The training files and labels as the torchvision path reads them (every rank knows every shard)."""
        if self.train_set is None:
            self.setup("fit")
        samples = self.train_set.samples
        return [str(path) for path, _ in samples], [int(label) for _, label in samples]
