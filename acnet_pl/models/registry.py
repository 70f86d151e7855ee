"""Model registry: one name -> one builder. ACB (or any block) is applied afterwards by `convert`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.models as tvm
from torch import nn

from acnet_pl.models import cifar
from acnet_pl.reparam import convert

__all__ = [
    "INITS",
    "build_model",
    "check_input_size",
    "default_input_size",
    "init_weights",
    "is_torchvision_model",
    "list_models",
]

IMAGENET_INPUT_SIZE = (3, 224, 224)
CIFAR_INPUT_SIZE = (3, 32, 32)


@dataclass(frozen=True)
class _ModelSpec:
    builder: Callable[[int], nn.Module]
    input_size: tuple[int, int, int]
    torchvision: bool


def _torchvision(builder: Callable[..., nn.Module]) -> Callable[[int], nn.Module]:
    # Untouched torchvision architecture, so state dicts load into torchvision.models.<name>() directly.
    def build(num_classes: int) -> nn.Module:
        return builder(weights=None, num_classes=num_classes)

    return build


_MODELS: dict[str, _ModelSpec] = {
    "resnet18": _ModelSpec(_torchvision(tvm.resnet18), IMAGENET_INPUT_SIZE, True),
    "resnet34": _ModelSpec(_torchvision(tvm.resnet34), IMAGENET_INPUT_SIZE, True),
    "resnet50": _ModelSpec(_torchvision(tvm.resnet50), IMAGENET_INPUT_SIZE, True),
    "resnet20": _ModelSpec(cifar.resnet20, CIFAR_INPUT_SIZE, False),
    "resnet32": _ModelSpec(cifar.resnet32, CIFAR_INPUT_SIZE, False),
    "resnet44": _ModelSpec(cifar.resnet44, CIFAR_INPUT_SIZE, False),
    "resnet56": _ModelSpec(cifar.resnet56, CIFAR_INPUT_SIZE, False),
    "resnet110": _ModelSpec(cifar.resnet110, CIFAR_INPUT_SIZE, False),
    "vgg16": _ModelSpec(cifar.vgg16, CIFAR_INPUT_SIZE, False),
    "wrn16_8": _ModelSpec(cifar.wrn16_8, CIFAR_INPUT_SIZE, False),
    "cifar_quick": _ModelSpec(cifar.cifar_quick, CIFAR_INPUT_SIZE, False),
    "densenet40": _ModelSpec(cifar.densenet40, CIFAR_INPUT_SIZE, False),
}

#: Initialisations `build_model` applies to every conv and linear (after `convert`, so the branches of a
#: block follow the same rule as its square conv): "default" = PyTorch's `reset_parameters` (the original
#: ACNet code), "kaiming" = Kaiming-normal (fan_out, ReLU) conv kernels and zero conv biases.
INITS = ("default", "kaiming")


def init_weights(model: nn.Module, init: str = "default") -> nn.Module:
    """(Re)initialise every nn.Conv2d and nn.Linear of `model` in place by the rule `init` (see `INITS`).

    Normalisation layers are left alone (a block's `gamma_init` lives there).
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of: {', '.join(INITS)}")
    for m in model.modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if init == "default" or isinstance(m, nn.Linear):
            # torchvision's ResNets draw Kaiming kernels in their constructor: undone here.
            m.reset_parameters()
            continue
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    return model


def list_models() -> list[str]:
    """Names accepted by `build_model`, sorted."""
    return sorted(_MODELS)


def _spec(name: str) -> _ModelSpec:
    spec = _MODELS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return spec


def default_input_size(name: str) -> tuple[int, int, int]:
    """(C, H, W) the model is meant for: (3, 224, 224) for ImageNet models, (3, 32, 32) for CIFAR ones."""
    return _spec(name).input_size


def _accepts(model: nn.Module, channels: int, size: int) -> bool:
    try:
        model(torch.empty(2, channels, size, size, device="meta"))
    except (RuntimeError, ValueError):
        return False
    return True


def check_input_size(name: str, input_size: tuple[int, int, int] | list[int]) -> None:
    """ValueError naming the smallest image size model `name` takes when `input_size` (C, H, W) is too small.

    Shapes only: the model is built and run on PyTorch's meta device (no memory, milliseconds), so a
    too-small `data.image_size` is one line before training instead of a traceback in the first step.
    """
    channels, height, width = (int(v) for v in input_size)
    with torch.device("meta"):
        model = _spec(name).builder(2).eval()
    size = min(height, width)
    if _accepts(model, channels, size):
        return
    low, high = size, max(2 * size, 8)
    while not _accepts(model, channels, high):  # every model here takes its default size
        low, high = high, 2 * high
        if high > 4096:
            raise ValueError(f"model {name!r} takes no square image up to 4096 px; check the model")
    while high - low > 1:  # smallest accepted size, by bisection (acceptance grows with the size)
        mid = (low + high) // 2
        low, high = (low, mid) if _accepts(model, channels, mid) else (mid, high)
    raise ValueError(
        f"images of {height}x{width} are too small for {name}: it needs at least {high}x{high} "
        f"(its default is {default_input_size(name)[1]}); set data.image_size={high} or larger"
    )


def is_torchvision_model(name: str) -> bool:
    """True when `name` is built by torchvision (its state dict loads into torchvision's model)."""
    return _spec(name).torchvision


def build_model(
    name: str, num_classes: int = 1000, block: str = "base", init: str = "default", **block_options: Any
) -> nn.Module:
    """Build model `name` with `num_classes` outputs; `block != "base"` converts it with `reparam.convert`.

    Args:
        init: how every conv and linear starts (`init_weights`): "default" (PyTorch's, as the original
            ACNet code) or "kaiming"; applied after the conversion, to the branches of a block as well.
        block: "base" returns the plain model; any other value is passed to
            `acnet_pl.reparam.convert(model, block=block, **block_options)`.
        block_options: options of the block (e.g. `kernel_sizes`, `include`); only valid with a block.
    """
    spec = _spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
    if not isinstance(block, str):
        raise ValueError(f"block must be a string such as 'base', 'acb' or 'dbb'; got {block!r}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of: {', '.join(INITS)}")
    model = spec.builder(num_classes)
    if block == "base":
        if block_options:
            raise ValueError(
                f"block options {sorted(block_options)} were given with block='base', which has no options; "
                "drop them or choose a re-parameterisable block such as block='acb'"
            )
        return init_weights(model, init)
    return init_weights(convert(model, block=block, **block_options), init)
