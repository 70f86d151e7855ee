"""Exporters of a fused model to other runtimes: ONNX (run with onnxruntime) and TorchScript.

Each writes its file atomically and has a ``run_*`` twin that computes logits from the written file,
so ``deploy.py`` verifies what it wrote, not the model in memory.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from acnet_pl.utils.files import atomic_write

#: ONNX opset of ``export_onnx`` (the torch.export-based exporter's default).
ONNX_OPSET = 18


def _example_input(model: nn.Module, input_size: Sequence[int], batch: int) -> torch.Tensor:
    ref = next(model.parameters(), None)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *[int(v) for v in input_size], generator=generator)
    return x.to(device=ref.device, dtype=ref.dtype) if ref is not None else x


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # The exporters print progress and deprecation notes; the deploy command prints its own summary.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------------------------------
# ONNX


def export_onnx(
    model: nn.Module, path: str | os.PathLike, input_size: Sequence[int], *, opset: int = ONNX_OPSET
) -> Path:
    """Export ``model`` (eval mode) to one self-contained ONNX file with a dynamic batch axis, then check it.

    Uses the torch.export-based exporter (torch's default, deterministic, offline); input ``"input"``
    (N, C, H, W), output ``"logits"``. The file is written atomically and only after
    ``onnx.checker.check_model`` accepted it.
    """
    import onnx  # optional (the [dev] extra, or pip install onnx): needed for onnx=true only

    x = _example_input(model, input_size, batch=2)  # batch 1 would be specialised away
    was_training = model.training
    model.eval()

    def write(tmp: str) -> None:
        with _quiet(), torch.no_grad():
            torch.onnx.export(
                model,
                (x,),
                tmp,
                dynamo=True,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
        onnx.checker.check_model(tmp, full_check=True)

    try:
        return atomic_write(path, write)
    finally:
        model.train(was_training)


def onnxruntime_available() -> bool:
    """True when onnxruntime can be imported (ONNX files are then run, not only checked)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def run_onnx(path: str | os.PathLike, inputs: torch.Tensor) -> torch.Tensor:
    """Logits of an ONNX file from ``export_onnx`` on ``inputs`` with onnxruntime (CPU, float32)."""
    import onnxruntime as ort  # optional, like onnx

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    (logits,) = session.run(None, {name: inputs.detach().float().cpu().numpy()})
    return torch.from_numpy(logits)


# --------------------------------------------------------------------------------------------------
# TorchScript


def export_torchscript(model: nn.Module, path: str | os.PathLike, input_size: Sequence[int]) -> Path:
    """Trace ``model`` (eval mode) with ``torch.jit.trace`` and save it atomically; any batch size runs."""
    x = _example_input(model, input_size, batch=2)
    was_training = model.training
    model.eval()

    def write(tmp: str) -> None:
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(model, x, check_trace=False)
            torch.jit.save(traced, tmp)

    try:
        return atomic_write(path, write)
    finally:
        model.train(was_training)


def run_torchscript(path: str | os.PathLike, inputs: torch.Tensor) -> torch.Tensor:
    """Logits of a TorchScript file on ``inputs`` (CPU).

    ``torch.jit.load`` is not a restricted loader: use it on files this tool wrote, not on downloads.
    """
    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu")
    module.eval()
    with torch.no_grad():
        return module(inputs.detach().cpu())
