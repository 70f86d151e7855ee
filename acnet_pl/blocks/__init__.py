"""Re-parameterisable blocks: plain nn.Modules, no training code, and the registry ``convert`` reads."""

from acnet_pl.blocks.acb import ACBlock
from acnet_pl.blocks.base import ReparamConvBlock
from acnet_pl.blocks.dbb import DBBlock
from acnet_pl.blocks.registry import ReparamBlock, get_block, list_blocks, register_block

__all__ = [
    "ACBlock",
    "DBBlock",
    "ReparamBlock",
    "ReparamConvBlock",
    "get_block",
    "list_blocks",
    "register_block",
]
