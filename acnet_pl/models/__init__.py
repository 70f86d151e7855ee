"""Model zoo: torchvision's ImageNet ResNets, the CIFAR nets of the ACNet paper and DenseNet-40, by name."""

from acnet_pl.models.registry import (
    INITS,
    build_model,
    default_input_size,
    init_weights,
    is_torchvision_model,
    list_models,
)

__all__ = [
    "INITS",
    "build_model",
    "default_input_size",
    "init_weights",
    "is_torchvision_model",
    "list_models",
]
