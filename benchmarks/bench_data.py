"""Input pipelines side by side: images/s per core of each CIFAR and ImageNet training pipeline, one run.

Usage: python benchmarks/bench_data.py [--device cpu|cuda] [--rounds 3] [--threads 1]

CIFAR-like: random uint8 32x32 images in memory. ImageNet-like: a synthetic JPEG tree (about 500x375,
written to a temporary folder). Every pipeline runs in this process on `--threads` threads, no DataLoader
workers, so the figures are per core of one worker (what a worker pool multiplies); the pipelines are
interleaved round by round and the median is reported. Batched/device pipelines run on `--device`.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as v1

from acnet_pl.data import CIFAR10DataModule, ImageFolderDataModule
from acnet_pl.data.fast import EncodedImageLoader, decode_batch
from acnet_pl.data.tensors import TensorImageDataset

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_jpeg_tree(root: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` JPEGs of about 500x375 (smooth colour fields plus noise, ~40-70 KB each) under root/train/a."""
    rng = np.random.default_rng(seed)
    folder = root / "train" / "a"
    folder.mkdir(parents=True)
    (root / "val" / "a").mkdir(parents=True)
    paths = []
    for i in range(count):
        h, w = int(rng.integers(330, 420)), int(rng.integers(450, 550))
        coarse = rng.integers(0, 256, size=(h // 25 + 2, w // 25 + 2, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
        noisy = np.clip(smooth + rng.normal(0, 12, size=smooth.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(path)
    Image.open(paths[0]).save(root / "val" / "a" / "0.jpg")
    return paths


def write_cifar(root: Path, train: int, test: int, seed: int = 0) -> None:
    """Random CIFAR-10 in torchvision's on-disk format (5 training batches + test_batch) under root."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [train // 5] * 5 + [test]
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, size in zip(names, sizes, strict=True):
        entry = {
            "data": rng.integers(0, 256, size=(size, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, size=size).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)


def cifar_pipelines(n: int, device: torch.device, tmp: Path) -> dict[str, tuple[Callable[[], None], int]]:
    """name -> (one pass, images per pass) for the CIFAR pipelines."""
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    hwc = images.permute(0, 2, 3, 1).numpy()
    original = v1.Compose(
        [
            v1.RandomCrop(32, padding=4),
            v1.RandomHorizontalFlip(),
            v1.ToTensor(),
            v1.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )

    def original_pass() -> (
        None
    ):  # torchvision's CIFAR10.__getitem__: PIL image from the array, then transforms
        for i in range(n):
            original(Image.fromarray(hwc[i]))

    dm = CIFAR10DataModule(root=str(tmp), batch_size=128, num_workers=0, device_batches=True)
    per_sample = dm.train_transform

    def per_sample_pass() -> None:
        for i in range(n):
            per_sample(images[i])

    write_cifar(tmp, 10, 10)
    dm.build_train_dataset = lambda: TensorImageDataset(images, labels, dm.train_transform)
    dm.setup("fit")
    dm.trainer = None
    batches = dm.train_dataloader()
    batches.images, batches.labels = images.to(device), labels.to(device)

    def batched_pass() -> None:
        for _ in batches:
            pass
        _sync(device)

    return {
        "CIFAR, original ACNet (PIL per sample)": (original_pass, n),
        "CIFAR, acnet-pl per sample (v2 on uint8 tensors, DataLoader path)": (per_sample_pass, n),
        f"CIFAR, acnet-pl batched (DeviceBatches on {device.type})": (batched_pass, len(batches) * 128),
    }


def imagenet_pipelines(
    paths: list[Path], device: torch.device, root: Path
) -> dict[str, tuple[Callable[[], None], int]]:
    """name -> (one pass, images per pass) for the ImageNet training pipelines (224 px)."""
    n = len(paths)
    original = v1.Compose(
        [v1.RandomResizedCrop(224), v1.RandomHorizontalFlip(), v1.ToTensor(), v1.Normalize(MEAN, STD)]
    )

    def original_pass() -> None:  # torchvision's default_loader: PIL, convert("RGB")
        for path in paths:
            with open(path, "rb") as f:
                original(Image.open(f).convert("RGB"))

    pil = ImageFolderDataModule(root=str(root), decoder="pil")
    fast = ImageFolderDataModule(root=str(root), decoder="torchvision")
    device_dm = ImageFolderDataModule(root=str(root), decoder="device")
    device_dm.trainer = None
    encoded = EncodedImageLoader()

    def pil_pass() -> None:
        for path in paths:
            pil.train_transform(pil.loader(str(path)))

    def torchvision_pass() -> None:  # worker side only: uint8 out, normalised on the device
        for path in paths:
            fast.train_transform(fast.loader(str(path)))

    def torchvision_with_tail() -> None:
        for start in range(0, n, 32):
            batch = torch.stack(
                [fast.train_transform(fast.loader(str(p))) for p in paths[start : start + 32]]
            )
            fast.device_tail(batch.to(device))
        _sync(device)

    def device_pass() -> None:  # workers read bytes; decode + crop/flip a batch at a time on the device
        for start in range(0, n, 32):
            read = [encoded(str(p)) for p in paths[start : start + 32]]
            batch = [[d for d, _ in read], torch.zeros(len(read)), [p for _, p in read]]
            images, _ = decode_batch(batch, device, device_dm.device_augment, contextlib.nullcontext())
            fast.device_tail(images)
        _sync(device)

    return {
        "ImageNet, original (PIL decode, RandomResizedCrop, ToTensor, Normalize)": (original_pass, n),
        "ImageNet, acnet-pl decoder=pil (v2 on PIL, float in the worker)": (pil_pass, n),
        "ImageNet, acnet-pl decoder=torchvision, worker side (decode_jpeg + v2 on uint8)": (
            torchvision_pass,
            n,
        ),
        f"ImageNet, decoder=torchvision incl. normalisation on {device.type}": (torchvision_with_tail, n),
        f"ImageNet, decoder=device (batched decode_jpeg + crop/flip on {device.type})": (device_pass, n),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cifar-images", type=int, default=2048)
    parser.add_argument("--jpegs", type=int, default=64)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    cpu = platform.processor() or platform.machine()
    print(f"device: {device.type} ({card}); CPU {cpu}, {args.threads} thread(s); torch {torch.__version__}")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpeg_tree(Path(tmp) / "tree", args.jpegs)
        kb = statistics.mean(p.stat().st_size for p in paths) / 1024
        groups = {
            "cifar": cifar_pipelines(args.cifar_images, device, Path(tmp)),
            "imagenet": imagenet_pipelines(paths, device, Path(tmp) / "tree"),
        }
        for pipelines in groups.values():
            for fn, _ in pipelines.values():  # warm-up
                fn()
        times: dict[str, list[float]] = {name: [] for p in groups.values() for name in p}
        for _ in range(args.rounds):
            for pipelines in groups.values():
                for name, (fn, _) in pipelines.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
    for group, pipelines in groups.items():
        what = (
            f"{args.cifar_images} images"
            if group == "cifar"
            else f"{args.jpegs} JPEGs of {kb:.0f} KB on average"
        )
        print(f"\n{group} ({what}; images/s per core, median of {args.rounds})")
        print("| pipeline | img/s per core | vs first row |\n|---|---|---|")
        reference = None
        for name, (_, count) in pipelines.items():
            rate = count / statistics.median(times[name]) / args.threads
            reference = reference or rate
            print(f"| {name} | {rate:,.0f} | {rate / reference:.2f}x |")


if __name__ == "__main__":
    main()
