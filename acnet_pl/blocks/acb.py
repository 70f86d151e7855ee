"""The Asymmetric Convolution Block (Ding et al., ICCV 2019)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from acnet_pl.blocks.registry import register_block
from acnet_pl.blocks.transforms import fold_bn, pad_kernel_to, sum_branches

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_IMPLS = ("branches", "stacked")
_BRANCHES = ("ver", "hor")


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"ACBlock {name} must be an int or a pair of ints, got {value!r}")


def _kernel_size(kernel_size: Any) -> int:
    kh, kw = _pair(kernel_size, "kernel_size")
    if kh != kw:
        raise ValueError(
            f"ACBlock needs a square kernel, got {kh}x{kw}: the Kx1 and 1xK branches add to the centre "
            "cross of a KxK kernel; keep non-square convs as they are"
        )
    if kh == 1:
        raise ValueError(
            "ACBlock kernel_size=1 has nothing to add: a 1x1 conv is its own Kx1 and 1xK branch; keep it a plain conv"
        )
    if kh < 1 or kh % 2 == 0:
        raise ValueError(
            f"ACBlock needs an odd kernel_size >= 3, got {kh}: an even kernel has no centre row/column "
            "for the Kx1 and 1xK branches to align with"
        )
    return kh


def _resolve_padding(padding: Any, kernel_size: int, stride: tuple[int, int], dilation: tuple[int, int]):
    if padding == "valid":
        return 0, 0
    if padding == "same":
        if stride != (1, 1):
            raise ValueError(
                "ACBlock padding='same' needs stride 1 (as nn.Conv2d); give explicit padding instead"
            )
        return dilation[0] * (kernel_size - 1) // 2, dilation[1] * (kernel_size - 1) // 2
    ph, pw = _pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"ACBlock padding must be >= 0, got {padding!r}")
    return ph, pw


@register_block("acb")
class ACBlock(nn.Module):
    """KxK conv+BN plus Kx1 conv+BN plus 1xK conv+BN, summed; fuses exactly into one KxK conv.

    Args:
        padding_mode: any of nn.Conv2d's; every branch sees the same padded input.
        deploy: build the fused form (``fused_conv``) directly.
        gamma_init: initial weight of all three BNs (the original uses 1/3 on CIFAR, 1 on ImageNet).
        impl: ``"branches"`` runs three convs and three BNs; ``"stacked"`` runs one conv over the stacked
            [square; padded Kx1; padded 1xK] kernels and one batch norm over 3 x out channels. Same maths,
            same state dict.
        bn_eps, bn_momentum, bn_affine: configuration of the three BNs.
        branches: the 1D branches the block has (the paper's ablation): ``("ver", "hor")``, ``("ver",)``
            (Kx1 only) or ``("hor",)`` (1xK only).
        branch_bn: True: a BN per branch, summed (ACNet); False: the convs summed, then one BN
            (``self.bn``; the paper's ablation). ``gamma_init`` sets every BN the block has.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        deploy: bool = False,
        gamma_init: float | None = None,
        impl: str = "branches",
        *,
        bn_eps: float = 1e-5,
        bn_momentum: float | None = 0.1,
        bn_affine: bool = True,
        branches: tuple[str, ...] | list[str] = _BRANCHES,
        branch_bn: bool = True,
    ) -> None:
        super().__init__()
        k = _kernel_size(kernel_size)
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
        self.branches = tuple(b for b in _BRANCHES if b in branches)
        self.branch_bn = bool(branch_bn)
        stride = _pair(stride, "stride")
        dilation = _pair(dilation, "dilation")
        if min(stride) < 1 or min(dilation) < 1:
            raise ValueError(
                f"ACBlock stride and dilation must be >= 1, got stride={stride}, dilation={dilation}"
            )
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"ACBlock groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
            )
        if padding_mode not in _PADDING_MODES:
            raise ValueError(
                f"ACBlock padding_mode={padding_mode!r} is not one of {', '.join(_PADDING_MODES)}"
            )
        if impl not in _IMPLS:
            raise ValueError(f"ACBlock impl={impl!r} is not one of {', '.join(_IMPLS)}")
        if gamma_init is not None and not bn_affine:
            raise ValueError("ACBlock gamma_init needs bn_affine=True (a BN without affine has no gamma)")
        padding = _resolve_padding(padding, k, stride, dilation)

        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.padding_mode, self.impl, self.deploy = padding_mode, impl, deploy
        self.bn_eps, self.bn_momentum, self.bn_affine = bn_eps, bn_momentum, bn_affine

        if deploy:
            self.fused_conv = self._plain_conv(bias=True)
            return

        c = (k - 1) // 2
        ph, pw = padding
        dh, dw = dilation
        # Every branch reads the input padded as the square conv reads it. Zero padding stays inside the
        # convs (no extra copy); other modes pad once in forward. A 1D branch whose padding along its
        # short axis would be negative (padding < dilation * (K-1)/2) reads a cropped input instead, so
        # its windows stay on the square kernel's centre row/column for every stride and input size.
        self._explicit_pad = padding_mode != "zeros"
        if self._explicit_pad:
            sq_pad, ver_pad, hor_pad = (0, 0), (0, 0), (0, 0)
            self._ver_crop, self._hor_crop = dw * c, dh * c
        else:
            sq_pad = padding
            ver_pad, hor_pad = (ph, max(pw - dw * c, 0)), (max(ph - dh * c, 0), pw)
            self._ver_crop, self._hor_crop = max(dw * c - pw, 0), max(dh * c - ph, 0)

        def conv(kernel: tuple[int, int], pad: tuple[int, int], dil: tuple[int, int]) -> nn.Conv2d:
            return nn.Conv2d(in_channels, out_channels, kernel, stride, pad, dil, groups, bias=False)

        self.square_conv = conv((k, k), sq_pad, dilation)
        if self.branch_bn:
            self.square_bn = self._bn()
        if "ver" in self.branches:
            self.ver_conv = conv((k, 1), ver_pad, (dh, 1))
            if self.branch_bn:
                self.ver_bn = self._bn()
        if "hor" in self.branches:
            self.hor_conv = conv((1, k), hor_pad, (1, dw))
            if self.branch_bn:
                self.hor_bn = self._bn()
        if not self.branch_bn:
            self.bn = self._bn()
        if gamma_init is not None:
            self.init_gamma(gamma_init)

    # construction helpers -------------------------------------------------------------------------
    def _bn(self) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(
            self.out_channels, eps=self.bn_eps, momentum=self.bn_momentum, affine=self.bn_affine
        )

    def _plain_conv(self, bias: bool) -> nn.Conv2d:
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            bias=bias,
            padding_mode=self.padding_mode,
        )

    def _branch_names(self) -> tuple[str, ...]:
        return ("square", *self.branches)

    def _bns(self) -> tuple[nn.Module, ...]:
        """The block's BNs: one per branch (square first), or the one after the sum."""
        if not self.branch_bn:
            return (self.bn,)
        return tuple(getattr(self, f"{name}_bn") for name in self._branch_names())

    def branch_norms(self) -> dict[str, nn.Module]:
        """The BN of each branch by name (``square``, ``ver``, ``hor``), ``{"sum": bn}`` for one BN after the
        sum (``branch_bn=False``); {} once fused."""
        if self.deploy:
            return {}
        if not self.branch_bn:
            return {"sum": self.bn}
        return {name: getattr(self, f"{name}_bn") for name in self._branch_names()}

    def init_gamma(self, value: float) -> None:
        """Set the weight of every BN of the block to ``value``."""
        with torch.no_grad():
            for bn in self._bns():
                bn.weight.fill_(value)

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.Module, **options: Any) -> ACBlock:
        """An ACBlock whose square branch computes ``bn(conv(x))``; the 1D branches start fresh.

        A conv bias is folded into the BN's running mean. ``options`` are constructor arguments
        (``gamma_init``, ``impl``, ...).
        """
        block = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.padding_mode,
            bn_eps=bn.eps,
            bn_momentum=bn.momentum,
            bn_affine=bn.affine,
            **options,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        gamma_init = options.get("gamma_init")
        # The square branch's BN, or with branch_bn=False the one BN after the sum (the 1D convs are
        # then added to an unchanged bn(conv(x))).
        square_bn = block.square_bn if block.branch_bn else block.bn
        with torch.no_grad():
            block.square_conv.weight.copy_(conv.weight)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                getattr(square_bn, name).copy_(getattr(bn, name))
            if conv.bias is not None:
                # bn(Wx + b) has the same value as bn'(Wx) with running_mean' = running_mean - b.
                square_bn.running_mean.sub_(conv.bias)
            if bn.affine:
                square_bn.bias.copy_(bn.bias)
                square_bn.weight.copy_(bn.weight)
            if gamma_init is not None:
                block.init_gamma(gamma_init)
        return block

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **options: Any) -> ACBlock:
        """An ACBlock made from a conv with no BatchNorm after it (a "bare" conv): fresh branch BNs.

        The square branch starts from the conv's kernel; the three BNs are new (weight ``gamma_init``,
        else 1). A conv bias b is carried exactly: the block computes ``bn(conv(x) + b)`` for the
        square branch by starting its BN's running mean at -b (with bias-free convs, as
        ``from_conv_bn``), which stays exact through training since the running mean update is linear.
        ``fused_conv_module`` gives a KxK conv with bias.
        """
        block = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.padding_mode,
            **options,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            block.square_conv.weight.copy_(conv.weight)
            if conv.bias is not None:
                (block.square_bn if block.branch_bn else block.bn).running_mean.sub_(conv.bias)
        return block

    # forward --------------------------------------------------------------------------------------
    def _branch_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._explicit_pad:
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
        xv, xh = x, x
        if self._ver_crop:
            xv = x[..., :, self._ver_crop : x.shape[-1] - self._ver_crop]
        if self._hor_crop:
            xh = x[..., self._hor_crop : x.shape[-2] - self._hor_crop, :]
        return x, xv, xh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.fused_conv(x)
        if self.impl == "stacked":
            return self._forward_stacked(x)
        xs, xv, xh = self._branch_inputs(x)
        if not self.branch_bn:
            out = self.square_conv(xs)
            if "ver" in self.branches:
                out = out + self.ver_conv(xv)
            if "hor" in self.branches:
                out = out + self.hor_conv(xh)
            return self.bn(out)
        out = self.square_bn(self.square_conv(xs))
        if "ver" in self.branches:
            out = out + self.ver_bn(self.ver_conv(xv))
        if "hor" in self.branches:
            out = out + self.hor_bn(self.hor_conv(xh))
        return out

    def _needs_branch_bn(self) -> bool:
        # SyncBatchNorm (after convert_sync_batchnorm) must run its own forward to reduce statistics
        # across processes, so the stacked conv is followed by the three BN modules.
        # Likewise when the BNs were put in different modes (e.g. one frozen with .eval()).
        bns = self._bns()
        return not all(type(bn) is nn.BatchNorm2d for bn in bns) or len({bn.training for bn in bns}) > 1

    def _group_interleave(self, *tensors: torch.Tensor) -> torch.Tensor:
        """Stack per-branch tensors (first dim = out_channels) so each conv group holds its 3 slices."""
        g = self.groups
        return torch.stack([t.reshape(g, -1, *t.shape[1:]) for t in tensors], dim=1).flatten(0, 2)

    def _padded_kernels(self) -> list[torch.Tensor]:
        """[square, Kx1 in the centre column, 1xK in the centre row] (the branches the block has), KxK."""
        k = self.kernel_size
        kernels = [self.square_conv.weight]
        if "ver" in self.branches:
            kernels.append(pad_kernel_to(self.ver_conv.weight, k))
        if "hor" in self.branches:
            kernels.append(pad_kernel_to(self.hor_conv.weight, k))
        return kernels

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
        if self._explicit_pad:
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            pad = 0
        else:
            pad = self.padding
        y = F.conv2d(x, self.stacked_kernel(), None, self.stride, pad, self.dilation, self.groups)
        if not self.branch_bn:
            return self.bn(y)
        bns = self._bns()
        nb = len(bns)
        if self._needs_branch_bn():
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

    # fusion ---------------------------------------------------------------------------------------
    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The KxK kernel and bias of the single conv equal to this block in eval mode (differentiable)."""
        if self.deploy:
            return self.fused_conv.weight, self.fused_conv.bias
        kernels = self._padded_kernels()
        if not self.branch_bn:
            return fold_bn(sum(kernels[1:], kernels[0]), self.bn)
        folded = [fold_bn(kernel, bn) for kernel, bn in zip(kernels, self._bns(), strict=True)]
        return sum_branches([kernel for kernel, _ in folded], [bias for _, bias in folded])

    def fused_conv_module(self) -> nn.Conv2d:
        """A new KxK ``nn.Conv2d`` (with bias) equal to this block in eval mode, computed in float64."""
        if self.deploy:
            weight, bias = self.fused_conv.weight, self.fused_conv.bias
        else:
            with torch.no_grad():
                weight, bias = self.double_precision_copy().get_equivalent_kernel_bias()
        ref = self.fused_conv.weight if self.deploy else self.square_conv.weight
        conv = self._plain_conv(bias=True).to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
        conv.train(self.training)
        return conv

    def double_precision_copy(self) -> ACBlock:
        """A float64 copy of this block (for exact fusion and reference computations)."""
        return copy.deepcopy(self).double()

    def switch_to_deploy(self) -> None:
        """Replace the branches by ``fused_conv`` in place; a no-op when already fused."""
        if self.deploy:
            return
        fused = self.fused_conv_module()
        for name in ("square_conv", "square_bn", "ver_conv", "ver_bn", "hor_conv", "hor_bn", "bn"):
            if hasattr(self, name):
                delattr(self, name)
        self.fused_conv = fused
        self.deploy = True

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        if self.branches != _BRANCHES:
            s += f", branches={list(self.branches)}"
        if not self.branch_bn:
            s += ", branch_bn=False"
        return s + (", deploy=True" if self.deploy else f", impl={self.impl}")
