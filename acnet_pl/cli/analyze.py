"""See what ACB does: `python -m acnet_pl.cli.analyze <run dir | sweep dir | checkpoint | deploy.pt> [more ...]`.

Per run: kernel magnitude maps (skeleton share), branch BN gammas, top-1 under flips/rotations and after
zeroing parts of every KxK kernel, INT8 numbers of a `quantize=int8` deploy report. Writes `analysis/`
(figures, analysis.json) and prints the tables; several runs are compared in one figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from acnet_pl.analysis import (
    branch_gamma_stats,
    gamma_branches,
    mean_branch_gammas,
    summarize_kernels,
    top1_tables,
)
from acnet_pl.analysis.figures import (
    kernel_maps_figure,
    overview_figure,
    pruning_figure,
    quantization_figure,
    robustness_figure,
    save_figure,
)
from acnet_pl.cli.common import exit_on_user_error, skip_shutdown_collection
from acnet_pl.deploy.checkpoint import load_source, validation_loader
from acnet_pl.utils.files import atomic_write_text, run_dir
from acnet_pl.utils.text import render_table

ANALYSIS_FORMAT = "acnet-pl-analysis"
ANALYSIS_VERSION = 1
FIGURES = {
    "overview.png": overview_figure,
    "kernel_maps.png": kernel_maps_figure,
    "robustness.png": robustness_figure,
    "pruning.png": pruning_figure,
}
_INPUT_HINT = (
    "give a run dir (with checkpoints/last.ckpt or deploy/deploy.pt), a sweep dir holding run dirs, "
    "a checkpoint or a deploy.pt"
)


def _model_file(run_dir: Path) -> Path | None:
    """The file a run dir is analysed from: checkpoints/last.ckpt (training form, with its BN gammas),
    else the newest checkpoint, else deploy/deploy.pt."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if ckpts:
        return ckpts[-1]
    deploy = run_dir / "deploy" / "deploy.pt"
    return deploy if deploy.is_file() else None


def find_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """The model files to analyse: files as given; a run dir's model file; every run dir of a sweep dir."""
    found: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder; {_INPUT_HINT}")
        if path.is_file():
            found.append(path)
            continue
        jobs = sorted(  # multirun jobs 0, 1, ..., 10
            (d for d in path.iterdir() if d.is_dir()),
            key=lambda d: (0, int(d.name)) if d.name.isdigit() else (1, d.name),
        )
        files = [f for f in map(_model_file, [path] if _model_file(path) else jobs) if f is not None]
        if not files:
            raise ValueError(
                f"{path}: no run found in it (no checkpoints/*.ckpt or deploy/deploy.pt); {_INPUT_HINT}"
            )
        found += files
    return found


def default_output_dir(paths: Sequence[str | Path]) -> Path:
    """`<dir>/analysis` for one run or sweep dir (a file's run dir), else `./analysis`."""
    if len(paths) != 1:
        return Path("analysis")
    path = Path(paths[0]).expanduser()
    return (path if path.is_dir() else run_dir(path)) / "analysis"


def _label(source: Any) -> str:
    block = dict(source.block or {})
    label = str(block.get("name", "base"))
    branches = block.get("branches")
    if branches is not None and sorted(branches) != ["hor", "ver"]:
        label += "[" + "+".join(branches) + "]"
    if block.get("branch_bn") is False:
        label += " sum-BN"
    return label


def _quantization(path: Path) -> dict[str, Any] | None:
    """The ``quantization`` of the newest deploy report of ``path``'s run that has one (quantize=int8)."""
    reports = [p for p in (run_dir(path) / "deploy").glob("**/report.json") if p.is_file()]
    for report in sorted(reports, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            found = json.loads(report.read_text()).get("quantization")
        except (OSError, ValueError, AttributeError):
            continue
        if found:
            return {**found, "report": str(report)}
    return None


def analyse_source(
    path: Path, device: str = "cpu", limit_batches: int | None = None, num_workers: int | None = None
) -> dict[str, Any]:
    """Every analysis number of one checkpoint or deploy file (robustness/pruning need its data)."""
    source = load_source(path)
    model = source.model.eval()
    result: dict[str, Any] = {
        "label": _label(source),
        "path": str(path),
        "kind": source.kind,
        "model": source.model_name,
        "block": source.block,
        "kernels": summarize_kernels(model),
        "branch_gamma": branch_gamma_stats(model) if source.kind == "checkpoint" else None,
        "robustness": None,
        "pruning": None,
        "data": None,
        "quantization": _quantization(path),
        "notes": [],
    }
    loader, why = None, f"no validation data ({source.data_config_origin})"
    if source.data_config is not None:
        try:
            loader = validation_loader(source.data_config, num_workers=num_workers)
        except Exception as err:  # noqa: BLE001 - data that does not load only leaves these two out
            message = " ".join(str(err).split())[:200] or type(err).__name__
            why = f"the validation data did not load ({message})"
    if loader is None:
        result["notes"].append(f"{why}: robustness and pruning left out")
        return result
    result["data"] = source.data_config_origin
    model.to(device)
    result.update(top1_tables(model, loader, device, limit_batches))
    return result


def _unique_labels(runs: list[dict[str, Any]]) -> None:
    if len({run["model"] for run in runs}) > 1:
        for run in runs:
            run["label"] = f"{run['model']} {run['label']}"
    counts = Counter(run["label"] for run in runs)
    for run in runs:
        if counts[run["label"]] > 1:
            run["label"] += f" ({run_dir(Path(run['path'])).name})"


def _table(
    title: str, columns: Sequence[str], rows: Sequence[tuple[str, Sequence[float | None]]], fmt: str
) -> str:
    cells = [
        [label]
        + ["-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt) for v in values]
        for label, values in rows
    ]
    number_width = max([len(c) for c in columns] + [7])  # one width for every column of numbers
    table = render_table(
        ["run", *columns], cells, "l" + "r" * len(columns), min_widths=[3] + [number_width] * len(columns)
    )
    return f"{title}\n{table}"


def format_analysis_tables(runs: Sequence[Mapping[str, Any]]) -> str:
    """The text the CLI prints: skeleton share per kernel size, robustness and pruning top-1 (%)."""
    sizes = sorted({k for run in runs for k in run["kernels"]["average"]}, key=int)
    parts = [
        _table(
            "skeleton share of the average kernel magnitude map (centre cross / whole kernel)",
            [f"{k}x{k}" for k in sizes],
            [
                (r["label"], [r["kernels"]["average"].get(k, {}).get("skeleton_share") for k in sizes])
                for r in runs
            ],
            ".3f",
        )
    ]
    gammas = [r for r in runs if r.get("branch_gamma")]
    if gammas:
        branches = gamma_branches(*(r["branch_gamma"] for r in gammas))
        means = [mean_branch_gammas(r["branch_gamma"]) for r in gammas]
        rows = [
            (r["label"], [m.get(branch) for branch in branches]) for r, m in zip(gammas, means, strict=True)
        ]
        parts.append(_table("mean |gamma| of the branch BNs (mean over blocks)", branches, rows, ".3f"))
    for key, title in (
        ("robustness", "val top-1 (%) under flips and rotations"),
        ("pruning", "val top-1 (%) after zeroing part of every KxK kernel"),
    ):
        have = [r for r in runs if r.get(key)]
        if have:
            names = list(have[0][key])
            rows = [(r["label"], [100.0 * r[key][n] for n in names]) for r in have]
            parts.append(_table(title, names, rows, ".2f"))
    quantized = [r for r in runs if r.get("quantization")]
    if quantized:
        rows = []
        for r in quantized:
            top1, layers = r["quantization"]["top1"], r["quantization"]["layers"]
            convs = [layer for layer in layers if len(layer["shape"] or ()) == 4]
            peak = float(np.mean([c["kernel"]["max_over_std_mean"] for c in convs]))
            worst = max(c["alone_logit_rel_error"] for c in convs)
            values = [100 * top1["fp32"], 100 * top1["int8"], top1["drop_points"], peak, worst]
            rows.append((r["label"], values))
        columns = ["fp32 top-1", "int8 top-1", "drop", "max|w|/std", "worst conv err"]
        parts.append(_table("INT8 (the run's deploy report, quantize=int8)", columns, rows, ".3f"))
    notes = [f"note ({r['label']}): {n}" for r in runs for n in r.get("notes", [])]
    return "\n\n".join(parts) + ("\n\n" + "\n".join(notes) if notes else "")


def write_outputs(runs: list[dict[str, Any]], output_dir: Path) -> list[Path]:
    """The figures and analysis.json in ``output_dir`` (each written atomically, analysis.json last)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output dir {output_dir} is a file, not a folder; give another with --output-dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    figures = dict(FIGURES)
    quantized = [r for r in runs if r.get("quantization")]
    if quantized:  # base vs ACB after INT8, side by side
        figures["quantization.png"] = lambda runs: quantization_figure(
            [{**r["quantization"], "label": r["label"]} for r in quantized]
        )
    written = [save_figure(draw(runs), output_dir / name) for name, draw in figures.items()]
    record = {"format": ANALYSIS_FORMAT, "version": ANALYSIS_VERSION, "runs": runs, "figures": list(figures)}
    written.append(atomic_write_text(json.dumps(record, indent=2) + "\n", output_dir / "analysis.json"))
    return written


def analyze(
    paths: Sequence[str | Path],
    output_dir: str | Path | None = None,
    device: str = "cpu",
    limit_batches: int | None = None,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Analyse every run of ``paths``, write ``output_dir`` (default: see ``default_output_dir``); return the runs."""
    if not paths:
        raise ValueError(f"nothing to analyse; {_INPUT_HINT}")
    if limit_batches is not None and limit_batches < 1:
        raise ValueError(f"--limit-batches must be >= 1, got {limit_batches}")
    files = find_inputs(paths)
    out = Path(output_dir).expanduser() if output_dir is not None else default_output_dir(paths)
    runs = [analyse_source(f, device, limit_batches, num_workers) for f in files]
    _unique_labels(runs)
    written = write_outputs(runs, out)
    return {"runs": runs, "output_dir": str(out), "written": [str(p) for p in written]}


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m acnet_pl.cli.analyze", description=__doc__.splitlines()[0]
    )
    parser.add_argument("paths", nargs="+", help="run dirs, sweep dirs, checkpoints or deploy.pt files")
    parser.add_argument("-o", "--output-dir", help="default: <the one dir given>/analysis, else ./analysis")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--limit-batches", type=int, help="validation batches to use (default: all)")
    parser.add_argument("--num-workers", type=int, help="data loader workers (default: the run's)")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} but no CUDA GPU is available; use --device cpu")
    result = analyze(args.paths, args.output_dir, device, args.limit_batches, args.num_workers)
    print(format_analysis_tables(result["runs"]))
    print("\nwrote " + ", ".join(result["written"]))
    return 0


if __name__ == "__main__":
    skip_shutdown_collection()
    sys.exit(main())
