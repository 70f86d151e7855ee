"""Pretrained weights without a network: a file (``model.weights``) or the library's local cache (``model.pretrained``).

Nothing here downloads: the caches (TORCH_HOME, the Hugging Face hub cache) are only looked into.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision.models as tvm
from torch import nn

from acnet_pl.utils.loading import load_weights_only

log = logging.getLogger(__name__)


def timm_module() -> Any:
    """The timm package (an optional dependency); ValueError with the fix when it is not installed."""
    try:
        import timm
    except ImportError:
        raise ValueError("timm models need timm, which is not installed: pip install timm") from None
    return timm


_HINT = "give a state dict, a torchvision/timm checkpoint or a base-model checkpoint of train.py"


def _torch_hub_file(url: str) -> Path:
    # torch.hub's cache layout: <TORCH_HOME>/hub/checkpoints/<the url's file name> (read at call time)
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def cached_weights(name: str) -> Path:
    """The file of the default pretrained weights of a "torchvision:" / "timm:" model in the local cache.

    FileNotFoundError (one line) when they are not there; ValueError for a model without library weights.
    """
    library, _, plain = name.partition(":")
    looked: list[str] = []
    if library == "torchvision":
        looked.append(str(_torch_hub_file(tvm.get_model_weights(plain).DEFAULT.url)))
        fetch = f"torchvision.models.get_model({plain!r}, weights='DEFAULT')"
    elif library == "timm":
        import huggingface_hub  # comes with timm

        cfg = timm_module().models.get_pretrained_cfg(plain)
        if cfg is None:
            raise FileNotFoundError(f"timm has no pretrained weights for {plain}; give model.weights=<file>")
        if cfg.hf_hub_id:
            repo, _, revision = cfg.hf_hub_id.partition("@")
            filenames = (
                [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
            )
            for filename in filenames:
                found = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision or None)
                if isinstance(found, str):
                    return Path(found)
            looked.append(f"{repo} in {huggingface_hub.constants.HF_HUB_CACHE}")
        if cfg.url:
            looked.append(str(_torch_hub_file(cfg.url)))
        fetch = f"timm.create_model({plain!r}, pretrained=True)"
    else:
        raise ValueError(
            f"model.pretrained=true reads torchvision/timm weights; {name} has none: give model.weights=<file>"
        )
    for path in looked:
        if Path(path).is_file():
            return Path(path)
    raise FileNotFoundError(
        f"no pretrained weights of {name} in the local cache (looked for {' and '.join(looked)}); nothing is "
        f"downloaded here: run {fetch} once where there is a network, or give model.weights=<file>"
    )


def weights_source(name: str, weights: str | os.PathLike | None, pretrained: bool) -> str | None:
    """The file a model starts from: ``weights``, or with ``pretrained`` the library's cached file; or None."""
    if weights is not None and pretrained:
        raise ValueError("give model.weights=<file> or model.pretrained=true, not both")
    if weights is not None:
        return str(Path(weights).resolve())
    return str(cached_weights(name)) if pretrained else None


def _load(path: str | os.PathLike) -> Any:
    # timm's train.py stores its argparse.Namespace: plain data, allowed to the restricted unpickler
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_weights_only(path, what="weights file", hint=_HINT)


def recorded_normalization(path: str | os.PathLike) -> tuple[list[float], list[float]] | None:
    """(mean, std) a train.py checkpoint or deploy.pt records for its weights; None for any other file."""
    if Path(path).suffix == ".safetensors":
        return None
    obj = _load(path)
    if not isinstance(obj, dict):
        return None
    hparams = obj.get("hyper_parameters")
    if isinstance(hparams, dict):
        data = hparams.get("data")
    else:
        data = obj if obj.get("format") == "acnet-pl-deploy" else None
    if not isinstance(data, dict) or data.get("mean") is None:
        return None
    return list(data["mean"]), list(data["std"])


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a file: a state dict (.pt/.pth/.bin/.safetensors), a torchvision/timm checkpoint, a
    train.py checkpoint of a base model or a deploy.pt; read with ``weights_only=True``, one line when not."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors.torch import load_file  # comes with timm, which writes these files

        return load_file(path)
    obj = _load(path)
    if isinstance(obj, dict) and isinstance(obj.get("hyper_parameters"), dict):  # train.py's checkpoint
        block = (obj["hyper_parameters"].get("block") or {}).get("name", "base")
        if block != "base":
            raise ValueError(
                f"{path}: a checkpoint of a block={block} model; its weights in the base model's layout are "
                "the run's deploy/deploy.pt: give model.weights=<run>/deploy/deploy.pt"
            )
        state = obj.get("state_dict", {})
        obj = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    elif isinstance(obj, dict) and obj.get("format") == "acnet-pl-deploy":
        if obj.get("fold_bn") or obj.get("added_biases"):
            raise ValueError(f"{path}: a deploy.pt with BN folded or added biases is not the base layout")
        obj = obj["state_dict"]
    elif isinstance(obj, dict):
        obj = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: holds no weights (no state dict of tensors); {_HINT}")
    # DDP's "module." and torch.compile's "_orig_mod." wrap the model's own names
    return {k.removeprefix("module.").replace("_orig_mod.", ""): v for k, v in obj.items()}


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def load_pretrained(
    model: nn.Module, path: str | os.PathLike, num_classes: int, name: str = "the model"
) -> None:
    """Load the weights of ``path`` into ``model`` (the base model), every tensor matching.

    Only the classifier head may differ, in its number of classes (its outputs are ``num_classes``, the
    file's are not): then it keeps its fresh initialisation, as ``timm.create_model(..., num_classes=n)``,
    and one line says so. Anything else that does not fit is a ValueError naming the keys.
    """
    weights, own = read_state_dict(path), model.state_dict()
    head = [
        k
        for k, v in weights.items()
        if k in own
        and v.shape != own[k].shape
        and own[k].shape[:1] == (num_classes,)
        and v.shape[1:] == own[k].shape[1:]
    ]
    # BN's step counter is absent from some published state dicts (older torchvision files)
    missing = [k for k in own if k not in weights and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in weights if k not in own]
    shapes = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}"
        for k in weights
        if k in own and k not in head and weights[k].shape != own[k].shape
    ]
    found = {"missing": missing, "unexpected": unexpected, "shapes (file vs model)": shapes}
    problems = [f"{what} {_listed(keys)}" for what, keys in found.items() if keys]
    if problems:
        raise ValueError(f"{path}: weights do not fit {name}: {'; '.join(problems)}")
    if head:
        log.info(
            "%s: classifier head %s has %d classes there, %d here: replaced by a new head (trained from scratch)",
            path,
            _listed(head),
            weights[head[0]].shape[0],
            num_classes,
        )
    model.load_state_dict({k: v for k, v in weights.items() if k not in head}, strict=False)
