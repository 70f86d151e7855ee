"""What ``convert`` leaves in a model for ``fuse``: a slot where each folded BatchNorm was, a mark on bare blocks.

A slot holds its block as a plain (unregistered) attribute, so the state dict and module tree are those
of the converted model and ``copy.deepcopy`` keeps the pair together.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx
from torch import nn

from acnet_pl.blocks.base import ConvSpec

#: Attribute (not registered, not in the state dict) that marks a block ``convert`` made from a bare conv;
#: it holds that conv's config, so ``added_biases`` knows whether fusing adds a bias.
BARE_CONV = "_acnet_bare_conv"


def conv_config(conv: nn.Conv2d) -> dict[str, Any]:
    """The ``nn.Conv2d`` arguments that rebuild ``conv``'s layout."""
    return {**{name: getattr(conv, name) for name in ConvSpec._fields}, "bias": conv.bias is not None}


def bn_config(bn: nn.Module) -> dict[str, Any]:
    """The ``nn.BatchNorm2d`` arguments that rebuild ``bn``'s layout."""
    names = ("num_features", "eps", "momentum", "affine", "track_running_stats")
    return {name: getattr(bn, name) for name in names}


class BNSlot(nn.Identity):
    """Stands where a BatchNorm was folded into a block; remembers the conv and BN so ``fuse`` can restore them."""

    def __init__(
        self,
        block: nn.Module,
        conv_config: dict[str, Any],
        bn_config: dict[str, Any],
        template: nn.Module | None = None,
        tail: torch.fx.GraphModule | None = None,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "block", block)
        self.conv_config = conv_config
        self.bn_config = bn_config
        # A BatchNorm subclass (e.g. Lightning's _BatchNormXd) comes back as its own class (unregistered copy).
        object.__setattr__(self, "template", template)
        if tail is not None:  # a NormActSlot's
            self.tail = tail

    def restore(self, bn: nn.BatchNorm2d) -> nn.Module:
        """The layer as the model had it: ``bn`` itself, or the recorded class normalising as ``bn``."""
        if self.template is None:
            return bn
        module = copy.deepcopy(self.template).to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        tail = getattr(self, "tail", None)  # a norm-act layer's trained act/drop state
        state = {**bn.state_dict(), **(tail.state_dict() if tail is not None else {})}
        unexpected = module.load_state_dict(state, strict=tail is None).unexpected_keys
        if unexpected:  # the tail holds state the layer has not: it cannot be put back
            raise RuntimeError(f"cannot restore {type(module).__name__}: unexpected state {unexpected}")
        return module

    def extra_repr(self) -> str:
        return f"BatchNorm2d({self.bn_config['num_features']}) folded into the preceding block"


class NormActSlot(BNSlot):
    """Stands where a norm-act layer (timm's ``BatchNormAct2d``: BN -> drop -> act) was; its ``tail`` (what
    its forward does after ``F.batch_norm``) still runs here and ``restore`` puts the tail's state back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(x)

    def extra_repr(self) -> str:
        name = type(self.template).__name__
        return f"{name}({self.bn_config['num_features']}): normalisation folded into the preceding block"
