"""DBBlock: equal to the DBB authors' block for the same weights, exact fusion, errors, convert/fuse.

tests/fixtures/dbb_reference.pt holds outputs and fused kernels of the authors' DiverseBranchBlock
(DingXiaoH/DiverseBranchBlock, made by tests/fixtures/make_dbb_reference.py); nothing is downloaded.
Bounds: float64 <= 1e-10 (norm-wise relative), float32 <= 1e-5 relative, random BN statistics, eval mode.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_rel, rel_err
from torch import nn

from acnet_pl import ConversionReport, convert, fuse
from acnet_pl.blocks import DBBlock, get_block, list_blocks

FIXTURE = Path(__file__).parent / "fixtures" / "dbb_reference.pt"
TOL64, TOL32 = 1e-10, 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def unpack(case: dict) -> dict[str, torch.Tensor]:
    tensors, offset = {}, 0
    for name, shape in zip(case["names"], case["shapes"], strict=True):
        n = int(torch.Size(shape).numel())
        tensors[name] = case["values"][offset : offset + n].reshape(shape)
        offset += n
    return tensors


def reference_cases() -> list[dict]:
    return torch.load(FIXTURE, weights_only=True)["cases"]


def randomize(block: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere (the identity 1x1 too) and random BN parameters and statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                n, dtype = m.num_features, m.running_mean.dtype
                m.running_mean.copy_((torch.randn(n, generator=g) * 0.3).to(dtype))
                m.running_var.copy_((torch.rand(n, generator=g) + 0.5).to(dtype))
                if m.affine:
                    m.weight.copy_((torch.rand(n, generator=g) + 0.5).to(dtype))
    return block


@pytest.mark.parametrize("index", range(5))
def test_equal_to_the_authors_block_for_the_same_weights(index):
    case = reference_cases()[index]
    t = unpack(case)
    block = DBBlock(**case["config"]).double()
    state = {k.removeprefix("state_dict."): v for k, v in t.items() if k.startswith("state_dict.")}
    # Their state dict loads strictly: same module names, nothing missing, nothing left over.
    block.load_state_dict(state, strict=True)
    x = t["input"]
    with torch.no_grad():
        block.train()
        assert_rel(block(x), t["output_train"], TOL64, "train-mode output vs authors'")
        block.load_state_dict(state, strict=True)
        block.eval()
        assert_rel(block(x), t["output_eval"], TOL64, "eval output vs authors'")
        kernel, bias = block.get_equivalent_kernel_bias()
        assert_rel(kernel, t["kernel"], TOL64, "fused kernel vs authors'")
        assert_rel(bias, t["bias"], TOL64, "fused bias vs authors'")
        fused = block.fused_conv_module()
        assert_rel(fused(x), t["output_eval"], TOL64, "fused conv vs authors' block")
    # Their deploy form (dbb_reparam) loads into ours too.
    deployed = DBBlock(**case["config"], deploy=True).double()
    deployed.load_state_dict({"dbb_reparam.weight": t["kernel"], "dbb_reparam.bias": t["bias"]}, strict=True)
    with torch.no_grad():
        assert_rel(deployed(x), t["output_eval"], TOL64, "deploy=True vs authors'")


# (in, out, K, stride, groups, internal_channels): identity-based and plain 1x1 in the 1x1->KxK branch,
# grouped, depthwise (no 1x1 branch; pooling on the input), K 1..7, strides 1..3.
GRID = [
    (3, 5, 3, 1, 1, None),
    (3, 5, 3, 2, 1, 6),
    (4, 6, 5, 3, 2, None),
    (4, 8, 3, 2, 4, None),
    (4, 4, 3, 2, 4, None),
    (6, 6, 5, 1, 6, None),
    (6, 6, 7, 2, 6, 6),
    (4, 4, 1, 2, 1, None),
    (2, 4, 7, 1, 1, 3),
]


@pytest.mark.parametrize(("cin", "cout", "k", "stride", "groups", "internal"), GRID)
def test_fusion_is_exact(cin, cout, k, stride, groups, internal):
    block = randomize(
        DBBlock(cin, cout, k, stride, groups=groups, internal_channels=internal).double(), seed=k
    )
    block.eval()
    g = torch.Generator().manual_seed(0)
    for h, w in ((9, 9), (10, 7), (k, k + 1)):
        x = torch.randn(2, cin, h, w, generator=g, dtype=torch.float64)
        with torch.no_grad():
            y = block(x)
            fused = block.fused_conv_module()
            assert fused.padding == (k // 2, k // 2) and fused.stride == (stride, stride)
            assert fused.groups == groups and fused.weight.dtype == torch.float64
            assert_rel(fused(x), y, TOL64, f"float64 {h}x{w}")
            block32 = block.float()
            assert_rel(block32.fused_conv_module()(x.float()), block32(x.float()), TOL32, f"float32 {h}x{w}")
            block.double()


def test_switch_to_deploy_and_gamma_init():
    torch.manual_seed(0)
    block = randomize(DBBlock(4, 6, 3, stride=2), seed=3).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        y = block(x)
        block.switch_to_deploy()
        block.switch_to_deploy()  # idempotent
        assert set(block.state_dict()) == {"dbb_reparam.weight", "dbb_reparam.bias"}
        assert_rel(block(x), y, TOL32)
        assert isinstance(block.fused_conv_module(), nn.Conv2d)
    fresh = DBBlock(4, 6, 3, gamma_init=0.25)
    outputs = [fresh.dbb_origin.bn, fresh.dbb_1x1.bn, fresh.dbb_avg.avgbn, fresh.dbb_1x1_kxk.bn2]
    assert all(torch.all(bn.weight == 0.25) for bn in outputs)
    # The BNs inside the 1x1->KxK / 1x1->avg branches keep gamma 1, as the authors' init_gamma.
    assert torch.all(fresh.dbb_1x1_kxk.bn1.bn.weight == 1) and torch.all(fresh.dbb_avg.bn.bn.weight == 1)
    # The identity-initialised 1x1 of the default layout: the branch starts as bn1 -> KxK conv.
    assert torch.all(fresh.dbb_1x1_kxk.idconv1.weight == 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"padding": 0}, "padding \\(0, 0\\) is not K//2"),
        ({"dilation": 2}, "dilation"),
        ({"padding_mode": "reflect"}, "padding_mode 'reflect'"),
        ({"kernel_size": 4, "padding": 2}, "even 4x4 kernel"),
        ({"kernel_size": (3, 5)}, "non-square kernel"),
        ({"in_channels": 8, "groups": 4}, "groups == out_channels != in_channels"),
        (
            {"internal_channels": 3, "groups": 2},
            "internal_channels=3 must be a positive multiple of groups=2",
        ),
        ({"bn_affine": False, "gamma_init": 0.5}, "gamma_init needs bn_affine=True"),
    ],
)
def test_configurations_dbb_cannot_fuse_are_clear_errors(kwargs, message):
    args = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        DBBlock(**args)


def test_convert_skips_what_dbb_cannot_fuse_and_fuse_restores_the_base_layout():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True),  # converted, its bias folded into the BN
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=0),  # padding 0: DBB pads K//2
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8),  # depthwise: converted
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 4, 3, padding=1, groups=4),  # groups == out != in: DBB's pooling keeps channels
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 8, 3, padding=1, groups=4),  # grouped, groups < out: converted
        nn.BatchNorm2d(8),
    ).double()
    report = ConversionReport()
    dbb = randomize(convert(model, block="dbb", report=report), seed=5).eval()
    assert report.converted == ["0", "5", "9"]
    skipped = dict(report.skipped)
    assert skipped["3"].startswith("padding (0, 0) is not K//2")
    assert skipped["7"].startswith("groups == out_channels != in_channels")
    x = torch.randn(2, 3, 11, 11, dtype=torch.float64)
    with torch.no_grad():
        y = dbb(x)
        fused = fuse(dbb)
        model.load_state_dict(fused.state_dict(), strict=True)
        assert_rel(model.eval()(x), y, TOL64, "base model with the fused weights")
        assert rel_err(fuse(dbb, fold_bn=True)(x), y) <= TOL64


def test_padding_same_is_k_over_2():
    """A conv with padding="same" (stride 1) pads K//2: DBB replaces it, and the fused conv loads back into it."""
    model = nn.Sequential(nn.Conv2d(3, 6, 5, padding="same"), nn.BatchNorm2d(6)).double()
    report = ConversionReport()
    dbb = randomize(convert(model, block="dbb", report=report), seed=4).eval()
    assert report.converted == ["0"] and dbb[0].padding == (2, 2)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        model.load_state_dict(fuse(dbb).state_dict(), strict=True)
        assert model[0].padding == "same"
        assert_rel(model.eval()(x), dbb(x), TOL64, "padding='same' round trip")


def test_registry_names_both_blocks():
    assert {"acb", "dbb"} <= set(list_blocks())
    assert get_block("dbb") is DBBlock
    with pytest.raises(ValueError, match="choose one of: base, acb, dbb"):
        get_block("dbbb")


def test_bare_convs_become_dbblocks_that_fuse_exactly():
    """convert(bare_convs=True): a conv with no BN after it (here with a bias) becomes a DBBlock too."""
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=True), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
    ).double()
    report = ConversionReport()
    dbb = convert(model, block="dbb", bare_convs=True, report=report)
    assert report.bare == ["0"] and report.converted == ["2"]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        # Fresh branches: the origin branch alone carries conv + bias exactly (other BNs zeroed here).
        for bn in list(dbb[0].branch_norms().values())[1:]:
            bn.weight.zero_()
            bn.bias.zero_()
        expect = model[0](x) / (1 + dbb[0].dbb_origin.bn.eps) ** 0.5
        assert_rel(dbb[0].eval()(x), expect, TOL64, "bare conv with bias")
        dbb = randomize(dbb, seed=9).eval()
        assert_rel(fuse(dbb)(x), dbb(x), TOL64, "fused bare-conv DBB model")


def test_fuse_after_convert_sync_batchnorm():
    """DDP's SyncBatchNorm replaces every BN, the ones inside the BN-then-pad layers too; fusion stays exact."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()).double()
    dbb = randomize(convert(model, block="dbb"), seed=11)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(dbb).eval()
    assert isinstance(synced[0].dbb_1x1_kxk.bn1.bn, nn.SyncBatchNorm)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        fused = fuse(synced)
        model.load_state_dict(fused.state_dict(), strict=True)
        assert_rel(model.eval()(x), synced(x), TOL64, "fused after convert_sync_batchnorm")
