"""acnet_pl.deploy.record: deploy.pt in both layouts, its checks, load_deployed, data_meta."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import acnet_pl
from acnet_pl.deploy.record import (
    DEPLOY_FORMAT,
    data_meta,
    load_deployed,
    make_deploy_record,
    read_deploy_record,
)
from acnet_pl.deploy.verification import output_error
from acnet_pl.models import build_model
from acnet_pl.reparam import fuse
from acnet_pl.utils.files import atomic_torch_save


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(n, generator=g))
    return model


def _record(model: nn.Module, fold_bn: bool = False) -> dict:
    return make_deploy_record(
        model.state_dict(),
        model_name="cifar_quick",
        num_classes=5,
        block={"name": "acb"},
        input_size=[3, 16, 16],
        mean=[0.5] * 3,
        std=[0.5] * 3,
        source="x.ckpt",
        fold_bn=fold_bn,
    )


@pytest.mark.slow
def test_deploy_record_roundtrip_both_layouts_same_logits(tmp_path):
    torch.manual_seed(0)
    model = _randomise_bn(build_model("cifar_quick", 5)).eval()
    atomic_torch_save(_record(model), tmp_path / "base.pt")
    atomic_torch_save(_record(fuse(model, fold_bn=True), fold_bn=True), tmp_path / "folded.pt")
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        base = load_deployed(tmp_path / "base.pt")
        folded = load_deployed(tmp_path / "folded.pt")
        assert not base.training and not folded.training
        assert output_error(ref, base(x))["max_rel"] == 0.0
        assert output_error(ref, folded(x))["max_rel"] <= 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert acnet_pl.load_deployed is load_deployed  # the package-level entry point
    record = read_deploy_record(tmp_path / "folded.pt")
    assert record["fold_bn"] is True and "folded" in record["layout"]
    assert record["format"] == DEPLOY_FORMAT and record["input_size"] == [3, 16, 16]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "something-else"}, "not an acnet-pl deploy file"),
        ({"version": 99}, "version 99 is newer"),
        ({"model": {"name": "resnet20"}}, "no valid 'model' entry"),
        ({"state_dict": {"w": [1, 2]}}, "no 'state_dict' of tensors"),
        ({"model": {"name": "foo", "num_classes": 5}}, "unknown model 'foo'"),
        ({"model": {"name": "cifar_quick", "num_classes": 7}}, r"weights do not fit .*size mismatch"),
    ],
)
def test_load_deployed_rejects_bad_records(tmp_path, change, message):
    record = {**_record(build_model("cifar_quick", 5)), **change}
    path = tmp_path / "deploy.pt"
    torch.save(record, path)
    with pytest.raises(ValueError, match=message) as err:
        load_deployed(path)
    assert str(err.value).startswith(str(path))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_load_deployed_names_nonfinite_weights(tmp_path, value):
    """A diverged model's deploy file: one line naming NaN/Inf and the first such tensor, not a NaN model."""
    record = _record(build_model("cifar_quick", 5))
    record["state_dict"]["classifier.2.bias"][2] = value
    path = tmp_path / "deploy.pt"
    torch.save(record, path)
    with pytest.raises(ValueError, match=r"weights are not finite, 1 of \d+ tensors hold NaN/Inf") as err:
        load_deployed(path)
    assert str(err.value).startswith(str(path)) and "classifier.2.bias" in str(err.value)


def test_data_meta_fills_what_is_missing():
    assert data_meta(None, "resnet18") == {
        "input_size": [3, 224, 224],
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "class_names": None,
    }
    given = {"input_size": (1, 8, 8), "mean": [0.5], "std": None, "class_names": ["a", "b"], "other": 1}
    assert data_meta(given, "resnet18") == {
        "input_size": [1, 8, 8],
        "mean": [0.5],
        "std": [1.0],
        "class_names": ["a", "b"],
    }
