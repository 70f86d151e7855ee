"""Model zoo: torchvision's ImageNet ResNets and the CIFAR nets of the ACNet paper, by name."""

from acnet_pl.models.registry import build_model, default_input_size, is_torchvision_model, list_models

__all__ = ["build_model", "default_input_size", "is_torchvision_model", "list_models"]
