"""The two graph transforms of ACNet: ``convert`` (conv+BN -> block) and ``fuse`` (block -> conv+BN).

Both work on models nobody rewrote: conv -> BN pairs are found from the data flow that ``torch.fx``
traces, so a torchvision model is converted as it is. Modules that cannot be traced are traced child by
child; what stays out of reach is reported, not guessed.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from acnet_pl.blocks import get_block
from acnet_pl.blocks.transforms import fold_bn

log = logging.getLogger(__name__)

#: Batch norms whose whole forward is the normalisation (folded away: nn.Identity), as are subclasses
#: that keep that forward, e.g. Lightning's `_BatchNormXd`, what SyncBatchNorm becomes after fit
#: (tests/test_reparam.py pins that revert). A conv is paired with any `_BatchNorm` subclass,
#: norm-act layers included (see `_after_norm`).
_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)

#: Attribute (not registered, not in the state dict) that marks a block ``convert`` made from a bare conv;
#: it holds that conv's config, so ``added_biases`` knows whether fusing adds a bias.
_BARE_CONV = "_acnet_bare_conv"


class BNSlot(nn.Identity):
    """Stands where a BatchNorm was folded into a block; remembers the conv and BN so ``fuse`` can restore them.

    The block it belongs to is held as a plain (unregistered) attribute, so the state dict and module
    tree are unchanged and ``copy.deepcopy`` keeps the pair together.
    """

    def __init__(
        self,
        block: nn.Module,
        conv_config: dict[str, Any],
        bn_config: dict[str, Any],
        template: nn.Module | None = None,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "block", block)
        self.conv_config = conv_config
        self.bn_config = bn_config
        # A BatchNorm subclass (e.g. Lightning's _BatchNormXd) comes back as its own class (unregistered copy).
        object.__setattr__(self, "template", template)

    def restore(self, bn: nn.BatchNorm2d) -> nn.Module:
        """The BatchNorm as the model had it: ``bn`` itself, or the recorded subclass with ``bn``'s state."""
        if self.template is None:
            return bn
        module = copy.deepcopy(self.template).to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        module.load_state_dict(bn.state_dict(), strict=True)
        return module.train(bn.training)

    def extra_repr(self) -> str:
        return f"BatchNorm2d({self.bn_config['num_features']}) folded into the preceding block"


class NormActSlot(BNSlot):
    """Stands where a norm-act layer (a BatchNorm subclass that does more after normalising, e.g. timm's
    ``BatchNormAct2d``: BN -> drop -> act) was: the block took its normalisation, ``tail`` (a traced
    ``GraphModule`` of what its forward does after ``F.batch_norm``) still runs here.

    ``fuse`` rebuilds the library's own module from ``template`` (an unregistered copy of the layer as
    converted) with the restored BN's state and the tail's trained state, so the fused state dict loads
    into the untouched model.
    """

    def __init__(
        self,
        block: nn.Module,
        conv_config: dict[str, Any],
        bn_config: dict[str, Any],
        tail: torch.fx.GraphModule,
        template: nn.Module,
    ) -> None:
        super().__init__(block, conv_config, bn_config, template)
        self.tail = tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(x)

    def restore(self, bn: nn.BatchNorm2d) -> nn.Module:
        """The original layer's class again, normalising as ``bn`` and with the tail's current state."""
        module = copy.deepcopy(self.template).to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        state = {**bn.state_dict(), **self.tail.state_dict()}
        missing, unexpected = module.load_state_dict(state, strict=False)
        if unexpected:  # the tail holds state the layer has not: it cannot be put back
            raise RuntimeError(f"cannot restore {type(module).__name__}: unexpected state {unexpected}")
        return module.train(self.training)

    def extra_repr(self) -> str:
        name = type(self.template).__name__
        return f"{name}({self.bn_config['num_features']}): normalisation folded into the preceding block"


@dataclass
class ConversionReport:
    """What ``convert`` changed and what it left alone, and why."""

    block: str = "base"
    converted: list[str] = field(default_factory=list)  # conv -> BN pairs: fuse restores conv + BN
    bare: list[str] = field(default_factory=list)  # convs with no BN after them: fuse gives conv + bias
    skipped: list[tuple[str, str]] = field(default_factory=list)
    untraced: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs: counts and the reasons for skipping."""
        if self.block == "base":
            return "block=base: model left as it is"
        total = len(self.converted) + len(self.bare) + len(self.skipped)
        line = f"converted {len(self.converted) + len(self.bare)} of {total} convs to {self.block}"
        if self.bare:
            line += f" ({len(self.bare)} of them bare convs, fused into a conv with bias)"
        if self.skipped:
            reasons: dict[str, int] = {}
            for _, reason in self.skipped:
                reasons[reason] = reasons.get(reason, 0) + 1
            line += "; skipped " + ", ".join(
                f"{n} ({r})" for r, n in sorted(reasons.items(), key=lambda t: -t[1])
            )
        if self.untraced:
            line += "; could not trace " + ", ".join(name or "<root>" for name, _ in self.untraced)
        return line


# --------------------------------------------------------------------------------------------------
# finding conv -> BN pairs


class _Tracer(torch.fx.Tracer):
    """Keeps blocks and the given ``opaque`` modules (whose forward cannot be traced) as leaves."""

    def __init__(self, opaque: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if id(m) in self.opaque or callable(getattr(m, "fused_conv_module", None)):
            return True
        # A BatchNorm subclass (timm's BatchNormAct2d: BN -> drop -> act) is one node, so the conv before
        # it is seen to feed a BatchNorm; _norm_act_tail splits off what it does after normalising.
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return True
        return super().is_leaf_module(m, qualname)


_BATCH_NORM_FUNCTIONS = (F.batch_norm, torch.batch_norm)
_PLAIN_BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


def _norm_act_tail(bn: nn.Module) -> torch.fx.GraphModule | str:
    """What ``bn.forward`` does after its one ``F.batch_norm`` call, as a module of that call's output;
    or why it cannot be split off (a string).

    Traced with torch.fx: the tail is every node the output needs, with the normalised tensor as the
    only input. It may use the layer's submodules (act, drop) but not its input nor its own BN state.
    """
    if type(bn).forward in _PLAIN_BN_FORWARDS:  # a subclass that only renames: its tail is the identity
        graph = torch.fx.Graph()
        graph.output(graph.placeholder("x"))
        return torch.fx.GraphModule(bn, graph, class_name=f"{type(bn).__name__}Tail")
    try:
        graph = torch.fx.Tracer().trace(bn)
    except Exception as err:  # noqa: BLE001 - any tracing failure: leave the layer alone
        return f"its forward could not be traced ({type(err).__name__})"
    norms = [n for n in graph.nodes if n.op == "call_function" and n.target in _BATCH_NORM_FUNCTIONS]
    if len(norms) != 1:
        return f"its forward calls batch_norm {len(norms)} times"
    own_state = {name for name, _ in bn.named_parameters(recurse=False)}
    own_state |= {name for name, _ in bn.named_buffers(recurse=False)}
    tail = torch.fx.Graph()
    env = {norms[0]: tail.placeholder("x")}

    def copy_node(node: torch.fx.Node) -> torch.fx.Node:
        if node not in env:
            if node.op == "placeholder":
                raise ValueError("it uses its input after normalising")
            if node.op == "get_attr" and node.target in own_state:
                raise ValueError(f"it uses its {node.target} after normalising")
            env[node] = tail.node_copy(node, copy_node)
        return env[node]

    try:
        copy_node(next(n for n in graph.nodes if n.op == "output"))
    except ValueError as err:
        return str(err)
    if not env[norms[0]].users:
        return "its output does not depend on the normalisation"
    return torch.fx.GraphModule(bn, tail, class_name=f"{type(bn).__name__}Tail")


def _after_norm(bn: nn.Module) -> nn.Module | str:
    """What replaces ``bn`` once its normalisation is folded away: nothing for a plain BatchNorm, the
    tail for a norm-act layer (or why it has none)."""
    plain = type(bn) in _BN_TYPES or type(bn).forward in _PLAIN_BN_FORWARDS  # e.g. Lightning's _BatchNormXd
    return nn.Identity() if plain else _norm_act_tail(bn)


@dataclass
class _Flow:
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (conv name, bn name)
    not_paired: dict[str, str] = field(default_factory=dict)  # conv name -> why not
    untraced: list[tuple[str, str]] = field(default_factory=list)  # (module name, error)
    seen: set[str] = field(default_factory=set)

    def merge(self, other: _Flow) -> None:
        self.pairs += other.pairs
        self.not_paired.update(other.not_paired)
        self.untraced += other.untraced
        self.seen |= other.seen


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _trace_flow(module: nn.Module, prefix: str, flow: _Flow) -> bool:
    """Add the conv -> BN data flow inside ``module`` to ``flow``; False when its forward did not trace.

    A module that does not trace is looked into child by child; then it is traced once more with the
    children that failed kept as opaque leaves, so its own pairs (and those across its children) are
    still found. Only pairs inside a forward that cannot be traced at all stay out of reach.
    """
    try:
        _analyse(module, prefix, _Tracer().trace(module), flow)
        return True
    except Exception:  # noqa: BLE001 - any tracing failure means "look inside instead"
        pass
    opaque, traced_children = set(), _Flow()
    for name, child in module.named_children():
        sub = _Flow()
        if _trace_flow(child, _join(prefix, name), sub):
            traced_children.merge(sub)
        else:
            opaque.add(id(child))
            flow.merge(sub)
    try:
        _analyse(module, prefix, _Tracer(frozenset(opaque)).trace(module), flow)
    except Exception as err:  # noqa: BLE001
        flow.merge(traced_children)
        flow.untraced.append((prefix, f"{type(err).__name__}: {str(err).strip().splitlines()[0][:120]}"))
    return False


def _analyse(module: nn.Module, prefix: str, graph: torch.fx.Graph, flow: _Flow) -> None:
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        conv = module.get_submodule(node.target)
        if type(conv) is not nn.Conv2d:
            continue
        name = _join(prefix, node.target)
        flow.seen.add(name)
        users = list(node.users)
        if calls[node.target] > 1:
            flow.not_paired[name] = "called more than once"
        elif len(users) != 1:
            flow.not_paired[name] = f"output has {len(users)} users"
        elif users[0].op != "call_module" or not isinstance(
            module.get_submodule(users[0].target), nn.modules.batchnorm._BatchNorm
        ):
            flow.not_paired[name] = "output does not feed a BatchNorm2d"
        elif calls[users[0].target] > 1:
            flow.not_paired[name] = "its BatchNorm is called more than once"
        elif not module.get_submodule(users[0].target).track_running_stats:
            flow.not_paired[name] = "its BatchNorm keeps no running statistics"
        else:
            flow.pairs.append((name, _join(prefix, users[0].target)))


def _conv_bn_flow(model: nn.Module) -> _Flow:
    flow = _Flow()
    _trace_flow(model, "", flow)
    for name, m in model.named_modules():
        if type(m) is nn.Conv2d and name not in flow.seen:
            flow.not_paired[name] = "inside a module that could not be traced"
    return flow


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[attr] = new  # works for Sequential/ModuleList indices and attributes alike


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def _conv_config(conv: nn.Conv2d) -> dict[str, Any]:
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": tuple(conv.kernel_size),
        "stride": tuple(conv.stride),
        "padding": conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
        "dilation": tuple(conv.dilation),
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }


def _bn_config(bn: nn.Module) -> dict[str, Any]:
    return {
        "num_features": bn.num_features,
        "eps": bn.eps,
        "momentum": bn.momentum,
        "affine": bn.affine,
        "track_running_stats": bn.track_running_stats,
    }


# --------------------------------------------------------------------------------------------------
# convert


def _gamma_rule(block_options: dict[str, Any]) -> Callable[[str], dict[str, Any]]:
    """conv name -> the block options for it, with a ``gamma_init`` given per name resolved to a number."""
    gamma = block_options.get("gamma_init")
    if not isinstance(gamma, Mapping):
        return lambda name: block_options
    for pattern, value in gamma.items():
        if not isinstance(pattern, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"gamma_init as a mapping takes conv name patterns to numbers, e.g. {{'conv1': 0.333}}; "
                f"got {pattern!r}: {value!r}"
            )

    def options(name: str) -> dict[str, Any]:
        value = next((v for p, v in gamma.items() if fnmatch.fnmatchcase(name, p)), None)
        return {**block_options, "gamma_init": value}

    return options


def _new_block(make: Callable[..., nn.Module], block: str, options: dict[str, Any], *args: Any) -> nn.Module:
    """`make(*args, **options)`; an option the block does not take is a ValueError naming the config key."""
    try:
        return make(*args, **options)
    except TypeError as err:
        # Options come from the config (an experiment's block.gamma_init reaches a custom block too).
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unexpected is None or unexpected.group(1) not in options:
            raise
        key = unexpected.group(1)
        raise ValueError(
            f"block {block} takes no option {key}; remove it (~block.{key} on the command line)"
        ) from err


def convert(
    model: nn.Module,
    block: str = "acb",
    *,
    kernel_sizes: Sequence[int] = (3, 5),
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    inplace: bool = False,
    report: ConversionReport | None = None,
    bare_convs: bool | str = False,
    **block_options: Any,
) -> nn.Module:
    """Replace every eligible KxK conv that feeds a BatchNorm2d by ``block`` (``"base"``: no change).

    ``block`` is a name of ``acnet_pl.blocks.list_blocks()`` or ``"package.module:ClassName"``.

    Args:
        kernel_sizes: square kernel sizes to convert (default: the original's rule 1 < K < 7, odd).
        bare_convs: also convert KxK convs whose output does not go only into a BatchNorm2d (the stem
            and the BN-ReLU-conv units of pre-activation nets), as the original's builder does: such a
            block has fresh branch BNs and ``fuse`` makes it a conv with bias (``added_biases`` names
            those that gain one). Listed in ``report.bare``. Convs inside a forward that could not be
            traced stay as they are.
            ``"all"``: every KxK conv becomes a bare block, also one that feeds a BatchNorm, which then
            stays where it is: the original's builder on pre-activation nets, where the BN after a conv
            is the next BN-ReLU-conv unit's (its WRN-16-8).
        include / exclude: fnmatch patterns on conv module names (``"layer1.*"``); include=None means all.
        inplace: modify ``model`` itself instead of a deep copy.
        report: a ``ConversionReport`` to fill with what was converted and skipped (then the caller
            reports it; without one, the summary is logged at INFO).
        block_options: passed to the block (for ACB: ``impl``, and ``gamma_init``, which sets the weight
            of all three BNs, the square one included: meant for training from scratch, as the original
            does; leave it None to keep a pretrained BN's weight). ``gamma_init`` may also map fnmatch
            patterns on conv names to values, first match wins, None for a conv matched by none (fresh
            BNs start at 1): ``{"conv1": 1/3}`` is the original's WRN (stem 1/3, its units 1).
    """
    block_cls = None if block == "base" else get_block(block)
    # A caller that passes a report reports it itself (e.g. once, on rank zero); otherwise log it here.
    log_summary = report is None
    report = report if report is not None else ConversionReport()
    report.block = block
    if not inplace:
        model = copy.deepcopy(model)
    if block == "base":
        if block_options:
            raise ValueError(f"block=base takes no block options, got {sorted(block_options)}")
        return model
    if bare_convs not in (False, True, "all"):
        raise ValueError(f"bare_convs must be false, true or 'all'; got {bare_convs!r}")
    gamma_of = _gamma_rule(block_options)
    unsupported_reason = getattr(block_cls, "unsupported_reason", None)
    kernel_sizes = tuple(int(k) for k in kernel_sizes)
    flow = _conv_bn_flow(model)
    report.untraced.extend(flow.untraced)
    pairs = dict(flow.pairs)
    for name, m in model.named_modules():
        if type(m) is not nn.Conv2d:
            continue
        kh, kw = m.kernel_size
        bare = bool(bare_convs) and name in flow.seen and (name not in pairs or bare_convs == "all")
        if name not in pairs and not bare:
            reason = flow.not_paired.get(name, "output does not feed a BatchNorm2d")
        elif kh != kw:
            reason = "non-square kernel"
        elif kh not in kernel_sizes:
            reason = f"{kh}x{kw} kernel not in kernel_sizes {list(kernel_sizes)}"
        elif include is not None and not _matches(name, include):
            reason = "not matched by include"
        elif _matches(name, exclude):
            reason = "matched by exclude"
        else:
            reason = unsupported_reason(m) if unsupported_reason is not None else None
        if reason is None and bare and not callable(getattr(block_cls, "from_conv", None)):
            reason = f"no BatchNorm after it, and block {block!r} has no from_conv"
        if reason is not None:
            report.skipped.append((name, reason))
            continue
        options = gamma_of(name)
        if bare:
            new_block = _new_block(block_cls.from_conv, block, options, m)
            new_block.train(m.training)
            object.__setattr__(new_block, _BARE_CONV, _conv_config(m))
            _set_module(model, name, new_block)
            report.bare.append(name)
            continue
        bn_name = pairs[name]
        bn = model.get_submodule(bn_name)
        after = _after_norm(bn)
        if isinstance(after, str):
            report.skipped.append((name, f"its {type(bn).__name__} cannot be split: {after}"))
            continue
        new_block = _new_block(block_cls.from_conv_bn, block, options, m, bn)
        new_block.train(m.training)
        _set_module(model, name, new_block)
        if isinstance(after, nn.Identity):
            template = None if type(bn) in _BN_TYPES else copy.deepcopy(bn)
            slot = BNSlot(new_block, _conv_config(m), _bn_config(bn), template)
        else:
            slot = NormActSlot(new_block, _conv_config(m), _bn_config(bn), after, copy.deepcopy(bn))
        _set_module(model, bn_name, slot.train(bn.training))
        report.converted.append(name)
    if log_summary:
        log.info("convert: %s", report.summary())
    return model


# --------------------------------------------------------------------------------------------------
# fuse


def _conv_with_kernel(config: dict[str, Any], weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    conv = nn.Conv2d(**{**config, "bias": bias is not None}).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def _restore_conv_bn(fused: nn.Conv2d, slot: BNSlot) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """Split a fused conv (W, b) into conv + BN in the layout recorded by ``slot``, with equal outputs.

    The BN gets running_mean 0 and running_var 1, so in eval mode it scales by 1/sqrt(1 + eps):
    its weight (or, without affine, the conv kernel) carries sqrt(1 + eps) and its bias (or running
    mean) carries b. Computed in float64.
    """
    cfg = slot.bn_config
    w = fused.weight.detach().double()
    b = fused.bias.detach().double()
    c = math.sqrt(1.0 + cfg["eps"])
    bn = nn.BatchNorm2d(**cfg, device=w.device, dtype=torch.float64)
    dtype = fused.weight.dtype
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        if cfg["affine"]:
            bn.weight.fill_(c)
            bn.bias.copy_(b)
        else:
            w = w * c
            bn.running_mean.copy_(-b * c)
    bn = bn.to(dtype=dtype)
    conv_bias = torch.zeros_like(b) if slot.conv_config["bias"] else None
    conv = _conv_with_kernel(
        slot.conv_config, w.to(dtype), None if conv_bias is None else conv_bias.to(dtype)
    )
    return conv, bn


def _fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """One conv with bias equal to ``bn(conv(x))`` in eval mode (float64 maths)."""
    with torch.no_grad():
        bias = conv.bias.double() if conv.bias is not None else None
        weight, bias = fold_bn(conv.weight.double(), copy.deepcopy(bn).double(), bias)
    dtype = conv.weight.dtype
    return _conv_with_kernel(_conv_config(conv), weight.to(dtype), bias.to(dtype))


def fuse(model: nn.Module, *, fold_bn: bool = False, inplace: bool = False) -> nn.Module:
    """Turn every re-parameterisable block back into a plain conv (+ BN), for deployment.

    Each block that ``convert`` created becomes conv + BN laid out exactly as before ``convert``, so the
    state dict loads with ``strict=True`` into the untouched base model. Blocks made from bare convs
    (``bare_convs=True``) and blocks put into a model by hand become one conv with bias: the base layout
    plus a bias on the convs ``added_biases(model)`` names. With ``fold_bn=True`` every conv -> BN pair (converted or not) becomes one
    conv with bias and the BN an ``nn.Identity``: the fastest inference, no longer the base layout.
    Running statistics are used whatever the model's mode; the result keeps that mode.
    """
    if not inplace:
        model = copy.deepcopy(model)
    slots = {id(m.block): name for name, m in model.named_modules() if isinstance(m, BNSlot)}
    blocks = [
        (name, m)
        for name, m in model.named_modules()
        if name and callable(getattr(m, "fused_conv_module", None)) and not isinstance(m, nn.Conv2d)
    ]
    for name, block in blocks:
        fused = block.fused_conv_module()
        slot_name = slots.get(id(block))
        if slot_name is None:
            _set_module(model, name, fused)
            continue
        slot = model.get_submodule(slot_name)
        if fold_bn:
            _set_module(model, name, fused)
            _set_module(model, slot_name, slot.tail if isinstance(slot, NormActSlot) else nn.Identity())
        else:
            conv, bn = _restore_conv_bn(fused, slot)
            bn = slot.restore(bn)
            _set_module(model, name, conv.train(block.training))
            _set_module(model, slot_name, bn.train(block.training))
    if fold_bn:
        for conv_name, bn_name in _conv_bn_flow(model).pairs:
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
            after = _after_norm(bn)
            if isinstance(after, str):  # a norm-act layer that cannot be split stays as it is
                continue
            _set_module(model, conv_name, _fold_conv_bn(conv, bn).train(conv.training))
            _set_module(model, bn_name, after.train(bn.training))
    return model


def added_biases(model: nn.Module) -> list[str]:
    """Names of the convs to which ``fuse(model)`` adds a bias the base model's conv does not have.

    These are the bare convs that ``convert(..., bare_convs=True)`` turned into blocks and that had no
    bias: the fused model is the base architecture plus a bias on exactly these convs.
    """
    return [
        name
        for name, m in model.named_modules()
        if getattr(m, _BARE_CONV, None) is not None and not getattr(m, _BARE_CONV)["bias"]
    ]


def add_conv_biases(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Give each named ``nn.Conv2d`` of ``model`` a zero bias, in place: the layout of ``added_biases``.

    With it a base model takes the state dict of a model fused after ``convert(..., bare_convs=True)``.
    ValueError when a name is not a bias-free ``nn.Conv2d`` of ``model``.
    """
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
    return sum(1 for m in model.modules() if callable(getattr(m, "fused_conv_module", None)))
