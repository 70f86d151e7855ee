"""The deploy report, ``report.json``, written beside every ``deploy.pt`` by the one deploy pipeline.

The fuse callback and ``deploy.py`` fill the same keys; what one does not measure is null (``val`` without
labelled data, the ``errors`` of a file not written). The sweep table averages the ``val`` top-1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from acnet_pl.utils.files import atomic_write_text
from acnet_pl.utils.text import render_rows

REPORT_FORMAT = "acnet-pl-deploy-report"
REPORT_VERSION = 3  # 3: quantization, files.int8, errors.int8
REPORT_NAME = "report.json"
#: The writers, as the report's ``tool`` names them.
FUSE_CALLBACK, DEPLOY_COMMAND = "FuseCallback", "deploy.py"
#: The deploy files (``exporters.EXPORTERS`` and quantize=int8's): their ``files`` key -> their ``errors`` key.
FILE_KEYS = {"deploy": "deploy_pt", "onnx": "onnx", "torchscript": "torchscript", "int8": "int8"}


def new_report(tool: str, **fields: Any) -> dict[str, Any]:
    """A report of ``tool`` with every key of the format, in order; ``fields`` set some (``errors`` and
    ``files`` update theirs)."""
    report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "tool": tool,
        "ok": False,
        "status": None,  # deployed | refused | diverged | not_trained
        "error": None,
        "model": None,  # {name, num_classes}
        "block": None,
        "fold_bn": False,
        "layout": None,
        "input_size": None,
        "source": None,  # the checkpoint or deploy.pt the weights come from (the fuse callback: last.ckpt)
        "source_kind": None,  # training (the model in memory at the end of fit) | checkpoint | deploy
        "pretrained_from": None,  # the weights file the training started from (model.weights)
        "source_sha256": None,
        "epoch": None,
        "global_step": None,
        "train_model": None,  # {params, flops} of the training form
        "deploy_model": None,  # {params, flops} of the fused form
        "verification": None,  # {input, samples, measure (verification.MEASURE), tolerance, precision}
        "errors": dict.fromkeys(["fused", *FILE_KEYS.values()]),  # each {max_abs, max_rel, logit_scale}
        "val": None,
        "quantization": None,  # quantize=int8: quantization.quantize_int8's numbers (top-1, layers, latency, size)
        "files": {**dict.fromkeys(FILE_KEYS), "report": None},
        "written": {},  # {file name: {sha256, bytes}}
        "output_dir": None,
        "notes": [],
        "torch_version": torch.__version__,
    }
    for key, value in fields.items():
        if key not in report:
            raise KeyError(f"{key!r} is not a key of the deploy report")
        report[key] = {**report[key], **value} if key in ("errors", "files") else value
    return report


def write_report(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``report`` as indented JSON, atomically."""
    return atomic_write_text(json.dumps(report, indent=2) + "\n", path)


def is_fuse_callback_report(path: str | os.PathLike) -> bool:
    """True when ``path`` is a ``report.json`` the fuse callback wrote."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    made_by = (report.get("format"), report.get("tool")) if isinstance(report, dict) else None
    return made_by == (REPORT_FORMAT, FUSE_CALLBACK)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            break
        size /= 1024
    return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"


def format_deploy_report(report: Mapping[str, Any]) -> str:
    """A report as ``name  value`` lines: model, sizes, accuracy (when measured), errors, files."""
    before, after, val = report["train_model"], report["deploy_model"], report.get("val")
    block = (report.get("block") or {}).get("name", "base")
    rows = [
        ("model", f"{report['model']['name']} ({report['model']['num_classes']} classes), block={block}"),
        ("layout", str(report["layout"])),
        ("params", f"{before['params']:,} -> {after['params']:,}"),
        ("FLOPs", f"{before['flops']:,} -> {after['flops']:,}"),
    ]
    for k in ("top1", "top5") if val is not None else ():
        rows.append(
            (f"val {k}", f"{val['before'][k]:.4f} -> {val['after'][k]:.4f} ({val['samples']} samples)")
        )
    for name, errors in report["errors"].items():
        if errors is not None:
            rel = errors["max_rel"]
            text = "NaN/Inf" if rel is None else f"abs {errors['max_abs']:.2e}, rel {rel:.2e}"
            rows.append((f"max error {name}", text))
    quantization = report.get("quantization")
    if quantization is not None:
        top1, ms, size = quantization["top1"], quantization["latency_ms"], quantization["bytes"]
        kept = ", ".join(k["weight"] for k in quantization["kept_float"]) or "none"
        sizes = f"{_human_bytes(size['fp32'])} -> {_human_bytes(size['int8'])} (/{size['ratio']:.2f})"
        rows += [
            ("int8 top-1", f"{100 * top1['fp32']:.2f}% -> {100 * top1['int8']:.2f}% (fp32 -> int8 file)"),
            ("int8 latency", f"{ms['fp32']:.2f} ms -> {ms['int8']:.2f} ms (x{ms['speedup']:.2f})"),
            ("int8 size", sizes),
            ("int8 kept float", kept),
        ]
    verification = report.get("verification")
    if verification is not None:
        rows.append(("verified on", f"{verification['input']} (tolerance {verification['tolerance']:g})"))
    for name, info in report["written"].items():
        rows.append(("wrote", f"{Path(report['output_dir']) / name} ({_human_bytes(info['bytes'])})"))
    return render_rows(rows)
