"""ACBlock ablation variants (the paper's Table 5): which 1D branches exist, BN per branch vs one BN after the sum.

Every variant fuses exactly as the full block does: norm-wise relative error <= 1e-10 in float64 and
<= 1e-5 in float32, random BN statistics, eval mode, over kernel sizes, strides, paddings, dilations,
groups and padding modes; stacked == branches; convert -> fuse -> the base model's layout.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import CONF_DIR, assert_rel, rel_err
from hydra import compose, initialize_config_dir
from torch import nn

from acnet_pl.blocks import ACBlock
from acnet_pl.cli.train import block_hparams
from acnet_pl.models import build_model
from acnet_pl.reparam import fuse

TOL64, TOL32 = 1e-10, 1e-5
VARIANTS = [
    pytest.param(branches, branch_bn, id=f"{'+'.join(branches)}-{'branch_bn' if branch_bn else 'sum_bn'}")
    for branches, branch_bn in itertools.product((("ver", "hor"), ("ver",), ("hor",)), (True, False))
]

pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(block: ACBlock, seed: int) -> ACBlock:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return block


def variant(branches, branch_bn, dtype=torch.float64, seed=0, **kwargs) -> ACBlock:
    torch.manual_seed(seed)
    block = ACBlock(branches=branches, branch_bn=branch_bn, **kwargs)
    return randomize(block, seed + 1).to(dtype).eval()


@pytest.mark.parametrize(("branches", "branch_bn"), VARIANTS)
def test_variant_has_only_its_modules(branches, branch_bn):
    block = ACBlock(4, 8, 3, padding=1, branches=list(branches), branch_bn=branch_bn)
    names = {name for name, _ in block.named_children()}
    expected = {"square_conv"} | {f"{b}_conv" for b in branches}
    expected |= {f"{b}_bn" for b in ("square", *branches)} if branch_bn else {"bn"}
    assert names == expected
    block.init_gamma(0.25)
    assert all(
        torch.equal(m.weight, torch.full((8,), 0.25))
        for m in block.modules()
        if isinstance(m, nn.BatchNorm2d)
    )


@pytest.mark.parametrize(("branches", "branch_bn"), VARIANTS)
@torch.no_grad()
def test_variant_fuses_exactly_float64_and_float32(branches, branch_bn):
    """K 3/5 x stride 1/2 x padding 0/same x dilation 1/2; groups and padding mode vary with them
    (the full grid of every argument runs for the full block in test_acb.py)."""
    checked = 0
    for k, stride, same, dilation in itertools.product((3, 5), (1, 2), (False, True), (1, 2)):
        args = dict(
            in_channels=4,
            out_channels=8,
            kernel_size=k,
            stride=stride,
            padding=dilation * (k // 2) if same else 0,
            dilation=dilation,
            groups=1 if k == 3 else 4,
            padding_mode="zeros" if stride == 1 else "reflect",
        )
        for dtype, tol in ((torch.float64, TOL64), (torch.float32, TOL32)):
            x = torch.randn(2, 4, 11, 9, dtype=dtype)
            block = variant(branches, branch_bn, dtype, seed=k + 7 * stride + dilation, **args)
            err = rel_err(block.fused_conv_module()(x), block(x))
            assert err <= tol, f"{args} {dtype}: relative error {err:.3g} > {tol}"
            checked += 1
    assert checked == 32


@pytest.mark.parametrize(("branches", "branch_bn"), VARIANTS)
def test_variant_stacked_equals_branches_in_train_and_eval(branches, branch_bn):
    args = dict(in_channels=4, out_channels=6, kernel_size=3, stride=1, padding=1, groups=2)
    a = variant(branches, branch_bn, torch.float64, seed=3, impl="branches", **args)
    b = variant(branches, branch_bn, torch.float64, seed=3, impl="stacked", **args)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 4, 7, 7, dtype=torch.float64)
    for mode in (True, False):
        a.train(mode)
        b.train(mode)
        assert_rel(b(x), a(x), 1e-12, f"train={mode}")
    for (name, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(ta.double(), tb.double(), rtol=0, atol=1e-12), name  # running stats too


@pytest.mark.parametrize(("branches", "branch_bn"), VARIANTS)
@torch.no_grad()
def test_variant_converts_and_fuses_into_the_base_layout(branches, branch_bn):
    model = build_model(
        "cifar_quick", num_classes=10, block="acb", branches=list(branches), branch_bn=branch_bn
    )
    for m in model.modules():
        if isinstance(m, ACBlock):
            randomize(m, 0)
    model.eval()
    base = build_model("cifar_quick", num_classes=10)
    base.load_state_dict(fuse(model).state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    assert_rel(base.eval()(x), model(x), TOL32, "deployed base vs ACB variant")


def test_from_conv_bn_with_one_bn_after_the_sum_keeps_the_conv_bn():
    conv, bn = nn.Conv2d(3, 5, 3, padding=1, bias=True).double(), nn.BatchNorm2d(5).double()
    randomize_bn = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(5, generator=randomize_bn, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(5, generator=randomize_bn, dtype=torch.float64) + 0.5)
    block = ACBlock.from_conv_bn(conv, bn, branch_bn=False).eval()
    with torch.no_grad():
        block.ver_conv.weight.zero_()
        block.hor_conv.weight.zero_()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert_rel(block(x), bn.eval()(conv(x)), TOL64, "from_conv_bn(branch_bn=False)")


@pytest.mark.parametrize("branches", ["ver", [], ["ver", "ver"], ["square"], ["hor", "diag"]])
def test_bad_branches_say_what_is_allowed(branches):
    with pytest.raises(ValueError, match=r"\['ver', 'hor'\]"):
        ACBlock(3, 3, 3, branches=branches)


@pytest.mark.parametrize(
    ("override", "branches"), [("block.branches=[hor]", ["hor"]), ("block.branches=[ver]", ["ver"])]
)
def test_branches_from_the_command_line(override, branches):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["model=cifar_quick", override, "block.branch_bn=false"])
    hp = block_hparams(cfg.block)
    assert hp["branches"] == branches and hp["branch_bn"] is False
    options = {k: v for k, v in hp.items() if k != "name"}
    model = build_model("cifar_quick", num_classes=10, block="acb", **options)
    block = model.features[0]
    assert block.branches == tuple(branches) and not block.branch_bn and hasattr(block, "bn")
    assert not hasattr(block, "ver_conv" if branches == ["hor"] else "hor_conv")


@torch.no_grad()
def test_bare_conv_with_one_bn_after_the_sum_keeps_the_conv_bias():
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=True).double()
    block = ACBlock.from_conv(conv, branch_bn=False).eval()
    block.ver_conv.weight.zero_()
    block.hor_conv.weight.zero_()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    # a fresh BN in eval mode divides by sqrt(1 + eps); the bias went into its running mean
    assert_rel(block(x), conv(x) / (1 + block.bn.eps) ** 0.5, TOL64, "from_conv(branch_bn=False)")
    assert_rel(block.fused_conv_module()(x), block(x), TOL64, "fused")
