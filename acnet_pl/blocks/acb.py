"""The Asymmetric Convolution Block (Ding et al., ICCV 2019)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from acnet_pl.blocks.base import ConvSpec, ReparamConvBlock
from acnet_pl.blocks.registry import register_block
from acnet_pl.blocks.transforms import fold_bn, pad_kernel_to, sum_branches

_IMPLS = ("branches", "stacked")
_BRANCHES = ("ver", "hor")


@register_block("acb")
class ACBlock(ReparamConvBlock):
    """KxK conv+BN plus Kx1 conv+BN plus 1xK conv+BN, summed; fuses exactly into one KxK conv.

    State-dict names are the original ACNet's: ``square_conv/square_bn``, ``ver_conv/ver_bn`` (Kx1),
    ``hor_conv/hor_bn`` (1xK); fused: ``fused_conv``.

    Args (``nn.Conv2d``'s and ``ReparamConvBlock``'s, then):
        padding_mode: any of nn.Conv2d's; every branch sees the same padded input.
        gamma_init: initial weight of every BN (the original uses 1/3 on CIFAR, 1 on ImageNet).
        impl: ``"branches"`` runs three convs and three BNs; ``"stacked"`` runs one conv over the stacked
            [square; padded Kx1; padded 1xK] kernels and one batch norm over 3 x out channels. Same maths,
            same state dict.
        branches: the 1D branches the block has (the paper's ablation): ``("ver", "hor")``, ``("ver",)``
            (Kx1 only) or ``("hor",)`` (1xK only).
        branch_bn: True: a BN per branch, summed (ACNet); False: the convs summed, then one BN
            (``self.bn``; the paper's ablation).
    """

    def __init__(
        self,
        *conv_args: Any,
        gamma_init: float | None = None,
        impl: str = "branches",
        branches: tuple[str, ...] | list[str] = _BRANCHES,
        branch_bn: bool = True,
        **conv_kwargs: Any,
    ) -> None:
        if impl not in _IMPLS:
            raise ValueError(f"ACBlock impl={impl!r} is not one of {', '.join(_IMPLS)}")
        if (
            isinstance(branches, str)
            or not branches
            or any(b not in _BRANCHES for b in branches)
            or len(set(branches)) != len(branches)
        ):
            raise ValueError(
                f"ACBlock branches must be a non-empty list of distinct 1D branches out of {list(_BRANCHES)} "
                f"(e.g. [ver, hor] or [hor]); got {branches!r}"
            )
        super().__init__(*conv_args, **conv_kwargs)
        self.impl, self.branch_bn = impl, bool(branch_bn)
        self.branches = tuple(b for b in _BRANCHES if b in branches)
        if self.deploy:
            return
        k, c, cin, cout = self.kernel_size, (self.kernel_size - 1) // 2, self.in_channels, self.out_channels
        # Every branch reads the input padded as the square conv reads it. Zero padding stays inside the
        # convs (no extra copy); other modes pad once in forward (the convs then pad nothing). A 1D branch
        # whose padding along its short axis would be negative (padding < dilation * (K-1)/2) reads a
        # cropped input instead, so its windows stay on the square kernel's centre row/column for every
        # stride and input size.
        self._explicit_pad = self.padding_mode != "zeros"
        (ph, pw), (dh, dw) = (0, 0) if self._explicit_pad else self.padding, self.dilation
        self._ver_crop, self._hor_crop = max(dw * c - pw, 0), max(dh * c - ph, 0)
        shapes = {
            "square": ((k, k), (ph, pw), self.dilation),
            "ver": ((k, 1), (ph, max(pw - dw * c, 0)), (dh, 1)),
            "hor": ((1, k), (max(ph - dh * c, 0), pw), (1, dw)),
        }
        for name in ("square", *self.branches):
            kernel, pad, dil = shapes[name]
            conv = nn.Conv2d(cin, cout, kernel, self.stride, pad, dil, self.groups, bias=False)
            setattr(self, f"{name}_conv", conv)
            if self.branch_bn:
                setattr(self, f"{name}_bn", self._bn())
        if not self.branch_bn:
            self.bn = self._bn()
        if gamma_init is not None:
            self.init_gamma(gamma_init)

    @classmethod
    def unsupported_config(cls, spec: ConvSpec) -> str | None:
        """Any kernel but a square one of odd size >= 3 (the 1D branches lie on its centre row and column)."""
        k = spec.kernel_size[0]
        if k == 1:
            return "kernel_size=1 (nothing to add: a 1x1 conv is its own Kx1 and 1xK branch)"
        if k < 3 or k % 2 == 0:
            return f"no centre row/column for the 1D branches (ACB needs an odd kernel_size >= 3, got {k})"
        return super().unsupported_config(spec)

    def origin(self) -> tuple[nn.Conv2d, nn.Module]:
        """``square_conv`` and its BN (with ``branch_bn=False`` the one BN after the sum)."""
        return self.square_conv, self.square_bn if self.branch_bn else self.bn

    def branch_norms(self) -> dict[str, nn.Module]:
        """``square``, ``ver``, ``hor`` (the branches the block has), or ``{"sum": bn}`` with ``branch_bn=False``."""
        if self.deploy:
            return {}
        if not self.branch_bn:
            return {"sum": self.bn}
        return {name: getattr(self, f"{name}_bn") for name in ("square", *self.branches)}

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """The input as every branch reads it: padded here unless zero padding stays inside the convs."""
        ph, pw = self.padding
        return F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode) if self._explicit_pad else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.fused_conv(x)
        if self.impl == "stacked":
            return self._forward_stacked(x)
        x = self._pad(x)
        (h, w), vc, hc = x.shape[-2:], self._ver_crop, self._hor_crop  # a crop of 0 is x itself (a view)
        inputs = {"square": x, "ver": x[..., :, vc : w - vc], "hor": x[..., hc : h - hc, :]}
        outs = [getattr(self, f"{b}_conv")(inputs[b]) for b in ("square", *self.branches)]
        if not self.branch_bn:
            return self.bn(sum(outs[1:], outs[0]))
        outs = [bn(out) for bn, out in zip(self.branch_norms().values(), outs, strict=True)]
        return sum(outs[1:], outs[0])

    def _group_interleave(self, *tensors: torch.Tensor) -> torch.Tensor:
        """Stack per-branch tensors (first dim = out_channels) so each conv group holds its 3 slices."""
        g = self.groups
        return torch.stack([t.reshape(g, -1, *t.shape[1:]) for t in tensors], dim=1).flatten(0, 2)

    def _padded_kernels(self) -> list[torch.Tensor]:
        """[square, Kx1 in the centre column, 1xK in the centre row] (the branches the block has), KxK."""
        padded = [pad_kernel_to(getattr(self, f"{b}_conv").weight, self.kernel_size) for b in self.branches]
        return [self.square_conv.weight, *padded]

    def stacked_kernel(self) -> torch.Tensor:
        """The (3*out, in/groups, K, K) kernel [square; Kx1 in the centre column; 1xK in the centre row].

        With fewer branches, one slice per branch; with ``branch_bn=False`` the (out, in/groups, K, K)
        sum of the three (the convs are linear, so one conv with it equals their sum).
        """
        kernels = self._padded_kernels()
        if not self.branch_bn:
            return torch.stack(kernels).sum(dim=0)
        return self._group_interleave(*kernels)

    def _forward_stacked(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.square_conv.padding  # the branches' own: (0, 0) when forward pads
        y = F.conv2d(self._pad(x), self.stacked_kernel(), None, self.stride, pad, self.dilation, self.groups)
        if not self.branch_bn:
            return self.bn(y)
        bns = tuple(self.branch_norms().values())
        nb = len(bns)
        # SyncBatchNorm (after convert_sync_batchnorm) must run its own forward to reduce statistics
        # across processes, so the stacked conv is followed by the branch BN modules; likewise when the
        # BNs were put in different modes (e.g. one frozen with .eval()).
        if not all(type(bn) is nn.BatchNorm2d for bn in bns) or len({bn.training for bn in bns}) > 1:
            ys = y.unflatten(1, (self.groups, nb, -1))
            parts = [bn(ys[:, :, i].flatten(1, 2)) for i, bn in enumerate(bns)]
            return sum(parts[1:], parts[0])
        y = self._stacked_batch_norm(y, bns)
        n, _, h, w = y.shape
        if not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last):
            # Channels-last in, channels-last out: sum the branches in NHWC order (the NCHW view would copy).
            nhwc = y.permute(0, 2, 3, 1).reshape(n, h, w, self.groups, nb, -1).sum(dim=4)
            return nhwc.reshape(n, h, w, self.out_channels).permute(0, 3, 1, 2)
        return y.view(n, self.groups, nb, -1, h, w).sum(dim=2).reshape(n, self.out_channels, h, w)

    def _stacked_batch_norm(self, y: torch.Tensor, bns: tuple[nn.BatchNorm2d, ...]) -> torch.Tensor:
        # Mirrors nn.BatchNorm2d.forward for one BN over 3 x out channels, then writes the running
        # statistics back into the three branch BNs so the state dict is the branches' layout.
        # The BNs' own mode decides (as in the branches impl): a BN frozen with .eval() inside a block
        # in train mode normalises with its running statistics and does not update them.
        sq = bns[0]
        use_batch_stats = sq.training or not sq.track_running_stats
        factor = 0.0 if sq.momentum is None else sq.momentum
        if sq.training and sq.track_running_stats:
            for bn in bns:
                bn.num_batches_tracked.add_(1)
            if sq.momentum is None:
                factor = 1.0 / float(sq.num_batches_tracked)
        weight = self._group_interleave(*(bn.weight for bn in bns)) if sq.affine else None
        bias = self._group_interleave(*(bn.bias for bn in bns)) if sq.affine else None
        mean = var = None
        if sq.track_running_stats:
            mean = self._group_interleave(*(bn.running_mean for bn in bns))
            var = self._group_interleave(*(bn.running_var for bn in bns))
        out = F.batch_norm(y, mean, var, weight, bias, use_batch_stats, factor, sq.eps)
        if sq.training and sq.track_running_stats:
            g = self.groups
            with torch.no_grad():
                means, vars_ = mean.view(g, len(bns), -1), var.view(g, len(bns), -1)
                for i, bn in enumerate(bns):
                    bn.running_mean.copy_(means[:, i].reshape(-1))
                    bn.running_var.copy_(vars_[:, i].reshape(-1))
        return out

    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.deploy:
            return self.fused_conv.weight, self.fused_conv.bias
        kernels = self._padded_kernels()
        if not self.branch_bn:
            return fold_bn(sum(kernels[1:], kernels[0]), self.bn)
        folded = [
            fold_bn(kernel, bn) for kernel, bn in zip(kernels, self.branch_norms().values(), strict=True)
        ]
        return sum_branches(*zip(*folded, strict=True))

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.branches != _BRANCHES:
            s += f", branches={list(self.branches)}"
        if not self.branch_bn:
            s += ", branch_bn=False"
        return s if self.deploy else f"{s}, impl={self.impl}"
