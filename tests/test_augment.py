"""Augmentation as config: presets equal the original transforms, every preset runs, lists, MixUp/CutMix."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict
from PIL import Image
from torchvision.transforms import v2

from acnet_pl.cli.train import train
from acnet_pl.data import CIFAR10DataModule, DigitsDataModule, FakeDataModule, ImageFolderDataModule
from acnet_pl.data.augment import PRESETS
from acnet_pl.training.module import ACNetModule
from tests.conftest import CONF_DIR

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def write_tree(root: Path, per_class: int = 2) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(30 + 4 * i, 36, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg")


def same_under_seeds(a: v2.Transform, b: v2.Transform, inputs: list, seeds: range) -> None:
    for seed in seeds:
        for x in inputs:
            torch.manual_seed(seed)
            expected = a(x)
            torch.manual_seed(seed)
            assert torch.equal(b(x), expected)


def test_cifar_and_digits_presets_equal_the_original_transforms(tmp_path):
    original_cifar = v2.Compose(
        [
            v2.RandomCrop(32, padding=4),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.5] * 3),
            v2.ToPureTensor(),
        ]
    )
    images = list(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    dm = CIFAR10DataModule(root=str(tmp_path), download=False)  # augment=None: the own preset, cifar
    same_under_seeds(original_cifar, dm.train_transform, images, range(8))
    same_under_seeds(
        original_cifar,
        CIFAR10DataModule(root=str(tmp_path), augment="cifar").train_transform,
        images,
        range(2),
    )
    original_digits = v2.Compose(
        [v2.RandomCrop(24, padding=3), v2.Normalize([0.5] * 3, [0.5] * 3), v2.ToPureTensor()]
    )
    floats = list(torch.rand(3, 3, 24, 24))
    same_under_seeds(original_digits, DigitsDataModule(image_size=24).train_transform, floats, range(8))


def test_imagenet_preset_equals_the_original_transform(tmp_path):
    original = v2.Compose(
        [
            v2.RandomResizedCrop(24, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
            v2.ToPureTensor(),
        ]
    )
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (40, 30 + i, 3), dtype=np.uint8)) for i in range(3)]
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=24, augment="imagenet", decoder="pil")
    same_under_seeds(original, dm.train_transform, images, range(6))
    # decoder=torchvision: the same ops on uint8 tensors, the float tail on the device.
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=24, augment="imagenet")
    tensors = [v2.functional.pil_to_tensor(image) for image in images]
    on_device = v2.Compose(
        [dm.train_transform, lambda x: dm.on_after_batch_transfer([x[None], None], 0)[0][0]]
    )
    same_under_seeds(
        v2.Compose([*original.transforms[:2], *original.transforms[3:]]), on_device, tensors, range(6)
    )


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_on_an_image_tree_and_on_tensors(tmp_path, preset):
    write_tree(tmp_path)
    dm = ImageFolderDataModule(
        root=str(tmp_path), image_size=20, batch_size=4, num_workers=0, augment=preset, random_erasing=0.5
    )
    x, y = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert x.shape == (4, 3, 20, 20) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert type(x) is torch.Tensor and sorted(y.tolist()) == [0, 0, 1, 1]
    # The same preset on CIFAR-like uint8 tensors (CIFAR's own preset is the base of the policies).
    cifar = CIFAR10DataModule(root=str(tmp_path), augment=preset, random_erasing=0.5)
    out = cifar.train_transform(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and -1.0 <= out.min() <= out.max() <= 1.0


def test_augment_lists_from_the_command_line_and_errors(tmp_path):
    extra = "{_target_:torchvision.transforms.v2.ColorJitter,brightness:0.4}"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["data=imagefolder", f"data.root={tmp_path}", f"data.augment=[imagenet,{extra}]"],
        )
    dm = instantiate(cfg.data)
    kinds = [type(t) for t in dm.train_transform.transforms]
    assert kinds[:3] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ColorJitter]
    assert dm.train_transform.transforms[2].brightness == (0.6, 1.4)
    with pytest.raises(ValueError, match=r"data.augment=autoaug: no such preset; choose one of none, crop"):
        CIFAR10DataModule(root=str(tmp_path), augment="autoaug")
    with pytest.raises(ValueError, match=r"cannot build torchvision.transforms.v2.Nope .*check the name"):
        CIFAR10DataModule(root=str(tmp_path), augment=[{"_target_": "torchvision.transforms.v2.Nope"}])
    with pytest.raises(ValueError, match=r"data.random_erasing must be a probability in \[0, 1\], got 2"):
        CIFAR10DataModule(root=str(tmp_path), random_erasing=2)
    with pytest.raises(ValueError, match=r"data.mixup_alpha must be a number >= 0"):
        CIFAR10DataModule(root=str(tmp_path), mixup_alpha=-1)


def test_random_erasing_erases_after_normalisation(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path), augment="none", random_erasing=1.0)
    image = torch.full((3, 32, 32), 255, dtype=torch.uint8)  # 1.0 after normalisation
    out = dm.train_transform(image)
    erased = (out == 0).float().mean().item()
    assert 0.02 <= erased <= 0.34 and set(out.unique().tolist()) == {0.0, 1.0}  # scale (0.02, 0.33)


@pytest.mark.parametrize("alphas", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)], ids=["mixup", "cutmix", "both"])
def test_mixup_cutmix_give_soft_targets_on_training_batches_only(alphas):
    dm = FakeDataModule(
        num_classes=5, batch_size=8, num_workers=0, mixup_alpha=alphas[0], cutmix_alpha=alphas[1]
    )
    dm.trainer = SimpleNamespace(training=False, world_size=1)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert dm.on_after_batch_transfer([x, y], 0)[1] is y  # validation: untouched
    dm.trainer.training = True
    # Lightning's model summary (and to_onnx, TensorBoard's graph) pass the module's example input, a
    # bare tensor, through the batch hooks while training: a forward input, not a batch to mix.
    example = torch.zeros(1, 3, 32, 32)
    assert dm.on_after_batch_transfer(example, 0) is example
    torch.manual_seed(0)
    mixed_x, soft = dm.on_after_batch_transfer([x, y], 0)
    assert soft.shape == (8, 5) and torch.allclose(soft.sum(1), torch.ones(8), atol=1e-6)
    assert (soft.max(1).values < 1).any() and not torch.equal(mixed_x, x)


def test_mixup_draws_each_ranks_own_stream(monkeypatch):
    """MixUp/CutMix in the main process: other mixes on every rank, the same for a seed and rank; the
    global generator (seeded alike on every rank) is left as it was."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 4

    def mixed(rank: int) -> torch.Tensor:
        dm = FakeDataModule(num_classes=4, image_size=16, batch_size=8, num_workers=0, mixup_alpha=1.0)
        dm.trainer = SimpleNamespace(training=True, world_size=2, global_rank=rank, current_epoch=0)
        before = torch.get_rng_state()
        out = dm.on_after_batch_transfer([x, y], 0)[0]
        assert torch.equal(torch.get_rng_state(), before)
        return out

    assert torch.equal(mixed(0), mixed(0)) and not torch.equal(mixed(0), mixed(1))


@pytest.mark.slow
def test_module_loss_takes_soft_targets_and_metrics_their_argmax():
    module = ACNetModule(model={"name": "cifar_quick", "num_classes": 4}).eval()
    module.log = lambda *args, **kwargs: None  # no trainer attached
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    hard = module._step([x, y], "val")
    top1_hard = module.val_top1.compute()
    module.val_top1.reset()
    soft = module._step([x, torch.nn.functional.one_hot(y, 4).float()], "val")
    assert torch.allclose(hard, soft, rtol=1e-6, atol=0)
    assert module.val_top1.compute() == top1_hard  # metrics count the argmax of soft targets
    # A 70/30 mix: cross-entropy is the same mix of the two hard losses (linear in the target).
    mix = (
        0.7 * torch.nn.functional.one_hot(y, 4).float()
        + 0.3 * torch.nn.functional.one_hot(y.flip(0), 4).float()
    )
    expected = 0.7 * module._step([x, y], "val") + 0.3 * module._step([x, y.flip(0)], "val")
    assert torch.allclose(module._step([x, mix], "val"), expected, rtol=1e-6, atol=0)


@pytest.mark.slow
def test_fit_with_mixup_and_cutmix_and_the_default_callbacks(tmp_path, wandb_free_env):
    """train(cfg) with MixUp and CutMix and every default callback (the model summary's example input
    passes through the batch hook at fit start while `trainer.training` is true)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "data=fake",
                "data.image_size=16",
                "data.train_size=32",
                "data.val_size=16",
                "data.batch_size=16",
                "data.num_classes=4",
                "model=cifar_quick",
                "logger=none",
                "trainer.accelerator=cpu",
                "trainer.max_epochs=1",
                "data.mixup_alpha=0.2",
                "data.cutmix_alpha=1.0",
            ],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    assert "model_summary" in cfg.callbacks and cfg.trainer.get("enable_model_summary") is not False
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and 0.0 <= metrics["train/acc_top1"] <= 1.0
    assert metrics["deploy/max_abs_logit_diff"] < 1e-3
    assert (tmp_path / "run" / "deploy" / "deploy.pt").is_file()
