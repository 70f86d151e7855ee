"""Kernel maths of re-parameterisation: each function turns one piece of a block into a (kernel, bias).

Pure tensor functions, differentiable, in whatever dtype they are given (blocks call them on a float64
copy for exact fusion). The names say what each does; the DBB paper (Ding et al., CVPR 2021) numbers
the same transforms I-VI: ``fold_bn`` (I), ``sum_branches`` (II), ``merge_1x1_kxk`` (III),
``avg_pool_kernel`` (V), ``pad_kernel_to`` (VI).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of a BatchNorm in eval mode: ``bn(y) == y * scale + shift``."""
    std = (bn.running_var + bn.eps).sqrt()
    if bn.affine:
        scale = bn.weight / std
        return scale, bn.bias - bn.running_mean * scale
    scale = 1.0 / std
    return scale, -bn.running_mean * scale


def fold_bn(
    kernel: torch.Tensor, bn: nn.Module, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel, bias) of one conv equal to ``bn(conv(x))`` in eval mode; ``bias`` is the conv's own, if any."""
    scale, shift = bn_scale_shift(bn)
    if bias is not None:
        shift = shift + bias * scale
    return kernel * scale.reshape(-1, 1, 1, 1), shift


def pad_kernel_to(kernel: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Zero-pad a smaller odd kernel (1x1, Kx1, 1xK) to ``size`` around its centre.

    Exact when the small conv reads its input at the big kernel's centre: same stride, and padding
    (or input crop) that puts its window on the big kernel's centre row/column.
    """
    kh, kw = (size, size) if isinstance(size, int) else size
    h, w = kernel.shape[-2:]
    if (kh - h) % 2 or (kw - w) % 2 or h > kh or w > kw:
        raise ValueError(
            f"cannot centre a {h}x{w} kernel in {kh}x{kw}: both must be odd, the first not larger"
        )
    ph, pw = (kh - h) // 2, (kw - w) // 2
    return F.pad(kernel, (pw, pw, ph, ph))


def identity_1x1_kernel(channels: int, groups: int = 1, **factory_kwargs: Any) -> torch.Tensor:
    """The (channels, channels/groups, 1, 1) kernel of the grouped 1x1 conv that returns its input
    (``factory_kwargs``: ``torch.zeros``'s ``dtype``, ``device``)."""
    per_group = channels // groups
    return torch.eye(per_group, **factory_kwargs).repeat(groups, 1).view(channels, per_group, 1, 1)


def avg_pool_kernel(channels: int, kernel_size: int, groups: int = 1, **factory_kwargs: Any) -> torch.Tensor:
    """The (channels, channels/groups, K, K) kernel of a grouped conv equal to KxK average pooling.

    Equal to ``nn.AvgPool2d(K, stride, padding)`` with ``count_include_pad=True`` (the default) applied
    by a conv with the same stride and zero padding: each output channel averages its own input channel.
    """
    kernel = identity_1x1_kernel(channels, groups, **factory_kwargs)
    return kernel.expand(-1, -1, kernel_size, kernel_size) / float(kernel_size * kernel_size)


def merge_1x1_kxk(
    kernel1: torch.Tensor, bias1: torch.Tensor, kernel2: torch.Tensor, bias2: torch.Tensor, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel, bias) of one KxK conv equal to a 1x1 conv (kernel1, bias1) followed by a KxK conv (kernel2, bias2).

    Both convs have ``groups`` groups; kernel1 is (mid, in/groups, 1, 1), kernel2 (out, mid/groups, K, K).
    Exact when the KxK conv's padding is filled with ``bias1`` (what the first conv gives for padded
    zeros), as DBB's BN-then-pad layer does.
    """
    mid, in_per_group = kernel1.shape[:2]
    out, mid_per_group, kh, kw = kernel2.shape
    k1 = kernel1.reshape(groups, mid // groups, in_per_group)
    k2 = kernel2.reshape(groups, out // groups, mid_per_group, kh, kw)
    kernel = torch.einsum("gomhw,gmi->goihw", k2, k1).reshape(out, in_per_group, kh, kw)
    b1 = bias1.reshape(groups, 1, mid // groups, 1, 1)
    bias = (k2 * b1).sum(dim=(2, 3, 4)).reshape(out) + bias2
    return kernel, bias


def sum_branches(
    kernels: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel, bias) of parallel convs of the same shape whose outputs are added."""
    return torch.stack(list(kernels)).sum(0), torch.stack(list(biases)).sum(0)
