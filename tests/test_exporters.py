"""acnet_pl.deploy.exporters: every deployed form (deploy.pt, ONNX in onnxruntime, TorchScript), written and
read back, reproduces the model with any batch size."""

from __future__ import annotations

import pytest
import torch

from acnet_pl.deploy.exporters import EXPORTERS
from acnet_pl.deploy.record import make_deploy_record
from acnet_pl.deploy.report import FILE_KEYS
from acnet_pl.deploy.verification import output_error
from acnet_pl.models import build_model


@pytest.mark.slow
def test_every_exporter_writes_a_file_that_reproduces_the_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("cifar_quick", num_classes=3).eval()
    meta = {"input_size": [3, 16, 16], "mean": [0.0] * 3, "std": [1.0] * 3}
    record = make_deploy_record(
        model.state_dict(), model_name="cifar_quick", num_classes=3, block={"name": "base"}, **meta
    )
    x = torch.randn(5, 3, 16, 16)  # batch 5: the exports were traced with batch 2
    with torch.no_grad():
        ref = model(x)
    tolerance = {"deploy": 0.0, "onnx": 1e-5, "torchscript": 1e-6}
    assert set(EXPORTERS) | {"int8"} == set(FILE_KEYS) and set(EXPORTERS) == set(
        tolerance
    )  # report keys (int8: quantize=int8)
    for key, exporter in EXPORTERS.items():
        exporter.write(model, record, tmp_path / exporter.filename)
        with torch.no_grad():
            assert (
                output_error(ref, exporter.load(tmp_path / exporter.filename)(x))["max_rel"] <= tolerance[key]
            )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "deploy.onnx",
        "deploy.pt",
        "deploy.ts",
    ]  # no temp files
