"""The sweep table: `python -m acnet_pl.cli.sweep_table multirun/<task>/<date>` compares the runs of a sweep.

Each row: one setting (data, model, block, every other override that differs but `seed`) averaged over
seeds, mean +- std of the deployed model's val top-1 from the fuse callback's `deploy/report.json`. The ACB
gain is the difference between rows that differ only by block, like the original's show_log.py.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from acnet_pl.cli.common import exit_on_user_error
from acnet_pl.deploy.report import REPORT_FORMAT, REPORT_VERSION
from acnet_pl.utils.text import render_table

_REPORT = "deploy/report.json"
#: Overrides that never split groups: `seed` is what a group averages over; data/model/block are columns.
_NOT_A_SETTING = ("seed", "data", "model", "block")


def _hydra_file(job_dir: Path, name: str) -> Any:
    path = job_dir / ".hydra" / name
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else None


def _job_overrides(job_dir: Path) -> dict[str, str | None]:
    items = _hydra_file(job_dir, "overrides.yaml")
    pairs = [str(item).partition("=") for item in (items if isinstance(items, list) else [])]
    return {key.lstrip("+"): value if sep else None for key, sep, value in pairs}  # None for `~key`


def _data_name(config: dict[str, Any]) -> str:
    target = str((config.get("data") or {}).get("_target_", ""))
    return target.rsplit(".", 1)[-1].removesuffix("DataModule").lower() or "?"


def _group_name(group: str, config: Mapping[str, Any], report: Mapping[str, Any]) -> str:
    return (config.get(group) or {}).get("name") or (report.get(group) or {}).get("name", "?")


def _val_top1(report: Mapping[str, Any], which: str) -> float | None:
    val = report.get("val")
    entry = val.get(which) if isinstance(val, Mapping) else None
    value = entry.get("top1") if isinstance(entry, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _left_out_reason(report: Any, top1: float | None) -> str | None:
    if not isinstance(report, Mapping):
        return f"{_REPORT} is not a JSON object"
    version = report.get("version")
    if report.get("format") != REPORT_FORMAT:
        return f"{_REPORT} has format {report.get('format')!r}, not {REPORT_FORMAT!r}"
    if isinstance(version, int) and version > REPORT_VERSION:
        return f"{_REPORT} has version {version}, newer than this acnet-pl reads"
    if not report.get("ok", False):
        stopped = {"diverged": "training diverged", "not_trained": "no training step was taken"}
        return stopped.get(report.get("status"), "the fused model failed its check")
    if report.get("val") is None:
        return (
            f"{_REPORT} holds no validation accuracy (written by {report.get('tool', '?')}, "
            "which checks outputs only); the fuse callback's report of the run has it"
        )
    if top1 is None:
        return f"{_REPORT} has no val top-1"
    return None


def collect_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job under `sweep_dir` with a `deploy/report.json`.

    Each row: job, data, model, block, seed, overrides ({key: value}), top1, top1_before (fractions or
    None) and left_out (None, or why the run is not averaged).
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep dir {root} does not exist; give the folder of a multirun")
    runs = []
    for report_file in sorted(root.rglob(_REPORT)):
        job_dir = report_file.parent.parent
        try:
            report = json.loads(report_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{report_file} is not valid JSON ({err}); delete it or rerun that job"
            ) from None
        config = _hydra_file(job_dir, "config.yaml") or {}
        described = report if isinstance(report, Mapping) else {}
        top1 = _val_top1(described, "after")
        runs.append(
            {
                "job": str(job_dir.relative_to(root)) if job_dir != root else ".",
                "data": _data_name(config),
                "model": _group_name("model", config, described),
                "block": _group_name("block", config, described),
                "seed": config.get("seed"),
                "overrides": _job_overrides(job_dir),
                "top1": top1,
                "top1_before": _val_top1(described, "before"),
                "left_out": _left_out_reason(report, top1),
            }
        )
    if not runs:
        raise FileNotFoundError(
            f"no runs found under {root}: expected <job>/{_REPORT} files, written at the end of "
            "`python train.py -m ...` jobs"
        )
    return runs


def varying_overrides(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The override keys (except seed, data, model, block) whose value is not the same in every run."""
    keys = sorted({key for run in runs for key in run["overrides"]} - set(_NOT_A_SETTING))
    missing = object()
    return [key for key in keys if len({run["overrides"].get(key, missing) for run in runs}) > 1]


def _value_order(value: str | None) -> tuple[int, float, str]:
    """Numbers in numeric order (0.05 before 0.1), then other values by name."""
    try:
        return (0, float(value), "") if value is not None else (2, 0.0, "")
    except ValueError:
        return (1, 0.0, value)


def summarize(runs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The usable runs grouped by (data, model, setting: the `varying_overrides`, block): n, mean and sample
    std of top-1 in %, base first; and each non-base group's gain over the base group of its setting."""
    keys = varying_overrides(runs)
    grouped: dict[tuple, list[float]] = defaultdict(list)
    for run in runs:
        if run["left_out"] is None:
            setting = tuple((key, run["overrides"][key]) for key in keys if key in run["overrides"])
            grouped[(run["data"], run["model"], setting, run["block"])].append(100.0 * run["top1"])

    def order(item: tuple[tuple, list[float]]) -> tuple:
        data, model, setting, block = item[0]
        return (data, model, [(k, _value_order(v)) for k, v in setting], block != "base", block)

    groups = []
    for (data, model, setting, block), values in sorted(grouped.items(), key=order):
        groups.append(
            {
                "data": data,
                "model": model,
                "block": block,
                "setting": " ".join(k if v is None else f"{k}={v}" for k, v in setting),
                "overrides": dict(setting),
                "n": len(values),
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            }
        )
    base = {(g["data"], g["model"], g["setting"]): g["mean"] for g in groups if g["block"] == "base"}
    gains = [
        {**{k: g[k] for k in ("data", "model", "setting", "block")}, "gain": g["mean"] - base[where]}
        for g in groups
        if g["block"] != "base" and (where := (g["data"], g["model"], g["setting"])) in base
    ]
    return groups, gains


def format_sweep_table(runs: Sequence[dict[str, Any]]) -> str:
    """The text printed by the CLI: one line per group, then the ACB gains, then one line per left-out job."""
    groups, gains = summarize(runs)
    with_setting = any(g["setting"] for g in groups)
    header = ["data", "model", "block", *(["setting"] if with_setting else []), "runs", "val top-1 (%)"]
    rows = [
        [g["data"], g["model"], g["block"], *([g["setting"]] if with_setting else []), str(g["n"])]
        + [f"{g['mean']:.2f} +- {g['std']:.2f}"]
        for g in groups
    ]
    lines = [render_table(header, rows, "lll" + ("l" if with_setting else "") + "rr", rule=True)]
    for gain in gains:
        where = " ".join(part for part in (gain["data"], gain["model"], gain["setting"]) if part)
        lines.append(f"{gain['block'].upper()} gain on {where}: {gain['gain']:+.2f}")
    for run in runs:
        if run["left_out"] is not None:
            lines.append(f"left out {run['job']}: {run['left_out']}")
    return "\n".join(lines)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the comparison table of a sweep dir (`--json` for machine-readable rows)."""
    parser = argparse.ArgumentParser(
        prog="python -m acnet_pl.cli.sweep_table", description=__doc__.splitlines()[0]
    )
    parser.add_argument("sweep_dir", help="folder of a multirun, e.g. multirun/cifar10_resnet56/<date>")
    parser.add_argument("--json", action="store_true", help="print the groups and gains as JSON")
    args = parser.parse_args(argv)
    runs = collect_runs(args.sweep_dir)
    if args.json:
        groups, gains = summarize(runs)
        print(json.dumps({"groups": groups, "gains": gains, "runs": runs}, indent=2))
    else:
        print(format_sweep_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
