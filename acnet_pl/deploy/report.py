"""The deploy report, ``report.json``, written beside every ``deploy.pt`` by the one deploy pipeline.

The fuse callback and ``deploy.py`` fill the same keys with the same meaning; what one of them does not
measure is null in its report:

- ``val``: validation top-1/top-5 before and after fusing, their agreement and near-ties (the fuse
  callback, which has the labelled validation set at hand; null from deploy.py).
- ``errors``: the logit error (``verification.LogitError``: max |out - ref| / max |ref|) of the fused
  model against the trained one (``fused``), and of every written file read back against the fused model
  (``FILE_KEYS``; null for a file that was not written or not run).

The sweep table (``python -m acnet_pl.cli.sweep_table``) averages the ``val`` top-1 of a sweep's reports.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from acnet_pl.deploy.verification import MEASURE
from acnet_pl.utils.files import atomic_write_text, sha256_file
from acnet_pl.utils.text import render_rows

REPORT_FORMAT = "acnet-pl-deploy-report"
REPORT_VERSION = 2
REPORT_NAME = "report.json"
#: The writers, as the report's ``tool`` names them.
FUSE_CALLBACK, DEPLOY_COMMAND = "FuseCallback", "deploy.py"
#: The deploy files (``exporters.EXPORTERS``): their ``files`` key -> their ``errors`` key.
FILE_KEYS = {"deploy": "deploy_pt", "onnx": "onnx", "torchscript": "torchscript"}


def new_report(
    *,
    tool: str,
    model: Mapping[str, Any],
    block: Mapping[str, Any],
    fold_bn: bool,
    source: str | None,
    source_kind: str,
) -> dict[str, Any]:
    """A report with every key of the format; what is not known yet is None (see the module docstring).

    Args:
        tool: ``FUSE_CALLBACK`` or ``DEPLOY_COMMAND``.
        source: the checkpoint or deploy.pt the weights come from (the fuse callback: last.ckpt, if any).
        source_kind: ``"training"`` (the model in memory at the end of fit), ``"checkpoint"`` or ``"deploy"``.
    """
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "tool": tool,
        "ok": False,
        "status": None,  # deployed | refused | diverged | not_trained
        "error": None,
        "model": {"name": model.get("name"), "num_classes": model.get("num_classes")},
        "block": dict(block),
        "fold_bn": bool(fold_bn),
        "layout": None,
        "input_size": None,
        "source": source,
        "source_kind": source_kind,
        "source_sha256": None,
        "epoch": None,
        "global_step": None,
        "train_model": None,  # {params, flops} of the training form
        "deploy_model": None,  # {params, flops} of the fused form
        "verification": None,  # {input, samples, measure, tolerance, precision}
        "errors": {"fused": None, **dict.fromkeys(FILE_KEYS.values())},
        "val": None,
        "files": {**dict.fromkeys(FILE_KEYS), "report": None},
        "written": {},  # {file name: {sha256, bytes}}
        "output_dir": None,
        "notes": [],
        "torch_version": torch.__version__,
    }


def verification_entry(input_: str, samples: int, tolerance: float, precision: str) -> dict[str, Any]:
    """The report's ``verification`` entry: on what, how many samples, the measure and its tolerance."""
    return {
        "input": input_,
        "samples": int(samples),
        "measure": MEASURE,
        "tolerance": float(tolerance),
        "precision": precision,
    }


def file_entries(folder: str | os.PathLike, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256", "bytes"}}`` of the files ``names`` in ``folder`` (the report's ``written``)."""
    folder = Path(folder)
    return {
        name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
        for name in names
    }


def write_report(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``report`` as indented JSON, atomically."""
    return atomic_write_text(json.dumps(report, indent=2) + "\n", path)


def is_fuse_callback_report(path: str | os.PathLike) -> bool:
    """True when ``path`` is a ``report.json`` the fuse callback wrote."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and (report.get("format"), report.get("tool")) == (
        REPORT_FORMAT,
        FUSE_CALLBACK,
    )


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def format_deploy_report(report: Mapping[str, Any]) -> str:
    """A report as ``name  value`` lines: model, sizes, accuracy (when measured), errors, files."""
    before, after = report["train_model"], report["deploy_model"]
    block = (report.get("block") or {}).get("name", "base")
    rows = [
        ("model", f"{report['model']['name']} ({report['model']['num_classes']} classes), block={block}"),
        ("layout", str(report["layout"])),
        ("params", f"{before['params']:,} -> {after['params']:,}"),
        ("FLOPs", f"{before['flops']:,} -> {after['flops']:,}"),
    ]
    val = report.get("val")
    if val is not None:
        for k in ("top1", "top5"):
            rows.append(
                (f"val {k}", f"{val['before'][k]:.4f} -> {val['after'][k]:.4f} ({val['samples']} samples)")
            )
    for name, errors in report["errors"].items():
        if errors is not None:
            abs_, rel = errors["max_abs"], errors["max_rel"]
            text = "NaN/Inf" if rel is None else f"abs {abs_:.2e}, rel {rel:.2e}"
            rows.append((f"max error {name}", text))
    verification = report.get("verification")
    if verification is not None:
        rows.append(("verified on", f"{verification['input']} (tolerance {verification['tolerance']:g})"))
    for name, info in report["written"].items():
        rows.append(("wrote", f"{Path(report['output_dir']) / name} ({_human_bytes(info['bytes'])})"))
    return render_rows(rows)
