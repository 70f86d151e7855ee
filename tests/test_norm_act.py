"""Norm-act layers (BatchNorm subclasses that do more after normalising, e.g. timm's BatchNormAct2d):
a conv feeding one converts like conv -> BN, the activation stays where it was, and fuse restores the
library's own layout (the fused state dict loads strictly into the untouched timm model).

Round trips randomise every BN after convert and compare in eval mode: norm-wise relative error <= 1e-5
in float32, <= 1e-10 in float64.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import assert_rel
from test_reparam import module_types, randomize_bns
from timm.layers import BatchNormAct2d
from torch import nn

from acnet_pl import ConversionReport, convert, fuse
from acnet_pl.blocks import ACBlock
from acnet_pl.reparam import NormActSlot, add_conv_biases, added_biases, count_blocks

TOL32, TOL64 = 1e-5, 1e-10

pytestmark = pytest.mark.usefixtures("one_thread")


def _square_convs(model: nn.Module, sizes=(3, 5)) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size[0] == m.kernel_size[1] and m.kernel_size[0] in sizes
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, bare_convs",
    [
        ("regnetx_002", False),
        ("efficientnet_b0", False),
        ("mobilenetv3_small_050", False),
        # Separable convs: a bare depthwise 3x3 then a 1x1 conv into BatchNormAct2d.
        ("ese_vovnet19b_dw", True),
    ],
)
def test_timm_norm_act_round_trip_loads_into_the_untouched_model(name, bare_convs):
    def build() -> nn.Module:
        return timm.create_model(name, pretrained=False, num_classes=10)

    torch.manual_seed(0)
    report = ConversionReport()
    acnet = randomize_bns(convert(build(), bare_convs=bare_convs, report=report)).eval()
    # Every 3x3 and 5x5 conv becomes a block; without bare_convs they all feed a norm-act layer.
    assert sorted(report.converted + report.bare) == sorted(_square_convs(build()))
    assert count_blocks(acnet) == len(_square_convs(build())) and report.untraced == []
    slots = [m for m in acnet.modules() if isinstance(m, NormActSlot)]
    assert len(slots) == len(report.converted) and all(type(s.template) is BatchNormAct2d for s in slots)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = acnet(x)

    fused = fuse(acnet)
    untouched = add_conv_biases(build(), added_biases(acnet)).eval()
    untouched.load_state_dict(fused.state_dict(), strict=True)
    assert module_types(fused) == module_types(untouched)  # BatchNormAct2d where it was
    folded = fuse(acnet, fold_bn=True).eval()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    with torch.no_grad():
        assert_rel(untouched(x), y, TOL32, f"{name} fused")
        assert_rel(folded(x), y, TOL32, f"{name} fold_bn")


class NormActNet(nn.Module):
    """conv -> BatchNormAct2d (ReLU) twice, in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn1 = BatchNormAct2d(8, act_layer=nn.ReLU)
        self.conv2 = nn.Conv2d(8, 8, 5, padding=2, groups=2, bias=False)
        self.bn2 = BatchNormAct2d(8, act_layer=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.bn1(self.conv1(x))))


def test_norm_act_conversion_keeps_the_activation_in_train_and_eval_mode():
    """With the 1D branches zeroed the converted net is the original one, in train mode too (batch
    statistics, running statistics updated alike); the round trip is exact in float64."""
    torch.manual_seed(0)
    base = randomize_bns(NormActNet().double())
    acnet = convert(base)
    assert isinstance(acnet.bn1, NormActSlot) and isinstance(acnet.bn1.tail.act, nn.ReLU)
    with torch.no_grad():
        for block in (acnet.conv1, acnet.conv2):
            block.ver_conv.weight.zero_()
            block.hor_conv.weight.zero_()
    for _ in range(2):
        x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
        assert_rel(acnet(x), base(x), TOL64, "train mode")
    # conv1's bias lives in its block's running mean (shifted by -bias): compare conv2's.
    assert_rel(acnet.conv2.square_bn.running_mean, base.bn2.running_mean, TOL64, "running mean")
    assert_rel(acnet.conv2.square_bn.running_var, base.bn2.running_var, TOL64, "running var")
    acnet.eval(), base.eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    assert_rel(acnet(x), base(x), TOL64, "eval mode")

    acnet = randomize_bns(convert(NormActNet().double()), seed=3).eval()
    fused = fuse(acnet)
    restored = NormActNet().double().eval()
    restored.load_state_dict(fused.state_dict(), strict=True)
    assert type(fused.bn2) is BatchNormAct2d and isinstance(fused.bn2.act, nn.SiLU) and not fused.bn2.training
    with torch.no_grad():
        assert_rel(restored(x), acnet(x), TOL64, "float64 round trip")


class RenamedBN(nn.BatchNorm2d):
    """A subclass that only renames BatchNorm2d."""


class ResidualBN(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training)
        return y + x


class WeightedAfterBN(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training)
        return y * self.weight.mean()


@pytest.mark.parametrize(
    "bn_class, reason",
    [
        (RenamedBN, None),
        (ResidualBN, "its ResidualBN cannot be split: it uses its input after normalising"),
        (WeightedAfterBN, "its WeightedAfterBN cannot be split: it uses its weight after normalising"),
    ],
)
def test_batchnorm_subclasses_split_or_skipped_with_the_reason(bn_class, reason):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bn_class(4), nn.ReLU())
    report = ConversionReport()
    acnet = randomize_bns(convert(model, report=report)).eval()
    if reason is not None:
        assert report.converted == [] and dict(report.skipped)["0"] == reason
        return
    assert isinstance(acnet[0], ACBlock) and report.converted == ["0"]
    fused = fuse(acnet)
    assert type(fused[1]) is RenamedBN
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_rel(fused(x), acnet(x), TOL32, "RenamedBN round trip")


def test_timm_stays_optional_at_run_time():
    """No module of the library imports timm at import time (it is a [dev] extra; norm-act layers are
    found by their BatchNorm base class and traced, never by timm's names)."""
    import ast
    from pathlib import Path

    import acnet_pl

    importers = []
    for path in Path(acnet_pl.__file__).parent.rglob("*.py"):
        for node in ast.iter_child_nodes(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n == "timm" or n.startswith("timm.") for n in names):
                importers.append(path.name)
    assert importers == []
