"""acnet-pl: Asymmetric Convolution Blocks for any CNN, with PyTorch Lightning and Hydra."""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.2.0"

# Where each public name lives. Loaded on first use, so the CLIs' argument checks (`acnet_pl.cli.common`,
# `acnet_pl.launch.overrides`) answer before torch is imported.
_EXPORTS = {
    "ACBlock": "acnet_pl.blocks",
    "DBBlock": "acnet_pl.blocks",
    "list_blocks": "acnet_pl.blocks",
    "register_block": "acnet_pl.blocks",
    "ConversionReport": "acnet_pl.reparam",
    "convert": "acnet_pl.reparam",
    "fuse": "acnet_pl.reparam",
    "build_model": "acnet_pl.models",
    "list_models": "acnet_pl.models",
    "load_deployed": "acnet_pl.deploy.record",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'acnet_pl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
