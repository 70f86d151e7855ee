"""``python deploy.py ckpt_path=...``: a checkpoint (or deploy.pt) -> fused model -> verified deploy files."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from acnet_pl.deploy.checkpoint import load_source, stored_datamodule
from acnet_pl.deploy.config import deploy_options
from acnet_pl.deploy.pipeline import deploy_source, verification_batches
from acnet_pl.deploy.quantization import calibration_images
from acnet_pl.deploy.report import DEPLOY_COMMAND, REPORT_NAME, format_deploy_report, is_fuse_callback_report
from acnet_pl.utils.files import run_dir


def default_output_dir(path: str | os.PathLike, kind: str) -> Path:
    """``<run>/deploy/<name>/`` for a checkpoint ``<run>/checkpoints/<name>.ckpt`` (``<folder>/deploy/<name>/``
    elsewhere); ``<folder>/redeploy/`` for a deploy.pt (``kind == "deploy"``), never over its input."""
    path = Path(path)
    return path.parent / "redeploy" if kind == "deploy" else run_dir(path) / "deploy" / path.stem


def _output_dir(given: str | None, ckpt_path: Path, kind: str) -> Path:
    output_dir = Path(given).expanduser() if given else default_output_dir(ckpt_path, kind)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir={output_dir} is a file, not a folder; give another output_dir")
    if (output_dir / "deploy.pt").resolve() == ckpt_path.resolve():
        raise ValueError(
            f"output_dir={output_dir} would overwrite the input {ckpt_path}; give another output_dir"
        )
    if is_fuse_callback_report(output_dir / REPORT_NAME):
        raise ValueError(
            f"output_dir={output_dir} holds the fuse callback's deploy.pt and report.json (read by the sweep "
            f"table, python -m acnet_pl.cli.sweep_table); give another output_dir, e.g. {output_dir / ckpt_path.stem}"
        )
    return output_dir


def deploy(cfg: Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    """Run ``deploy.py`` on ``cfg`` (``DeployOptions``, or a partial mapping of them); return the report."""
    options = deploy_options(cfg)
    if not options.ckpt_path:
        raise ValueError(
            "ckpt_path is missing: run `python deploy.py ckpt_path=<run>/checkpoints/last.ckpt` "
            "(a checkpoint written by train.py, or a deploy.pt to re-deploy)"
        )
    ckpt_path = Path(options.ckpt_path).expanduser()
    source = load_source(ckpt_path)
    output_dir = _output_dir(options.output_dir, ckpt_path, source.kind)
    verify, quantize, calibration = options.verify, options.quantize, None
    if quantize is None:
        batches, where = verification_batches(
            source, verify.batches, verify.batch_size, verify.use_data, verify.seed
        )
    else:  # the top-1 budget: labelled validation batches of the data's own size, calibration images
        batches, where = verification_batches(source, quantize.val_batches, None, labelled=True)
        datamodule = stored_datamodule(source.data_config)
        calibration = calibration_images(datamodule, quantize.calibration_images, quantize.seed)
    print(f"verifying on {where}", flush=True)
    report = deploy_source(
        source,
        batches,
        where,
        tool=DEPLOY_COMMAND,
        output_dir=output_dir,
        fold_bn=options.fold_bn,
        exports=[key for key in ("onnx", "torchscript") if getattr(options, key)],
        rtol=verify.logit_rtol,
        tolerance_name="verify.logit_rtol",
        quantize=quantize,
        calibration=calibration,
    )
    errors = report["errors"]["fused"]
    measured = (
        "NaN/Inf"
        if errors["max_rel"] is None
        else f"max abs error {errors['max_abs']:.3e}, max rel error {errors['max_rel']:.3e}"
    )
    against = "trained" if source.kind == "checkpoint" else "input"
    print(f"fused vs {against} model: {measured} (tolerance {verify.logit_rtol:g})", flush=True)
    if not report["ok"]:
        raise ValueError(f"{report['error']}; nothing was written")
    for note in report["notes"]:
        print(f"note: {note}")
    print(format_deploy_report(report), flush=True)
    return report
