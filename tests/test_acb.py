"""ACBlock: exact fusion over the whole conv argument space, branch alignment, stacked == branches, errors.

Every equivalence check uses random BN statistics in all three branches and the norm-wise relative
error ||y - y_fused|| / ||y||: <= 1e-10 in float64, <= 1e-5 in float32.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_rel, rel_err
from torch import nn

from acnet_pl.blocks import ACBlock

MODES = ("zeros", "reflect", "replicate", "circular")
BRANCH_MODULES = ("square_conv", "square_bn", "ver_conv", "ver_bn", "hor_conv", "hor_bn")
TOL64, TOL32 = 1e-10, 1e-5

# Thousands of tiny convs: with several threads most of the time goes to thread hand-offs.
pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_bns(block: ACBlock, seed: int) -> ACBlock:
    """Random running mean/var, weight and bias in all three BNs (an untrained block would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (block.square_bn, block.ver_bn, block.hor_bn):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=g))
            bn.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            if bn.affine:
                bn.weight.copy_(torch.randn(n, generator=g))
                bn.bias.copy_(torch.randn(n, generator=g))
    return block


def make_block(*args, seed: int = 0, dtype=torch.float64, **kwargs) -> ACBlock:
    torch.manual_seed(seed)
    return randomize_bns(ACBlock(*args, **kwargs), seed + 1).to(dtype).eval()


# --------------------------------------------------------------------------------------------------
# exact fusion over kernel size x stride x padding x dilation x groups x padding mode x input size

GRID_IN, GRID_OUT = 4, 8
GRID_SIZES = ((9, 9), (10, 7), (8, 8))  # odd square, non-square (even x odd), even square


def check_config(block: ACBlock, xs: list[torch.Tensor], tol: float, conv_args: dict) -> tuple[int, int]:
    """Compare the block with its fused conv on each input; (checked, skipped) counts.

    An input is skipped only when a plain nn.Conv2d with the same arguments fails on it too, and
    then the block must fail as well.
    """
    plain = nn.Conv2d(**conv_args, bias=False).to(xs[0].dtype)
    fused = block.fused_conv_module()
    checked = skipped = 0
    for x in xs:
        try:
            plain(x)
        except (RuntimeError, ValueError, NotImplementedError):
            with pytest.raises((RuntimeError, ValueError, NotImplementedError)):
                block(x)
            skipped += 1
            continue
        y, y_fused = block(x), fused(x)
        assert y.shape == y_fused.shape == plain(x).shape, conv_args
        err = rel_err(y_fused, y)
        assert err <= tol, f"{conv_args} input {tuple(x.shape)}: relative error {err:.3g} > {tol}"
        checked += 1
    return checked, skipped


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [3, 5, 7])
@torch.no_grad()
def test_fusion_exact_float64_full_grid(k, mode):
    """Every padding 0..K (cropped 1D branches below K//2), stride 1/2, dilation 1/2, groups 1/2/depthwise."""
    xs = [torch.randn(2, GRID_IN, h, w, dtype=torch.float64) for h, w in GRID_SIZES]
    checked = skipped = 0
    for stride, padding, dilation, groups in itertools.product((1, 2), range(k + 1), (1, 2), (1, 2, GRID_IN)):
        args = dict(
            in_channels=GRID_IN,
            out_channels=GRID_OUT,
            kernel_size=k,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=mode,
        )
        block = make_block(**args, seed=padding + 10 * stride)
        c, s = check_config(block, xs, TOL64, args)
        checked, skipped = checked + c, skipped + s
    total = 2 * (k + 1) * 2 * 3 * len(GRID_SIZES)
    assert checked + skipped == total
    # Skips are only the configs nn.Conv2d rejects too (kernel or padding larger than the input).
    assert checked >= total // 2, (checked, skipped)


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_fusion_exact_float32(mode):
    xs = [torch.randn(2, GRID_IN, h, w) for h, w in ((10, 7), (9, 9))]
    checked = 0
    for k in (3, 5, 7):
        for stride, padding, dilation, groups in itertools.product(
            (1, 2), (0, k // 2, k), (1, 2), (1, GRID_IN)
        ):
            args = dict(
                in_channels=GRID_IN,
                out_channels=GRID_OUT,
                kernel_size=k,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                padding_mode=mode,
            )
            block = make_block(**args, seed=k + padding, dtype=torch.float32)
            assert block.fused_conv_module().weight.dtype == torch.float32
            checked += check_config(block, xs, TOL32, args)[0]
    assert checked >= 60


@pytest.mark.parametrize(
    ("stride", "padding", "dilation"),
    [((1, 2), (0, 2), (1, 1)), ((2, 1), (3, 1), (2, 1)), ((1, 1), (1, 0), (1, 2)), ((2, 2), (2, 3), (2, 2))],
)
@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_fusion_exact_anisotropic_arguments(stride, padding, dilation, mode):
    """Per-axis stride/padding/dilation: the crop of each 1D branch is computed per axis."""
    args = dict(
        in_channels=3,
        out_channels=6,
        kernel_size=5,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=3,
        padding_mode=mode,
    )
    block = make_block(**args)
    checked, _ = check_config(block, [torch.randn(2, 3, 11, 12, dtype=torch.float64)], TOL64, args)
    assert checked == 1


@pytest.mark.parametrize("dilation", [1, 2])
@torch.no_grad()
def test_padding_same_and_valid(dilation):
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
    same = make_block(4, 4, 5, padding="same", dilation=dilation)
    assert same.padding == (2 * dilation, 2 * dilation)
    y = same(x)
    assert y.shape == (2, 4, 9, 10)
    assert_rel(same.fused_conv_module()(x), y, TOL64)
    valid = make_block(4, 4, 3, padding="valid", dilation=dilation)
    assert valid(x).shape == nn.Conv2d(4, 4, 3, padding="valid", dilation=dilation)(x.float()).shape
    with pytest.raises(ValueError, match="stride 1"):
        ACBlock(4, 4, 3, stride=2, padding="same")


@pytest.mark.parametrize("momentum", [0.1, None])
@torch.no_grad()
def test_fusion_without_bn_affine(momentum):
    block = make_block(4, 8, 3, padding=1, bn_affine=False, bn_momentum=momentum)
    assert block.square_bn.weight is None and block.ver_bn.momentum == momentum
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64)
    assert_rel(block.fused_conv_module()(x), block(x), TOL64)


# --------------------------------------------------------------------------------------------------
# the 1D windows sit on the square kernel's centre column / row


def _identity_bns(block: ACBlock) -> None:
    with torch.no_grad():
        for bn in (block.square_bn, block.ver_bn, block.hor_bn):
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)  # (var + eps) = 1: the BN is the identity in eval mode
            bn.weight.fill_(1.0)
            bn.bias.zero_()


def _hand_conv(x, kernel, block: ACBlock) -> torch.Tensor:
    """The KxK conv the block should equal, built without any of the block's fusion code."""
    ph, pw = block.padding
    if block.padding_mode == "zeros":
        return F.conv2d(x, kernel, None, block.stride, block.padding, block.dilation, block.groups)
    x = F.pad(x, (pw, pw, ph, ph), mode=block.padding_mode)
    return F.conv2d(x, kernel, None, block.stride, 0, block.dilation, block.groups)


@pytest.mark.parametrize("branch", ["ver", "hor"])
@pytest.mark.parametrize(
    ("k", "stride", "padding", "dilation", "mode"),
    [
        (3, 1, 1, 1, "zeros"),
        (3, 2, 0, 1, "zeros"),  # padding < K//2: the 1D branch reads a cropped input
        (5, 2, 1, 1, "zeros"),
        (5, 1, 4, 1, "zeros"),  # padding > K//2
        (5, 2, 3, 2, "zeros"),  # dilation: crop of dilation * K//2 - padding
        (7, 3, 2, 1, "zeros"),
        (5, 2, 1, 1, "reflect"),
        (3, 2, 0, 2, "replicate"),
        (7, 1, 5, 1, "circular"),
    ],
)
@torch.no_grad()
def test_1d_branch_aligns_with_square_centre(branch, k, stride, padding, dilation, mode):
    block = ACBlock(2, 3, k, stride, padding, dilation, padding_mode=mode).double().eval()
    _identity_bns(block)
    block.square_conv.weight.zero_()
    other = "hor" if branch == "ver" else "ver"
    getattr(block, f"{other}_conv").weight.zero_()
    conv = getattr(block, f"{branch}_conv")
    conv.weight.copy_(torch.arange(1.0, conv.weight.numel() + 1).view_as(conv.weight))
    x = torch.randn(2, 2, 13, 12, dtype=torch.float64)
    y = block(x)

    def placed(col: int) -> torch.Tensor:
        kernel = torch.zeros(3, 2, k, k, dtype=torch.float64)
        if branch == "ver":
            kernel[:, :, :, col] = conv.weight[:, :, :, 0]
        else:
            kernel[:, :, col, :] = conv.weight[:, :, 0, :]
        return kernel

    c = k // 2
    assert_rel(y, _hand_conv(x, placed(c), block), 1e-12)
    # The check has teeth: the same 1D kernel one column/row off the centre gives another output.
    assert rel_err(y[..., 1:-1, 1:-1], _hand_conv(x, placed(c - 1), block)[..., 1:-1, 1:-1]) > 0.1
    assert rel_err(y[..., 1:-1, 1:-1], _hand_conv(x, placed(c + 1), block)[..., 1:-1, 1:-1]) > 0.1


# --------------------------------------------------------------------------------------------------
# layout: module names, state dict keys of the original ACNet, deploy form


def original_acnet_state_dict(o: int, c_per_group: int, k: int) -> dict[str, torch.Tensor]:
    """An ACBlock state dict laid out as in the original ACNet code (DingXiaoH/ACNet acb.py), by hand."""
    sd = {
        "square_conv.weight": torch.randn(o, c_per_group, k, k),
        "ver_conv.weight": torch.randn(o, c_per_group, k, 1),
        "hor_conv.weight": torch.randn(o, c_per_group, 1, k),
    }
    for bn in ("square_bn", "ver_bn", "hor_bn"):
        sd[f"{bn}.weight"] = torch.randn(o)
        sd[f"{bn}.bias"] = torch.randn(o)
        sd[f"{bn}.running_mean"] = torch.randn(o)
        sd[f"{bn}.running_var"] = torch.rand(o) + 0.5
        sd[f"{bn}.num_batches_tracked"] = torch.tensor(7)
    return sd


@pytest.mark.parametrize("impl", ["branches", "stacked"])
@pytest.mark.parametrize("groups", [1, 2])
def test_state_dict_layout_matches_original_acnet(impl, groups):
    block = ACBlock(4, 6, 5, padding=2, groups=groups, impl=impl)
    expected = original_acnet_state_dict(6, 4 // groups, 5)
    sd = block.state_dict()
    assert sorted(sd) == sorted(expected)
    assert {name: tuple(t.shape) for name, t in sd.items()} == {
        n: tuple(t.shape) for n, t in expected.items()
    }
    assert [name for name, _ in block.named_children()] == list(BRANCH_MODULES)
    assert all(getattr(block, f"{b}_conv").bias is None for b in ("square", "ver", "hor"))
    assert block.ver_conv.kernel_size == (5, 1) and block.hor_conv.kernel_size == (1, 5)
    block.load_state_dict(expected, strict=True)
    for name, value in expected.items():
        assert torch.equal(block.state_dict()[name], value), name


def test_gamma_init_sets_all_three_bn_weights():
    block = ACBlock(3, 5, 3, padding=1, gamma_init=1 / 3)
    for bn in (block.square_bn, block.ver_bn, block.hor_bn):
        assert torch.equal(bn.weight, torch.full((5,), 1 / 3))
        assert torch.equal(bn.bias, torch.zeros(5))
    default = ACBlock(3, 5, 3, padding=1)
    assert all(torch.equal(bn.weight, torch.ones(5)) for bn in (default.square_bn, default.ver_bn))


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
@torch.no_grad()
def test_deploy_true_builds_only_fused_conv(mode):
    block = ACBlock(4, 6, 5, stride=2, padding=1, dilation=2, groups=2, padding_mode=mode, deploy=True)
    assert [name for name, _ in block.named_children()] == ["fused_conv"]
    assert sorted(block.state_dict()) == ["fused_conv.bias", "fused_conv.weight"]
    conv = block.fused_conv
    assert type(conv) is nn.Conv2d and conv.weight.shape == (6, 2, 5, 5) and conv.bias.shape == (6,)
    assert (conv.stride, conv.padding, conv.dilation, conv.groups) == ((2, 2), (1, 1), (2, 2), 2)
    assert conv.padding_mode == mode
    # A trained block's fused weights load into it and give the trained block's outputs.
    trained = make_block(4, 6, 5, stride=2, padding=1, dilation=2, groups=2, padding_mode=mode)
    trained.switch_to_deploy()
    block.double().load_state_dict(trained.state_dict(), strict=True)
    x = torch.randn(2, 4, 11, 10, dtype=torch.float64)
    assert torch.equal(block(x), trained(x))
    assert block.get_equivalent_kernel_bias()[0] is conv.weight


@torch.no_grad()
def test_switch_to_deploy_twice_is_harmless():
    block = make_block(4, 8, 3, stride=2, padding=0, groups=4, padding_mode="replicate")
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    y = block(x)
    block.switch_to_deploy()
    y1 = block(x)
    fused = block.fused_conv
    block.switch_to_deploy()
    y2 = block(x)
    assert block.deploy and block.fused_conv is fused
    assert [name for name, _ in block.named_children()] == ["fused_conv"]
    assert all(not hasattr(block, name) for name in BRANCH_MODULES)
    assert sorted(block.state_dict()) == ["fused_conv.bias", "fused_conv.weight"]
    assert_rel(y1, y, TOL64)
    assert torch.equal(y1, y2)
    # fused_conv_module() of a deployed block is a copy, not the block's own conv.
    copy_ = block.fused_conv_module()
    assert copy_ is not fused and torch.equal(copy_.weight, fused.weight)


def test_fused_conv_module_is_independent_and_keeps_mode():
    block = make_block(4, 4, 3, padding=1, dtype=torch.float32).train()
    conv = block.fused_conv_module()
    assert conv.training and conv.bias is not None and conv.weight.dtype == torch.float32
    with torch.no_grad():
        conv.weight.zero_()
    assert block.square_conv.weight.abs().sum() > 0
    assert not block.eval().fused_conv_module().training


def test_equivalent_kernel_bias_is_differentiable():
    """Gradients of the fused kernel/bias reach every branch weight and BN parameter, with the right values."""
    block = make_block(4, 6, 5, padding=2, groups=2)
    kernel, bias = block.get_equivalent_kernel_bias()
    assert kernel.shape == (6, 2, 5, 5) and bias.shape == (6,)
    r_k, r_b = torch.randn_like(kernel), torch.randn_like(bias)
    ((kernel * r_k).sum() + (bias * r_b).sum()).backward()
    for name in BRANCH_MODULES:
        for pname, p in getattr(block, name).named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname}"
    # d/dW_ver of sum(K * R) = scale_ver * (centre column of R); likewise for the 1xK branch.
    for branch, centre in (("ver", r_k[:, :, :, 2:3]), ("hor", r_k[:, :, 2:3, :])):
        bn = getattr(block, f"{branch}_bn")
        scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().view(-1, 1, 1, 1)
        expected = scale * centre
        assert_rel(getattr(block, f"{branch}_conv").weight.grad, expected, 1e-12, branch)
    # d/d bias_bn of the fused bias is 1 for every branch.
    assert torch.allclose(block.ver_bn.bias.grad, r_b) and torch.allclose(block.square_bn.bias.grad, r_b)


# --------------------------------------------------------------------------------------------------
# from_conv_bn: the square branch carries a conv + BN


@pytest.mark.parametrize(("conv_bias", "affine"), [(False, True), (True, True), (True, False)])
@torch.no_grad()
def test_from_conv_bn_square_branch_equals_conv_bn(conv_bias, affine):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=conv_bias).double()
    bn = nn.BatchNorm2d(8, eps=1e-3, momentum=0.05, affine=affine).double().eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    if affine:
        bn.weight.normal_()
        bn.bias.normal_()
    block = ACBlock.from_conv_bn(conv, bn).eval()
    assert (block.bn_eps, block.bn_momentum, block.bn_affine, block.groups) == (1e-3, 0.05, affine, 2)
    assert block.square_conv.weight.dtype == torch.float64
    assert torch.equal(block.square_conv.weight, conv.weight)
    if affine:
        for bn_branch in (block.ver_bn, block.hor_bn):
            bn_branch.weight.zero_()  # the fresh 1D branches have bias 0 and running stats 0 / 1
    else:
        block.ver_conv.weight.zero_()
        block.hor_conv.weight.zero_()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    assert_rel(block(x), bn(conv(x)), TOL64)


# --------------------------------------------------------------------------------------------------
# impl="stacked" == impl="branches"

STACKED_CASES = [
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=8, kernel_size=5, stride=2, padding=1, groups=2),  # cropped 1D branches
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=0, dilation=2, groups=4),  # depthwise
    dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=2, groups=4, padding_mode="reflect"),
    dict(in_channels=2, out_channels=6, kernel_size=5, padding=3, groups=2, padding_mode="circular"),
]


def make_pair(case: dict, **options) -> tuple[ACBlock, ACBlock]:
    torch.manual_seed(0)
    branches = randomize_bns(ACBlock(**case, impl="branches", **options), 1).double()
    stacked = ACBlock(**case, impl="stacked", **options).double()
    stacked.load_state_dict(branches.state_dict(), strict=True)
    return branches, stacked


def assert_same_step(a: ACBlock, b: ACBlock, x: torch.Tensor, tol: float = TOL64) -> None:
    """One forward/backward on both blocks: outputs, input gradients and all parameter gradients agree."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    assert_rel(yb, ya, tol)
    r = torch.randn_like(ya)
    (ya * r).sum().backward()
    (yb * r).sum().backward()
    assert_rel(xb.grad, xa.grad, tol)
    params_a, params_b = dict(a.named_parameters()), dict(b.named_parameters())
    assert params_a.keys() == params_b.keys()
    for name, pa in params_a.items():
        assert params_b[name].grad.shape == pa.grad.shape == pa.shape, name
        assert_rel(params_b[name].grad, pa.grad, tol, name)


def assert_same_buffers(a: ACBlock, b: ACBlock, tol: float = TOL64) -> None:
    buffers_a, buffers_b = dict(a.named_buffers()), dict(b.named_buffers())
    assert buffers_a.keys() == buffers_b.keys()
    for name, buf in buffers_a.items():
        if buf.dtype == torch.long:
            assert torch.equal(buffers_b[name], buf), name
        else:
            assert_rel(buffers_b[name], buf, tol, name)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("case", STACKED_CASES, ids=lambda c: f"k{c['kernel_size']}g{c.get('groups', 1)}")
def test_stacked_equals_branches_train_and_eval(case, momentum):
    a, b = make_pair(case, bn_momentum=momentum)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, weight_decay=0.01)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, weight_decay=0.01)
    for block in (a, b):
        block.train()
    for step in range(3):
        opt_a.zero_grad()
        opt_b.zero_grad()
        assert_same_step(a, b, torch.randn(3, case["in_channels"], 9, 10, dtype=torch.float64))
        opt_a.step()
        opt_b.step()
        assert_same_buffers(a, b)
        assert int(b.ver_bn.num_batches_tracked) == step + 1
    # The stacked kernel's gradient reaches only the real 1D entries: the padding around them is no parameter.
    k, o, c = case["kernel_size"], case["out_channels"], case["kernel_size"] // 2
    assert b.ver_conv.weight.shape == (o, case["in_channels"] // case.get("groups", 1), k, 1)
    assert b.hor_conv.weight.shape == (o, case["in_channels"] // case.get("groups", 1), 1, k)
    with torch.no_grad():
        g = case.get("groups", 1)
        stacked = b.stacked_kernel().view(g, 3, o // g, -1, k, k)
        off_centre = torch.ones(k, dtype=torch.bool)
        off_centre[c] = False
        assert stacked[:, 1][..., off_centre].abs().max() == 0  # ver part: zero outside the centre column
        assert stacked[:, 2][..., off_centre, :].abs().max() == 0  # hor part: zero outside the centre row
        assert torch.equal(stacked[:, 0].reshape(o, -1, k, k), b.square_conv.weight)
    for block in (a, b):
        block.eval()
        block.zero_grad()
    assert_same_step(a, b, torch.randn(2, case["in_channels"], 8, 11, dtype=torch.float64))
    assert_same_buffers(a, b)  # eval mode leaves the running statistics alone in both
    with torch.no_grad():
        x = torch.randn(2, case["in_channels"], 8, 11, dtype=torch.float64)
        assert_rel(b.fused_conv_module()(x), b(x), TOL64)


def test_stacked_float32_matches_branches():
    a, b = make_pair(STACKED_CASES[1])
    a, b = a.float().train(), b.float().train()
    x = torch.randn(4, 4, 12, 12)
    assert_rel(b(x), a(x), TOL32)
    assert_same_buffers(a, b, tol=TOL32)


def test_stacked_respects_bn_modules_set_to_eval_inside_a_training_block():
    """Frozen BN (bn.eval() inside a model in train mode, as in fine-tuning) must mean the same in both impls.

    The branches impl then normalises with the running statistics and leaves them alone; the stacked impl
    must do the same rather than follow the block's own training flag.
    """
    a, b = make_pair(STACKED_CASES[0])
    for block in (a, b):
        block.train()
        for bn in (block.square_bn, block.ver_bn, block.hor_bn):
            bn.eval()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    before = copy.deepcopy(b.state_dict())
    assert_rel(b(x), a(x), TOL64)
    for name, value in before.items():
        assert torch.equal(b.state_dict()[name], value), f"{name} changed by a forward with frozen BN"


# --------------------------------------------------------------------------------------------------
# SyncBatchNorm


def _record_bn_inputs(block: ACBlock) -> dict[str, list[torch.Tensor]]:
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in ("square_bn", "ver_bn", "hor_bn")}
    for name in seen:
        getattr(block, name).register_forward_hook(
            lambda m, args, out, n=name: seen[n].append(args[0].detach())
        )
    return seen


@pytest.mark.parametrize(
    "case", [STACKED_CASES[0], STACKED_CASES[1], STACKED_CASES[2]], ids=["g1", "g2", "dw"]
)
def test_stacked_runs_under_sync_batchnorm(case):
    """After convert_sync_batchnorm the stacked block hands each branch's output to its own SyncBatchNorm.

    (On one process SyncBatchNorm computes plain batch norm. A multi-process run cannot be tested on CPU:
    torch's SyncBatchNorm refuses CPU tensors whenever a process group with world size > 1 exists.)
    """
    a, b = make_pair(case)
    a = nn.SyncBatchNorm.convert_sync_batchnorm(a)
    b = nn.SyncBatchNorm.convert_sync_batchnorm(b)
    assert all(type(getattr(b, n)) is nn.SyncBatchNorm for n in ("square_bn", "ver_bn", "hor_bn"))
    seen_a, seen_b = _record_bn_inputs(a), _record_bn_inputs(b)
    for block in (a, b):
        block.train()
    for _ in range(2):
        assert_same_step(a, b, torch.randn(3, case["in_channels"], 9, 10, dtype=torch.float64))
        assert_same_buffers(a, b)
    for name in seen_a:
        assert len(seen_b[name]) == len(seen_a[name]) == 2  # each BN called once per forward
        for ta, tb in zip(seen_a[name], seen_b[name], strict=True):
            assert_rel(tb, ta, TOL64, name)
    for block in (a, b):
        block.eval()
    x = torch.randn(2, case["in_channels"], 9, 10, dtype=torch.float64)
    with torch.no_grad():
        assert_rel(b(x), a(x), TOL64)
        assert_rel(b.fused_conv_module()(x), a(x), TOL64)


# --------------------------------------------------------------------------------------------------
# errors a user can cause


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        (dict(kernel_size=1), ["kernel_size=1", "1x1"]),
        (dict(kernel_size=4), ["odd kernel_size", "got 4", "centre"]),
        (dict(kernel_size=2), ["odd kernel_size", "got 2"]),
        (dict(kernel_size=(3, 5)), ["square kernel", "3x5"]),
        (dict(groups=3), ["groups=3", "must divide", "in_channels=4"]),
        (dict(groups=0), ["groups=0"]),
        (dict(padding_mode="mirror"), ["padding_mode='mirror'", "zeros", "reflect", "replicate", "circular"]),
        (dict(impl="fast"), ["impl='fast'", "branches", "stacked"]),
        (dict(padding=-1), ["padding must be >= 0"]),
        (dict(stride=0), ["stride and dilation must be >= 1"]),
        (dict(gamma_init=0.5, bn_affine=False), ["gamma_init", "bn_affine=True"]),
    ],
)
def test_invalid_arguments_raise_value_error_saying_why(kwargs, fragments):
    args = dict(in_channels=4, out_channels=8, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        ACBlock(**args)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
