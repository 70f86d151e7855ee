"""Where the conv -> BN pairs are (a torch.fx trace, child by child where needed), and the module surgery
``convert`` and ``fuse`` share."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

#: Batch norms whose whole forward is the normalisation (folded away: nn.Identity), as are subclasses
#: that keep that forward, e.g. Lightning's `_BatchNormXd`, what SyncBatchNorm becomes after fit
#: (tests/test_reparam.py pins that revert). A conv is paired with any `_BatchNorm` subclass,
#: norm-act layers included (see `after_norm`).
BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)
_BATCH_NORM_FUNCTIONS = (F.batch_norm, torch.batch_norm)
_PLAIN_BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


def is_block(module: nn.Module) -> bool:
    """A re-parameterisable block, found by duck typing (timm's way): it has a callable ``fused_conv_module``."""
    return callable(getattr(module, "fused_conv_module", None)) and not isinstance(module, nn.Conv2d)


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``name`` of ``root`` (attributes and Sequential/ModuleList indices alike)."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[attr] = new


class _Tracer(torch.fx.Tracer):
    """Keeps blocks and the given ``opaque`` modules (whose forward cannot be traced) as leaves."""

    def __init__(self, opaque: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # A BatchNorm subclass (timm's BatchNormAct2d: BN -> drop -> act) is one node, so the conv before
        # it is seen to feed a BatchNorm; _norm_act_tail splits off what it does after normalising.
        if id(m) in self.opaque or is_block(m) or isinstance(m, nn.modules.batchnorm._BatchNorm):
            return True
        return super().is_leaf_module(m, qualname)


def _norm_act_tail(bn: nn.Module) -> torch.fx.GraphModule | str:
    """What ``bn.forward`` does after its one ``F.batch_norm`` call (every node the output needs, the
    normalised tensor the only input: the layer's act and drop, not its input nor its BN state), as a
    module; or why it cannot be split off (a string)."""
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


def after_norm(bn: nn.Module) -> nn.Module | str:
    """What replaces ``bn`` once its normalisation is folded away: nothing (``nn.Identity``) for a plain
    BatchNorm, the tail for a norm-act layer (a traced ``GraphModule``), or why it has none (a string)."""
    plain = type(bn) in BN_TYPES or type(bn).forward in _PLAIN_BN_FORWARDS  # e.g. Lightning's _BatchNormXd
    return nn.Identity() if plain else _norm_act_tail(bn)


@dataclass
class Flow:
    """The conv -> BN data flow of a model, by module name."""

    pairs: list[tuple[str, str]] = field(default_factory=list)  # (conv name, bn name)
    not_paired: dict[str, str] = field(default_factory=dict)  # conv name -> why not
    untraced: list[tuple[str, str]] = field(default_factory=list)  # (module name, error)
    seen: set[str] = field(default_factory=set)  # convs inside a traced forward

    def merge(self, other: Flow) -> None:
        self.pairs += other.pairs
        self.not_paired.update(other.not_paired)
        self.untraced += other.untraced
        self.seen |= other.seen


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _trace_flow(module: nn.Module, prefix: str, flow: Flow) -> bool:
    """Add the conv -> BN data flow inside ``module`` to ``flow``; False when its forward did not trace.

    A module that does not trace is looked into child by child, then traced once more with the children
    that failed as opaque leaves, so its own pairs (and those across its children) are still found.
    """
    try:
        _analyse(module, prefix, _Tracer().trace(module), flow)
        return True
    except Exception:  # noqa: BLE001 - any tracing failure means "look inside instead"
        pass
    opaque, traced_children = set(), Flow()
    for name, child in module.named_children():
        sub = Flow()
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


def _analyse(module: nn.Module, prefix: str, graph: torch.fx.Graph, flow: Flow) -> None:
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    for node in graph.nodes:
        if node.op != "call_module" or type(module.get_submodule(node.target)) is not nn.Conv2d:
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


def conv_bn_flow(model: nn.Module) -> Flow:
    """Every ``nn.Conv2d`` of ``model`` whose output goes only into a BatchNorm (``pairs``), and why the others do not."""
    flow = Flow()
    _trace_flow(model, "", flow)
    for name, m in model.named_modules():
        if type(m) is nn.Conv2d and name not in flow.seen:
            flow.not_paired[name] = "inside a module that could not be traced"
    return flow
