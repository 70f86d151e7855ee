"""FuseCallback: deploy.pt + report.json after fit, verified against the trained model; failures are loud."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import fit_tiny
from torch import nn

import acnet_pl.callbacks.fuse as fuse_module
from acnet_pl.callbacks import FuseCallback
from acnet_pl.callbacks.fuse import compare_models
from acnet_pl.export import FUSE_REPORT_FORMAT, load_deployed
from acnet_pl.models import build_model

LOGIT_ATOL = 1e-4


@pytest.mark.parametrize("block", ["acb", "base"])
def test_fuse_callback_writes_verified_deploy_files(tmp_path: Path, block: str) -> None:
    callback = FuseCallback(dirpath="deploy")
    trainer, module, data = fit_tiny(tmp_path, block=block, callbacks=[callback])
    deploy_dir = tmp_path / "deploy"  # relative dirpath: under the trainer's default_root_dir
    report = json.loads((deploy_dir / "report.json").read_text())
    assert report == callback.report
    assert (report["format"], report["version"]) == (FUSE_REPORT_FORMAT, 1)  # what the sweep report reads
    assert report["ok"] is True and report["error"] is None
    assert report["model"] == {"name": "cifar_quick", "num_classes": 4}
    assert report["block"]["name"] == block
    val = report["val"]
    assert val["samples"] == 16
    assert val["before"] == val["after"]
    assert val["max_abs_logit_diff"] < LOGIT_ATOL
    base_params = sum(p.numel() for p in build_model("cifar_quick", 4).parameters())
    assert report["deploy_model"]["params"] == base_params
    if block == "acb":
        assert report["train_model"]["params"] > base_params
        assert report["train_model"]["flops"] > report["deploy_model"]["flops"] > 0
    else:
        assert report["train_model"] == report["deploy_model"]

    record = torch.load(deploy_dir / "deploy.pt", map_location="cpu", weights_only=True)
    assert record["format"] == "acnet-pl-deploy" and record["block"]["name"] == block
    assert record["input_size"] == [3, 16, 16] and record["fold_bn"] is False
    base = build_model("cifar_quick", num_classes=4, block="base")
    base.load_state_dict(record["state_dict"], strict=True)
    x = torch.stack([data.val_set[i][0] for i in range(8)])
    with torch.no_grad():
        assert (base.eval()(x) - module.model.eval()(x)).abs().max().item() < LOGIT_ATOL
        assert torch.equal(load_deployed(deploy_dir / "deploy.pt")(x), base(x))


def test_fuse_callback_fold_bn(tmp_path: Path) -> None:
    callback = FuseCallback(dirpath=str(tmp_path / "out"), fold_bn=True, limit_batches=1)
    fit_tiny(tmp_path, callbacks=[callback])
    report = callback.report
    assert report["ok"] and report["fold_bn"] is True
    assert report["val"]["samples"] == 16  # one batch of 16
    assert report["val"]["max_abs_logit_diff"] < LOGIT_ATOL
    model = load_deployed(tmp_path / "out" / "deploy.pt")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("off_by", [1, 2])
def test_fuse_callback_tolerates_one_sample_and_refuses_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, off_by: int
) -> None:
    """Top-1 counts may differ by one sample (float ties); more: error in report.json, no deploy.pt, raise."""
    real_compare = fuse_module.compare_models

    def disagreeing(*args, **kwargs):
        result = real_compare(*args, **kwargs)
        after = result["after"]
        result["after"] = {**after, "correct_top1": after["correct_top1"] + off_by}
        return result

    monkeypatch.setattr(fuse_module, "compare_models", disagreeing)
    callback = FuseCallback(dirpath="deploy")
    if off_by == 1:
        fit_tiny(tmp_path, callbacks=[callback])
        assert callback.report["ok"] is True
        assert (tmp_path / "deploy" / "deploy.pt").is_file()
        return
    with pytest.raises(RuntimeError, match="disagrees with the trained one"):
        fit_tiny(tmp_path, callbacks=[callback])
    report = json.loads((tmp_path / "deploy" / "report.json").read_text())
    assert report["ok"] is False and "correct_top1" in report["error"]
    assert report["files"]["deploy"] is None
    assert not (tmp_path / "deploy" / "deploy.pt").exists()


def test_compare_models_counts_and_difference() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    shifted = nn.Linear(5, 3)
    shifted.load_state_dict(model.state_dict())
    with torch.no_grad():
        shifted.bias += 0.25
    x = torch.randn(10, 5)
    y = model(x).argmax(1)
    result = compare_models(model, shifted, [(x[:6], y[:6]), (x[6:], y[6:])])
    assert result["samples"] == 10
    assert result["before"]["correct_top1"] == 10 and result["before"]["top1"] == 1.0
    assert result["before"]["correct_top5"] == 10  # top-5 capped at 3 classes: always a hit
    assert result["after"] == result["before"]  # a constant shift keeps the ranking
    assert result["max_abs_logit_diff"] == pytest.approx(0.25, abs=1e-6)


def test_limit_batches_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit_batches"):
        FuseCallback(limit_batches=0)
