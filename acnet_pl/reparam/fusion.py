"""``fuse``: every block back to one conv (+ BN), the base model's layout; and the bare-conv biases."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from acnet_pl.blocks.transforms import fold_bn
from acnet_pl.reparam.graph import after_norm, conv_bn_flow, is_block, set_module
from acnet_pl.reparam.slots import BARE_CONV, BNSlot, NormActSlot, conv_config


def _conv_with_kernel(config: dict[str, Any], weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    conv = nn.Conv2d(**{**config, "bias": bias is not None}).to(weight)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def _restore_conv_bn(fused: nn.Conv2d, slot: BNSlot) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """Split a fused conv (W, b) into conv + BN in ``slot``'s layout, with equal outputs (float64 maths).

    The BN keeps running_mean 0 and running_var 1, so in eval mode it scales by 1/sqrt(1 + eps): its
    weight (or, without affine, the conv kernel) carries sqrt(1 + eps) and its bias (or running mean) b.
    """
    cfg, dtype = slot.bn_config, fused.weight.dtype
    w, b = fused.weight.detach().double(), fused.bias.detach().double()
    c = math.sqrt(1.0 + cfg["eps"])
    bn = nn.BatchNorm2d(**cfg).to(w)
    with torch.no_grad():
        if cfg["affine"]:
            bn.weight.fill_(c)
            bn.bias.copy_(b)
        else:
            w = w * c
            bn.running_mean.copy_(-b * c)
    conv_bias = torch.zeros_like(b, dtype=dtype) if slot.conv_config["bias"] else None
    return _conv_with_kernel(slot.conv_config, w.to(dtype), conv_bias), bn.to(dtype)


def _fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """One conv with bias equal to ``bn(conv(x))`` in eval mode (float64 maths)."""
    with torch.no_grad():
        bias = conv.bias.double() if conv.bias is not None else None
        weight, bias = fold_bn(conv.weight.double(), copy.deepcopy(bn).double(), bias)
    dtype = conv.weight.dtype
    return _conv_with_kernel(conv_config(conv), weight.to(dtype), bias.to(dtype))


def fuse(model: nn.Module, *, fold_bn: bool = False, inplace: bool = False) -> nn.Module:
    """Turn every re-parameterisable block back into a plain conv (+ BN), for deployment.

    A block ``convert`` made from conv + BN becomes conv + BN laid out as before, so the state dict loads
    with ``strict=True`` into the untouched base model; one from a bare conv (or put in by hand) becomes
    one conv with bias (``added_biases``). ``fold_bn=True`` folds every conv -> BN pair into one conv
    with bias (the BN an ``nn.Identity``): the fastest inference, no longer the base layout. Running
    statistics are used whatever the model's mode; the result keeps that mode.
    """
    if not inplace:
        model = copy.deepcopy(model)
    slots = {id(m.block): name for name, m in model.named_modules() if isinstance(m, BNSlot)}
    blocks = [(name, m) for name, m in model.named_modules() if name and is_block(m)]
    for name, block in blocks:
        fused = block.fused_conv_module()
        slot_name = slots.get(id(block))
        if slot_name is None:
            set_module(model, name, fused)
            continue
        slot = model.get_submodule(slot_name)
        if fold_bn:
            set_module(model, name, fused)
            set_module(model, slot_name, slot.tail if isinstance(slot, NormActSlot) else nn.Identity())
        else:
            conv, bn = _restore_conv_bn(fused, slot)
            bn = slot.restore(bn)
            set_module(model, name, conv.train(block.training))
            set_module(model, slot_name, bn.train(block.training))
    if fold_bn:
        for conv_name, bn_name in conv_bn_flow(model).pairs:
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
            after = after_norm(bn)
            if isinstance(after, str):  # a norm-act layer that cannot be split stays as it is
                continue
            set_module(model, conv_name, _fold_conv_bn(conv, bn).train(conv.training))
            set_module(model, bn_name, after.train(bn.training))
    return model


def added_biases(model: nn.Module) -> list[str]:
    """Names of the convs to which ``fuse(model)`` adds a bias the base model's conv does not have: the
    bias-free bare convs that ``convert(..., bare_convs=True)`` turned into blocks."""
    return [name for name, m in model.named_modules() if not getattr(m, BARE_CONV, {"bias": True})["bias"]]


def add_conv_biases(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Give each named ``nn.Conv2d`` of ``model`` a zero bias, in place (the layout of ``added_biases``), so
    a base model takes the state dict of a model fused after ``convert(..., bare_convs=True)``."""
    for name in names:
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            conv = None
        if type(conv) is not nn.Conv2d or conv.bias is not None:
            raise ValueError(
                f"cannot add a bias to {name!r}: not a bias-free nn.Conv2d of this "
                f"{type(model).__name__} (the weights belong to another model)"
            )
        conv.bias = nn.Parameter(conv.weight.new_zeros(conv.out_channels))
    return model


def count_blocks(model: nn.Module) -> int:
    """Number of re-parameterisable blocks (modules with ``fused_conv_module``) in ``model``."""
    return sum(1 for m in model.modules() if is_block(m))
