"""The datamodules: shapes, normalisation, global-batch split, trees, list files, CIFAR format, errors."""

from __future__ import annotations

import pickle
import re
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import RandomSampler, SequentialSampler

from acnet_pl.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    ClassificationDataModule,
    DigitsDataModule,
    FakeDataModule,
    ImageFolderDataModule,
    ImageNetDataModule,
)

IMAGENET_LOW = min((0 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True))
IMAGENET_HIGH = max((1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True))


def first_batch(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(loader))


# -- global batch split and loader settings --------------------------------------------------------------
def test_global_batch_is_split_over_processes():
    dm = FakeDataModule(batch_size=8, val_batch_size=4, num_workers=0)
    dm.trainer = SimpleNamespace(world_size=2)
    dm.setup("fit")
    assert (dm.per_process_batch_size, dm.per_process_val_batch_size) == (4, 2)
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)
    assert first_batch(dm.val_dataloader())[0].shape == (2, 3, 32, 32)


def test_batch_that_does_not_divide_raises():
    dm = FakeDataModule(batch_size=130, num_workers=0)
    dm.trainer = SimpleNamespace(world_size=8)
    message = (
        "data.batch_size=130 does not divide by the 8 processes (trainer.devices x num_nodes); "
        "choose a multiple of 8"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        dm.setup("fit")
    dm = FakeDataModule(batch_size=16, val_batch_size=12, num_workers=0)
    dm.trainer = SimpleNamespace(world_size=8)
    with pytest.raises(ValueError, match=r"data\.val_batch_size=12 does not divide by the 8 processes"):
        dm.setup("fit")


def test_bad_batch_sizes_raise():
    with pytest.raises(ValueError, match="data.batch_size must be a positive integer"):
        FakeDataModule(batch_size=0)
    dm = FakeDataModule(batch_size=512, train_size=256, num_workers=0)
    with pytest.raises(ValueError, match=r"larger than the training set \(256 samples over 1 processes\)"):
        dm.setup("fit")


def test_loader_settings_are_cpu_safe():
    # the per-sample loader (device_batches=auto would batch on the device without workers)
    dm = FakeDataModule(
        batch_size=8, num_workers=0, pin_memory=True, persistent_workers=True, device_batches=False
    )
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert isinstance(train.sampler, RandomSampler) and train.drop_last
    assert isinstance(val.sampler, SequentialSampler) and not val.drop_last
    assert train.pin_memory == torch.cuda.is_available()
    assert not train.persistent_workers  # not allowed with num_workers=0
    assert len(train) == 256 // 8 and len(val) == 64 // 8
    workers = FakeDataModule(batch_size=8, num_workers=2).train_dataloader()  # built, never iterated
    assert workers.persistent_workers and workers.num_workers == 2
    assert isinstance(dm.test_dataloader().sampler, SequentialSampler)
    assert len(dm.test_dataloader().dataset) == 64


# -- fake data ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fake_is_deterministic_and_learnable():
    a, b, c = (FakeDataModule(seed=s, num_workers=0) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup("fit")
    assert torch.equal(a.train_set.images, b.train_set.images)
    assert torch.equal(a.val_set.labels, b.val_set.labels)
    assert not torch.allclose(a.train_set.images, c.train_set.images)
    assert a.train_set.images.shape == (256, 3, 32, 32) and a.train_set.images.dtype == torch.float32
    assert torch.bincount(a.train_set.labels, minlength=10).tolist() == [26] * 6 + [25] * 4
    assert (a.num_classes, a.input_size, a.class_names) == (10, (3, 32, 32), None)
    # Nearest class mean (means from train, scored on val) must be far above chance (10%).
    train, val = a.train_set, a.val_set
    means = torch.stack([train.images[train.labels == k].mean(0) for k in range(10)]).flatten(1)
    predicted = torch.cdist(val.images.flatten(1), means).argmin(1)
    assert (predicted == val.labels).float().mean().item() >= 0.9
    # Roughly normalised already (mean/std are the identity).
    assert abs(train.images.mean().item()) < 0.3 and 0.8 < train.images.std().item() < 1.6


def test_fake_options():
    dm = FakeDataModule(num_classes=3, image_size=16, train_size=12, val_size=6, batch_size=4, num_workers=0)
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (4, 3, 16, 16) and int(y.max()) < 3 and dm.input_size == (3, 16, 16)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        FakeDataModule(num_classes=1)


# -- digits ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_digits_split_shapes_and_range():
    dm = DigitsDataModule(batch_size=32, num_workers=0)
    assert (dm.num_classes, dm.input_size, dm.class_names[:3]) == (10, (3, 32, 32), ["0", "1", "2"])
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (1437, 360)  # 1797 with 20% (rounded up) held out
    train_counts = torch.bincount(dm.train_set.labels, minlength=10).float()
    val_counts = torch.bincount(dm.val_set.labels, minlength=10).float()
    share = val_counts / (train_counts + val_counts)
    assert torch.all((share - 0.2).abs() < 0.01)  # stratified, per class to +-1 sample in ~180
    raw = dm.train_set.images
    assert raw.shape == (1437, 3, 32, 32) and raw.min() >= 0.0 and raw.max() <= 1.0
    assert torch.equal(raw[:, 0], raw[:, 2])  # grey repeated on the 3 channels
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6
    xv, _ = first_batch(dm.val_dataloader())
    assert torch.allclose(xv, (dm.val_set.images[:32] - 0.5) / 0.5)  # val: normalisation only
    again = DigitsDataModule(batch_size=32, image_size=16, num_workers=0)
    again.setup("validate")
    assert torch.equal(again.val_set.labels, dm.val_set.labels)  # same seed, same split
    assert again.val_set.images.shape[-2:] == (16, 16)


# -- image trees ---------------------------------------------------------------------------------------------
def write_tree(root: Path, classes: dict[str, int], split: str, suffix: str = ".png") -> None:
    rng = np.random.default_rng(len(classes) + len(split))
    for name, count in classes.items():
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(30 + 3 * i, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}{suffix}")


def test_imagefolder_reads_classes_and_yields_normalised_batches(tmp_path):
    write_tree(tmp_path, {"cat": 2, "dog": 2, "fish": 2}, "train")
    write_tree(tmp_path, {"cat": 1, "dog": 1, "fish": 1}, "val")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=24, batch_size=3, num_workers=0)
    assert (dm.class_names, dm.num_classes, dm.input_size) == (["cat", "dog", "fish"], 3, (3, 24, 24))
    assert dm.mean == (0.485, 0.456, 0.406) and dm.std == (0.229, 0.224, 0.225)
    x, y = first_batch(dm.train_dataloader())
    # decoder=torchvision: uint8 from the workers, normalised after the transfer to the device
    assert x.shape == (3, 3, 24, 24) and x.dtype == torch.uint8 and set(y.tolist()) <= {0, 1, 2}
    xn = dm.on_after_batch_transfer([x, y], 0)[0]
    assert xn.dtype == torch.float32 and torch.allclose(xn[:, 0] * 0.229 + 0.485, x[:, 0] / 255, atol=1e-6)
    pil = ImageFolderDataModule(root=str(tmp_path), image_size=24, batch_size=3, num_workers=0, decoder="pil")
    assert first_batch(pil.train_dataloader())[0].dtype == torch.float32
    xv, yv = first_batch(dm.val_dataloader())
    assert xv.shape == (3, 3, 24, 24) and yv.tolist() == [0, 1, 2]
    assert xv.min() >= IMAGENET_LOW - 1e-5 and xv.max() <= IMAGENET_HIGH + 1e-5
    assert xv.min() < -1.0 and xv.max() > 1.5  # really normalised (random pixels span [0, 255])


def test_imagefolder_errors(tmp_path):
    missing = ImageFolderDataModule(root=str(tmp_path / "nowhere"), batch_size=2)  # lazy: no error yet
    with pytest.raises(FileNotFoundError, match=re.escape(str((tmp_path / "nowhere").resolve()))):
        _ = missing.num_classes
    write_tree(tmp_path, {"a": 1, "b": 1}, "train")
    with pytest.raises(FileNotFoundError, match=r"no 'val/' folder under"):
        ImageFolderDataModule(root=str(tmp_path), batch_size=2, num_workers=0).setup("fit")
    write_tree(tmp_path, {"a": 1, "c": 1}, "val")
    with pytest.raises(ValueError, match=r"missing in val: \['b'\], only in val: \['c'\]"):
        ImageFolderDataModule(root=str(tmp_path), batch_size=2, num_workers=0).setup("fit")


def test_imagenet_folder_mode_and_missing_root(tmp_path):
    write_tree(tmp_path, {"n01": 2, "n02": 2}, "train", ".JPEG")
    write_tree(tmp_path, {"n01": 1, "n02": 1}, "val", ".JPEG")
    dm = ImageNetDataModule(root=str(tmp_path), image_size=16, batch_size=2, num_workers=0)
    assert (dm.class_names, dm.num_classes) == (["n01", "n02"], 2)
    assert first_batch(dm.val_dataloader())[0].shape == (2, 3, 16, 16)
    assert isinstance(dm, ImageFolderDataModule) and isinstance(dm, ClassificationDataModule)

    where = tmp_path / "imagenet_data"
    dm = ImageNetDataModule(root=str(where), batch_size=2)
    expected = (
        f"ImageNet not found at '{where.resolve()}': link it with `ln -s /path/to/imagenet imagenet_data` "
        f"(folders train/ and val/), set data.root=..., or try experiment=quickstart"
    )
    with pytest.raises(FileNotFoundError) as info:
        _ = dm.class_names
    assert str(info.value) == expected and "\n" not in str(info.value)


def test_imagenet_list_files(tmp_path):
    write_tree(tmp_path, {"n01": 2, "n02": 1, "n03": 1}, "train", ".JPEG")
    write_tree(tmp_path, {"n01": 1, "n02": 1, "n03": 1}, "val", ".JPEG")
    # The lists use their own labels, not the folder order, and may skip files.
    (tmp_path / "train_list.txt").write_text("train/n01/0.JPEG 2\ntrain/n02/0.JPEG 0\n\ntrain/n03/0.JPEG 1\n")
    (tmp_path / "val_list.txt").write_text("val/n03/0.JPEG 1\nval/n01/0.JPEG 2\n")
    dm = ImageNetDataModule(root=str(tmp_path), image_size=16, batch_size=3, num_workers=0)
    assert dm.uses_list_files and dm.num_classes == 3 and dm.class_names == ["n01", "n02", "n03"]
    dm.setup("fit")
    assert len(dm.train_set) == 3 and len(dm.val_set) == 2
    x, y = first_batch(dm.val_dataloader())
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [1, 2]

    # Labels beyond the folders: num_classes from the labels, names unknown.
    (tmp_path / "val_list.txt").write_text("val/n03/0.JPEG 4\n")
    dm = ImageNetDataModule(root=str(tmp_path), batch_size=3)
    assert (dm.num_classes, dm.class_names) == (5, None)

    (tmp_path / "val_list.txt").write_text("val/n03/0.JPEG 1\nval/n01/0.JPEG two\n")
    with pytest.raises(ValueError, match=r"val_list\.txt:2: expected 'relative/path label'"):
        _ = ImageNetDataModule(root=str(tmp_path), batch_size=3).num_classes
    (tmp_path / "val_list.txt").unlink()
    with pytest.raises(FileNotFoundError, match="val_list.txt' is missing but the other list file exists"):
        ImageNetDataModule(root=str(tmp_path), batch_size=3, num_workers=0).setup("fit")


# -- CIFAR -------------------------------------------------------------------------------------------------
def write_cifar10(root: Path, per_batch: int = 4, test_size: int = 6) -> np.ndarray:
    """A tiny cifar-10-batches-py in torchvision's pickle format; returns the test images (N, 3072)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def dump(name: str, n: int) -> np.ndarray:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        entry = {"batch_label": name, "labels": [i % 10 for i in range(n)], "data": data,
                 "filenames": [f"{i}.png" for i in range(n)]}  # fmt: skip
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        return data

    for i in range(1, 6):
        dump(f"data_batch_{i}", per_batch)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["x"] * 10, "num_cases_per_batch": per_batch}, f)
    return dump("test_batch", test_size)


def test_cifar10_loads_torchvision_format(tmp_path):
    test_data = write_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), download=False, batch_size=4, val_batch_size=6, num_workers=0)
    assert (dm.num_classes, dm.input_size, dm.mean, dm.std) == (10, (3, 32, 32), (0.5,) * 3, (0.5,) * 3)
    assert dm.class_names[0] == "airplane" and len(dm.class_names) == 10
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (20, 6)
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1.0 and x.max() <= 1.0
    xv, yv = first_batch(dm.val_dataloader())
    expected = (torch.from_numpy(test_data).float().view(-1, 3, 32, 32) / 255 - 0.5) / 0.5
    assert torch.allclose(xv, expected, atol=1e-6) and yv.tolist() == [0, 1, 2, 3, 4, 5]
    # Augmentation: a padded random crop shows a border of padding (-1 after normalisation) in most draws.
    draws = [dm.train_set[0][0] for _ in range(12)]
    padded = [bool((d[:, 0] == -1).all() or (d[:, -1] == -1).all() or (d[:, :, 0] == -1).all()
                   or (d[:, :, -1] == -1).all()) for d in draws]  # fmt: skip
    assert sum(padded) >= 6


def test_cifar_missing_gives_one_line_fix(tmp_path, monkeypatch):
    dm = CIFAR10DataModule(root=str(tmp_path / "data"), download=False, batch_size=4)
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "\n" not in message
    assert str((tmp_path / "data" / "cifar-10-batches-py").resolve()) in message
    assert "put the extracted 'cifar-10-batches-py' folder under" in message and "data.root=" in message
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found"):
        dm.setup("fit")  # setup without prepare_data says the same

    class Offline:
        def __init__(self, *args, **kwargs):
            raise urllib.error.URLError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(CIFAR100DataModule, "torchvision_class", Offline)
    dm = CIFAR100DataModule(root=str(tmp_path / "c100"), batch_size=4)
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "\n" not in message and "download failed: URLError" in message and "cifar-100-python" in message


def test_cifar100_format_and_names(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 8), ("test", 4)):
        entry = {"data": np.zeros((n, 3072), dtype=np.uint8), "fine_labels": list(range(90, 90 + n)),
                 "coarse_labels": [0] * n}  # fmt: skip
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    dm = CIFAR100DataModule(root=str(tmp_path), download=False, batch_size=4, num_workers=0)
    names = dm.class_names
    assert dm.num_classes == 100 and len(set(names)) == 100 and names == sorted(names)
    assert names[0] == "apple" and names[-1] == "worm"
    x, y = first_batch(dm.val_dataloader())
    assert torch.allclose(x, torch.full_like(x, -1.0)) and y.tolist() == [90, 91, 92, 93]
