"""Training steps through `acnet_pl.cli.train` as users run them: what each callback costs, and the data share.

Usage: python benchmarks/bench_train.py [--device cpu|cuda] [--models resnet20,resnet56] [--batch 128]
       [--batches 10] [--rounds 2] [--data] [--imagenet] [--compile]

Each run composes train.yaml with Hydra (as train.py does) and runs `train(cfg)` in this process, one epoch
on synthetic CIFAR-10 in torchvision's format written to a temporary folder (and one validation batch). A
timer callback, the last one, starts after `WARMUP_BATCHES` steps and stops after the last one, with one
device synchronisation at each end and none per step, so the host queues work ahead as in a real run.

Callback rows (ACB, the default): `bare` (no callback but the timer) against the default callbacks and
against each optional callback alone (EMA, diagnostics, divergence), every variant once per round, rounds
interleaved: a ratio is time / `bare` time of the same round, median over rounds; the callbacks' own time
in the per-step hooks (Lightning's SimpleProfiler) over `bare`'s step is the same cost without the noise of
a shared machine (host time: on a GPU the end-to-end ratio says the rest). `tail` is the time from
the last step to the end of training (validation, the epoch-end hooks); the diagnostics row runs every
epoch and its share is its tail over the steps of a CIFAR-10 epoch (391 x batch 128) times its default
interval. `--data` adds the data rows: base vs ACB, per-sample loader vs batches on the device, the share
of the time the host waits for a batch (`--imagenet`: also ResNet-18 on a JPEG tree through two decoders).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf, open_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import write_cifar, write_jpeg_tree  # noqa: E402

from acnet_pl.cli.train import train  # noqa: E402

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
WARMUP_BATCHES = 2
CIFAR_STEPS = 391  # one CIFAR-10 epoch at batch 128
#: The hooks Lightning calls every training step: their time, read off its SimpleProfiler, is the callbacks'
#: own per-step cost (host time), which the load of a shared machine hardly blurs.
STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(Callback):
    """Wall time of the steps after the warm-up (synchronised at both ends only), host data wait, tail."""

    results: list[dict[str, float]] = []

    def __init__(self) -> None:
        self.wait = 0.0
        self.images = 0
        self._start = self._end = self._last_end = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx >= WARMUP_BATCHES:
            self.wait += time.perf_counter() - self._last_end

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        last = batch_idx == trainer.num_training_batches - 1
        if batch_idx == WARMUP_BATCHES - 1 or last:
            _sync(pl_module.device)
        now = time.perf_counter()
        if batch_idx == WARMUP_BATCHES - 1:
            self._start = now
        elif batch_idx >= WARMUP_BATCHES:
            self.images += len(batch[0])
        if last:
            self._end = now
        self._last_end = now

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        _sync(pl_module.device)
        steps = trainer.num_training_batches - WARMUP_BATCHES
        total = self._end - self._start
        hooks = sum(
            sum(durations)
            for action, durations in getattr(trainer.profiler, "recorded_durations", {}).items()
            if action.startswith("[Callback]")
            and "StepTimer" not in action
            and action.rsplit(".", 1)[-1] in STEP_HOOKS
        )
        StepTimer.results.append(
            {
                "step_ms": 1e3 * total / steps,
                "img_s": self.images / total,
                "wait_share": self.wait / total,
                "tail_ms": 1e3 * (time.perf_counter() - self._end),
                "hooks_ms": 1e3 * hooks / trainer.num_training_batches,
            }
        )


def run(overrides: list[str], out: Path, callbacks: list[str] | None) -> dict[str, float]:
    """`train(cfg)` of train.yaml with `overrides`, keeping the named configured callbacks (None = all)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        kept = {k: v for k, v in cfg.callbacks.items() if callbacks is None or k in callbacks}
        kept.pop("rich_progress_bar", None)  # the progress bar is off
        cfg.callbacks = {**kept, "timer": {"_target_": f"{__name__}.StepTimer"}}
        # without a checkpoint callback of ours, Lightning would add its own
        cfg.trainer.enable_checkpointing = "model_checkpoint" in kept
        cfg.trainer.profiler = "simple"  # per-hook times (see STEP_HOOKS)
    StepTimer.results.clear()
    train(cfg)
    return StepTimer.results[-1]


def callback_rows(common: list[str], tmp: Path, args: argparse.Namespace) -> list[str]:
    """Markdown rows: per model, each callback variant's step time and ratio to `bare` in the same round."""
    default_every = OmegaConf.load(CONF_DIR / "callbacks" / "diagnostics.yaml").diagnostics.get(
        "every_n_epochs", 1
    )
    variants = {
        "bare (no callbacks)": (["callbacks=default"], []),
        "default callbacks": (["callbacks=default"], None),
        "EMA (callbacks=ema)": (["callbacks=ema"], ["ema"]),
        "diagnostics, every epoch": (
            ["callbacks=default", "++callbacks.diagnostics.every_n_epochs=1"],
            ["diagnostics"],
        ),
        "divergence": (["callbacks=default"], ["divergence"]),
    }
    rows = []
    for model in args.models.split(","):
        times: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
        for r in range(args.rounds):
            names = list(variants) if r % 2 == 0 else list(reversed(variants))  # alternate the order
            for name in names:
                options, keep = variants[name]
                overrides = [*common, f"model={model}", "block=acb", *options]
                times[name].append(run(overrides, tmp / f"{model}-{r}-{list(variants).index(name)}", keep))
        bare = times["bare (no callbacks)"]
        for name, results in times.items():
            ratio = statistics.median(t["step_ms"] / b["step_ms"] for t, b in zip(results, bare, strict=True))
            step = statistics.median(t["step_ms"] for t in results)
            tail = statistics.median(t["tail_ms"] for t in results)
            hooks = statistics.median(t["hooks_ms"] for t in results)
            own = 1 + hooks / statistics.median(b["step_ms"] for b in bare)
            extra = ""
            if name.startswith("diagnostics"):
                cost = statistics.median(
                    t["tail_ms"] - b["tail_ms"] for t, b in zip(results, bare, strict=True)
                )
                share = cost / default_every / (CIFAR_STEPS * statistics.median(b["step_ms"] for b in bare))
                extra = f"{100 * share:.2f}% of a CIFAR-10 epoch at every_n_epochs={default_every}"
            rows.append(
                f"| {model} ACB | {name} | {step:,.0f} | {ratio:.3f} | {hooks:.2f} | {own:.4f} | {tail:,.0f} | {extra} |"
            )
    return rows


def data_rows(common: list[str], tmp: Path, args: argparse.Namespace, cuda: bool) -> list[str]:
    """Markdown rows: base vs ACB through the per-sample loader and device batches (and JPEG decoders)."""
    rows = []
    model = args.models.split(",")[-1]
    for block in ("base", "acb"):
        for path, options in (
            ("per sample", ["data.device_batches=false", f"data.num_workers={args.workers}"]),
            ("batched on device", ["data.device_batches=true", "data.num_workers=0"]),
        ):
            cifar = [
                "data=cifar10",
                f"data.root={tmp / 'cifar'}",
                "data.download=false",
                f"data.batch_size={args.batch}",
            ]
            overrides = [*common, *cifar, f"model={model}", f"block={block}", *options]
            r = run(overrides, tmp / f"d{len(rows)}", [])
            rows.append(
                f"| CIFAR {model} {block}, {path} | {r['img_s']:,.0f} | {100 * r['wait_share']:.0f}% |"
            )
    if args.imagenet:
        size = args.image_size or (224 if cuda else 112)
        batch = 256 if cuda else 16
        write_jpeg_tree(tmp / "tree", batch * (args.batches + 1))
        for block in ("base", "acb"):
            for decoder in ("pil", "torchvision"):
                overrides = [
                    *common,
                    "data=imagefolder",
                    f"data.root={tmp / 'tree'}",
                    f"data.image_size={size}",
                    f"data.batch_size={batch}",
                    f"data.num_workers={args.workers}",
                    f"data.decoder={decoder}",
                    "model=resnet18",
                    f"block={block}",
                ]
                r = run(overrides, tmp / f"i{len(rows)}", [])
                name = f"ImageNet-like resnet18 {size}px {block}, decoder={decoder}"
                rows.append(f"| {name} | {r['img_s']:,.0f} | {100 * r['wait_share']:.0f}% |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="resnet20,resnet56", help="CIFAR models, comma-separated")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--batches", type=int, default=10, help=f"training batches per run ({WARMUP_BATCHES} warm-up)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the callback rows")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--data", action="store_true", help="also the data rows (loader vs device batches)")
    parser.add_argument("--imagenet", action="store_true", help="data rows: also ResNet-18 on a JPEG tree")
    parser.add_argument(
        "--image-size", type=int, default=None, help="ImageNet rows (default 224; 112 on CPU)"
    )
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cuda = args.device == "cuda"
    card = torch.cuda.get_device_name() if cuda else f"no GPU, {torch.get_num_threads()} threads"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(
        f"device: {args.device} ({card}); CPU {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores{load}; torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        # five training files of train // 5 images each: at least `--batches` full batches
        write_cifar(tmp_path / "cifar", train=5 * (args.batch * args.batches // 5 + 1), test=args.batch)
        common = [
            f"trainer.accelerator={'gpu' if cuda else 'cpu'}",
            "trainer.devices=1",
            "trainer.max_epochs=1",
            f"++trainer.limit_train_batches={args.batches}",
            "++trainer.limit_val_batches=1",
            "++trainer.num_sanity_val_steps=0",
            "++trainer.enable_progress_bar=false",
            "++trainer.enable_model_summary=false",
            "logger=csv",
            f"compile={str(args.compile).lower()}",
            "data=cifar10",
            f"data.root={tmp_path / 'cifar'}",
            "data.download=false",
            f"data.batch_size={args.batch}",
            "data.device_batches=true",
            "data.num_workers=0",
            "callbacks.fuse.limit_batches=1",
        ]
        rows = callback_rows(common, tmp_path, args)
        print(
            f"\nbatch {args.batch}, {args.batches - WARMUP_BATCHES} timed steps per run, {args.rounds} rounds"
        )
        print(
            "| model | callbacks | step (ms) | / bare, same round | callback hooks (ms/step) | 1 + hooks / bare step "
            "| tail (ms) | |\n|---|---|---|---|---|---|---|---|"
        )
        print("\n".join(rows))
        if args.data or args.imagenet:
            rows = data_rows([o for o in common if not o.startswith("data")], tmp_path, args, cuda)
            print(f"\n{args.workers} loader workers where used")
            print("| run | train img/s | host waiting for data |\n|---|---|---|")
            print("\n".join(rows))


if __name__ == "__main__":
    main()
