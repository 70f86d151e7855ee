"""Model registry: one name -> one builder. ACB (or any block) is applied afterwards by `convert`.

Names: the project's (`list_models()`), and every classification model of torchvision and timm as
"torchvision:<name>" / "timm:<name>" (`build_model(name, library="timm")` says the same).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.models as tvm
from torch import nn

from acnet_pl.models import cifar
from acnet_pl.models.weights import load_pretrained, timm_module, weights_source
from acnet_pl.reparam import ConversionReport, convert

#: Libraries whose models `build_model` takes by name (timm is optional).
LIBRARIES = ("torchvision", "timm")

IMAGENET_INPUT_SIZE = (3, 224, 224)
CIFAR_INPUT_SIZE = (3, 32, 32)


@dataclass(frozen=True)
class _ModelSpec:
    builder: Callable[[int], nn.Module]
    input_size: tuple[int, int, int]
    torchvision: bool
    mean: tuple[float, ...] | None = None  # the normalisation of the library's pretrained weights
    std: tuple[float, ...] | None = None


def _torchvision(name: str) -> Callable[[int], nn.Module]:
    # Untouched torchvision architecture, so state dicts load into torchvision.models.<name>() directly.
    return lambda num_classes: tvm.get_model(name, weights=None, num_classes=num_classes)


def _cifar(build: Callable[..., nn.Module], *args: Any) -> _ModelSpec:
    return _ModelSpec(lambda num_classes: build(*args, num_classes=num_classes), CIFAR_INPUT_SIZE, False)


_MODELS: dict[str, _ModelSpec] = {
    **{
        name: _ModelSpec(_torchvision(name), IMAGENET_INPUT_SIZE, True)
        for name in ("resnet18", "resnet34", "resnet50")
    },
    **{f"resnet{depth}": _cifar(cifar.cifar_resnet, depth) for depth in (20, 32, 44, 56, 110)},
    "vgg16": _cifar(cifar.CifarVGG),  # the classes' defaults are the named nets
    "wrn16_8": _cifar(cifar.PreActWideResNet),
    "cifar_quick": _cifar(cifar.CifarQuick),
    "densenet40": _cifar(cifar.CifarDenseNet),
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


def list_models(library: str | None = None) -> list[str]:
    """The project's model names, sorted; with `library` ("torchvision", "timm") that library's, qualified."""
    if library is None:
        return sorted(_MODELS)
    if library not in LIBRARIES:
        raise ValueError(f"unknown model library {library!r}; choose one of: {', '.join(LIBRARIES)}")
    names = tvm.list_models(module=tvm) if library == "torchvision" else timm_module().list_models()
    return [f"{library}:{name}" for name in names]


def qualified_name(name: str, library: str | None = None) -> str:
    """`name` as the registry keys it: "timm:efficientnet_b0" for library="timm", a project name as it is."""
    if library is None or (isinstance(name, str) and name.startswith(f"{library}:")):
        return name
    if library not in LIBRARIES:
        raise ValueError(f"unknown model library {library!r}; choose one of: {', '.join(LIBRARIES)}")
    return f"{library}:{name}"


def _unknown(kind: str, name: str, names: list[str], listing: str) -> ValueError:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return ValueError(f"unknown {kind} model {name!r}; {hint}{listing} lists them all")


@functools.cache
def _library_spec(library: str, name: str) -> _ModelSpec:
    """The spec of a torchvision or timm model: its builder and the metadata of its default weights."""
    if library == "torchvision":
        names = tvm.list_models(module=tvm)  # classification models only
        if name not in names:
            raise _unknown(library, name, names, "torchvision.models.list_models(module=torchvision.models)")
        t = tvm.get_model_weights(name).DEFAULT.transforms()
        size = (3, t.crop_size[0], t.crop_size[0])
        return _ModelSpec(_torchvision(name), size, True, tuple(t.mean), tuple(t.std))
    timm = timm_module()
    if not timm.is_model(name.split(".", 1)[0]):  # "resnet18.a1_in1k": an architecture and its weights' tag
        raise _unknown(library, name, timm.list_models(), "timm.list_models()")
    cfg = timm.models.get_pretrained_cfg(name)
    meta = (tuple(cfg.input_size), tuple(cfg.mean), tuple(cfg.std)) if cfg else (IMAGENET_INPUT_SIZE,)
    return _ModelSpec(lambda n: timm.create_model(name, num_classes=n), meta[0], False, *meta[1:])


def _spec(name: str) -> _ModelSpec:
    library, _, plain = name.partition(":") if isinstance(name, str) else ("", "", "")
    if library in LIBRARIES and plain:
        return _library_spec(library, plain)
    spec = _MODELS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(
            f"unknown model {name!r}; choose one of: {', '.join(list_models())}, "
            "or a torchvision or timm model: model=torchvision model.name=<name> (model=timm ...)"
        )
    return spec


def default_input_size(name: str) -> tuple[int, int, int]:
    """(C, H, W) the model is meant for: (3, 224, 224) for ImageNet models, (3, 32, 32) for CIFAR ones."""
    return _spec(name).input_size


def pretrained_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) of the library's pretrained weights of `name` (torchvision's transforms, timm's
    pretrained_cfg); None for the project's models."""
    spec = _spec(name)
    return None if spec.mean is None else (spec.mean, spec.std)


def _accepts(model: nn.Module, channels: int, size: int) -> bool:
    try:
        model(torch.empty(2, channels, size, size, device="meta"))
    except (RuntimeError, ValueError, AssertionError):  # timm asserts some input sizes
        return False
    return True


def check_input_size(name: str, input_size: tuple[int, int, int] | list[int]) -> None:
    """ValueError naming the smallest image size model `name` takes when `input_size` (C, H, W) is too small.

    Shapes only: the model is built and run on PyTorch's meta device (no memory, milliseconds), so a
    too-small `data.image_size` is one line before training instead of a traceback in the first step.
    """
    channels, height, width = (int(v) for v in input_size)
    builder = _spec(name).builder
    try:
        with torch.device("meta"):
            model = builder(2).eval()
    except (RuntimeError, NotImplementedError):  # a builder that reads its tensors (timm's drop-path rates)
        model = builder(2).to("meta").eval()
    size = min(height, width)
    if _accepts(model, channels, size):
        return
    low, high = size, max(2 * size, 8)
    while not _accepts(model, channels, high):
        low, high = high, 2 * high
        if high > 4096:  # a model the meta device cannot run: its first step will tell
            return
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
    name: str,
    num_classes: int = 1000,
    block: str = "base",
    init: str = "default",
    *,
    library: str | None = None,
    weights: str | None = None,
    pretrained: bool = False,
    **block_options: Any,
) -> nn.Module:
    """Model `name` with `num_classes` outputs; `block != "base"`: `convert(model, block, **block_options)`.

    Args:
        init: how every conv and linear starts (`init_weights`): "default" (PyTorch's, as the original
            ACNet code) or "kaiming"; applied after the conversion, to the branches of a block as well.
            Not applied over pretrained weights (the branches of a block keep PyTorch's default).
        library: "torchvision" or "timm": `name` is one of that library's models ("timm:<name>" says the same).
        weights: a file of weights for the base model, loaded before the conversion (`load_pretrained`: a
            classifier head of another number of classes is replaced).
        pretrained: load the library's default weights from the local cache (`cached_weights`); no download.
        block_options: options of the block (e.g. `kernel_sizes`, `include`, `preserve`); only valid with a block.
    """
    name = qualified_name(name, library)
    spec = _spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
    if not isinstance(block, str):
        raise ValueError(f"block must be a string such as 'base', 'acb' or 'dbb'; got {block!r}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of: {', '.join(INITS)}")
    if block == "base" and block_options:
        raise ValueError(
            f"block options {sorted(block_options)} were given with block='base', which has no options; "
            "drop them or choose a re-parameterisable block such as block='acb'"
        )
    source = weights_source(name, weights, pretrained)
    if source is not None and init != "default":
        raise ValueError(f"model.init={init} starts a model from scratch; drop it with pretrained weights")
    model = spec.builder(num_classes)
    if source is not None:
        load_pretrained(model, source, num_classes, name)
    if block != "base":
        model = convert(model, block=block, **block_options)
    return model if source is not None else init_weights(model, init)


def build_net(model: Mapping[str, Any], block: Mapping[str, Any]) -> tuple[nn.Module, ConversionReport]:
    """The network of `model` ({"name", "num_classes"}, optionally "init", "weights") with `block` ({"name",
    **options of `reparam.convert`}) applied, and what was converted: what training and the checkpoint
    reader both build from a run's hyperparameters. ValueError when the block converts none of the
    network's convs (it would train the base model under a block's name)."""
    base = block["name"] == "base"
    options = {k: v for k, v in block.items() if k != "name"}
    report = ConversionReport(block=block["name"])
    if not base:
        options["report"] = report
    net = build_model(
        model["name"],
        num_classes=model["num_classes"],
        block=block["name"],
        init=model.get("init", "default"),
        weights=model.get("weights"),
        **options,
    )
    if not base and not (report.converted or report.bare):
        convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
        sizes = sorted({m.kernel_size[0] for m in convs if m.kernel_size[0] == m.kernel_size[1] > 1})
        fix = f"block.kernel_sizes={sizes} (the square kernels it has) or " if sizes else ""
        if not options.get("bare_convs") and any(
            r == "output does not feed a BatchNorm2d" for _, r in report.skipped
        ):
            fix = "block.bare_convs=true (a pre-activation net: its convs feed no BatchNorm) or " + fix
        raise ValueError(
            f"block={block['name']} converts none of {model['name']}'s convs ({report.summary()}); "
            f"choose {fix}block=base"
        )
    return net, report


def net_summary(name: str, report: ConversionReport) -> str:
    """The line that says what `build_net` made: `resnet20: converted 19 of 21 convs to acb; ...`."""
    what = "block=base, model left as it is" if report.block == "base" else report.summary()
    return f"{name}: {what}"
