"""convert / fuse: round trips over the model zoo and torchvision, what convert touches and why, fuse layouts.

Round trips randomise every BN (running stats, weight, bias) after convert, fuse, load the fused state
dict with strict=True into a freshly built base model and compare with the converted model in eval mode:
norm-wise relative error <= 1e-6 in float32 (fold_bn=True: <= 1e-5), <= 1e-10 in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
import torchvision.models as tvm
from conftest import assert_rel, rel_err
from torch import nn

from acnet_pl import ConversionReport, convert, fuse
from acnet_pl.blocks import ACBlock
from acnet_pl.models import build_model, is_torchvision_model, list_models
from acnet_pl.reparam import BNSlot, count_blocks

# float32: the project's bound for exact fusion (1e-5 relative); resnet18 lands at ~1.0e-6 on some CPUs.
TOL_FUSE, TOL_FOLD, TOL64 = 1e-5, 1e-5, 1e-10

# Thousands of tiny convs: with several threads most of the time goes to thread hand-offs.
pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_bns(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random running mean/var, weight and bias in every BatchNorm (inside blocks too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                dtype = m.running_mean.dtype
                m.running_mean.copy_((torch.randn(n, generator=g) * 0.2).to(dtype))
                m.running_var.copy_((torch.rand(n, generator=g) * 1.5 + 0.5).to(dtype))
                if m.affine:
                    m.weight.copy_((torch.rand(n, generator=g) * 0.8 + 0.4).to(dtype))
                    m.bias.copy_((torch.randn(n, generator=g) * 0.2).to(dtype))
    return model


def module_types(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(m)) for name, m in model.named_modules()]


def bns_fed_by_a_conv(model: nn.Module) -> set[str]:
    """BatchNorms whose input is the output of a conv used nowhere else (what fold_bn must remove)."""
    modules = dict(model.named_modules())
    names = set()
    for node in torch.fx.symbolic_trace(model).graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm):
            src = node.args[0]
            is_conv = src.op == "call_module" and isinstance(modules[src.target], nn.Conv2d)
            if is_conv and len(src.users) == 1:
                names.add(node.target)
    return names


def check_round_trip(build, size: int, **convert_options) -> ConversionReport:
    """convert -> random BNs -> fuse -> strict load into build() -> equal outputs; fold_bn too."""
    torch.manual_seed(0)
    report = ConversionReport()
    acnet = convert(build(), kernel_sizes=(3, 5, 7), inplace=True, report=report, **convert_options)
    acnet = randomize_bns(acnet).eval()
    assert report.converted and count_blocks(acnet) == len(report.converted)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        y = acnet(x)

    fused = fuse(acnet)
    base = build().eval()
    base.load_state_dict(fused.state_dict(), strict=True)
    assert module_types(fused) == module_types(base)  # conv + BN exactly where they were
    folded = fuse(acnet, fold_bn=True, inplace=True).eval()
    assert count_blocks(folded) == 0
    remaining = {n for n, m in folded.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    all_bns = {n for n, m in base.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert remaining == all_bns - bns_fed_by_a_conv(base)
    with torch.no_grad():
        err, err_fold = rel_err(base(x), y), rel_err(folded(x), y)
    assert err <= TOL_FUSE, f"fused relative error {err:.3g}"
    assert err_fold <= TOL_FOLD, f"fold_bn relative error {err_fold:.3g}"
    return report


# --------------------------------------------------------------------------------------------------
# round trips


# densenet40 feeds every 3x3 conv into a concatenation, so conv->BN conversion finds nothing in it: its
# round trip is the bare-conv one (tests/test_models.py, block.bare_convs).
@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in list_models() if n != "densenet40"])
def test_zoo_round_trip(name, block="acb"):
    size = 64 if is_torchvision_model(name) else 32

    def build() -> nn.Module:
        return build_model(name, num_classes=10)

    report = check_round_trip(build, size, block=block)
    if is_torchvision_model(name):
        # The fused weights load into torchvision's own model, not only into our registry's.
        torch.manual_seed(0)
        acnet = randomize_bns(convert(build(), block=block, kernel_sizes=(3, 5, 7), inplace=True))
        getattr(tvm, name)(weights=None, num_classes=10).load_state_dict(
            fuse(acnet).state_dict(), strict=True
        )
    assert report.untraced == []


# One of each kind (5x5 convs, CIFAR basic blocks, torchvision's); every zoo model passes (about 4x the time).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar_quick", "resnet20", "resnet18"])
def test_zoo_round_trip_dbb(name):
    """The same round trip with Diverse Branch Blocks."""
    test_zoo_round_trip(name, block="dbb")


TORCHVISION = [
    "resnext50_32x4d",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "regnet_x_400mf",
    "efficientnet_b0",
    "densenet121",
    "shufflenet_v2_x0_5",
    "mnasnet0_5",
    pytest.param("wide_resnet50_2", marks=pytest.mark.slow),
    pytest.param("vgg11_bn", marks=pytest.mark.slow),
    pytest.param("vgg16_bn", marks=pytest.mark.slow),
]


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_round_trip(name):
    def build() -> nn.Module:
        return getattr(tvm, name)(weights=None, num_classes=10)

    report = check_round_trip(build, 64)
    assert report.untraced == []


@pytest.mark.slow
def test_round_trip_stacked_impl_and_gamma_init():
    report = check_round_trip(
        lambda: build_model("resnet20", num_classes=10), 32, impl="stacked", gamma_init=0.5
    )
    assert len(report.converted) == 19


@torch.no_grad()
def test_fuse_keeps_float64_precision_of_the_restored_bn():
    """The restored BN (weight sqrt(1 + eps), bias b) must be computed and stored in the model's dtype."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).double()
    acnet = randomize_bns(convert(model)).eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    fused = fuse(acnet)
    assert fused[1].weight.dtype == torch.float64
    assert abs(fused[1].weight[0].item() - (1 + fused[1].eps) ** 0.5) <= 1e-15
    err = rel_err(fused(x), acnet(x))
    assert err <= TOL64, f"float64 fuse relative error {err:.3g}"


@pytest.mark.parametrize("block", ["acb", "dbb"])
@torch.no_grad()
def test_fused_conv_of_a_float64_block_leaves_the_block_as_it_was(block):
    """A float64 block is fused from itself (no float64 copy): its state and output must not change, and the
    fused conv must equal the one fused from a copy (the float32 path's maths)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    acnet = randomize_bns(convert(model, block=block)).double().eval()
    (name, m), *_ = [
        (n, m) for n, m in acnet.named_modules() if callable(getattr(m, "fused_conv_module", None))
    ]
    state = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    before = m(x)
    conv = m.fused_conv_module()
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    assert torch.equal(m(x), before)
    reference = m.double_precision_copy().get_equivalent_kernel_bias()
    assert torch.equal(conv.weight, reference[0]) and torch.equal(conv.bias, reference[1])
    assert rel_err(conv(x), before) <= TOL64


@pytest.mark.slow
@torch.no_grad()
def test_float64_end_to_end_resnet20():
    torch.manual_seed(0)
    acnet = randomize_bns(convert(build_model("resnet20", num_classes=10).double())).eval()
    assert count_blocks(acnet) == 19
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = acnet(x)
    base = build_model("resnet20", num_classes=10).double().eval()
    base.load_state_dict(fuse(acnet).state_dict(), strict=True)
    assert base.conv1.weight.dtype == torch.float64
    err, err_fold = rel_err(base(x), y), rel_err(fuse(acnet, fold_bn=True)(x), y)
    assert err_fold <= TOL64, f"fold_bn relative error {err_fold:.3g}"
    assert err <= TOL64, f"fused relative error {err:.3g}"


# --------------------------------------------------------------------------------------------------
# what convert converts, and why it leaves the rest


class Zoo(nn.Module):
    """One of each case convert must tell apart."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=True)  # conv bias, folded into the BN
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)  # depthwise
        self.bn_dw = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 5, padding=2, groups=2, bias=False)
        self.bn_grouped = nn.BatchNorm2d(8)
        self.seq = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.to_relu = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.to_add = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_add = nn.BatchNorm2d(8)
        self.point = nn.Conv2d(8, 8, 1, bias=False)
        self.bn_point = nn.BatchNorm2d(8)
        self.big = nn.Conv2d(8, 8, 7, padding=3, bias=False)
        self.bn_big = nn.BatchNorm2d(8)
        self.two_users = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_two = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = self.bn_grouped(self.grouped(self.bn_dw(self.dw(x))))
        x = self.seq(x)
        x = self.relu(self.to_relu(x))
        x = self.bn_add(self.to_add(x) + x)
        x = self.bn_big(self.big(self.bn_point(self.point(x))))
        t = self.two_users(x)
        return self.bn_two(t) + t


ZOO_CONVERTED = ["conv1", "dw", "grouped", "seq.0"]
ZOO_SKIPPED = {
    "to_relu": "output does not feed a BatchNorm2d",
    "to_add": "output does not feed a BatchNorm2d",
    "point": "1x1 kernel not in kernel_sizes",
    "big": "7x7 kernel not in kernel_sizes",
    "two_users": "output has 2 users",
}
ZOO_PAIRS = {"conv1": "bn1", "dw": "bn_dw", "grouped": "bn_grouped", "seq.0": "seq.1"}


def randomized_zoo() -> Zoo:
    torch.manual_seed(0)
    return randomize_bns(Zoo(), seed=3).eval()


@pytest.mark.slow
def test_report_lists_converted_and_skipped_with_reasons():
    report = ConversionReport()
    acnet = convert(randomized_zoo(), report=report)
    assert report.block == "acb"
    assert report.converted == ZOO_CONVERTED
    skipped = dict(report.skipped)
    assert sorted(skipped) == sorted(ZOO_SKIPPED)
    for name, fragment in ZOO_SKIPPED.items():
        assert fragment in skipped[name], (name, skipped[name])
    summary = report.summary()
    assert "converted 4 of 9 convs to acb" in summary
    assert "2 (output does not feed a BatchNorm2d)" in summary and "skipped" in summary
    for name in ZOO_CONVERTED:
        assert isinstance(acnet.get_submodule(name), ACBlock)
        assert isinstance(acnet.get_submodule(ZOO_PAIRS[name]), BNSlot)
    for name in ZOO_SKIPPED:
        assert type(acnet.get_submodule(name)) is nn.Conv2d
    # A kernel size the block cannot take is skipped with the block's reason (ACB: no 1D branch in a 1x1).
    report = ConversionReport()
    convert(randomized_zoo(), kernel_sizes=(1, 3), report=report)
    assert dict(report.skipped)["point"].startswith("kernel_size=1 (nothing to add")


@torch.no_grad()
def test_square_branch_carries_conv_and_bn():
    """With the 1D branches' BN weights zeroed, a converted model equals the base model (conv bias folded)."""
    base = randomized_zoo()
    with torch.no_grad():
        base.conv1.bias.normal_()
    acnet = convert(base).eval()
    for conv_name, bn_name in ZOO_PAIRS.items():
        block, conv, bn = (
            acnet.get_submodule(conv_name),
            base.get_submodule(conv_name),
            base.get_submodule(bn_name),
        )
        assert torch.equal(block.square_conv.weight, conv.weight)
        assert torch.equal(block.square_bn.weight, bn.weight) and torch.equal(block.square_bn.bias, bn.bias)
        assert torch.equal(block.square_bn.running_var, bn.running_var)
        bias = conv.bias if conv.bias is not None else 0
        assert torch.allclose(block.square_bn.running_mean, bn.running_mean - bias, rtol=0, atol=1e-6)
        assert (block.stride, block.padding, block.groups) == (conv.stride, conv.padding, conv.groups)
        assert (
            dict(acnet.get_submodule(bn_name).named_parameters()) == {}
        )  # the BN's state lives in the block
        block.ver_bn.weight.zero_()
        block.hor_bn.weight.zero_()
    x = torch.randn(2, 3, 16, 16)
    assert_rel(acnet(x), base(x), TOL_FUSE)


def test_zoo_model_round_trip_with_bias_depthwise_and_grouped():
    check_round_trip(Zoo, 16)  # kernel_sizes=(3, 5, 7): `big` is converted too


def test_torchvision_basic_block_attributes_and_sequential_convs():
    report = ConversionReport()
    acnet = convert(tvm.resnet18(num_classes=10), report=report)
    assert len(report.converted) == 16
    assert "layer1.0.conv1" in report.converted and "layer1.0.conv2" in report.converted
    assert isinstance(acnet.layer1[0].conv1, ACBlock) and isinstance(acnet.layer1[0].bn1, BNSlot)
    skipped = dict(report.skipped)
    assert "7x7 kernel not in kernel_sizes" in skipped["conv1"]
    assert "1x1 kernel not in kernel_sizes" in skipped["layer2.0.downsample.0"]
    # The converted state dict holds the original ACNet block keys where the conv was.
    sd = acnet.state_dict()
    assert "layer1.0.conv1.ver_conv.weight" in sd and "layer1.0.conv1.square_bn.running_mean" in sd
    assert "layer1.0.bn1.weight" not in sd and "layer2.0.downsample.1.weight" in sd


def test_include_and_exclude_patterns():
    report = ConversionReport()
    convert(build_model("resnet20", num_classes=10), include=["layer1.*"], report=report)
    assert len(report.converted) == 6 and all(n.startswith("layer1.") for n in report.converted)
    assert dict(report.skipped)["layer2.0.conv1"] == "not matched by include"
    report = ConversionReport()
    convert(build_model("resnet20", num_classes=10), exclude=["layer1.*", "conv1"], report=report)
    assert len(report.converted) == 12
    assert not any(n.startswith("layer1.") or n == "conv1" for n in report.converted)
    assert dict(report.skipped)["conv1"] == "matched by exclude"


def test_gamma_init_patterns_first_match_wins():
    """Overlapping gamma_init patterns: the first that matches a conv's name sets its gammas; no match, 1."""

    def gammas(gamma_init: dict) -> dict[str, float]:
        model = convert(build_model("cifar_quick", num_classes=4), gamma_init=gamma_init)
        values = {
            name: {float(bn.weight[0]) for bn in block.branch_norms().values()}
            for name, block in model.named_modules()
            if isinstance(block, ACBlock)
        }
        assert all(len(v) == 1 for v in values.values())  # every branch BN of a block alike
        return {name: v.pop() for name, v in values.items()}

    assert gammas({"features.0": 0.25, "features.*": 0.5}) == {
        "features.0": 0.25,
        "features.4": 0.5,
        "features.8": 0.5,
    }
    assert set(gammas({"features.*": 0.5, "features.0": 0.25}).values()) == {0.5}
    assert gammas({"features.4": 0.125, "nothing.*": 0.5}) == {
        "features.0": 1.0,
        "features.4": 0.125,
        "features.8": 1.0,
    }


def test_block_base_is_the_identity():
    torch.manual_seed(0)
    model = randomize_bns(build_model("resnet20", num_classes=10)).eval()
    report = ConversionReport()
    same = convert(model, block="base", report=report)
    assert same is not model
    assert module_types(same) == module_types(model)
    sd, sd_same = model.state_dict(), same.state_dict()
    assert sd.keys() == sd_same.keys() and all(torch.equal(sd[k], sd_same[k]) for k in sd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(same(x), model(x))
    assert report.summary().startswith("block=base")
    assert convert(model, block="base", inplace=True) is model
    with pytest.raises(ValueError, match="block=base takes no block options"):
        convert(model, block="base", gamma_init=0.5)


def test_unknown_block_lists_the_names():
    with pytest.raises(ValueError) as info:
        convert(nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)), block="dbbb")
    message = str(info.value)
    assert "'dbbb'" in message and "base" in message and "acb" in message


def test_convert_leaves_its_input_alone_unless_inplace():
    model = randomized_zoo()
    before = copy.deepcopy(model.state_dict())
    types = module_types(model)
    acnet = convert(model)
    assert acnet is not model and count_blocks(acnet) == 4
    assert module_types(model) == types
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model.state_dict().keys() == before.keys()
    same = convert(model, inplace=True)
    assert same is model and count_blocks(model) == 4


@torch.no_grad()
def test_fuse_leaves_its_input_alone_unless_inplace():
    acnet = randomize_bns(convert(randomized_zoo())).eval()
    x = torch.randn(2, 3, 16, 16)
    y = acnet(x)
    before = copy.deepcopy(acnet.state_dict())
    fused = fuse(acnet)
    assert fused is not acnet and count_blocks(fused) == 0 and count_blocks(acnet) == 4
    assert all(torch.equal(acnet.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(acnet(x), y)
    assert_rel(fused(x), y, TOL_FUSE)
    same = fuse(acnet, inplace=True)
    assert same is acnet and count_blocks(acnet) == 0
    assert_rel(acnet(x), y, TOL_FUSE)


@pytest.mark.slow
def test_fuse_from_train_mode_uses_running_statistics():
    acnet = randomize_bns(convert(build_model("resnet20", num_classes=10))).train()
    before = copy.deepcopy(acnet.state_dict())
    fused = fuse(acnet)
    assert all(m.training for m in fused.modules())  # the result keeps the model's mode
    assert all(torch.equal(acnet.state_dict()[k], v) for k, v in before.items())  # no statistics updated
    folded = fuse(acnet, fold_bn=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        y = acnet.eval()(x)
        assert_rel(fused.eval()(x), y, TOL_FUSE)
        assert_rel(folded.eval()(x), y, TOL_FOLD)


class DataDependent(nn.Module):
    """torch.fx cannot trace ``if x.sum() > 0``; its Sequential child can be traced on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = self.body(x)
        return self.bn(self.conv(x))


class WithUntraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(4)
        self.dd = DataDependent()
        self.head = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dd(self.stem_bn(self.stem(x))))


def test_untraceable_module_children_are_still_converted():
    report = ConversionReport()
    model = randomize_bns(WithUntraceable()).eval()
    acnet = randomize_bns(convert(model, report=report)).eval()
    assert "dd.body.0" in report.converted and "head.0" in report.converted
    untraced = dict(report.untraced)
    assert "dd" in untraced and "TraceError" in untraced["dd"]
    # Inside `dd` the data flow is unknown: its own conv is reported, not guessed.
    assert dict(report.skipped)["dd.conv"] == "inside a module that could not be traced"
    assert "could not trace" in report.summary() and "dd" in report.summary()
    x = torch.randn(2, 3, 8, 8).abs()
    base = WithUntraceable().eval()
    base.load_state_dict(fuse(acnet).state_dict(), strict=True)
    with torch.no_grad():
        assert_rel(base(x), acnet(x), TOL_FUSE)


def test_untraceable_child_does_not_hide_its_parents_conv_bn_pairs():
    """The root's own stem -> stem_bn is plain data flow once `dd` is treated as an opaque call.

    Only the module whose forward cannot be traced should lose its direct conv -> BN pairs; its
    ancestors can be retraced with it as a leaf.
    """
    report = ConversionReport()
    convert(WithUntraceable(), report=report)
    assert "stem" in report.converted, dict(report.skipped).get("stem")


# --------------------------------------------------------------------------------------------------
# fuse on blocks put in by hand, SyncBatchNorm


@torch.no_grad()
def test_fuse_hand_built_acblocks():
    torch.manual_seed(0)
    model = nn.Sequential(
        ACBlock(3, 8, 3, padding=1),
        nn.ReLU(),
        ACBlock(8, 8, 5, stride=2, padding=1, groups=2, padding_mode="reflect", impl="stacked"),
        nn.BatchNorm2d(8),
    )
    model = randomize_bns(model).eval()
    x = torch.randn(2, 3, 15, 14)
    y = model(x)
    fused = fuse(model)
    for index, k in ((0, 3), (2, 5)):
        conv = fused[index]
        assert type(conv) is nn.Conv2d and conv.kernel_size == (k, k) and conv.bias is not None
    assert fused[2].padding_mode == "reflect" and fused[2].stride == (2, 2) and fused[2].groups == 2
    assert type(fused[3]) is nn.BatchNorm2d
    assert_rel(fused(x), y, TOL_FUSE)
    folded = fuse(model, fold_bn=True)
    assert type(folded[3]) is nn.Identity
    assert_rel(folded(x), y, TOL_FOLD)


@torch.no_grad()
def test_fuse_after_convert_sync_batchnorm_restores_base_layout():
    torch.manual_seed(0)
    acnet = randomize_bns(convert(build_model("resnet20", num_classes=10)))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(acnet).eval()
    assert isinstance(synced.layer1[0].conv1.ver_bn, nn.SyncBatchNorm)
    assert isinstance(synced.layer2[0].downsample[1], nn.SyncBatchNorm)
    x = torch.randn(2, 3, 32, 32)
    y = synced(x)
    fused = fuse(synced)
    assert count_blocks(fused) == 0
    base = build_model("resnet20", num_classes=10).eval()
    base.load_state_dict(fused.state_dict(), strict=True)
    assert_rel(base(x), y, TOL_FUSE)
    assert_rel(fuse(synced, fold_bn=True)(x), y, TOL_FOLD)


@torch.no_grad()
def test_fold_bn_after_lightning_reverts_sync_batchnorm():
    """After fit Lightning turns SyncBatchNorm into `_BatchNormXd`: convert/fuse/fold_bn must see those BNs.

    Pins the library behaviour too: if Lightning's revert ever builds another class, the first asserts say so.
    """
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm, _BatchNormXd

    torch.manual_seed(0)
    acnet = randomize_bns(convert(build_model("resnet20", num_classes=10)))
    reverted = TorchSyncBatchNorm().revert(TorchSyncBatchNorm().apply(acnet)).eval()
    downsample_bn = reverted.layer2[0].downsample[1]
    assert type(downsample_bn) is _BatchNormXd  # what Lightning 2.x leaves behind
    assert type(reverted.layer1[0].conv1.ver_bn) is _BatchNormXd
    x = torch.randn(2, 3, 32, 32)
    y = reverted(x)
    folded = fuse(reverted, fold_bn=True)
    assert type(folded.layer2[0].downsample[1]) is nn.Identity  # the un-converted 1x1 conv's BN folded too
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    from acnet_pl.deploy.record import build_deploy_model

    deployed = build_deploy_model({"model": {"name": "resnet20", "num_classes": 10}, "fold_bn": True})
    deployed.load_state_dict(folded.state_dict(), strict=True)  # the deploy.pt loads
    assert_rel(deployed.eval()(x), y, TOL_FOLD)
    # and convert pairs a conv with a reverted BN like any other
    report = ConversionReport()
    synced_then_reverted = TorchSyncBatchNorm().revert(
        TorchSyncBatchNorm().apply(build_model("resnet20", 10))
    )
    convert(synced_then_reverted, report=report)
    assert len(report.converted) == 19  # as without SyncBatchNorm: only the two 1x1 downsample convs stay
    assert [reason for _, reason in report.skipped] == ["1x1 kernel not in kernel_sizes [3, 5]"] * 2


def _non_affine_net(dtype: torch.dtype) -> nn.Module:
    """3x3 conv (with and without bias) -> BatchNorm2d(affine=False), twice, then a 1x1 conv -> non-affine BN."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6, affine=False),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1, bias=True),
        nn.BatchNorm2d(6, affine=False, eps=1e-3),
        nn.ReLU(),
        nn.Conv2d(6, 4, 1),
        nn.BatchNorm2d(4, affine=False),
    ).to(dtype)


@torch.no_grad()
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, TOL64), (torch.float32, TOL_FUSE)])
def test_non_affine_batchnorm_round_trip(dtype: torch.dtype, tol: float):
    """convert -> fuse restores a non-affine BN (running mean carries the bias, kernel sqrt(1+eps)): exact."""
    torch.manual_seed(0)
    acnet = randomize_bns(convert(_non_affine_net(dtype)), seed=3).eval()
    assert not acnet[0].square_bn.affine and not acnet[3].ver_bn.affine
    x = torch.randn(3, 3, 9, 9, dtype=dtype)
    y = acnet(x)
    fused = fuse(acnet)
    assert type(fused[1]) is nn.BatchNorm2d and not fused[1].affine and fused[4].eps == 1e-3
    base = _non_affine_net(dtype).eval()
    base.load_state_dict(fused.state_dict(), strict=True)
    assert_rel(base(x), y, tol, "non-affine fuse")
    folded = fuse(acnet, fold_bn=True)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert_rel(folded(x), y, tol, "non-affine fold_bn")
    assert_rel(fuse(fused, fold_bn=True)(x), y, tol, "non-affine restored then folded")
