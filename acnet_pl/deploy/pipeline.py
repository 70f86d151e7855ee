"""The one deploy pipeline (fuse callback and deploy.py): fuse -> verify -> record -> report -> write.

Every file is written to a hidden staging folder and read back; only when all of them pass the one
``verification.Comparison`` are they renamed into place, ``report.json`` last, so a refused model leaves
nothing that looks finished.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acnet_pl.deploy.checkpoint import Source, validation_loader
from acnet_pl.deploy.config import LOGIT_RTOL, QuantizeOptions
from acnet_pl.deploy.exporters import EXPORTERS, load_onnx
from acnet_pl.deploy.quantization import FIGURE_FILE, INT8_FILE, quantize_int8
from acnet_pl.deploy.record import make_deploy_record
from acnet_pl.deploy.report import FILE_KEYS, REPORT_NAME, new_report, write_report
from acnet_pl.deploy.verification import (
    MEASURE,
    Candidate,
    Comparison,
    full_fp32,
    nonfinite_entries,
    nonfinite_message,
)
from acnet_pl.reparam import fuse
from acnet_pl.utils.files import sha256_file
from acnet_pl.utils.flops import model_stats


def verification_batches(
    source: Source,
    batches: int | None,
    batch_size: int | None,
    use_data: bool = True,
    seed: int = 0,
    labelled: bool = False,
) -> tuple[list[Any], str]:
    """``batches`` (None: all) validation batches (``labelled``: (images, labels)) of the source's stored
    data config, else seeded random input (``labelled``: ValueError); and a sentence saying which."""
    reason = source.data_config_origin if use_data else "verify.use_data=false"
    if use_data and source.data_config is not None:
        try:
            loader = validation_loader(source.data_config, batch_size=batch_size, num_workers=0)
            out = [batch[:2] if labelled else batch[0] for batch in itertools.islice(loader, batches)]
            if not out:
                raise ValueError("its validation set is empty")
            name = source.data_config["_target_"].rsplit(".", 1)[-1]
            samples = sum(len(x[0] if labelled else x) for x in out)
            return out, (
                f"validation data ({name}: {len(out)} batches, {samples} samples; "
                f"config from {source.data_config_origin})"
            )
        except Exception as err:  # noqa: BLE001 - any failure to read the data falls back to random input
            message = " ".join(str(err).split())[:200] or type(err).__name__
            reason = f"the data of {source.data_config_origin} did not load: {message}"
    if labelled:
        raise ValueError(
            f"quantize=int8 needs the run's labelled validation data, and there is none: {reason}"
        )
    generator = torch.Generator().manual_seed(seed)
    out = [torch.randn(batch_size, *source.input_size, generator=generator) for _ in range(batches)]
    size = "x".join(str(v) for v in source.input_size)
    return out, f"random normal input ({batches} batches of {batch_size} x {size}; {reason})"


def _weights_problem(trained: nn.Module, fused: nn.Module) -> str | None:
    for name, model in (("trained", trained), ("fused", fused)):
        state = model.state_dict()
        bad = nonfinite_entries(state)
        if bad:
            return f"the {name} model's weights are not finite: {nonfinite_message(bad, len(state))}"
    return None


def deploy_source(
    source: Source,
    batches: Iterable[Any],
    where: str,
    *,
    tool: str,
    output_dir: Path | None,
    fold_bn: bool = False,
    exports: Sequence[str] = (),
    rtol: float = LOGIT_RTOL,
    tolerance_name: str = "logit_rtol",
    device: torch.device | str = "cpu",
    limit_batches: int | None = None,
    report_refusal: bool = False,
    quantize: QuantizeOptions | None = None,
    calibration: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Fuse ``source.model``, verify it and its files on ``batches``, write them; return the deploy report.

    Args:
        batches: inputs ``x`` or ``(x, labels)`` (labels: top-1/top-5 go into the report's ``val``).
        where: what the batches are, for the report and messages.
        output_dir: where the files go; None: verify the fused model only, write nothing.
        exports: forms besides deploy.pt (``EXPORTERS`` keys).
        report_refusal: also write ``report.json`` (and nothing else) when the model is refused.
        quantize: also deploy.int8.onnx (judged by ``quantize.max_top1_drop`` on the labelled ``batches``)
            and quantization.png, calibrated on the images ``calibration``.
    """
    notes = []
    if source.folded and not fold_bn:
        notes.append("the input deploy.pt already has BN folded; kept folded")
    fold_bn = fold_bn or source.folded
    trained = source.model.to(device).eval()
    fused = fuse(trained, fold_bn=fold_bn).eval()
    shared = ("model_name", "num_classes", "block", "input_size", "mean", "std", "class_names")
    record = make_deploy_record(  # the Source's fields it takes by the same names, and where it came from
        fused.state_dict(),
        **{key: getattr(source, key) for key in (*shared, "added_biases", "pretrained_from")},
        source=None if source.path is None else str(Path(source.path).resolve()),
        fold_bn=fold_bn,
    )
    error = _weights_problem(trained, fused)  # then no file is worth writing
    if quantize is not None:  # the INT8 file is made from deploy.onnx and judged on labelled batches
        exports = list(dict.fromkeys([*exports, "onnx"]))
        batches = [(batch[0], batch[1]) for batch in itertools.islice(batches, limit_batches)]
    exporters = [EXPORTERS[key] for key in ("deploy", *exports)] if output_dir and not error else []
    created = [d for d in (output_dir, *output_dir.parents) if not d.exists()] if output_dir else []
    staging = None
    try:
        candidates = [Candidate("fused", "fused model", fused)]
        if exporters:
            output_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".deploy-staging-", dir=output_dir))
        for exporter in exporters:
            exporter.write(fused, record, staging / exporter.filename)
            run = exporter.load(staging / exporter.filename)
            if run is None:
                notes.append(exporter.missing)
            else:
                candidates.append(Candidate(FILE_KEYS[exporter.key], exporter.label, run, against="fused"))
        quantization, files = None, {exporter.key: exporter.filename for exporter in exporters}
        if quantize is not None and exporters:
            from acnet_pl.analysis.figures import quantization_figure, save_figure  # matplotlib: INT8 only

            quantization = quantize_int8(
                staging / "deploy.onnx", staging / INT8_FILE, calibration, batches, quantize
            )
            save_figure(
                quantization_figure([{"label": source.model_name, **quantization}]), staging / FIGURE_FILE
            )
            quantization["figure"], files["int8"] = FIGURE_FILE, INT8_FILE
            run = load_onnx(staging / INT8_FILE)
            label = f"{INT8_FILE} (onnxruntime)"
            candidates.append(
                Candidate("int8", label, run, against="fused", max_top1_drop=quantize.max_top1_drop)
            )
        comparison = Comparison(trained, candidates, rtol)
        with full_fp32():  # TF32 (torch's default for cuDNN convs) would add ~4e-4 of rounding
            comparison.run(batches, device, limit_batches)
        error = error or comparison.problem(tolerance_name)
        written = [] if error else [*files.values(), *([FIGURE_FILE] if quantization else [])]
        files = {} if error else files
        if output_dir is not None and (error is None or report_refusal):
            files["report"] = REPORT_NAME
        report = new_report(
            tool,
            ok=error is None,
            status="refused" if error else "deployed",
            error=None if error is None else f"{error}; checked on {where}",
            **{key: record[key] for key in ("model", "block", "fold_bn", "layout", "input_size", "source")},
            source_kind=source.kind,
            pretrained_from=source.pretrained_from,
            source_sha256=None if source.kind == "training" else sha256_file(source.path),
            epoch=source.epoch,
            global_step=source.global_step,
            train_model=model_stats(trained, source.input_size),
            deploy_model=model_stats(fused, source.input_size),
            verification={
                "input": where,
                "samples": comparison.samples,
                "measure": MEASURE,
                "tolerance": float(rtol),
                "precision": "float32, TF32 off",
            },
            errors={name: e.summary() for name, e in comparison.errors.items()},
            val=comparison.val("fused"),
            quantization=quantization,
            files=files,
            written={
                name: {"sha256": sha256_file(staging / name), "bytes": (staging / name).stat().st_size}
                for name in written
            },
            output_dir=None if output_dir is None else str(output_dir.resolve()),
            notes=notes,
        )
        for name in written:
            os.replace(staging / name, output_dir / name)
        if report["files"]["report"]:
            write_report(report, output_dir / REPORT_NAME)  # last: the folder is complete once it is there
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # innermost first: a run that wrote nothing leaves no empty folder behind
            if folder.is_dir():
                if any(folder.iterdir()):
                    break
                folder.rmdir()
    return report
