"""Bad image files: one line naming the file (also from a worker and from train.py), skipping, 16-bit, bombs."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from acnet_pl.data import ImageFolderDataModule
from acnet_pl.data.images import (
    BadImageError,
    PILImageLoader,
    SkipBadImages,
    TensorImageLoader,
    decode_rgb_tensor,
    open_rgb,
)
from tests.conftest import TINY_RUN, run_train

BAD_KINDS = ("truncated", "empty", "not_an_image", "broken_link")


def write_image(path: Path, seed: int, size: tuple[int, int] = (20, 24)) -> None:
    """A random RGB JPEG of `size` (height, width)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


def write_bad(path: Path, kind: str) -> None:
    """A file named like an image that is not a usable one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "truncated":
        write_image(path, 99)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not_an_image":
        path.write_text("label,value\ncat,1\n")
    elif kind == "broken_link":
        os.symlink(path.parent / "does_not_exist.jpg", path)
    else:
        raise AssertionError(kind)


def write_tree_with_bad(root: Path, bad: dict[str, str]) -> None:
    """train/ and val/ with classes a and b, 3 good JPEGs each (0.jpg, 2.jpg, 4.jpg); `bad` adds files.

    `bad` maps 'split/class/name' to a kind of BAD_KINDS; odd names keep bad files between good ones.
    """
    for split in ("train", "val"):
        for c, name in enumerate(("a", "b")):
            for i in (0, 2, 4):
                write_image(root / split / name / f"{i}.jpg", seed=10 * c + i)
    for relative, kind in bad.items():
        write_bad(root / relative, kind)


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("loader", [PILImageLoader(), TensorImageLoader()], ids=["pil", "tensor"])
def test_bad_file_error_is_one_line_naming_it(tmp_path, kind, loader):
    path = tmp_path / f"{kind}.jpg"
    write_bad(path, kind)
    with pytest.raises(BadImageError) as caught:
        loader(str(path))
    message = str(caught.value)
    assert "\n" not in message and f"'{path}'" in message
    assert "data.skip_bad_images=true" in message
    expected = {
        "truncated": "truncated or corrupt",
        "empty": "empty file (0 bytes)",
        "not_an_image": "not an image format",
        "broken_link": "broken symbolic link",
    }[kind]
    assert expected in message


def test_worker_error_reaches_the_main_process_as_one_line(tmp_path):
    # DataLoader re-creates a worker's exception from its traceback text; BadImageError keeps one line.
    write_tree_with_bad(tmp_path, {"val/a/1.jpg": "truncated"})
    dm = ImageFolderDataModule(
        root=str(tmp_path), image_size=16, batch_size=2, num_workers=1, persistent_workers=False
    )
    dm.setup("validate")
    with pytest.raises(BadImageError) as caught:
        list(dm.val_dataloader())
    message = str(caught.value)
    assert message.startswith(f"cannot read image '{tmp_path / 'val' / 'a' / '1.jpg'}': truncated")
    assert "\n" not in message and "Traceback" not in message


@pytest.mark.slow
def test_skip_bad_images_skips_and_counts(tmp_path, caplog):
    bad = {"val/a/1.jpg": "truncated", "val/a/3.jpg": "empty", "val/b/1.jpg": "broken_link"}
    write_tree_with_bad(tmp_path, bad)
    dm = ImageFolderDataModule(
        root=str(tmp_path), image_size=16, batch_size=3, num_workers=0, skip_bad_images=True
    )
    dm.setup("validate")
    assert isinstance(dm.val_set, SkipBadImages) and len(dm.val_set) == 9
    with caplog.at_level(logging.WARNING, logger="acnet_pl.data.images"):
        batches = list(dm.val_dataloader())
    # Every bad index is replaced by the next (good) file: 9 samples, the good ones of each class.
    labels = torch.cat([y for _, y in batches]).tolist()
    assert len(labels) == 9 and labels.count(0) == 5 and labels.count(1) == 4
    assert dm.val_set.skipped == 3
    skipped = [r.getMessage() for r in caplog.records if "skipped a bad image" in r.getMessage()]
    assert len(skipped) == 3 and "(3 so far" in skipped[-1]
    assert all(str(tmp_path / relative) in " ".join(skipped) for relative in bad)
    # The count is shared with worker processes.
    dm = ImageFolderDataModule(
        root=str(tmp_path), image_size=16, batch_size=3, num_workers=2, skip_bad_images=True
    )
    dm.setup("validate")
    assert sum(len(y) for _, y in dm.val_dataloader()) == 9
    assert dm.val_set.skipped == 3


@pytest.mark.parametrize("read", [open_rgb, decode_rgb_tensor], ids=["pil", "tensor"])
def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path, read):
    values = np.array([[0, 257 * 37, 257 * 200 + 100, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    image = read(str(tmp_path / "deep.png"))
    array = np.asarray(image) if isinstance(image, Image.Image) else image.permute(1, 2, 0).numpy()
    assert array.shape == (1, 4, 3) and array.dtype == np.uint8
    assert array[0, :, 0].tolist() == [0, 37, 200, 255]  # clipping would give [0, 255, 255, 255]
    assert (array[..., 0] == array[..., 2]).all()


@pytest.mark.parametrize("loader_class", [PILImageLoader, TensorImageLoader], ids=["pil", "tensor"])
def test_decompression_bomb_limit_is_configurable(tmp_path, loader_class):
    write_image(tmp_path / "big.jpg", 0, size=(40, 50))  # 2000 pixels
    with pytest.raises(BadImageError, match=r"50x40 = 2000 pixels, more than data.max_image_pixels=1999"):
        loader_class(max_pixels=1999)(str(tmp_path / "big.jpg"))
    assert np.asarray(loader_class(max_pixels=2000)(str(tmp_path / "big.jpg"))).size == 6000
    assert np.asarray(loader_class(max_pixels=None)(str(tmp_path / "big.jpg"))).size == 6000
    # PIL's global limit is left as it was.
    assert Image.MAX_IMAGE_PIXELS == 89_478_485
    with pytest.raises(ValueError, match=r"data.max_image_pixels must be a positive integer or null"):
        loader_class(max_pixels=0)


@pytest.mark.slow
def test_train_py_names_the_bad_file_in_one_line(tmp_path):
    write_tree_with_bad(tmp_path / "tree", {"train/b/1.jpg": "truncated"})
    overrides = [o for o in TINY_RUN if not o.startswith("data")] + [
        "data=imagefolder",
        f"data.root={tmp_path / 'tree'}",
        "data.image_size=16",
        "data.batch_size=2",
        "data.num_workers=1",
        "logger=none",
    ]
    result = run_train([*overrides, "++trainer.limit_train_batches=4"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    bad = tmp_path / "tree" / "train" / "b" / "1.jpg"
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot read image '{bad}': truncated")


# -- decoders ----------------------------------------------------------------------------------------------
def test_libjpeg_turbo_and_pil_decode_the_same_pixels(tmp_path):
    write_image(tmp_path / "x.jpg", 3, size=(33, 47))
    ours = decode_rgb_tensor(str(tmp_path / "x.jpg")).permute(1, 2, 0).numpy().astype(int)
    pil = np.asarray(open_rgb(str(tmp_path / "x.jpg"))).astype(int)
    assert ours.shape == pil.shape == (33, 47, 3)
    assert np.abs(ours - pil).max() <= 2  # both libjpeg(-turbo); upsampling of chroma may differ by a level


def _device_batch(dm: ImageFolderDataModule, seed: int = 0) -> list:
    """The first training batch of `dm` as the training loop makes it: hooks before and after the transfer."""
    dm.setup("fit")
    torch.manual_seed(seed)  # the sampler's order (and the workers' crops) draw from the global generator
    batch = next(iter(dm.train_dataloader()))
    if dm.decoder == "device":
        assert isinstance(batch[0], list) and batch[0][0].ndim == 1  # bytes from the workers
        batch = dm.on_before_batch_transfer(batch, 0)
    return dm.on_after_batch_transfer(batch, 0)


def test_decoding_on_the_device_equals_decoding_in_workers(tmp_path):
    write_tree_with_bad(tmp_path, {})
    batches = {}
    for decoder in ("torchvision", "device"):
        dm = ImageFolderDataModule(
            root=str(tmp_path), image_size=16, batch_size=6, num_workers=0, decoder=decoder, augment="none"
        )
        batches[decoder] = _device_batch(dm)
    assert batches["device"][0].dtype == torch.float32 and batches["device"][0].shape == (6, 3, 16, 16)
    assert torch.equal(batches["device"][0], batches["torchvision"][0])
    assert torch.equal(batches["device"][1], batches["torchvision"][1])


def test_device_decoding_falls_back_to_the_cpu_for_what_the_device_rejects(tmp_path, monkeypatch):
    """A CMYK JPEG (nvJPEG decodes none; ImageNet's train set has ~22): the batch fails on the device, the
    good files are decoded there one by one, the CMYK one by the CPU decoder; the batch is what
    decoder=torchvision gives. The device here is the CPU with a decoder that refuses CMYK as nvJPEG does."""
    import io

    from acnet_pl.data import images
    from acnet_pl.data.fast import nvjpeg

    write_tree_with_bad(tmp_path, {})
    cmyk = np.random.default_rng(5).integers(0, 256, size=(22, 26, 4), dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "train" / "a" / "1.jpg", quality=90)
    real_decode_jpeg = images.decode_jpeg
    refused = []

    def nvjpeg_like(data, mode, device=None):
        if device is None:  # the CPU decoder (libjpeg-turbo)
            return real_decode_jpeg(data, mode=mode)
        for item in data if isinstance(data, list) else [data]:
            if Image.open(io.BytesIO(item.numpy().tobytes())).mode == "CMYK":
                refused.append(len(data) if isinstance(data, list) else 1)
                raise RuntimeError("nvjpegDecode failed: unsupported color space")
        return real_decode_jpeg(data, mode=mode, device=device)

    monkeypatch.setattr(images, "decode_jpeg", nvjpeg_like)
    monkeypatch.setattr(nvjpeg, "decode_jpeg", nvjpeg_like)  # the device decoder's module
    batches = {}
    for decoder in ("torchvision", "device"):
        dm = ImageFolderDataModule(
            root=str(tmp_path), image_size=16, batch_size=7, num_workers=0, decoder=decoder, augment="none"
        )
        batches[decoder] = _device_batch(dm)
    assert refused == [7, 1]  # the batched call, then that file alone; the other 6 decoded on the device
    assert torch.equal(batches["device"][0], batches["torchvision"][0])
    assert torch.equal(batches["device"][1], batches["torchvision"][1])
    # libjpeg-turbo's CMYK -> RGB is PIL's, to the level
    decoded = images.decode_jpeg_on_cpu(images._read_bytes(str(tmp_path / "train/a/1.jpg")), "x")
    pil = np.asarray(Image.open(tmp_path / "train/a/1.jpg").convert("RGB")).astype(int)
    assert np.abs(decoded.permute(1, 2, 0).numpy().astype(int) - pil).max() <= 1


def test_device_augmentation_draws_the_workers_crops_from_each_ranks_own_stream(tmp_path, monkeypatch):
    """decoder=device augments in the main process: each rank its own stream (different crops on every
    GPU, the same for a seed and rank, another per epoch), the crops the workers' transform draws from it,
    the global generator left as it was."""
    from types import SimpleNamespace

    from acnet_pl.data.base import RankStream

    write_tree_with_bad(tmp_path, {})
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    cpu = SimpleNamespace(root_device=torch.device("cpu"))

    def device_dm(rank: int, epoch: int = 0) -> ImageFolderDataModule:
        dm = ImageFolderDataModule(
            root=str(tmp_path), image_size=16, batch_size=6, num_workers=0, decoder="device"
        )
        dm.trainer = SimpleNamespace(
            global_rank=rank, current_epoch=epoch, world_size=1, strategy=cpu, training=True
        )
        return dm

    def crops(rank: int, epoch: int = 0) -> torch.Tensor:
        return _device_batch(device_dm(rank, epoch))[0]

    rank0 = crops(0)
    assert torch.equal(crops(0), rank0)  # same seed, rank and epoch: the same crops
    assert not torch.equal(crops(1), rank0)  # the sampler's order is the same: only the crops differ
    assert not torch.equal(crops(0, epoch=1), rank0)
    dm = device_dm(1)
    dm.setup("fit")
    torch.manual_seed(0)  # the order of crops(1)
    raw = next(iter(dm.train_dataloader()))
    before = torch.get_rng_state()
    dm.on_before_batch_transfer(raw, 0)
    assert torch.equal(torch.get_rng_state(), before)
    # The workers' transform (decoder=torchvision) on the same files, drawing from rank 1's stream,
    # gives rank 1's crops.
    workers = ImageFolderDataModule(root=str(tmp_path), image_size=16, batch_size=6, num_workers=0)
    workers.setup("fit")
    paths = [path for path, _ in workers.train_set.samples]
    with RankStream(1).drawing(0):
        expected = torch.stack([workers.train_set[paths.index(path)][0] for path in raw[2]])
    assert torch.equal(workers.on_after_batch_transfer([expected, raw[1]], 0)[0], crops(1))


def test_device_decoding_names_the_bad_file(tmp_path):
    write_tree_with_bad(tmp_path, {"train/a/1.jpg": "truncated"})
    dm = ImageFolderDataModule(
        root=str(tmp_path), image_size=16, batch_size=7, num_workers=0, decoder="device"
    )
    dm.setup("fit")
    with pytest.raises(
        BadImageError, match=r"cannot read image '.*/train/a/1.jpg': truncated or corrupt JPEG"
    ):
        dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    # skip_bad_images: what no decoder reads is left out of the batch (in the main process) and counted
    dm = ImageFolderDataModule(
        root=str(tmp_path), image_size=16, batch_size=7, num_workers=0, decoder="device", skip_bad_images=True
    )
    dm.setup("fit")
    raw = next(iter(dm.train_dataloader()))
    images, labels = dm.on_before_batch_transfer(raw, 0)
    kept = [
        label for label, path in zip(raw[1].tolist(), raw[2], strict=True) if not path.endswith("a/1.jpg")
    ]
    assert images.shape == (6, 3, 16, 16) and labels.tolist() == kept and dm.train_set.skipped == 1
    with pytest.raises(
        ValueError, match=r"data.decoder must be one of pil, torchvision, device, got 'nvjpeg'"
    ):
        ImageFolderDataModule(root=str(tmp_path), decoder="nvjpeg")


def test_auto_workers_are_cores_per_device(tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    dm = ImageFolderDataModule(root=str(tmp_path), num_workers="auto")
    dm.trainer = SimpleNamespace(num_devices=8)
    assert dm.workers_per_process() == 2
    dm.trainer = SimpleNamespace(num_devices=1)
    assert dm.workers_per_process() == 16
    with pytest.raises(ValueError, match=r"data.num_workers must be an integer >= 0 or auto, got 'many'"):
        ImageFolderDataModule(root=str(tmp_path), num_workers="many")


@pytest.mark.slow
def test_dali_without_dali_says_how_to_get_it(tmp_path):
    if importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None:
        pytest.skip("DALI is installed here: this checks the message of machines without it")
    from acnet_pl.data.fast.dali import DALIImageNetDataModule

    write_tree_with_bad(tmp_path, {})
    dm = DALIImageNetDataModule(root=str(tmp_path), image_size=16, batch_size=2, num_workers=0)
    with pytest.raises(
        ValueError, match=r"data=imagenet_dali needs NVIDIA DALI .*pip install -e '.\[dali\]'"
    ):
        dm.train_dataloader()
    x, _ = next(iter(dm.val_dataloader()))  # validation needs no DALI
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    dm.prepare_data()  # train() calls it before any logger starts: the augmentation is refused there
    with pytest.raises(ValueError, match=r"data=imagenet_dali offers data.augment=imagenet only"):
        DALIImageNetDataModule(root=str(tmp_path), augment="randaugment").prepare_data()


def test_dali_ranks_run_the_same_number_of_batches(tmp_path):
    """DALI's shards of an uneven file list differ by a sample, so their full batches can differ by one
    between ranks (a hang at the epoch's end): every rank runs the smallest shard's count (no DALI needed)."""
    from types import SimpleNamespace

    from acnet_pl.data.fast.dali import DALIImageNetDataModule, _DALIBatches, batches_per_rank, shard_sizes

    for n in range(1, 40):
        for shards in range(1, 9):
            sizes = shard_sizes(n, shards)
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1, (n, shards)
    assert shard_sizes(30, 4) == [7, 8, 7, 8]  # DALI's formula: floor((i+1)N/S) - floor(iN/S)
    assert [size // 4 for size in shard_sizes(30, 4)] == [1, 2, 1, 2]  # each rank's own count differs
    assert batches_per_rank(30, 4, 4) == 1 and batches_per_rank(32, 4, 4) == 2

    class DALIEpochs:
        """As DALI's iterator with auto_reset: `own` batches, StopIteration, then the next epoch."""

        def __init__(self, own: int) -> None:
            self.own, self.served = own, 0

        def __next__(self) -> list[dict[str, torch.Tensor]]:
            if self.served == self.own:
                self.served = 0
                raise StopIteration
            self.served += 1
            return [{"data": torch.zeros(4, 3, 2, 2), "label": torch.zeros(4, 1, dtype=torch.int32)}]

    for own in (1, 2):  # ranks whose shards hold 7 and 8 files
        batches = _DALIBatches(DALIEpochs(own), batches_per_rank(30, 4, 4))
        assert [len(list(batches)) for _ in range(3)] == [1, 1, 1] == [len(batches)] * 3
        x, y = next(iter(batches))
        assert x.shape == (4, 3, 2, 2) and y.dtype == torch.int64 and y.shape == (4,)
    # The module gives DALI the file list the torchvision path reads: 7 files over 2 ranks, 2 per batch
    write_tree_with_bad(tmp_path, {"train/a/1.jpg": "truncated"})  # DALI counts it as a file too
    dm = DALIImageNetDataModule(root=str(tmp_path), image_size=16, batch_size=4, num_workers=0)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
    files, labels = dm.train_files()
    assert len(files) == 7 and labels == [0, 0, 0, 0, 1, 1, 1]
    assert files[1] == str(tmp_path / "train" / "a" / "1.jpg")
    assert [size // 2 for size in shard_sizes(7, 2)] == [1, 2] and batches_per_rank(7, 2, 2) == 1
