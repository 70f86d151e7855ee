"""Side-by-side throughput of base vs ACB (branches / stacked) vs DBB training and fused vs base inference.

Usage: python benchmarks/bench_acb.py [--device cpu|cuda] [--models resnet20,resnet18] [--rounds 5]

All variants of one model are timed in the same process, interleaved round by round, so the ratios
compare like with like; the median over rounds is reported. Synthetic data, no data loading.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from torch import nn

from acnet_pl.models import build_model, default_input_size
from acnet_pl.reparam import fuse

SETTINGS = {  # model -> (batch, image size) for cpu and cuda
    "resnet20": {"cpu": (64, 32), "cuda": (128, 32)},
    "resnet56": {"cpu": (64, 32), "cuda": (128, 32)},
    "resnet18": {"cpu": (16, 112), "cuda": (256, 224)},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, iters: int) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, amp: bool):
    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _infer_step(model: nn.Module, x: torch.Tensor, amp: bool):
    @torch.no_grad()
    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            model(x)

    return step


def bench_model(name: str, device: torch.device, rounds: int, iters: int) -> list[tuple[str, float]]:
    """Images/s of each variant of ``name`` (median over interleaved rounds)."""
    batch, size = SETTINGS.get(name, {}).get(device.type, (32, default_input_size(name)[1]))
    amp = device.type == "cuda"
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    variants: dict[str, object] = {}
    models = {
        "base": build_model(name, 10),
        "acb branches": build_model(name, 10, block="acb"),
        "acb stacked": build_model(name, 10, block="acb", impl="stacked"),
        "dbb": build_model(name, 10, block="dbb"),
    }
    for label, model in models.items():
        model = model.to(device, memory_format=fmt).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        variants[f"train {label}"] = _train_step(model, x, y, opt, amp)
    # Copies: `.eval()` on the trained models would time the train variants with BN in eval mode.
    variants["infer base"] = _infer_step(copy.deepcopy(models["base"]).eval(), x, amp)
    # The fused convs are new tensors (NCHW): back to the base's memory format.
    for block in ("acb", "dbb"):
        fused = fuse(copy.deepcopy(models["acb branches" if block == "acb" else "dbb"]).eval()).eval()
        variants[f"infer fused {block}"] = _infer_step(fused.to(memory_format=fmt), x, amp)
    for fn in variants.values():  # warm-up (cudnn autotune, allocator)
        _time(fn, device, 2)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for label, fn in variants.items():
            times[label].append(_time(fn, device, iters))
    return [(label, batch / statistics.median(ts)) for label, ts in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="resnet20,resnet18")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        card = torch.cuda.get_device_name(device)
    else:
        card = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {device.type} ({card}); torch {torch.__version__}")
    for name in args.models.split(","):
        rows = bench_model(name, device, args.rounds, args.iters)
        ref = dict(rows)
        print(f"\n{name}")
        print("| variant | images/s | time vs base |\n|---|---|---|")
        for label, ips in rows:
            base = ref["train base"] if label.startswith("train") else ref["infer base"]
            print(f"| {label} | {ips:.0f} | {base / ips:.2f} |")


if __name__ == "__main__":
    main()
