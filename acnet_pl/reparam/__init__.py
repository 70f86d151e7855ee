"""The two graph transforms of ACNet: ``convert`` (conv + BN -> block) and ``fuse`` (block -> conv + BN)."""

from acnet_pl.reparam.conversion import ConversionReport, convert
from acnet_pl.reparam.fusion import add_conv_biases, added_biases, count_blocks, fuse
from acnet_pl.reparam.slots import BNSlot, NormActSlot

__all__ = [
    "BNSlot",
    "ConversionReport",
    "NormActSlot",
    "add_conv_biases",
    "added_biases",
    "convert",
    "count_blocks",
    "fuse",
]
