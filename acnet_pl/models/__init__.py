"""Model zoo: the CIFAR nets of the ACNet paper, DenseNet-40, and every torchvision and timm model, by name."""

from acnet_pl.models.registry import (
    INITS,
    build_model,
    default_input_size,
    init_weights,
    is_torchvision_model,
    list_models,
    qualified_name,
)

__all__ = [
    "INITS",
    "build_model",
    "default_input_size",
    "init_weights",
    "is_torchvision_model",
    "list_models",
    "qualified_name",
]
