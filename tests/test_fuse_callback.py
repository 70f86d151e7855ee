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
from acnet_pl.training.callbacks.fuse import compare_models, verdict

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
    )  # what the sweep report reads
    assert report["tool"] == "FuseCallback" and report["files"] == {
        "deploy": "deploy.pt",
        "onnx": None,
        "torchscript": None,
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
    with pytest.raises(RuntimeError, match="disagrees with the trained one"):
        _stop_after_fit(callback, trainer, wrong)
    report = json.loads((tmp_path / "deploy" / "report.json").read_text())
    assert report["ok"] is False and report["status"] == "refused" and report["files"]["deploy"] is None
    assert report["errors"]["fused"]["max_rel"] > 10 * LOGIT_RTOL  # measured 0.55: not a rounding case
    assert "above logit_rtol" in report["error"]
    assert not (tmp_path / "deploy" / "deploy.pt").exists()


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


def test_untrained_model_is_not_deployed(tmp_path: Path) -> None:
    """trainer.max_epochs=0: no training step, so no deploy.pt; report.json and the error say why."""
    callback = FuseCallback(dirpath="deploy")
    with pytest.raises(ValueError, match=r"no training step was taken \(trainer.max_epochs=0"):
        fit_tiny(tmp_path, callbacks=[callback], max_epochs=0)
    report = json.loads((tmp_path / "deploy" / "report.json").read_text())
    assert (report["ok"], report["status"], report["global_step"]) == (False, "not_trained", 0)
    assert not (tmp_path / "deploy" / "deploy.pt").exists()


class FixedLogits(nn.Module):
    """Returns row `int(x[i])` of a fixed logit table: a 'model' whose outputs a test chooses exactly."""

    def __init__(self, logits: torch.Tensor, relative_noise: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        noise = torch.zeros_like(logits)
        if relative_noise:
            generator = torch.Generator().manual_seed(seed)
            uniform = torch.rand(logits.shape, generator=generator, dtype=logits.dtype)
            noise = (uniform * 2 - 1) * relative_noise
        self.table = logits * (1 + noise)  # not a buffer: no weights, whatever the logits hold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.long()]


def _near_tied_logits(n: int, classes: int, gap: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of scale 10 whose 1st/2nd and 5th/6th places are within `gap`; labels at rank 1 or rank 5."""
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, classes, generator=generator, dtype=torch.float64) * 2).clamp(-9, 9)
    order = logits.argsort(dim=1, descending=True)
    rows = torch.arange(n)

    def within_gap() -> torch.Tensor:
        return torch.rand(n, generator=generator, dtype=torch.float64) * gap

    logits[rows, order[:, 0]] = 10.0
    logits[rows, order[:, 1]] = 10.0 - within_gap()
    logits[rows, order[:, 5]] = logits[rows, order[:, 4]] - within_gap()
    labels = torch.where(rows % 2 == 0, order[:, 0], order[:, 4])
    return logits, labels


def test_reduced_precision_rounding_on_near_ties_is_accepted() -> None:
    """TF32-like rounding (4e-4 relative on every logit) over 4000 near-tied samples: flips, yet accepted.

    Many top-1/top-5 hits flip (the old rule, counts within one sample, refused this), but every
    flip is at a near-tie and every logit is within tolerance.
    """
    logits, labels = _near_tied_logits(4000, 10, gap=2e-3)
    trained = FixedLogits(logits)
    fused = FixedLogits(logits, relative_noise=4e-4)
    index = torch.arange(len(labels), dtype=torch.float32)
    batches = [(index[i : i + 500], labels[i : i + 500]) for i in range(0, len(labels), 500)]
    result = compare_models(trained, fused, batches)
    assert verdict(result, trained, fused) is None
    assert 3.9e-4 < result["logit_error"].summary()["max_rel"] <= 4e-4  # the emulated rounding, at full size
    assert result["top1_flips"] > 100 and result["top5_flips"] > 50  # 531 and 66
    before, after = result["before"], result["after"]
    assert abs(before["correct_top1"] - after["correct_top1"]) > 1  # what the old rule refused
    assert result["top1_flips"] <= result["near_ties"] and result["top5_flips"] <= result["near_ties"]


@pytest.mark.parametrize("error", [2e-3, 1e-2])
def test_a_logit_error_beyond_rounding_is_refused(error: float) -> None:
    """The same set with one class's logit off by `error` x the scale (a wrong fusion): refused."""
    logits, labels = _near_tied_logits(4000, 10, gap=2e-3)
    wrong = logits.clone()
    wrong[:, 3] += error * logits.abs().max()
    trained, fused = FixedLogits(logits), FixedLogits(wrong)
    index = torch.arange(len(labels), dtype=torch.float32)
    result = compare_models(trained, fused, [(index, labels)])
    assert result["logit_error"].summary()["max_rel"] == pytest.approx(error, rel=1e-6)
    message = verdict(result, trained, fused)
    assert message is not None and "above logit_rtol=0.001" in message


def test_nan_logits_of_the_fused_model_are_counted_not_hidden() -> None:
    """One NaN logit in one sample: max |diff| is not a number (no max(0.0, nan) == 0.0) and it is refused."""
    logits, labels = _near_tied_logits(40, 10, gap=1e-3)
    broken = logits.clone()
    broken[7, 2] = float("nan")
    trained, fused = FixedLogits(logits), FixedLogits(broken)
    result = compare_models(trained, fused, [(torch.arange(40, dtype=torch.float32), labels)])
    assert result["logit_error"].summary() == {"max_abs": None, "max_rel": None, "logit_scale": None}
    assert result["nonfinite_samples"] == {"before": 0, "after": 1}
    assert (
        verdict(result, trained, fused)
        == "the fused model outputs NaN/Inf logits on 1 of 40 validation samples"
    )


def test_compare_models_top5_with_ten_classes() -> None:
    """10 classes, the label at rank 1..10 in turn (twice): top-1 and top-5 counts are exact."""
    ranks = torch.arange(20) % 10  # label rank 0 (best) .. 9
    logits = torch.arange(10, 0, -1, dtype=torch.float32).repeat(20, 1)  # class c has logit 10 - c
    labels = ranks.clone()  # class r sits at rank r
    model = FixedLogits(logits)
    index = torch.arange(20, dtype=torch.float32)
    result = compare_models(model, model, [(index[:7], labels[:7]), (index[7:], labels[7:])])
    assert result["before"]["correct_top1"] == 2  # ranks 1 only
    assert result["before"]["correct_top5"] == 10  # ranks 1-5, twice
    assert result["before"]["top5"] == 0.5
    # the label at ranks 2nd-6th: top-1 misses all 5, top-5 hits ranks 2-5 (4), misses the 6th
    second_to_sixth = (ranks >= 1) & (ranks <= 5)
    result = compare_models(model, model, [(index[second_to_sixth], labels[second_to_sixth])])
    assert (result["before"]["correct_top1"], result["before"]["correct_top5"]) == (0, 8)


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
    assert result["logit_error"].summary()["max_abs"] == pytest.approx(0.25, abs=1e-6)


def test_limit_batches_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit_batches"):
        FuseCallback(limit_batches=0)
