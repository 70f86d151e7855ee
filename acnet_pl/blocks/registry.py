"""The block registry and ``ReparamBlock``, the protocol ``convert`` and ``fuse`` rely on.

A name of the form ``"package.module:ClassName"`` imports that module and uses that class (registered or
not), so a block outside this package works in configs and checkpoints (README "Add your own block").
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class ReparamBlock(Protocol):
    """What ``convert`` and ``fuse`` rely on (docs/DESIGN.md "Block protocol"); nothing else is assumed.

    The module tree (hence the state dict) of ``from_conv_bn(conv, bn, **options)`` depends only on the
    conv's and BN's configuration and ``options``, so a checkpoint of a converted model loads into the
    same model converted again. Optional: ``unsupported_reason(conv)``, ``from_conv(conv, **options)``
    (bare convs), ``branch_norms()``; ``blocks.base.ReparamConvBlock`` has them all.
    """

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.Module, **options: Any) -> nn.Module:
        """A block (``conv``'s device and dtype) equal to ``bn(conv(x))`` in one branch."""
        ...

    def fused_conv_module(self) -> nn.Conv2d:
        """A new ``nn.Conv2d`` with bias equal to the block in eval mode, computed in float64."""
        ...


_BLOCKS: dict[str, type[nn.Module]] = {}


def _check_block_class(cls: Any, name: str, error: type[Exception] = TypeError) -> None:
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise error(f"block {name!r} must be an nn.Module subclass, got {cls!r}")
    missing = [
        attr for attr in ("from_conv_bn", "fused_conv_module") if not callable(getattr(cls, attr, None))
    ]
    if missing:
        raise error(
            f"block {name!r} ({cls.__qualname__}) lacks {', '.join(missing)}: "
            "see acnet_pl.blocks.registry.ReparamBlock for what convert and fuse need"
        )


def register_block(name: str):
    """Class decorator: make the block class available as ``convert(model, block=name)``.

    Registering a second class under a taken name is an error (``"base"`` is reserved: the model as
    it is); registering the same class again is a no-op (a module imported twice).
    """
    if not isinstance(name, str) or not name or name == "base" or ":" in name:
        raise ValueError(
            f"block name must be a non-empty string other than 'base' and without ':'; got {name!r}"
        )

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        _check_block_class(cls, name)
        taken = _BLOCKS.get(name)
        # Compare by qualified name too: a module reloaded (importlib.reload, notebooks) makes a new class.
        if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(
                f"block name {name!r} is already taken by {taken.__module__}.{taken.__qualname__}; "
                "choose another name"
            )
        _BLOCKS[name] = cls
        return cls

    return decorator


def list_blocks() -> list[str]:
    """Names of the registered blocks, sorted (``convert`` also accepts ``"base"``: no change)."""
    return sorted(_BLOCKS)


def get_block(name: str) -> type[nn.Module]:
    """The block class of ``name``: a registered name, or ``"package.module:ClassName"`` (imported)."""
    module_name, _, attr = name.partition(":") if isinstance(name, str) else ("", "", "")
    if module_name and attr:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(
                f"block {name!r}: cannot import module {module_name!r} ({err}); "
                "make it importable (pip install it or add its folder to PYTHONPATH)"
            ) from None
        cls = getattr(module, attr, None)
        if cls is None:
            raise ValueError(f"block {name!r}: module {module_name!r} has no {attr!r}")
        _check_block_class(cls, name, ValueError)
        return cls
    cls = _BLOCKS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(
            f"unknown block {name!r}; choose one of: base, {', '.join(list_blocks())} "
            "(or your own as 'package.module:ClassName')"
        )
    return cls
