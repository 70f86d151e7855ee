"""export.py: safe loading, deploy records in both layouts, atomic writes, error measures, ONNX/TorchScript."""

from __future__ import annotations

import hashlib
import os
import pickle
import stat

import pytest
import torch
from torch import nn

import acnet_pl
from acnet_pl.export import (
    DEPLOY_FORMAT,
    atomic_torch_save,
    atomic_write_text,
    data_meta,
    export_onnx,
    export_torchscript,
    load_deployed,
    load_weights_only,
    make_deploy_record,
    model_stats,
    output_error,
    read_deploy_record,
    run_onnx,
    run_torchscript,
    sha256_file,
)
from acnet_pl.models import build_model
from acnet_pl.reparam import fuse


class _MakesMarker:
    """Unpickling this would run ``os.system`` (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


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


# -- safe loading ---------------------------------------------------------------------------------------


def test_load_weights_only_refuses_code_and_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _MakesMarker(marker)}}, path)
    with pytest.raises(ValueError, match=r"evil\.ckpt: refused as unsafe: it needs posix\.system") as err:
        load_weights_only(path)
    assert "nothing in it was run" in str(err.value)
    assert "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "empty file"),
        (b"epoch,loss\n1,0.5\n", "it holds text"),
        (b"\x00\x01\x02\x03garbage", "it holds binary data"),
    ],
)
def test_load_weights_only_names_not_a_checkpoint(tmp_path, content, expected):
    path = tmp_path / "x.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=expected):
        load_weights_only(path, hint="the fix")


def test_load_weights_only_truncated_missing_and_folder(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(4096)}, good)
    assert torch.equal(load_weights_only(good)["w"], torch.load(good, weights_only=True)["w"])
    half = tmp_path / "half.pt"
    half.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"half\.pt: corrupt or truncated checkpoint \(.+\); fix$"):
        load_weights_only(half, hint="fix")
    with pytest.raises(FileNotFoundError, match=r"nope\.pt: no such file"):
        load_weights_only(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="is a folder"):
        load_weights_only(tmp_path)


# -- deploy records -------------------------------------------------------------------------------------


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


# -- small helpers --------------------------------------------------------------------------------------


def test_atomic_writes_replace_and_leave_nothing_on_failure(tmp_path):
    path = tmp_path / "sub" / "report.json"
    atomic_write_text("old\n", path)
    atomic_write_text("new\n", path)
    assert path.read_text() == "new\n"
    # A plain file's permissions (umask applied), not mkstemp's private 0600.
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):  # a local lambda cannot be pickled
        atomic_torch_save({"f": lambda: 0}, tmp_path / "sub" / "deploy.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]
    assert sha256_file(path) == hashlib.sha256(b"new\n").hexdigest()


def test_output_error_numbers():
    ref = torch.tensor([[1.0, -4.0], [2.0, 0.0]], dtype=torch.float64)
    errors = output_error(ref, ref + torch.tensor([[0.0, 0.0], [0.0, 0.002]], dtype=torch.float64))
    assert errors["max_abs"] == pytest.approx(0.002, rel=1e-9)
    assert errors["max_rel"] == pytest.approx(0.002 / 4.0, rel=1e-9)  # scaled by max |ref|, not element-wise
    assert output_error(ref, ref[:1])["max_rel"] == float("inf")
    assert output_error(ref, torch.full_like(ref, float("nan")))["max_rel"] == float("inf")


def test_model_stats_counts_one_conv():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
    stats = model_stats(conv, (3, 10, 10))
    assert stats["params"] == 8 * 3 * 9 + 8
    assert stats["flops"] == 2 * 8 * 3 * 9 * 10 * 10  # 2 per multiply-add, bias not counted


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
