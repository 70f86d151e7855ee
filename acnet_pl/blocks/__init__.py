"""Re-parameterisable blocks: plain nn.Modules, no training code."""

from acnet_pl.blocks.acb import ACBlock

__all__ = ["ACBlock"]
