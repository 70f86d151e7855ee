"""FuseCallback: deploy.pt + report.json after fit, verified against the trained model; failures are loud."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import fit_tiny
from torch import nn

from acnet_pl.blocks import ACBlock
from acnet_pl.blocks.transforms import bn_scale_shift
from acnet_pl.deploy.record import load_deployed
from acnet_pl.deploy.report import REPORT_FORMAT, REPORT_VERSION
from acnet_pl.deploy.verification import LOGIT_RTOL
from acnet_pl.models import build_model
from acnet_pl.training.callbacks import FuseCallback

LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def fitted_acb(tmp_path_factory: pytest.TempPathFactory):
    """One tiny ACB fit with a FuseCallback: (trainer, module, data, callback, root), shared by the tests."""
    root = tmp_path_factory.mktemp("fitted_acb")
    callback = FuseCallback(dirpath="deploy")
    trainer, module, data = fit_tiny(root, block="acb", callbacks=[callback])
    return trainer, module, data, callback, root


@pytest.fixture
def fitted_base(tmp_path: Path):
    callback = FuseCallback(dirpath="deploy")
    trainer, module, data = fit_tiny(tmp_path, block="base", callbacks=[callback])
    return trainer, module, data, callback, tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("fitted", ["fitted_acb", "fitted_base"])
def test_fuse_callback_writes_verified_deploy_files(request: pytest.FixtureRequest, fitted: str) -> None:
    trainer, module, data, callback, root = request.getfixturevalue(fitted)
    block = module.hparams.block["name"]
    deploy_dir = root / "deploy"  # relative dirpath: under the trainer's default_root_dir
    report = json.loads((deploy_dir / "report.json").read_text())
    assert report == callback.report
    assert (report["format"], report["version"]) == (
        REPORT_FORMAT,
        REPORT_VERSION,
    )  # what the sweep table reads
    assert report["tool"] == "FuseCallback" and report["files"] == {
        "deploy": "deploy.pt",
        "onnx": None,
        "torchscript": None,
        "int8": None,
        "report": "report.json",
    }
    assert report["ok"] is True and report["error"] is None and report["status"] == "deployed"
    assert report["model"] == {"name": "cifar_quick", "num_classes": 4}
    assert report["block"]["name"] == block
    val = report["val"]
    assert val["samples"] == 16
    assert val["before"] == val["after"] and val["top1_agreement"] == 1.0
    assert val["nonfinite_samples"] == {"before": 0, "after": 0}
    verification = report["verification"]
    assert verification["precision"] == "float32, TF32 off" and verification["tolerance"] == LOGIT_RTOL
    assert verification["samples"] == 16
    fused = report["errors"]["fused"]
    assert fused["logit_scale"] > 0
    assert fused["max_rel"] == pytest.approx(fused["max_abs"] / fused["logit_scale"])
    assert report["errors"]["deploy_pt"]["max_rel"] == 0.0  # the written file, read back: the fused model
    assert report["errors"]["onnx"] is None and report["errors"]["torchscript"] is None  # deploy.py's to fill
    if block == "acb":
        # A real fusion rounds differently from the three branches: not 0 (a model compared with itself
        # would give exactly 0), and far below what a wrong fusion gives.
        assert 0 < fused["max_abs"] < LOGIT_ATOL
    else:
        assert fused["max_abs"] == 0.0  # nothing to fuse: the same convs
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


@pytest.mark.slow
def test_fuse_callback_fold_bn(tmp_path: Path) -> None:
    callback = FuseCallback(dirpath=str(tmp_path / "out"), fold_bn=True, limit_batches=1)
    fit_tiny(tmp_path, callbacks=[callback])
    report = callback.report
    assert report["ok"] and report["fold_bn"] is True
    assert report["val"]["samples"] == 16  # one batch of 16
    assert report["errors"]["fused"]["max_abs"] < LOGIT_ATOL
    model = load_deployed(tmp_path / "out" / "deploy.pt")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


class ForgetsHorizontalBranch(ACBlock):
    """A fusion bug: the fused kernel and bias leave out the 1xK branch (its conv and its BN)."""

    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        kernel, bias = super().get_equivalent_kernel_bias()
        c = (self.kernel_size - 1) // 2
        scale, shift = bn_scale_shift(self.hor_bn)
        hor = F.pad(self.hor_conv.weight * scale.view(-1, 1, 1, 1), (0, 0, c, c))
        return kernel - hor, bias - shift


def _stop_after_fit(callback: FuseCallback, trainer, module) -> None:
    callback.on_fit_start(trainer, module)
    callback.on_fit_end(trainer, module)


@pytest.mark.slow
def test_fuse_callback_refuses_a_genuinely_wrong_fused_model(fitted_acb, tmp_path: Path) -> None:
    """The real fuse() of blocks whose fusion is wrong: report ok false, no deploy.pt, RuntimeError."""
    trainer, module, _, _, _ = fitted_acb
    wrong = copy.deepcopy(module)
    for block in wrong.model.modules():
        if type(block) is ACBlock:
            block.__class__ = ForgetsHorizontalBranch
    with torch.no_grad():
        x = torch.randn(4, 3, 16, 16)
        assert torch.equal(wrong.model.eval()(x), module.model.eval()(x))  # the trained model is the same
    callback = FuseCallback(dirpath=str(tmp_path / "deploy"))
    with pytest.raises(RuntimeError, match="fused model: max relative error .* on the validation set"):
        _stop_after_fit(callback, trainer, wrong)
    report = json.loads((tmp_path / "deploy" / "report.json").read_text())
    assert report["ok"] is False and report["status"] == "refused" and report["files"]["deploy"] is None
    assert report["errors"]["fused"]["max_rel"] > 10 * LOGIT_RTOL  # measured 0.55: not a rounding case
    assert "above logit_rtol=0.001" in report["error"]
    assert sorted(p.name for p in (tmp_path / "deploy").iterdir()) == ["report.json"]  # no staged file left


@pytest.mark.slow
@pytest.mark.parametrize("where", ["weight", "running_var"])
def test_fuse_callback_refuses_nonfinite_weights(fitted_acb, tmp_path: Path, where: str) -> None:
    """A NaN anywhere in the trained weights or BN statistics: refused and named, whatever the logits say."""
    trainer, module, _, _, _ = fitted_acb
    broken = copy.deepcopy(module)
    block = next(m for m in broken.model.modules() if isinstance(m, ACBlock))
    with torch.no_grad():
        tensor = block.square_conv.weight if where == "weight" else block.ver_bn.running_var
        tensor.view(-1)[0] = float("nan")
    callback = FuseCallback(dirpath=str(tmp_path / "deploy"))
    with pytest.raises(RuntimeError, match="trained model's weights are not finite: 1 of .* hold NaN/Inf"):
        _stop_after_fit(callback, trainer, broken)
    report = json.loads((tmp_path / "deploy" / "report.json").read_text())
    assert report["ok"] is False and "NaN/Inf" in report["error"]
    assert report["errors"]["fused"]["max_abs"] is None  # NaN is not hidden as 0.0 (max(0.0, nan) == 0.0)
    assert report["val"]["nonfinite_samples"]["before"] == 16
    assert not (tmp_path / "deploy" / "deploy.pt").exists()


@pytest.mark.slow
def test_untrained_model_is_not_deployed(tmp_path: Path) -> None:
    """trainer.max_epochs=0: no training step, so no deploy.pt; report.json and the error say why."""
    callback = FuseCallback(dirpath="deploy")
    with pytest.raises(ValueError, match=r"no training step was taken \(trainer.max_epochs=0"):
        fit_tiny(tmp_path, callbacks=[callback], max_epochs=0)
    report = json.loads((tmp_path / "deploy" / "report.json").read_text())
    assert (report["ok"], report["status"], report["global_step"]) == (False, "not_trained", 0)
    assert not (tmp_path / "deploy" / "deploy.pt").exists()


def test_limit_batches_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit_batches"):
        FuseCallback(limit_batches=0)
