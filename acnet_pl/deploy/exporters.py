"""The deployed forms of a fused model: deploy.pt, ONNX (run with onnxruntime) and TorchScript.

Each ``Exporter`` writes its file and loads it back as a function from inputs to logits, so the deploy
pipeline verifies what it wrote, not the model in memory.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acnet_pl.deploy.record import load_deployed
from acnet_pl.utils.files import atomic_torch_save, atomic_write

#: ONNX opset of ``export_onnx`` (the torch.export-based exporter's default).
ONNX_OPSET = 18
Logits = Callable[[torch.Tensor], torch.Tensor]


def _example_input(model: nn.Module, input_size: Sequence[int], batch: int) -> torch.Tensor:
    ref = next(model.parameters(), None)
    x = torch.randn(batch, *[int(v) for v in input_size], generator=torch.Generator().manual_seed(0))
    return x.to(device=ref.device, dtype=ref.dtype) if ref is not None else x


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No warnings, stdout or log records below ERROR meanwhile: the exporters and onnxruntime.quantization
    print progress, deprecation notes and a hint on every call; the deploy command prints its own summary."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: Sequence[int]) -> Path:
    """Export an eval-mode ``model`` to one ONNX file (input ``"input"`` with a dynamic batch axis, output
    ``"logits"``) with torch.export's exporter, written atomically once ``onnx.checker`` accepted it."""
    import onnx  # optional (the [dev] extra, or pip install onnx): needed for onnx=true only

    x = _example_input(model, input_size, batch=2)  # batch 1 would be specialised away

    def write(tmp: str) -> None:
        with quiet(), torch.no_grad():
            torch.onnx.export(
                model,
                (x,),
                tmp,
                dynamo=True,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=ONNX_OPSET,
                external_data=False,
                verbose=False,
            )
        onnx.checker.check_model(tmp, full_check=True)

    return atomic_write(path, write)


def load_onnx(model: str | os.PathLike | Any) -> Logits | None:
    """Logits of an ONNX file or ModelProto with onnxruntime (CPU, float32); None without onnxruntime."""
    try:
        import onnxruntime as ort  # optional, like onnx
    except ImportError:
        return None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.detach().float().cpu().numpy()})[0])


def export_torchscript(model: nn.Module, path: str | os.PathLike, input_size: Sequence[int]) -> Path:
    """Trace an eval-mode ``model`` with ``torch.jit.trace`` and save it atomically; any batch size runs."""
    x = _example_input(model, input_size, batch=2)

    def write(tmp: str) -> None:
        with quiet(), torch.no_grad():
            torch.jit.save(torch.jit.trace(model, x, check_trace=False), tmp)

    return atomic_write(path, write)


def load_torchscript(path: str | os.PathLike) -> Logits:
    """Logits of a TorchScript file (CPU). ``torch.jit.load`` is not a restricted loader: use it on files
    this tool wrote, not on downloads."""
    with quiet():
        module = torch.jit.load(str(path), map_location="cpu").eval()
    return lambda x: module(x.detach().cpu())


def _load_deploy_pt(path: str | os.PathLike) -> Logits:
    model = load_deployed(path)
    return lambda x: model.to(x.device)(x)


@dataclass(frozen=True)
class Exporter:
    """One deployed form: its report ``files`` key, file name, label in messages, ``write(fused model,
    deploy record, path)`` and ``load(path)`` -> logits function, or None when it cannot run here
    (``missing`` says why)."""

    key: str
    filename: str
    label: str
    write: Callable[[nn.Module, dict[str, Any], Path], Any]
    load: Callable[[Path], Logits | None]
    missing: str = ""


EXPORTERS = {
    "deploy": Exporter(
        "deploy", "deploy.pt", "deploy.pt reloaded", lambda m, r, p: atomic_torch_save(r, p), _load_deploy_pt
    ),
    "onnx": Exporter(
        "onnx",
        "deploy.onnx",
        "deploy.onnx (onnxruntime)",
        lambda m, r, p: export_onnx(m, p, r["input_size"]),
        load_onnx,
        "onnxruntime is not installed: deploy.onnx was checked, not run",
    ),
    "torchscript": Exporter(
        "torchscript",
        "deploy.ts",
        "deploy.ts (torch.jit.load)",
        lambda m, r, p: export_torchscript(m, p, r["input_size"]),
        load_torchscript,
    ),
}
