"""What every block of this package repeats: ``ReparamConvBlock``, trained as branches, deployed as one conv.

The base holds the configuration of the conv a block stands for (checked as ``nn.Conv2d`` checks it),
builds a block from a model's conv (+ BN), makes the fused conv (float64 maths) and switches to it in
place (``deploy=True`` builds that form directly, as mmpretrain's RepVGG). A subclass adds what is its
own: its branches (in ``__init__``, unless ``deploy``), ``forward``, ``get_equivalent_kernel_bias``,
``origin`` and ``branch_norms``. A block need not subclass it: ``convert`` and ``fuse`` rely only on
``registry.ReparamBlock``.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["PADDING_MODES", "ReparamConvBlock"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_CONV_ARGS = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
)


def _pair(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"{what} must be an int or a pair of ints, got {value!r}")


def _padding(
    padding: Any, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int], owner: str
) -> tuple[int, int]:
    """``nn.Conv2d``'s padding as a pair; None: ``dilation * (K - 1) // 2``, the kernel centred on each pixel."""
    if padding == "valid":
        return 0, 0
    if padding is None or padding == "same":
        if padding == "same" and stride != (1, 1):
            raise ValueError(
                f"{owner} padding='same' needs stride 1 (as nn.Conv2d); give explicit padding instead"
            )
        return dilation[0] * (kernel[0] - 1) // 2, dilation[1] * (kernel[1] - 1) // 2
    ph, pw = _pair(padding, f"{owner} padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"{owner} padding must be >= 0, got {padding!r}")
    return ph, pw


class ReparamConvBlock(nn.Module):
    """A block that trains as several conv branches and equals one KxK ``nn.Conv2d`` in eval mode.

    Args (those of ``nn.Conv2d``, then):
        deploy: build the fused form (the ``fused_name`` conv, with bias) directly.
        bn_eps, bn_momentum, bn_affine: configuration of the block's BNs (``_bn``).
    """

    #: Module name of the fused conv: the deploy form's state-dict prefix.
    fused_name: ClassVar[str] = "fused_conv"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str | None = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        deploy: bool = False,
        *,
        bn_eps: float = 1e-5,
        bn_momentum: float | None = 0.1,
        bn_affine: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        kernel = _pair(kernel_size, f"{name} kernel_size")
        stride, dilation = _pair(stride, f"{name} stride"), _pair(dilation, f"{name} dilation")
        if min(stride) < 1 or min(dilation) < 1:
            raise ValueError(
                f"{name} stride and dilation must be >= 1, got stride={stride}, dilation={dilation}"
            )
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"{name} groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
            )
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"{name} padding_mode={padding_mode!r} is not one of {', '.join(PADDING_MODES)}")
        padding = _padding(padding, kernel, stride, dilation, name)
        reason = self.unsupported_config(
            in_channels, out_channels, kernel, padding, dilation, groups, padding_mode
        )
        if reason is not None:
            raise ValueError(
                f"{name} cannot replace a conv of this configuration exactly: {reason}; keep it as it is"
            )
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel[0]
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.padding_mode, self.deploy = padding_mode, bool(deploy)
        self.bn_eps, self.bn_momentum, self.bn_affine = bn_eps, bn_momentum, bn_affine
        if self.deploy:
            setattr(self, self.fused_name, self._conv(bias=True))

    # what a subclass defines ----------------------------------------------------------------------
    @classmethod
    def unsupported_config(
        cls,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
        padding_mode: str,
    ) -> str | None:
        """Why the block cannot equal a conv of this configuration exactly, or None (here: a non-square kernel)."""
        kh, kw = kernel_size
        return f"non-square kernel {kh}x{kw} (the branches add up in a square kernel)" if kh != kw else None

    def origin(self) -> tuple[nn.Conv2d, nn.Module]:
        """The conv and BN of the branch that takes a model's conv and BN (``from_conv_bn``)."""
        raise NotImplementedError

    def branch_norms(self) -> dict[str, nn.Module]:
        """The BN of each branch by branch name ({} once fused); ``init_gamma`` and the analysis read them."""
        raise NotImplementedError

    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel and bias of the single conv equal to this block in eval mode (differentiable)."""
        raise NotImplementedError

    # shared ---------------------------------------------------------------------------------------
    def _bn(self, channels: int | None = None) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(
            channels or self.out_channels, eps=self.bn_eps, momentum=self.bn_momentum, affine=self.bn_affine
        )

    def _conv(self, bias: bool) -> nn.Conv2d:
        """An ``nn.Conv2d`` of the block's configuration: the fused conv's layout."""
        args = (
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
        )
        return nn.Conv2d(*args, self.groups, bias=bias, padding_mode=self.padding_mode)

    @classmethod
    def unsupported_reason(cls, conv: nn.Conv2d) -> str | None:
        """Why ``conv`` cannot become this block exactly (``convert`` skips it and reports why), or None."""
        kernel, stride, dilation = tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation)
        padding = _padding(conv.padding, kernel, stride, dilation, cls.__name__)
        return cls.unsupported_config(
            conv.in_channels, conv.out_channels, kernel, padding, dilation, conv.groups, conv.padding_mode
        )

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.Module, **options: Any) -> ReparamConvBlock:
        """A block (``conv``'s device and dtype) whose ``origin`` branch computes ``bn(conv(x))``; the others start fresh.

        The block's BNs take ``bn``'s eps, momentum and affine; a conv bias is folded into the origin BN's
        running mean. ``options`` are constructor arguments; ``gamma_init`` sets every branch BN, the
        origin's included (for training from scratch; None keeps a pretrained BN's weight).
        """
        return cls._from(conv, bn, options)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **options: Any) -> ReparamConvBlock:
        """A block from a conv with no BatchNorm after it (a "bare" conv, ``convert(..., bare_convs=True)``).

        The origin conv starts from ``conv``'s kernel, every BN is new; the conv's bias b is carried
        exactly by starting the origin BN's running mean at -b, so ``fused_conv_module`` has the bias.
        """
        return cls._from(conv, None, options)

    @classmethod
    def _from(cls, conv: nn.Conv2d, bn: nn.Module | None, options: dict[str, Any]) -> ReparamConvBlock:
        config = {name: getattr(conv, name) for name in _CONV_ARGS}
        if bn is not None:
            config.update(bn_eps=bn.eps, bn_momentum=bn.momentum, bn_affine=bn.affine)
        block = cls(**config, **options).to(device=conv.weight.device, dtype=conv.weight.dtype)
        origin_conv, origin_bn = block.origin()
        with torch.no_grad():
            origin_conv.weight.copy_(conv.weight)
            if bn is not None:
                for name in ("running_mean", "running_var", "num_batches_tracked"):
                    getattr(origin_bn, name).copy_(getattr(bn, name))
                if bn.affine:
                    origin_bn.weight.copy_(bn.weight)
                    origin_bn.bias.copy_(bn.bias)
            if conv.bias is not None:
                # bn(Wx + b) == bn'(Wx) with running_mean' = running_mean - b; the running-mean update is
                # linear, so this stays exact through training.
                origin_bn.running_mean.sub_(conv.bias)
        if bn is not None and options.get("gamma_init") is not None:
            block.init_gamma(options["gamma_init"])  # bn's weight was copied over the origin's
        return block

    def init_gamma(self, value: float) -> None:
        """Set the weight of every BN ``branch_norms`` names to ``value``."""
        if not self.bn_affine:
            raise ValueError(
                f"{type(self).__name__} gamma_init needs bn_affine=True (a BN without affine has no gamma)"
            )
        with torch.no_grad():
            for bn in self.branch_norms().values():
                bn.weight.fill_(value)

    def double_precision_copy(self) -> ReparamConvBlock:
        """A float64 copy of this block (for exact fusion and reference computations)."""
        return copy.deepcopy(self).double()

    def fused_conv_module(self) -> nn.Conv2d:
        """A new ``nn.Conv2d`` with bias equal to this block in eval mode (running statistics).

        The block's conv configuration, dtype, device and train/eval mode; computed in float64, so fusion
        is exact to the dtype's precision.
        """
        if self.deploy:
            return copy.deepcopy(getattr(self, self.fused_name))
        with torch.no_grad():
            weight, bias = self.double_precision_copy().get_equivalent_kernel_bias()
            ref = next(self.parameters())
            conv = self._conv(bias=True).to(device=ref.device, dtype=ref.dtype)
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
        return conv.train(self.training)

    def switch_to_deploy(self) -> None:
        """Replace the training branches (every child module) by the fused conv, in place; a no-op once fused."""
        if self.deploy:
            return
        fused = self.fused_conv_module()
        for name in list(self._modules):
            delattr(self, name)
        setattr(self, self.fused_name, fused)
        self.deploy = True

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + (", deploy=True" if self.deploy else "")
