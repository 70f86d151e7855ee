"""The Diverse Branch Block (Ding et al., CVPR 2021, "ACNet v2").

Four branches, summed, fused exactly into one KxK conv (padding K//2) after training:

- ``dbb_origin``: KxK conv + BN (the conv it replaces);
- ``dbb_1x1``: 1x1 conv + BN (absent when depthwise, ``groups == out_channels``);
- ``dbb_1x1_kxk``: 1x1 conv + BN -> KxK conv + BN; with the default internal channels (``in_channels``,
  or ``2 * in_channels`` when depthwise) the 1x1 starts as the identity (``idconv1``), else ``conv1``;
- ``dbb_avg``: 1x1 conv + BN -> KxK average pooling + BN (depthwise: the pooling alone + BN).

The BN between a 1x1 conv and a KxK conv/pooling with no padding of its own pads its output with the
value it gives for a zero input (``_BNThenPad``), so the pair equals one KxK conv with zero padding.
The module names (hence the state dict) are those of the authors' code
(DingXiaoH/DiverseBranchBlock ``diversebranchblock.py``), so their trained weights load with
``strict=True``; the fused form is ``dbb_reparam`` as there.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from acnet_pl.blocks.registry import register_block
from acnet_pl.blocks.transforms import (
    avg_pool_kernel,
    bn_scale_shift,
    fold_bn,
    identity_1x1_kernel,
    merge_1x1_kxk,
    pad_kernel_to,
    sum_branches,
)


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"DBBlock {name} must be an int or a pair of ints, got {value!r}")


def _unsupported(
    in_channels: int,
    out_channels: int,
    kernel_size: tuple[int, int],
    padding: Any,
    dilation: tuple[int, int],
    groups: int,
    padding_mode: str,
) -> str | None:
    """Why DBB cannot replace a conv of this configuration exactly, or None."""
    kh, kw = kernel_size
    if kh != kw:
        return "non-square kernel"
    if kh % 2 == 0:
        return f"even {kh}x{kw} kernel (DBB's branches align on the kernel centre)"
    if padding != (kh // 2, kh // 2):
        return f"padding {padding} is not K//2 = {kh // 2} (DBB pads K//2)"
    if dilation != (1, 1):
        return f"dilation {dilation} (DBB's 1x1 and pooling branches are not dilated)"
    if padding_mode != "zeros":
        return f"padding_mode {padding_mode!r} (DBB's branches pad with zeros)"
    if groups == out_channels and in_channels != out_channels:
        return "groups == out_channels != in_channels (DBB's depthwise pooling branch keeps the channels)"
    return None


class _BNThenPad(nn.Module):
    """BatchNorm, then pad by ``pad`` pixels with the value the BN gives for a zero input (eval mode).

    So 1x1 conv -> this -> unpadded KxK conv equals a KxK conv on the zero-padded input. The pad value
    uses the running statistics and no gradient, in training too, as in the authors' BNAndPadLayer.
    """

    def __init__(self, num_features: int, pad: int, eps: float, momentum: float | None, affine: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=affine)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        if self.pad == 0:
            return y
        with torch.no_grad():
            _, shift = bn_scale_shift(self.bn)
        p = self.pad
        n, c, h, w = y.shape
        out = shift.view(1, c, 1, 1).expand(n, c, h + 2 * p, w + 2 * p).clone()
        out[:, :, p : p + h, p : p + w] = y
        return out


class _IdentityPlus1x1(nn.Module):
    """A grouped 1x1 conv whose kernel is identity + ``weight`` (``weight`` starts at zero)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(channels, channels // groups, 1, 1))
        # Not persistent: the state dict holds only ``weight``, as the authors' IdentityBasedConv1x1.
        self.register_buffer("identity", identity_1x1_kernel(channels, groups), persistent=False)

    def kernel(self) -> torch.Tensor:
        """The 1x1 kernel this conv applies."""
        return self.weight + self.identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel(), None, 1, 0, 1, self.groups)


@register_block("dbb")
class DBBlock(nn.Module):
    """Diverse Branch Block: KxK, 1x1, 1x1->KxK and 1x1->avg branches, each with BN, summed.

    Args:
        padding: must be K//2 (None: K//2), as in DBB; the fused conv pads K//2 with zeros.
        internal_channels: channels between the 1x1 and KxK convs of ``dbb_1x1_kxk`` (the authors'
            ``internal_channels_1x1_3x3``); None = their default (``in_channels``, depthwise
            ``2 * in_channels``). Equal to ``in_channels``, the 1x1 starts as the identity.
        deploy: build the fused form (``dbb_reparam``) directly.
        gamma_init: initial weight of the output BNs of all four branches (the paper: 1, the default).
        bn_eps, bn_momentum, bn_affine: configuration of every BN.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | None = None,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        deploy: bool = False,
        gamma_init: float | None = None,
        internal_channels: int | None = None,
        *,
        bn_eps: float = 1e-5,
        bn_momentum: float | None = 0.1,
        bn_affine: bool = True,
    ) -> None:
        super().__init__()
        kernel = _pair(kernel_size, "kernel_size")
        stride = _pair(stride, "stride")
        padding = (kernel[0] // 2, kernel[0] // 2) if padding is None else _pair(padding, "padding")
        dilation = _pair(dilation, "dilation")
        if min(stride) < 1:
            raise ValueError(f"DBBlock stride must be >= 1, got {stride}")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"DBBlock groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
            )
        reason = _unsupported(in_channels, out_channels, kernel, padding, dilation, groups, padding_mode)
        if reason is not None:
            raise ValueError(
                f"DBBlock cannot fuse exactly with {reason}; keep such a conv as it is (or use ACB)"
            )
        if gamma_init is not None and not bn_affine:
            raise ValueError("DBBlock gamma_init needs bn_affine=True (a BN without affine has no gamma)")
        k = kernel[0]
        depthwise = groups == out_channels
        if internal_channels is None:
            internal_channels = 2 * in_channels if depthwise else in_channels
        if internal_channels < 1 or internal_channels % groups:
            raise ValueError(
                f"DBBlock internal_channels={internal_channels} must be a positive multiple of groups={groups}"
            )
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride, self.padding, self.groups, self.deploy = stride, padding, groups, deploy
        self.internal_channels = internal_channels
        self.bn_eps, self.bn_momentum, self.bn_affine = bn_eps, bn_momentum, bn_affine

        if deploy:
            self.dbb_reparam = self._plain_conv(bias=True)
            return

        def conv(cin: int, cout: int, size: int, conv_stride: Any = 1, pad: int = 0) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, size, conv_stride, pad, 1, groups, bias=False)

        self.dbb_origin = nn.Sequential(
            OrderedDict(conv=conv(in_channels, out_channels, k, stride, k // 2), bn=self._bn(out_channels))
        )
        avg: OrderedDict[str, nn.Module] = OrderedDict()
        if depthwise:
            # nn.AvgPool2d counts the zero padding (count_include_pad): a conv with zero padding.
            avg["avg"] = nn.AvgPool2d(k, stride, k // 2)
        else:
            avg["conv"] = conv(in_channels, out_channels, 1)
            avg["bn"] = _BNThenPad(out_channels, k // 2, bn_eps, bn_momentum, bn_affine)
            avg["avg"] = nn.AvgPool2d(k, stride, 0)
        avg["avgbn"] = self._bn(out_channels)
        self.dbb_avg = nn.Sequential(avg)
        if not depthwise:
            self.dbb_1x1 = nn.Sequential(
                OrderedDict(conv=conv(in_channels, out_channels, 1, stride), bn=self._bn(out_channels))
            )
        kxk: OrderedDict[str, nn.Module] = OrderedDict()
        if internal_channels == in_channels:
            kxk["idconv1"] = _IdentityPlus1x1(in_channels, groups)
        else:
            kxk["conv1"] = conv(in_channels, internal_channels, 1)
        kxk["bn1"] = _BNThenPad(internal_channels, k // 2, bn_eps, bn_momentum, bn_affine)
        kxk["conv2"] = conv(internal_channels, out_channels, k, stride)
        kxk["bn2"] = self._bn(out_channels)
        self.dbb_1x1_kxk = nn.Sequential(kxk)
        if gamma_init is not None:
            self.init_gamma(gamma_init)

    # construction helpers -------------------------------------------------------------------------
    def _bn(self, channels: int) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(channels, eps=self.bn_eps, momentum=self.bn_momentum, affine=self.bn_affine)

    def _plain_conv(self, bias: bool) -> nn.Conv2d:
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            1,
            self.groups,
            bias=bias,
        )

    def branch_norms(self) -> dict[str, nn.Module]:
        """The output BN of each branch by name: ``kxk``, ``1x1`` (not depthwise), ``1x1_kxk``, ``avg``; {} once fused."""
        if self.deploy:
            return {}
        norms = {"kxk": self.dbb_origin.bn}
        if hasattr(self, "dbb_1x1"):
            norms["1x1"] = self.dbb_1x1.bn
        norms["1x1_kxk"] = self.dbb_1x1_kxk.bn2
        norms["avg"] = self.dbb_avg.avgbn
        return norms

    def init_gamma(self, value: float) -> None:
        """Set the weight of each branch's output BN to ``value`` (the authors' ``init_gamma``)."""
        with torch.no_grad():
            for bn in self.branch_norms().values():
                bn.weight.fill_(value)

    @classmethod
    def unsupported_reason(cls, conv: nn.Conv2d) -> str | None:
        """Why ``conv`` cannot become a DBBlock exactly (``convert`` reports it and skips the conv), or None."""
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        return _unsupported(
            conv.in_channels,
            conv.out_channels,
            tuple(conv.kernel_size),
            padding,
            tuple(conv.dilation),
            conv.groups,
            conv.padding_mode,
        )

    @classmethod
    def _require_supported(cls, conv: nn.Conv2d) -> None:
        reason = cls.unsupported_reason(conv)
        if reason is not None:
            raise ValueError(
                f"DBBlock cannot fuse exactly with {reason}; keep such a conv as it is (or use ACB)"
            )

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.Module, **options: Any) -> DBBlock:
        """A DBBlock whose ``dbb_origin`` computes ``bn(conv(x))``; the other branches start fresh.

        A conv bias is folded into the BN's running mean. ``options`` are constructor arguments
        (``gamma_init``, ``internal_channels``).
        """
        cls._require_supported(conv)
        block = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            None,  # K//2, checked above
            conv.dilation,
            conv.groups,
            conv.padding_mode,
            bn_eps=bn.eps,
            bn_momentum=bn.momentum,
            bn_affine=bn.affine,
            **options,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        origin = block.dbb_origin
        with torch.no_grad():
            origin.conv.weight.copy_(conv.weight)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                getattr(origin.bn, name).copy_(getattr(bn, name))
            if conv.bias is not None:
                # bn(Wx + b) has the same value as bn'(Wx) with running_mean' = running_mean - b.
                origin.bn.running_mean.sub_(conv.bias)
            if bn.affine:
                origin.bn.weight.copy_(bn.weight)
                origin.bn.bias.copy_(bn.bias)
            if options.get("gamma_init") is not None:
                block.init_gamma(options["gamma_init"])
        return block

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **options: Any) -> DBBlock:
        """A DBBlock from a conv with no BatchNorm after it (``convert(..., bare_convs=True)``): fresh BNs.

        ``dbb_origin`` starts from the conv's kernel; a conv bias b is carried exactly by starting its
        BN's running mean at -b (the running mean update is linear, so it stays exact in training).
        """
        cls._require_supported(conv)
        block = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            None,
            conv.dilation,
            conv.groups,
            conv.padding_mode,
            **options,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            block.dbb_origin.conv.weight.copy_(conv.weight)
            if conv.bias is not None:
                block.dbb_origin.bn.running_mean.sub_(conv.bias)
        return block

    # forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.dbb_reparam(x)
        out = self.dbb_origin(x)
        if hasattr(self, "dbb_1x1"):
            out = out + self.dbb_1x1(x)
        out = out + self.dbb_avg(x)
        return out + self.dbb_1x1_kxk(x)

    # fusion ---------------------------------------------------------------------------------------
    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The KxK kernel and bias of the single conv equal to this block in eval mode (differentiable)."""
        if self.deploy:
            return self.dbb_reparam.weight, self.dbb_reparam.bias
        k, g = self.kernel_size, self.groups
        ref = self.dbb_origin.conv.weight
        kernels, biases = [], []

        def add(kernel: torch.Tensor, bias: torch.Tensor) -> None:
            kernels.append(kernel)
            biases.append(bias)

        add(*fold_bn(ref, self.dbb_origin.bn))
        if hasattr(self, "dbb_1x1"):
            kernel, bias = fold_bn(self.dbb_1x1.conv.weight, self.dbb_1x1.bn)
            add(pad_kernel_to(kernel, k), bias)

        kxk = self.dbb_1x1_kxk
        first = kxk.idconv1.kernel() if hasattr(kxk, "idconv1") else kxk.conv1.weight
        add(*merge_1x1_kxk(*fold_bn(first, kxk.bn1.bn), *fold_bn(kxk.conv2.weight, kxk.bn2), groups=g))

        avg = self.dbb_avg
        pool = avg_pool_kernel(self.out_channels, k, g, dtype=ref.dtype, device=ref.device)
        if hasattr(avg, "conv"):
            add(*merge_1x1_kxk(*fold_bn(avg.conv.weight, avg.bn.bn), *fold_bn(pool, avg.avgbn), groups=g))
        else:
            add(*fold_bn(pool, avg.avgbn))
        return sum_branches(kernels, biases)

    def fused_conv_module(self) -> nn.Conv2d:
        """A new KxK ``nn.Conv2d`` (with bias, padding K//2) equal to this block in eval mode, computed in float64."""
        if self.deploy:
            weight, bias = self.dbb_reparam.weight, self.dbb_reparam.bias
        else:
            with torch.no_grad():
                weight, bias = self.double_precision_copy().get_equivalent_kernel_bias()
        ref = self.dbb_reparam.weight if self.deploy else self.dbb_origin.conv.weight
        conv = self._plain_conv(bias=True).to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
        conv.train(self.training)
        return conv

    def double_precision_copy(self) -> DBBlock:
        """A float64 copy of this block (for exact fusion and reference computations)."""
        return copy.deepcopy(self).double()

    def switch_to_deploy(self) -> None:
        """Replace the branches by ``dbb_reparam`` in place; a no-op when already fused."""
        if self.deploy:
            return
        fused = self.fused_conv_module()
        for name in ("dbb_origin", "dbb_avg", "dbb_1x1", "dbb_1x1_kxk"):
            if hasattr(self, name):
                delattr(self, name)
        self.dbb_reparam = fused
        self.deploy = True

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}"
        )
        if self.groups != 1:
            s += f", groups={self.groups}"
        if not self.deploy and self.internal_channels != self.in_channels:
            s += f", internal_channels={self.internal_channels}"
        return s + (", deploy=True" if self.deploy else "")
