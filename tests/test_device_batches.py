"""On-device batches of in-memory data: exactly and statistically the per-sample augmentation; shards, seeds."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency, chisquare
from torchvision.transforms import v2

from acnet_pl.data import CIFAR10DataModule, DigitsDataModule, FakeDataModule
from acnet_pl.data.fast import BatchCropFlip, DeviceBatches, batched_form
from acnet_pl.data.tensors import TensorImageDataset
from acnet_pl.training.module import ACNetModule


def cifar_module(tmp_path, n: int = 64, **kwargs) -> CIFAR10DataModule:
    """A CIFAR-10 module whose training set is `n` random uint8 images (no files needed)."""
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=16, num_workers=0, **kwargs)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    dm.build_train_dataset = lambda: TensorImageDataset(images, torch.arange(n) % 10, dm.train_transform)
    dm.build_val_dataset = lambda: TensorImageDataset(images[:16], torch.arange(16) % 10, dm.val_transform)
    return dm


def test_batched_equals_per_sample_transforms_for_the_same_draws(tmp_path):
    # torchvision's per-sample order of draws: top, left (RandomCrop), then flip (RandomHorizontalFlip).
    dm = cifar_module(tmp_path, device_batches=True)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert (
        isinstance(loader, DeviceBatches) and repr(loader.augment) == "BatchCropFlip(padding=4, flip_p=0.5)"
    )
    images = dm.train_set.images[:24]
    for seed in range(3):
        torch.manual_seed(seed)
        expected = torch.stack([dm.train_transform(image) for image in images])
        torch.manual_seed(seed)
        draws = [(torch.randint(0, 9, ()), torch.randint(0, 9, ()), torch.rand(1) < 0.5) for _ in images]
        top, left, flip = (torch.stack([d[k].reshape(()) for d in draws]) for k in range(3))
        assert flip.any() and not flip.all()
        batched = loader.normalise(loader.augment.apply(images, top, left, flip))
        assert torch.equal(batched, expected)  # exact: the same pixels, the same float maths


def _recover(out: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top, left, flip) of crops of the coordinate image below, read off the centre pixels."""
    rows = out[:, 0, 16, 16].long() - 1  # original row of output row 16 = top - 4 + 16
    cols = out[:, 1, 16, 16].long() - 1
    flip = out[:, 1, 16, 17].long() - 1 < cols
    top = rows - 12
    left = torch.where(flip, cols - 11, cols - 12)
    return top.numpy(), left.numpy(), flip.numpy()


@pytest.mark.slow
def test_batched_and_per_sample_draw_the_same_distribution():
    n = 3000
    coords = torch.zeros(3, 32, 32, dtype=torch.uint8)
    coords[0] = torch.arange(1, 33, dtype=torch.uint8)[:, None]
    coords[1] = torch.arange(1, 33, dtype=torch.uint8)[None, :]
    per_sample = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])
    torch.manual_seed(0)
    reference = torch.stack([per_sample(coords) for _ in range(n)])
    batched = batched_form(per_sample.transforms, 32)
    ours = batched(coords.expand(n, -1, -1, -1), torch.Generator().manual_seed(1))
    for a, b, cells in zip(_recover(reference), _recover(ours), (9, 9, 2), strict=True):
        counts = np.stack(
            [np.bincount(a.astype(int), minlength=cells), np.bincount(b.astype(int), minlength=cells)]
        )
        assert counts.shape == (2, cells) and counts.sum() == 2 * n  # every offset in [0, 8]
        assert chi2_contingency(counts).pvalue > 1e-3  # the two paths: same distribution
        assert chisquare(counts[1]).pvalue > 1e-3  # and uniform
    # Every one of the 81 offsets (and both flips) occurs.
    top, left, flip = _recover(ours)
    assert len(set(zip(top.tolist(), left.tolist(), flip.tolist(), strict=True))) == 162


def test_batched_form_only_for_crop_and_flip():
    assert batched_form([v2.RandomCrop(32, padding=4)], 32).flip_p == 0.0
    assert batched_form([v2.RandomHorizontalFlip(0.3)], 32).padding == 0
    assert batched_form([v2.RandomCrop(32, padding=4, padding_mode="reflect")], 32) is None
    assert batched_form([v2.RandomCrop(32, padding=4, fill=128)], 32) is None
    assert batched_form([v2.RandomCrop(28)], 32) is None
    assert batched_form([v2.RandAugment()], 32) is None


def test_shards_seeds_and_resume():
    n, batch = 50, 4
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 1, 8, 8).contiguous()
    labels = torch.arange(n)

    def epoch(rank: int, e: int, seed: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = DeviceBatches(
            images, labels, batch, BatchCropFlip(2, 0.5), num_replicas=2, rank=rank, seed=seed
        )
        loader.sampler.set_epoch(e)
        return list(loader)

    ranks = [epoch(0, 3), epoch(1, 3)]
    assert len(ranks[0]) == len(ranks[1]) == 25 // batch  # DistributedSampler: 25 per rank, partial dropped
    seen = [torch.cat([y for _, y in r]) for r in ranks]
    assert not set(seen[0].tolist()) & set(seen[1].tolist())  # disjoint shards
    for x, y in ranks[0]:  # labels travel with their images (pixels are the index, scaled to [0, 1])
        assert x.shape == (batch, 1, 8, 8) and x.dtype == torch.float32
        assert torch.allclose(x.amax(dim=(1, 2, 3)) * 255, y.float(), atol=1e-4)
    again = epoch(0, 3)  # a fresh loader (a resumed run) replays the epoch exactly
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again, ranks[0], strict=True)
    )
    other = torch.cat([y for _, y in epoch(0, 4)])
    assert not torch.equal(other, seen[0])  # a new order every epoch
    assert not torch.equal(torch.cat([y for _, y in epoch(0, 3, seed=8)]), seen[0])


@pytest.mark.slow
def test_device_batches_modes(tmp_path):
    # auto: on a CUDA device, or where the per-sample transforms would run in the training process
    dm = DigitsDataModule(image_size=16, batch_size=32, num_workers=2)
    dm.setup("fit")
    assert not dm.uses_device_batches()  # CPU with loader workers: per sample, in the workers
    assert DigitsDataModule(image_size=16, batch_size=32, num_workers=0).uses_device_batches()
    assert not DigitsDataModule(image_size=16, num_workers=0, device_batches=False).uses_device_batches()
    assert not DigitsDataModule(image_size=16, num_workers=0, random_erasing=0.1).uses_device_batches()
    dm.trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cuda")), world_size=1, global_rank=0
    )
    assert dm.uses_device_batches()
    dm = DigitsDataModule(image_size=16, batch_size=32, num_workers=0, device_batches=True)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 16, 16) and x.min() >= -1.0 and x.max() <= 1.0 and y.dtype == torch.long
    assert repr(dm.batched_augment()) == "BatchCropFlip(padding=2, flip_p=0.0)"  # digits: no flip
    # Refused when the data module is built (before train() starts a logger or writes a file)
    with pytest.raises(
        ValueError, match=r"device_batches=true but .*RandAugment.*set data.device_batches=auto"
    ):
        cifar_module(tmp_path, device_batches=True, augment="randaugment")
    with pytest.raises(ValueError, match=r"\(random erasing\)"):
        cifar_module(tmp_path, device_batches=True, random_erasing=0.1)
    with pytest.raises(ValueError, match=r"data.device_batches must be true, false or auto"):
        FakeDataModule(device_batches="yes")


@pytest.mark.slow
def test_lightning_sets_the_epoch_of_device_batches(tmp_path):
    # Lightning calls `loader.sampler.set_epoch(epoch)` on any iterable: this pins that behaviour.
    dm = FakeDataModule(
        num_classes=4,
        image_size=16,
        train_size=32,
        val_size=16,
        batch_size=8,
        num_workers=0,
        device_batches=True,
    )
    seen = []
    original = DeviceBatches.__iter__

    def spy(self):
        seen.append((self.sampler.epoch, self.augment))
        return original(self)

    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=1,
    )
    DeviceBatches.__iter__ = spy
    try:
        trainer.fit(ACNetModule(model={"name": "cifar_quick", "num_classes": 4}), datamodule=dm)
    finally:
        DeviceBatches.__iter__ = original
    # (Lightning may start an iterator once more at the first epoch; each epoch's order is its own.)
    assert sorted(set(seen)) == [(0, None), (1, None)] and seen[-1] == (1, None)  # fake data: no augmentation
    assert trainer.global_step == 8


def test_device_normalise_equals_torchvision_with_stats_made_once() -> None:
    """DeviceNormalise: torchvision's to_dtype + normalize exactly, mean/std tensors built once per device."""
    from acnet_pl.data.base import DeviceNormalise

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    normalise = DeviceNormalise(mean, std)
    expected = v2.functional.normalize(v2.functional.to_dtype(images, torch.float32, scale=True), mean, std)
    assert torch.equal(normalise(images), expected)
    stats = normalise._stats
    assert torch.equal(normalise(images), expected) and normalise._stats is stats
