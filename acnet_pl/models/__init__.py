"""Model zoo: the CIFAR nets of the ACNet paper, DenseNet-40, and every torchvision and timm model, by name."""

from acnet_pl.models.registry import (
    INITS,
    build_model,
    build_net,
    default_input_size,
    init_weights,
    is_torchvision_model,
    list_models,
    net_summary,
    qualified_name,
)

__all__ = [
    "INITS",
    "build_model",
    "build_net",
    "default_input_size",
    "init_weights",
    "is_torchvision_model",
    "list_models",
    "net_summary",
    "qualified_name",
]
