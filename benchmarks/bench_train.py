"""Whole training epochs through `acnet_pl.cli.train` (data + model + Lightning): base vs ACB, the data share.

Usage: python benchmarks/bench_train.py [--device cpu|cuda] [--batches 12] [--imagenet] [--compile]

Each variant composes train.yaml with Hydra (as train.py does) and runs `train(cfg)` in this process on
synthetic data written to a temporary folder: CIFAR-10 in torchvision's format (ResNet-20 on CPU, ResNet-56
on CUDA), and with --imagenet a JPEG tree (ResNet-18). A callback times every training step after a
warm-up: "data wait" is the time from the end of one step to the start of the next (fetching, transfer,
on-device augmentation), "step" the forward/backward/optimizer (synchronised on CUDA). Reported: training
images/s and the share of wall time spent waiting for data.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import open_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import write_cifar, write_jpeg_tree  # noqa: E402

from acnet_pl.cli.train import train  # noqa: E402

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
WARMUP_BATCHES = 2


class DataWaitTimer(Callback):
    """Sums, after `WARMUP_BATCHES`, the time waiting for each batch and the time of each step."""

    results: list[dict[str, float]] = []

    def __init__(self) -> None:
        self.wait = self.step = 0.0
        self.images = 0
        self._last_end = self._start = 0.0

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._last_end = time.perf_counter()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if batch_idx >= WARMUP_BATCHES:
            self.wait += now - self._last_end
        self._start = now

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        if batch_idx >= WARMUP_BATCHES:
            self.step += now - self._start
            self.images += len(batch[0])
        self._last_end = now

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        total = self.wait + self.step
        DataWaitTimer.results.append(
            {"img_s": self.images / total, "wait_share": self.wait / total, "step_ms": 1e3 * self.step}
        )


def run(overrides: list[str], out: Path) -> dict[str, float]:
    """`train(cfg)` of train.yaml with `overrides`; the timer's figures."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.callbacks = {"data_wait": {"_target_": f"{__name__}.DataWaitTimer"}}
    DataWaitTimer.results.clear()
    train(cfg)
    return DataWaitTimer.results[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, default=12, help="training batches per run (2 are warm-up)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--imagenet", action="store_true", help="also ResNet-18 on a synthetic JPEG tree")
    parser.add_argument(
        "--image-size", type=int, default=None, help="ImageNet rows (default 224; 112 on CPU)"
    )
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cuda = args.device == "cuda"
    card = torch.cuda.get_device_name() if cuda else f"no GPU, {torch.get_num_threads()} threads"
    print(
        f"device: {args.device} ({card}); CPU {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; torch {torch.__version__}"
    )
    common = [
        f"trainer.accelerator={'gpu' if cuda else 'cpu'}",
        "trainer.devices=1",
        "trainer.max_epochs=1",
        f"++trainer.limit_train_batches={args.batches}",
        "++trainer.limit_val_batches=0",
        "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
        "++trainer.enable_checkpointing=false",
        "logger=none",
        f"compile={str(args.compile).lower()}",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        batch = 128 if cuda else 64
        write_cifar(tmp_path / "cifar", train=5 * (batch * (args.batches + 1) // 5 + 1), test=batch)
        model = "resnet56" if cuda else "resnet20"
        rows = []
        for block in ("base", "acb"):
            for path, options in (
                ("per sample", ["data.device_batches=false", f"data.num_workers={args.workers}"]),
                ("batched on device", ["data.device_batches=true", "data.num_workers=0"]),
            ):
                overrides = [
                    *common,
                    "data=cifar10",
                    f"data.root={tmp_path / 'cifar'}",
                    "data.download=false",
                    f"data.batch_size={batch}",
                    f"model={model}",
                    f"block={block}",
                    *options,
                ]
                rows.append((f"CIFAR {model} {block}, {path}", run(overrides, tmp_path / f"c{len(rows)}")))
        if args.imagenet:
            size = args.image_size or (224 if cuda else 112)
            batch = 256 if cuda else 16
            write_jpeg_tree(tmp_path / "tree", batch * (args.batches + 1))
            for block in ("base", "acb"):
                for decoder in ("pil", "torchvision"):
                    overrides = [
                        *common,
                        "data=imagefolder",
                        f"data.root={tmp_path / 'tree'}",
                        f"data.image_size={size}",
                        f"data.batch_size={batch}",
                        f"data.num_workers={args.workers}",
                        f"data.decoder={decoder}",
                        "model=resnet18",
                        f"block={block}",
                    ]
                    name = f"ImageNet-like resnet18 {size}px {block}, decoder={decoder}"
                    rows.append((name, run(overrides, tmp_path / f"i{len(rows)}")))
    print(
        f"\n{args.batches - WARMUP_BATCHES} timed batches per row, {args.workers} loader workers where used"
    )
    print("| run | train img/s | waiting for data |\n|---|---|---|")
    for name, result in rows:
        print(f"| {name} | {result['img_s']:,.0f} | {100 * result['wait_share']:.0f}% |")


if __name__ == "__main__":
    main()
