"""The block registry: names, the 'package.module:ClassName' form, errors; the kernel transforms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from acnet_pl import convert, fuse
from acnet_pl.blocks import ACBlock, DBBlock, ReparamBlock, get_block, list_blocks, register_block, transforms
from acnet_pl.blocks import registry as registry_module


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(registry_module, "_BLOCKS", dict(registry_module._BLOCKS))


class _Fused(nn.Module):
    """A block that is a conv + BN folded at once: the smallest thing the protocol accepts."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.Module, **options) -> _Fused:
        return cls(conv, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def fused_conv_module(self) -> nn.Conv2d:
        c = self.conv
        conv = nn.Conv2d(
            c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups
        )
        kernel, bias = transforms.fold_bn(self.conv.weight, self.bn, self.conv.bias)
        with torch.no_grad():
            conv.weight.copy_(kernel)
            conv.bias.copy_(bias)
        return conv


def test_builtin_blocks_satisfy_the_protocol():
    assert list_blocks() == sorted(list_blocks()) and {"acb", "dbb"} <= set(list_blocks())
    assert get_block("acb") is ACBlock and get_block("dbb") is DBBlock
    assert isinstance(ACBlock(4, 4, 3, padding=1), ReparamBlock)
    assert isinstance(DBBlock(4, 4, 3), ReparamBlock)


def test_register_convert_fuse_a_new_block(clean_registry):
    register_block("folded")(_Fused)
    register_block("folded")(_Fused)  # the same class again (a module imported twice): fine
    assert "folded" in list_blocks()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        converted = convert(model, block="folded")
        assert isinstance(converted[0], _Fused)
        x = torch.randn(2, 3, 6, 6)
        fused = fuse(converted)
        model.load_state_dict(fused.state_dict(), strict=True)
        assert torch.allclose(model(x), converted(x), rtol=0, atol=1e-5)


def test_registration_errors(clean_registry):
    with pytest.raises(ValueError, match="already taken by acnet_pl.blocks.acb.ACBlock"):
        register_block("acb")(_Fused)
    with pytest.raises(ValueError, match="other than 'base'"):
        register_block("base")
    with pytest.raises(TypeError, match="lacks from_conv_bn, fused_conv_module"):
        register_block("plain")(nn.Identity)


class _NoOptions(_Fused):
    """A builder that names its parameters (no ``**options``): its signature says what it takes."""

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.Module, scale: float = 1.0) -> _NoOptions:
        return cls(conv, bn)


@pytest.mark.parametrize(
    ("block", "options", "key"),
    [
        ("no_options", {"scale": 2.0, "gamma_init": 0.5}, "gamma_init"),  # an experiment's gamma_init
        ("acb", {"internal_channels": 4}, "internal_channels"),  # a DBB option given to ACB
    ],
)
def test_an_option_the_block_does_not_take_names_the_key(clean_registry, block, options, key):
    """By the builder's signature (no **options) or, for ACB's **options, by its constructor's TypeError."""
    register_block("no_options")(_NoOptions)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError) as info:
        convert(model, block=block, **options)
    assert (
        str(info.value)
        == f"block {block} takes no option {key}; remove it (~block.{key} on the command line)"
    )
    assert type(convert(model, block="no_options", scale=2.0)[0]) is _NoOptions
    with pytest.raises(TypeError, match="fill_"):  # a value of the wrong type: the block's own error
        convert(model, block="acb", gamma_init="high")


def test_block_by_import_path(tmp_path, monkeypatch):
    package = tmp_path / "userblocks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mine.py").write_text("from torch import nn\nclass NotABlock(nn.Module):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_block(f"{__name__}:_Fused") is _Fused  # registered or not
    with pytest.raises(ValueError, match="lacks from_conv_bn"):
        get_block("userblocks.mine:NotABlock")
    with pytest.raises(ValueError, match="has no 'Missing'"):
        get_block("userblocks.mine:Missing")
    with pytest.raises(ValueError, match="cannot import module 'nowhere_such'.*PYTHONPATH"):
        get_block("nowhere_such:Block")
    with pytest.raises(ValueError, match="unknown block 'acbb'; choose one of: base, acb, dbb"):
        get_block("acbb")


def test_transforms_against_the_convs_they_replace():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    # a 1x3 kernel padded into 3x3 = the 1x3 conv reading the centre row
    k13 = torch.randn(6, 4, 1, 3, dtype=torch.float64)
    y = F.conv2d(x, transforms.pad_kernel_to(k13, 3), padding=1)
    assert torch.allclose(y, F.conv2d(x, k13, padding=(0, 1)), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="cannot centre a 1x2 kernel in 3x3"):
        transforms.pad_kernel_to(torch.zeros(1, 1, 1, 2), 3)
    # average pooling (zero padding counted) = the grouped conv with avg_pool_kernel
    for groups in (1, 2, 4):
        conv = F.conv2d(x, transforms.avg_pool_kernel(4, 3, groups, dtype=x.dtype), None, 2, 1, 1, groups)
        assert torch.allclose(conv, F.avg_pool2d(x, 3, 2, 1), rtol=0, atol=1e-12)
    # 1x1 (with bias) then 3x3 (with bias, input padded with the 1x1's bias) = one 3x3 conv
    groups = 2
    k1, b1 = torch.randn(6, 2, 1, 1, dtype=x.dtype), torch.randn(6, dtype=x.dtype)
    k2, b2 = torch.randn(8, 3, 3, 3, dtype=x.dtype), torch.randn(8, dtype=x.dtype)
    mid = F.pad(F.conv2d(x, k1, None, 1, 0, 1, groups), (1, 1, 1, 1)) + b1.view(1, -1, 1, 1)
    two_step = F.conv2d(mid, k2, b2, 1, 0, 1, groups)
    kernel, bias = transforms.merge_1x1_kxk(k1, b1, k2, b2, groups)
    assert torch.allclose(F.conv2d(x, kernel, bias, 1, 1, 1, groups), two_step, rtol=0, atol=1e-10)
    # fold_bn with a conv bias and a BN without affine
    bn = nn.BatchNorm2d(6, affine=False).double().eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    kernel, bias = transforms.fold_bn(k1, bn, b1)
    ref = bn(F.conv2d(x, k1, b1, groups=2))
    assert torch.allclose(F.conv2d(x, kernel, bias, groups=2), ref, rtol=0, atol=1e-12)
