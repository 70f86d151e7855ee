"""Augmentation as config: `data.augment` is a preset name or a list of preset names and Hydra configs of
torchvision v2 transforms (`{_target_: torchvision.transforms.v2.ColorJitter, brightness: 0.4}`); random
erasing; MixUp/CutMix of whole batches (soft targets). The presets are the original's geometry (crop: digits,
whose meaning a flip would change; cifar; imagenet), then optionally a policy on the data set's own geometry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchvision.transforms import v2

V2 = "torchvision.transforms.v2."
PRESETS = ("none", "crop", "cifar", "imagenet", "randaugment", "trivialaugment")


def v2_config(name: str, **kwargs: Any) -> dict[str, Any]:
    """The `_target_` config of torchvision's v2 transform `name`."""
    return {"_target_": V2 + name, **kwargs}


def preset_configs(name: str, image_size: int, own: str) -> list[dict[str, Any]]:
    """The transform configs of preset `name`; `own` is the data set's own preset (for the policies)."""
    flip = v2_config("RandomHorizontalFlip")
    geometric = {
        "none": [],
        "crop": [v2_config("RandomCrop", size=image_size, padding=image_size // 8)],
        "cifar": [v2_config("RandomCrop", size=image_size, padding=4), flip],
        "imagenet": [v2_config("RandomResizedCrop", size=image_size, antialias=True), flip],
    }
    policies = {"randaugment": "RandAugment", "trivialaugment": "TrivialAugmentWide"}
    if name in geometric:
        return geometric[name]
    if name in policies:
        return [*geometric[own], v2_config(policies[name])]
    raise ValueError(
        f"data.augment={name}: no such preset; choose one of {', '.join(PRESETS)}, or give a list of "
        f"presets and {{_target_: torchvision.transforms.v2.<Transform>, ...}} configs"
    )


def resolve_augment(augment: str | Sequence[Any], image_size: int, own: str) -> list[Any]:
    """`data.augment` as a list of configs; items that are transforms already (from Python) are kept."""
    if isinstance(augment, str):
        return preset_configs(augment, image_size, own)
    if isinstance(augment, Mapping) or not isinstance(augment, Sequence):
        raise ValueError(
            f"data.augment must be a preset name or a list, got {augment!r}; e.g. data.augment=randaugment"
        )
    configs: list[Any] = []
    for item in augment:
        if isinstance(item, str):
            configs += preset_configs(item, image_size, own)
        elif isinstance(item, Mapping) and "_target_" in item:
            configs.append(dict(item))
        elif callable(item) and not isinstance(item, Mapping):
            configs.append(item)
        else:
            raise ValueError(
                f"data.augment: each item must be a preset name or a config with a _target_, got {item!r}"
            )
    return configs


def instantiate_transforms(configs: Sequence[Any]) -> list[Callable]:
    """The transforms of `configs` (Hydra's instantiate); ValueError naming the config that fails."""
    transforms = []
    for config in configs:
        if not isinstance(config, Mapping):
            transforms.append(config)  # a transform object already
            continue
        try:
            transforms.append(instantiate(OmegaConf.create(dict(config))))
        except Exception as error:  # import errors and wrong arguments alike are config mistakes
            cause = error.__cause__ or error
            raise ValueError(
                f"data.augment: cannot build {config.get('_target_')} ({type(cause).__name__}: "
                f"{' '.join(str(cause).split())}); check the name and arguments of that transform"
            ) from None
    return transforms


def random_erasing(probability: float) -> list[Callable]:
    """RandomErasing with `probability` (erased pixels set to 0, the mean after normalisation); [] when 0."""
    return [v2.RandomErasing(p=probability, value=0)] if probability > 0 else []


def batch_mix(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> Callable | None:
    """`images, soft_targets = mix(images, labels)` by MixUp and/or CutMix (one of them per batch when both
    are on; targets (N, num_classes) floats); None when both are off."""
    kinds = ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha))
    mixes = [kind(alpha=alpha, num_classes=num_classes) for kind, alpha in kinds if alpha > 0]
    return (mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)) if mixes else None
