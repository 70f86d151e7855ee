"""Compare the runs of a sweep: `python -m acnet_pl.report multirun/<task>/<date>`.

Reads every job's `deploy/report.json` (written by FuseCallback) and `.hydra/config.yaml`, groups the
runs by (data, model, block) and prints mean +- std of the validation top-1 of the deployed model, and
the gain of ACB over the base model, like the original's show_log.py.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from acnet_pl.cli import exit_on_user_error

REPORT_PATH = Path("deploy") / "report.json"


def _job_config(job_dir: Path) -> dict[str, Any]:
    """The job's composed Hydra config, or {} when it has none."""
    config_file = job_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)


def _data_name(config: dict[str, Any]) -> str:
    target = str((config.get("data") or {}).get("_target_", ""))
    name = target.rsplit(".", 1)[-1].removesuffix("DataModule")
    return name.lower() or "?"


def collect_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job under `sweep_dir` with a deploy report: data, model, block, seed, top-1, ok, path."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep dir {root} does not exist; give the folder of a multirun")
    runs = []
    for report_file in sorted(root.rglob(str(REPORT_PATH))):
        job_dir = report_file.parent.parent
        try:
            report = json.loads(report_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{report_file} is not valid JSON ({err}); delete it or rerun that job"
            ) from None
        config = _job_config(job_dir)
        block = (config.get("block") or {}).get("block") or (report.get("block") or {}).get("name", "?")
        model = (config.get("model") or {}).get("name") or (report.get("model") or {}).get("name", "?")
        val = report.get("val") or {}
        runs.append(
            {
                "job": str(job_dir.relative_to(root)) if job_dir != root else ".",
                "data": _data_name(config),
                "model": model,
                "block": block,
                "seed": config.get("seed"),
                "top1": float((val.get("after") or {}).get("top1", math.nan)),
                "top1_before": float((val.get("before") or {}).get("top1", math.nan)),
                "ok": bool(report.get("ok", False)),
            }
        )
    if not runs:
        raise FileNotFoundError(
            f"no runs found under {root}: expected <job>/{REPORT_PATH.as_posix()} files, written at the end of "
            "`python train.py -m ...` jobs"
        )
    return runs


def summarize(runs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Group rows by (data, model, block): n, mean and std (sample, 0 for one run) of top-1 in %.

    Returns the groups and, for every (data, model) with both blocks, the ACB gain (acb mean - base mean).
    """
    grouped: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for run in runs:
        if run["ok"]:
            grouped[(run["data"], run["model"], run["block"])].append(100.0 * run["top1"])
    groups = []
    # base first within each (data, model), then the blocks by name
    for (data, model, block), values in sorted(
        grouped.items(), key=lambda kv: (*kv[0][:2], kv[0][2] != "base", kv[0][2])
    ):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        groups.append(
            {
                "data": data,
                "model": model,
                "block": block,
                "n": len(values),
                "mean": statistics.fmean(values),
                "std": std,
            }
        )
    by_key = {(g["data"], g["model"], g["block"]): g for g in groups}
    gains = []
    for (data, model, block), group in by_key.items():
        base = by_key.get((data, model, "base"))
        if block != "base" and base is not None:
            gains.append({"data": data, "model": model, "block": block, "gain": group["mean"] - base["mean"]})
    return groups, gains


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    """The text printed by the CLI: one line per (data, model, block), then the ACB gains."""
    groups, gains = summarize(runs)
    header = f"{'data':<12} {'model':<14} {'block':<6} {'runs':>4}  {'val top-1 (%)':>16}"
    lines = [header, "-" * len(header)]
    for g in groups:
        lines.append(
            f"{g['data']:<12} {g['model']:<14} {g['block']:<6} {g['n']:>4}  {g['mean']:>7.2f} +- {g['std']:<5.2f}"
        )
    for gain in gains:
        lines.append(f"{gain['block'].upper()} gain on {gain['data']} {gain['model']}: {gain['gain']:+.2f}")
    failed = [run["job"] for run in runs if not run["ok"]]
    if failed:
        lines.append(f"left out (fused model failed its check): {', '.join(failed)}")
    return "\n".join(lines)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the comparison table of a sweep dir (`--json` for machine-readable rows)."""
    parser = argparse.ArgumentParser(prog="python -m acnet_pl.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="folder of a multirun, e.g. multirun/cifar10_resnet56/<date>")
    parser.add_argument("--json", action="store_true", help="print the groups and gains as JSON")
    args = parser.parse_args(argv)
    runs = collect_runs(args.sweep_dir)
    if args.json:
        groups, gains = summarize(runs)
        print(json.dumps({"groups": groups, "gains": gains, "runs": runs}, indent=2))
    else:
        print(format_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
