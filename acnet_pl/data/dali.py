"""ImageNet training batches read, decoded and augmented by NVIDIA DALI on the GPU (optional extra).

`pip install -e ".[dali]"` and `data=imagenet_dali`. DALI is imported only when the training loader is
built, so this module imports without it; without DALI or a CUDA GPU the run stops with one line saying so.
Validation keeps the torchvision path of `ImageNetDataModule` (the fuse callback and deploy.py read it).
This path needs a GPU to run and has no GPU test here: it is kept to the few DALI calls below.
"""

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


class _DALIBatches:
    """A DALI classification iterator as (images, labels) batches with a length."""

    def __init__(self, iterator: Any, batches: int) -> None:
        self.iterator = iterator
        self.batches = batches

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for output in self.iterator:
            yield output[0]["data"], output[0]["label"].squeeze(-1).long()


class DALIImageNetDataModule(ImageNetDataModule):
    """`ImageNetDataModule` whose training batches come from DALI: GPU decoding with a random-resized crop,
    flip and normalisation fused (`fn.decoders.image_random_crop` + `fn.resize` + `fn.crop_mirror_normalize`).

    Only the original's augmentation (`augment=imagenet`) is offered here; each rank reads its own shard.
    """

    def train_dataloader(self) -> Any:
        """DALI's training batches of this rank (normalised floats on this rank's GPU)."""
        dali = _import_dali()
        from nvidia.dali import fn, types
        from nvidia.dali.plugin.pytorch import DALIClassificationIterator, LastBatchPolicy

        if self.augment != "imagenet" or self.random_erasing:
            raise ValueError("data=imagenet_dali offers augment=imagenet only (no random erasing)")
        if self.per_process_batch_size is None:
            self.setup("fit")
        trainer = self.trainer
        rank = int(getattr(trainer, "global_rank", 0))
        world = int(getattr(trainer, "world_size", 1))
        reader: dict[str, Any] = {"file_root": str(self.require_folder("train"))}
        if self.uses_list_files:  # DALI reads the same 'relative/path label' lines
            reader = {"file_root": str(self.root), "file_list": str(self.list_file("train"))}
        size = self.image_size

        @dali.pipeline_def
        def pipeline() -> Any:
            jpegs, labels = fn.readers.file(
                **reader, random_shuffle=True, shard_id=rank, num_shards=world, name="reader"
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
            ), labels.gpu()

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
        return _DALIBatches(iterator, len(self.train_set) // world // self.per_process_batch_size)
