"""convert(..., bare_convs=True): KxK convs with no BatchNorm after them become blocks with fresh branch BNs,
fused into a conv with bias; deploy files record those biases and every reader rebuilds that layout.

Round trips randomise every BN (running stats, weight, bias) after convert, fuse, load the fused state dict
strictly into the base model with a bias added on ``added_biases`` and compare in eval mode: norm-wise
relative error <= 1e-5 in float32, <= 1e-10 in float64.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from conftest import assert_rel, fit_tiny
from test_reparam import module_types, randomize_bns
from torch import nn

from acnet_pl import ConversionReport, convert, fuse
from acnet_pl.blocks import ACBlock
from acnet_pl.cli.deploy import deploy
from acnet_pl.deploy.record import load_deployed, make_deploy_record, read_deploy_record
from acnet_pl.models import build_model, registry
from acnet_pl.reparam import add_conv_biases, added_biases, count_blocks
from acnet_pl.training.callbacks import FuseCallback

TOL32, TOL64 = 1e-5, 1e-10

pytestmark = pytest.mark.usefixtures("one_thread")


class BareStemNet(nn.Module):
    """Pre-activation in miniature: a bare 3x3 stem (with bias), a BN-ReLU-conv unit (bare 3x3) on a
    residual, a conv->BN pair, a bare depthwise 5x5 whose output goes to a BN and past it, a 1x1."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 5, padding=2, groups=16, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.proj = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.conv1(F.relu(self.bn1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        y = self.dw(x)
        x = self.proj(F.relu(self.bn3(y)) + y)
        return self.fc(x.mean(dim=(2, 3)))


def _base_with_biases(build, names) -> nn.Module:
    return add_conv_biases(build(), names).eval()


def _check_bare_round_trip(build, x: torch.Tensor, tol: float, dtype=torch.float32) -> ConversionReport:
    """convert(bare_convs) -> random BNs -> fuse -> strict load into base + biases -> equal outputs."""
    report = ConversionReport()
    acnet = convert(build(), bare_convs=True, report=report).to(dtype)
    acnet = randomize_bns(acnet).eval()
    assert count_blocks(acnet) == len(report.converted) + len(report.bare)
    x = x.to(dtype)
    with torch.no_grad():
        y = acnet(x)
    biased = added_biases(acnet)
    fused = fuse(acnet)
    base = _base_with_biases(build, biased).to(dtype)
    base.load_state_dict(fused.state_dict(), strict=True)
    assert module_types(fused) == module_types(base)
    # A bias exactly where the record says one was added, nowhere else new.
    untouched = build()
    gained = [
        n
        for n, m in fused.named_modules()
        if isinstance(m, nn.Conv2d) and m.bias is not None and untouched.get_submodule(n).bias is None
    ]
    assert gained == biased
    folded = fuse(acnet, fold_bn=True)
    with torch.no_grad():
        assert_rel(base(x), y, tol, "fused")
        assert_rel(folded.eval()(x), y, tol, "fold_bn")
    return report


@pytest.mark.slow
def test_densenet121_every_3x3_conv_converted_and_round_trips():
    def build() -> nn.Module:
        return tvm.densenet121(weights=None, num_classes=10)

    torch.manual_seed(0)
    # Without bare_convs a pre-activation net gets no block at all.
    plain = ConversionReport()
    convert(build(), report=plain)
    assert plain.converted == [] and plain.bare == []

    torch.manual_seed(0)
    report = _check_bare_round_trip(build, torch.randn(2, 3, 32, 32), TOL32)
    threes = [n for n, m in build().named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(threes) == 58 and report.bare == threes and report.converted == []
    assert "58 of them bare convs" in report.summary()


def test_bare_stem_model_report_float64_and_bias():
    report = _check_bare_round_trip(BareStemNet, torch.randn(3, 3, 16, 16), TOL64, dtype=torch.float64)
    assert report.converted == ["conv2"]
    assert report.bare == ["stem", "conv1", "dw"]
    assert dict(report.skipped)["proj"] == "1x1 kernel not in kernel_sizes [3, 5]"
    # The stem had a bias already: its fused form is the base layout; conv1 and dw gain one.
    assert added_biases(convert(BareStemNet(), bare_convs=True)) == ["conv1", "dw"]
    # include/exclude and kernel_sizes apply to bare convs too.
    r = ConversionReport()
    convert(BareStemNet(), bare_convs=True, kernel_sizes=(3,), exclude=["stem"], report=r)
    assert r.bare == ["conv1"] and dict(r.skipped)["stem"] == "matched by exclude"


def test_bare_block_has_fresh_bns_with_gamma_init():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    block = ACBlock.from_conv(conv, gamma_init=1 / 3)
    assert torch.equal(block.square_conv.weight, conv.weight)
    for bn in (block.square_bn, block.ver_bn, block.hor_bn):
        assert torch.all(bn.weight == 1 / 3) and torch.all(bn.bias == 0) and torch.all(bn.running_var == 1)
    assert torch.all(block.ver_bn.running_mean == 0)


def test_bare_conv_bias_is_exact_through_training():
    """The square branch of a block made from a conv with bias b is bn(conv(x) + b), train mode included."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True).double()
    with torch.no_grad():
        conv.bias.copy_(torch.randn(6, dtype=torch.float64) * 3)
    reference = nn.Sequential(copy.deepcopy(conv), nn.BatchNorm2d(6).double())
    block = ACBlock.from_conv(conv)
    for _ in range(3):  # running statistics updated from batches
        x = torch.randn(4, 4, 8, 8, dtype=torch.float64)
        assert_rel(block.square_bn(block.square_conv(x)), reference(x), TOL64, "train mode")
    block.eval(), reference.eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    assert_rel(block.square_bn(block.square_conv(x)), reference(x), TOL64, "eval mode")


def test_add_conv_biases_refuses_what_is_not_a_bias_free_conv():
    with pytest.raises(ValueError, match="'bn1'.*not a bias-free nn.Conv2d"):
        add_conv_biases(BareStemNet(), ["bn1"])
    with pytest.raises(ValueError, match="'stem'"):
        add_conv_biases(BareStemNet(), ["stem"])  # has one already
    with pytest.raises(ValueError, match="'nope'"):
        add_conv_biases(BareStemNet(), ["nope"])


@pytest.mark.slow
def test_fuse_callback_and_deploy_py_with_bare_convs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A trained bare-conv model: the fuse callback's deploy.pt records the biases, load_deployed rebuilds
    it, and deploy.py verifies and exports it (deploy.pt, ONNX run in onnxruntime, TorchScript)."""
    spec = registry._ModelSpec(BareStemNet, (3, 16, 16), False)
    monkeypatch.setitem(registry._MODELS, "bare_stem_net", spec)
    callback = FuseCallback(dirpath="deploy")
    block = {"name": "acb", "bare_convs": True, "gamma_init": 0.5}
    trainer, module, data = fit_tiny(tmp_path, block=block, model="bare_stem_net", callbacks=[callback])
    assert callback.report["ok"], callback.report["error"]
    assert module.conversion_report.bare == ["stem", "conv1", "dw"]

    record = read_deploy_record(tmp_path / "deploy" / "deploy.pt")
    assert record["version"] == 2 and record["added_biases"] == ["conv1", "dw"]
    assert "bias on 2 bare convs" in record["layout"]
    with pytest.raises(RuntimeError, match="Unexpected key.*conv1.bias"):
        build_model("bare_stem_net", num_classes=4).load_state_dict(record["state_dict"])
    deployed = load_deployed(tmp_path / "deploy" / "deploy.pt")
    assert deployed.conv1.bias is not None and deployed.conv2.bias is None
    x = torch.stack([data.val_set[i][0] for i in range(8)])
    with torch.no_grad():
        assert_rel(deployed(x), module.model.eval()(x), TOL32, "load_deployed")

    # The fold_bn layout too: base + the biases, then every conv -> BN folded.
    folded = make_deploy_record(
        fuse(module.model, fold_bn=True).state_dict(),
        model_name="bare_stem_net",
        num_classes=4,
        block=block,
        input_size=[3, 16, 16],
        mean=[0.0] * 3,
        std=[1.0] * 3,
        fold_bn=True,
        added_biases=added_biases(module.model),
    )
    torch.save(folded, tmp_path / "folded.pt")
    with torch.no_grad():
        assert_rel(load_deployed(tmp_path / "folded.pt")(x), module.model(x), TOL32, "fold_bn load_deployed")

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    report = deploy(
        {"ckpt_path": str(ckpt), "onnx": True, "torchscript": True, "verify": {"use_data": False}}
    )
    errors = report["errors"]
    assert all(errors[k]["max_rel"] <= 1e-5 for k in ("fused", "deploy_pt", "onnx", "torchscript")), errors
    deployed = tmp_path / "deploy" / "last"
    assert read_deploy_record(deployed / "deploy.pt")["added_biases"] == ["conv1", "dw"]
    # Re-deploying the deploy file keeps its biases.
    again = deploy({"ckpt_path": str(deployed / "deploy.pt"), "output_dir": str(tmp_path / "again")})
    assert again["errors"]["deploy_pt"]["max_rel"] == 0.0
    assert read_deploy_record(tmp_path / "again" / "deploy.pt")["added_biases"] == ["conv1", "dw"]


def _preact_only(num_classes: int = 10) -> nn.Module:
    """Every 3x3 conv is bare: a stem into a ReLU, a BN-ReLU-conv unit."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def test_module_trains_a_net_of_only_bare_convs_and_says_how(monkeypatch: pytest.MonkeyPatch):
    """ACNetModule: a pre-activation net converts with bare_convs; without, the refusal names the fix."""
    from acnet_pl.training.module import ACNetModule

    monkeypatch.setitem(
        registry._MODELS, "preact_only", registry._ModelSpec(_preact_only, (3, 16, 16), False)
    )
    model = {"name": "preact_only", "num_classes": 4}
    module = ACNetModule(model=model, block={"name": "acb", "bare_convs": True})
    assert module.conversion_report.bare == ["0", "4"] and count_blocks(module.model) == 2
    with pytest.raises(ValueError, match=r"converts none of preact_only's convs.*block.bare_convs=true"):
        ACNetModule(model=model, block={"name": "acb"})
