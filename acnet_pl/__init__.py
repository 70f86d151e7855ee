"""acnet-pl: Asymmetric Convolution Blocks for any CNN, with PyTorch Lightning and Hydra."""

from acnet_pl.blocks import ACBlock
from acnet_pl.reparam import ConversionReport, convert, fuse

__all__ = ["ACBlock", "ConversionReport", "convert", "fuse", "build_model", "list_models", "load_deployed"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so that `import acnet_pl` stays light (no torchvision model zoo / export deps at import time).
    if name in ("build_model", "list_models"):
        from acnet_pl import models

        return getattr(models, name)
    if name == "load_deployed":
        from acnet_pl.export import load_deployed

        return load_deployed
    raise AttributeError(f"module 'acnet_pl' has no attribute {name!r}")
