"""The Diverse Branch Block (Ding et al., CVPR 2021, "ACNet v2").

Module names (hence the state dict) are those of the authors' code (DingXiaoH/DiverseBranchBlock
``diversebranchblock.py``), so their trained weights load with ``strict=True``; fused: ``dbb_reparam``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from acnet_pl.blocks.base import ConvSpec, ReparamConvBlock
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


class _BNThenPad(nn.Module):
    """BatchNorm, then pad by ``pad`` pixels with the value the BN gives for a zero input (eval mode).

    So 1x1 conv -> this -> unpadded KxK conv equals a KxK conv on the zero-padded input. The pad value
    uses the running statistics and no gradient, in training too, as in the authors' BNAndPadLayer.
    """

    def __init__(self, bn: nn.BatchNorm2d, pad: int) -> None:
        super().__init__()
        self.bn, self.pad = bn, pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        if self.pad == 0:  # nothing to pad: no copy on the training path
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
class DBBlock(ReparamConvBlock):
    """Four branches, each ending in a BN, summed; fuse exactly into one KxK conv (padding K//2).

    ``dbb_origin``: KxK conv + BN (the conv it replaces); ``dbb_1x1``: 1x1 conv + BN (absent when
    depthwise, ``groups == out_channels``); ``dbb_1x1_kxk``: 1x1 conv (``idconv1``, starting as the
    identity, or ``conv1``) + BN -> KxK conv + BN; ``dbb_avg``: 1x1 conv + BN -> KxK average pooling + BN
    (depthwise: the pooling alone + BN).

    Args (``nn.Conv2d``'s and ``ReparamConvBlock``'s, then):
        padding: must be K//2 (None, the default: K//2).
        gamma_init: initial weight of the output BNs of all four branches (the paper: 1, the default).
        internal_channels: channels between the 1x1 and KxK convs of ``dbb_1x1_kxk`` (the authors'
            ``internal_channels_1x1_3x3``); None = their default (``in_channels``, depthwise
            ``2 * in_channels``). Equal to ``in_channels``, the 1x1 starts as the identity.
    """

    fused_name = "dbb_reparam"

    def __init__(
        self,
        *conv_args: Any,
        gamma_init: float | None = None,
        internal_channels: int | None = None,
        **conv_kwargs: Any,
    ) -> None:
        if len(conv_args) < 5:  # padding defaults to K//2 here
            conv_kwargs.setdefault("padding", None)
        super().__init__(*conv_args, **conv_kwargs)
        in_channels, out_channels, groups = self.in_channels, self.out_channels, self.groups
        k, stride = self.kernel_size, self.stride
        depthwise = groups == out_channels
        if internal_channels is None:
            internal_channels = 2 * in_channels if depthwise else in_channels
        if internal_channels < 1 or internal_channels % groups:
            raise ValueError(
                f"DBBlock internal_channels={internal_channels} must be a positive multiple of groups={groups}"
            )
        self.internal_channels = internal_channels
        if self.deploy:
            return

        def conv(cin: int, cout: int, size: int, conv_stride: Any = 1, pad: int = 0) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, size, conv_stride, pad, 1, groups, bias=False)

        self.dbb_origin = nn.Sequential(
            OrderedDict(conv=conv(in_channels, out_channels, k, stride, k // 2), bn=self._bn())
        )
        avg: OrderedDict[str, nn.Module] = OrderedDict()
        if depthwise:
            # nn.AvgPool2d counts the zero padding (count_include_pad): a conv with zero padding.
            avg["avg"] = nn.AvgPool2d(k, stride, k // 2)
        else:
            avg["conv"] = conv(in_channels, out_channels, 1)
            avg["bn"] = _BNThenPad(self._bn(), k // 2)
            avg["avg"] = nn.AvgPool2d(k, stride, 0)
        avg["avgbn"] = self._bn()
        self.dbb_avg = nn.Sequential(avg)
        if not depthwise:
            self.dbb_1x1 = nn.Sequential(
                OrderedDict(conv=conv(in_channels, out_channels, 1, stride), bn=self._bn())
            )
        kxk: OrderedDict[str, nn.Module] = OrderedDict()
        if internal_channels == in_channels:
            kxk["idconv1"] = _IdentityPlus1x1(in_channels, groups)
        else:
            kxk["conv1"] = conv(in_channels, internal_channels, 1)
        kxk["bn1"] = _BNThenPad(self._bn(internal_channels), k // 2)
        kxk["conv2"] = conv(internal_channels, out_channels, k, stride)
        kxk["bn2"] = self._bn()
        self.dbb_1x1_kxk = nn.Sequential(kxk)
        if gamma_init is not None:
            self.init_gamma(gamma_init)

    @classmethod
    def unsupported_config(cls, spec: ConvSpec) -> str | None:
        """An even kernel, padding other than K//2, dilation, a padding mode but zeros, a depthwise conv
        that changes the channel count: what DBB's branches cannot equal."""
        k = spec.kernel_size[0]
        if (reason := super().unsupported_config(spec)) is not None:
            return reason
        if k % 2 == 0:
            return f"even {k}x{k} kernel (DBB's branches align on the kernel centre)"
        if spec.dilation != (1, 1):
            return f"dilation {spec.dilation} (DBB's 1x1 and pooling branches are not dilated)"
        if spec.padding != (k // 2, k // 2):
            return f"padding {spec.padding} is not K//2 = {k // 2} (DBB pads K//2)"
        if spec.padding_mode != "zeros":
            return f"padding_mode {spec.padding_mode!r} (DBB's branches pad with zeros)"
        if spec.groups == spec.out_channels != spec.in_channels:
            return "groups == out_channels != in_channels (DBB's depthwise pooling branch keeps the channels)"
        return None

    def origin(self) -> tuple[nn.Conv2d, nn.Module]:
        """``dbb_origin``'s conv and BN."""
        return self.dbb_origin.conv, self.dbb_origin.bn

    def branch_norms(self) -> dict[str, nn.Module]:
        """The output BN of each branch: ``kxk``, ``1x1`` (not depthwise), ``1x1_kxk``, ``avg``."""
        if self.deploy:
            return {}
        norms = {"kxk": self.dbb_origin.bn}
        if hasattr(self, "dbb_1x1"):
            norms["1x1"] = self.dbb_1x1.bn
        norms["1x1_kxk"] = self.dbb_1x1_kxk.bn2
        norms["avg"] = self.dbb_avg.avgbn
        return norms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.dbb_reparam(x)
        out = self.dbb_origin(x)
        if hasattr(self, "dbb_1x1"):
            out = out + self.dbb_1x1(x)
        out = out + self.dbb_avg(x)
        return out + self.dbb_1x1_kxk(x)

    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.deploy:
            return self.dbb_reparam.weight, self.dbb_reparam.bias
        k, g = self.kernel_size, self.groups
        ref = self.dbb_origin.conv.weight
        branches = [fold_bn(ref, self.dbb_origin.bn)]
        if hasattr(self, "dbb_1x1"):
            kernel, bias = fold_bn(self.dbb_1x1.conv.weight, self.dbb_1x1.bn)
            branches.append((pad_kernel_to(kernel, k), bias))
        kxk = self.dbb_1x1_kxk
        first = kxk.idconv1.kernel() if hasattr(kxk, "idconv1") else kxk.conv1.weight
        branches.append(
            merge_1x1_kxk(*fold_bn(first, kxk.bn1.bn), *fold_bn(kxk.conv2.weight, kxk.bn2), groups=g)
        )
        avg = self.dbb_avg
        pool = avg_pool_kernel(self.out_channels, k, g, dtype=ref.dtype, device=ref.device)
        if hasattr(avg, "conv"):
            branches.append(
                merge_1x1_kxk(*fold_bn(avg.conv.weight, avg.bn.bn), *fold_bn(pool, avg.avgbn), groups=g)
            )
        else:
            branches.append(fold_bn(pool, avg.avgbn))
        return sum_branches(*zip(*branches, strict=True))

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if not self.deploy and self.internal_channels != self.in_channels:
            s += f", internal_channels={self.internal_channels}"
        return s
