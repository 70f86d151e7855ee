"""``ReparamConvBlock``: what every block of this package repeats, so each block holds only what is its own."""

from __future__ import annotations

import copy
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class ConvSpec(NamedTuple):
    """The configuration of the conv a block stands for, every size a pair, padding resolved."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    padding_mode: str


def _pair(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"{what} must be an int or a pair of ints, got {value!r}")


def _conv_spec(owner: str, *conv_args: Any) -> ConvSpec:
    """``nn.Conv2d``'s arguments (in ``ConvSpec._fields`` order) checked as it checks them; padding None:
    ``dilation * (K - 1) // 2``."""
    in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode = conv_args
    kernel, stride = _pair(kernel_size, f"{owner} kernel_size"), _pair(stride, f"{owner} stride")
    dilation = _pair(dilation, f"{owner} dilation")
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(
            f"{owner} stride and dilation must be >= 1, got stride={stride}, dilation={dilation}"
        )
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(
            f"{owner} groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
        )
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"{owner} padding_mode={padding_mode!r} is not one of {', '.join(PADDING_MODES)}")
    if padding == "same" and stride != (1, 1):
        raise ValueError(
            f"{owner} padding='same' needs stride 1 (as nn.Conv2d); give explicit padding instead"
        )
    if padding is None or padding == "same":
        padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel, strict=True))
    padding = (0, 0) if padding == "valid" else _pair(padding, f"{owner} padding")
    if min(padding) < 0:
        raise ValueError(f"{owner} padding must be >= 0, got {padding!r}")
    return ConvSpec(in_channels, out_channels, kernel, stride, padding, dilation, groups, padding_mode)


class ReparamConvBlock(nn.Module):
    """A block of conv branches equal to one KxK ``nn.Conv2d`` in eval mode (a ``ReparamBlock``).

    A subclass adds its branches (in ``__init__``, unless ``self.deploy``: then only the fused conv, as
    mmpretrain's RepVGG), ``forward``, ``get_equivalent_kernel_bias``, ``origin`` and ``branch_norms``.

    Args: ``nn.Conv2d``'s, then ``deploy`` and ``bn_eps``, ``bn_momentum``, ``bn_affine`` (every BN's).
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
        spec = _conv_spec(
            name, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode
        )
        reason = self.unsupported_config(spec)
        if reason is not None:
            raise ValueError(
                f"{name} cannot replace a conv of this configuration exactly: {reason}; keep it as it is"
            )
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, spec.kernel_size[0]
        self.stride, self.padding, self.dilation = spec.stride, spec.padding, spec.dilation
        self.groups, self.padding_mode, self.deploy = groups, padding_mode, bool(deploy)
        self.bn_eps, self.bn_momentum, self.bn_affine = bn_eps, bn_momentum, bn_affine
        if self.deploy:
            setattr(self, self.fused_name, self._conv(bias=True))

    @classmethod
    def unsupported_config(cls, spec: ConvSpec) -> str | None:
        """Why the block cannot equal a conv of this configuration exactly, or None (here: a non-square kernel)."""
        kh, kw = spec.kernel_size
        return f"non-square kernel {kh}x{kw} (the branches add up in a square kernel)" if kh != kw else None

    @classmethod
    def unsupported_reason(cls, conv: nn.Conv2d) -> str | None:
        """Why ``conv`` cannot become this block exactly (``convert`` skips it and reports why), or None."""
        return cls.unsupported_config(_conv_spec(cls.__name__, *(getattr(conv, f) for f in ConvSpec._fields)))

    def origin(self) -> tuple[nn.Conv2d, nn.Module]:
        """The conv and BN of the branch that takes a model's conv and BN (``from_conv_bn``)."""
        raise NotImplementedError

    def branch_norms(self) -> dict[str, nn.Module]:
        """The BN of each branch by branch name ({} once fused): what ``init_gamma`` sets and the analysis reads."""
        raise NotImplementedError

    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel and bias of the one conv equal to this block in eval mode (differentiable)."""
        raise NotImplementedError

    def _bn(self, channels: int | None = None) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(
            channels or self.out_channels, eps=self.bn_eps, momentum=self.bn_momentum, affine=self.bn_affine
        )

    def _conv(self, bias: bool) -> nn.Conv2d:
        sizes = (self.kernel_size, self.stride, self.padding, self.dilation)
        return nn.Conv2d(self.in_channels, self.out_channels, *sizes, self.groups, bias, self.padding_mode)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **options: Any) -> ReparamConvBlock:
        """A block from a conv with no BatchNorm after it (``convert(..., bare_convs=True)``): fresh BNs.

        The origin conv starts from ``conv``'s kernel; its bias is carried as the origin BN's running
        mean, so ``fused_conv_module`` has it.
        """
        return cls.from_conv_bn(conv, None, **options)

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.Module | None, **options: Any) -> ReparamConvBlock:
        """A block whose ``origin`` branch computes ``bn(conv(x))``, the others fresh (``ReparamBlock``).

        Its BNs take ``bn``'s eps, momentum and affine. ``options`` are constructor arguments;
        ``gamma_init`` sets every branch BN, the origin's too (None keeps a pretrained BN's weight).
        ``preserve=True`` (fine-tuning a trained model) computes exactly ``bn(conv(x))`` in train and eval
        mode: the origin keeps the trained BN, every other branch BN starts at gamma = beta = 0 (trainable),
        ``gamma_init`` aside.
        """
        preserve = bool(options.pop("preserve", False))
        if preserve and bn is None:
            raise ValueError(
                "block.preserve=true keeps a trained conv -> BN exactly; a conv with no BN after it cannot: "
                "set block.bare_convs=false"
            )
        config = {name: getattr(conv, name) for name in ConvSpec._fields}
        if bn is not None:
            config.update(bn_eps=bn.eps, bn_momentum=bn.momentum, bn_affine=bn.affine)
        block = cls(**config, **options).to(device=conv.weight.device, dtype=conv.weight.dtype)
        origin_conv, origin_bn = block.origin()
        with torch.no_grad():
            origin_conv.weight.copy_(conv.weight)
            if bn is not None:
                for name in ("running_mean", "running_var", "num_batches_tracked", "weight", "bias"):
                    if getattr(bn, name) is not None:  # no weight and bias without affine
                        getattr(origin_bn, name).copy_(getattr(bn, name))
            if conv.bias is not None:
                # bn(Wx + b) == bn'(Wx) with running_mean' = running_mean - b; the running-mean update is
                # linear, so this stays exact through training.
                origin_bn.running_mean.sub_(conv.bias)
        if not preserve:
            if bn is not None and options.get("gamma_init") is not None:
                block.init_gamma(options["gamma_init"])  # over the weight copied from bn
            return block
        others = [b for b in block.branch_norms().values() if b is not origin_bn]
        if not others or not block.bn_affine:
            raise ValueError(
                f"block.preserve=true needs a BN with gamma on every new branch of {cls.__name__} "
                "(branch_bn=true, an affine BN); drop block.preserve or set block.branch_bn=true"
            )
        with torch.no_grad():
            for other in others:
                other.weight.zero_()
                other.bias.zero_()
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
        """A new ``nn.Conv2d`` with bias equal to this block in eval mode (``ReparamBlock``), float64 maths."""
        if self.deploy:
            return copy.deepcopy(getattr(self, self.fused_name))
        ref = next(self.parameters())
        conv = self._conv(bias=True).to(device=ref.device, dtype=ref.dtype)
        # a block in float64 already (a model fused in float64: the analyses' kernel maps) is not copied
        source = self if ref.dtype == torch.float64 else self.double_precision_copy()
        with torch.no_grad():
            weight, bias = source.get_equivalent_kernel_bias()
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
        for name, default in (("dilation", (1, 1)), ("groups", 1), ("padding_mode", "zeros")):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s + (", deploy=True" if self.deploy else "")
