"""acnet_pl.deploy.exporters: ONNX (run with onnxruntime) and TorchScript files reproduce the model."""

from __future__ import annotations

import torch
from torch import nn

from acnet_pl.deploy.exporters import export_onnx, export_torchscript, run_onnx, run_torchscript
from acnet_pl.deploy.verification import output_error


def test_onnx_and_torchscript_exports_run_with_any_batch(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()
    x = torch.randn(5, 3, 8, 8)  # batch 5: the exports were traced with batch 2
    with torch.no_grad():
        ref = model(x)
    onnx_path = export_onnx(model, tmp_path / "m.onnx", (3, 8, 8))
    assert output_error(ref, run_onnx(onnx_path, x))["max_rel"] <= 1e-5
    ts_path = export_torchscript(model, tmp_path / "m.ts", (3, 8, 8))
    assert output_error(ref, run_torchscript(ts_path, x))["max_rel"] <= 1e-6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.ts"]  # no temp or .data files
