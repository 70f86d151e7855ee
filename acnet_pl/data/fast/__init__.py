"""The fast paths apart: in-memory training sets batched on the device, JPEGs decoded there (nvJPEG), and
NVIDIA DALI (`acnet_pl.data.fast.dali`, imported only by `data=imagenet_dali`)."""

from acnet_pl.data.fast.device import BatchCropFlip, DeviceBatches, batched_form
from acnet_pl.data.fast.nvjpeg import EncodedImageLoader, collate_encoded, decode_batch

__all__ = [
    "BatchCropFlip",
    "DeviceBatches",
    "batched_form",
    "EncodedImageLoader",
    "collate_encoded",
    "decode_batch",
]
