"""``deploy.pt``: plain containers and CPU tensors (``weights_only=True``) whose weights fit the base model."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from acnet_pl.deploy.verification import nonfinite_entries, nonfinite_message
from acnet_pl.models import build_model, default_input_size
from acnet_pl.reparam import add_conv_biases, fuse
from acnet_pl.utils.config import to_plain
from acnet_pl.utils.loading import load_weights_only, state_dict_error

DEPLOY_FORMAT = "acnet-pl-deploy"
#: Version 2 added ``added_biases`` (convs of the base model that carry a bias in the deploy file).
DEPLOY_VERSION = 2


def make_deploy_record(
    state_dict: dict[str, torch.Tensor],
    *,
    model_name: str,
    num_classes: int,
    block: dict[str, Any],
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str] | None = None,
    source: str | None = None,
    fold_bn: bool = False,
    added_biases: Sequence[str] = (),
    pretrained_from: str | None = None,
) -> dict[str, Any]:
    """The ``deploy.pt`` payload.

    Args:
        added_biases: convs that carry a bias the base model's conv has not (``reparam.added_biases``).
        pretrained_from: the weights file the training started from (``model.weights``), if any.
    """
    added_biases = [str(name) for name in added_biases]
    layout = "conv+bias (BN folded)" if fold_bn else "base model (conv + BatchNorm)"
    if added_biases:
        layout += f", plus a bias on {len(added_biases)} bare convs (listed in added_biases)"
    return {
        "format": DEPLOY_FORMAT,
        "version": DEPLOY_VERSION,
        "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
        "model": {"name": str(model_name), "num_classes": int(num_classes)},
        "block": to_plain(block),
        "fold_bn": bool(fold_bn),
        "layout": layout,
        "added_biases": added_biases,
        "input_size": [int(v) for v in input_size],
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "class_names": None if class_names is None else [str(c) for c in class_names],
        "source": None if source is None else str(source),
        "pretrained_from": pretrained_from,
    }


def data_meta(data: Mapping[str, Any] | None, model_name: str) -> dict[str, Any]:
    """The ``input_size``, ``mean``, ``std`` and ``class_names`` of ``data`` (a checkpoint's ``data``
    hyperparameters, a deploy record); gaps: the model's default input size, mean 0, std 1."""
    data = dict(data or {})
    input_size = [int(v) for v in (data.get("input_size") or default_input_size(model_name))]
    return {
        "input_size": input_size,
        "mean": list(data.get("mean") or [0.0] * input_size[0]),
        "std": list(data.get("std") or [1.0] * input_size[0]),
        "class_names": data.get("class_names"),
    }


_DEPLOY_HINT = "give the path of a deploy.pt written by train.py or deploy.py"


def check_deploy_record(record: Any, path: str | os.PathLike = "deploy record") -> dict[str, Any]:
    """``record`` when it is a deploy record this acnet-pl reads; ValueError (naming ``path``) otherwise."""
    if not isinstance(record, dict) or record.get("format") != DEPLOY_FORMAT:
        raise ValueError(f"{path}: not an acnet-pl deploy file (no format={DEPLOY_FORMAT!r} entry)")
    version = record.get("version", 0)
    if not isinstance(version, int) or version > DEPLOY_VERSION:
        raise ValueError(f"{path}: deploy format version {version!r} is newer than this acnet-pl reads")
    model = record["model"] if isinstance(record.get("model"), dict) else {}
    if not isinstance(model.get("name"), str) or type(model.get("num_classes")) is not int:  # not bool
        raise ValueError(
            f"{path}: deploy file has no valid 'model' entry {{'name': str, 'num_classes': int}}"
        )
    state_dict = record.get("state_dict")
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path}: deploy file has no 'state_dict' of tensors")
    added = record.get("added_biases", [])
    if not isinstance(added, list) or not all(isinstance(name, str) for name in added):
        raise ValueError(f"{path}: deploy file's 'added_biases' is not a list of conv names")
    return record


def read_deploy_record(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a ``deploy.pt``; FileNotFoundError / ValueError say what is wrong with it."""
    return check_deploy_record(load_weights_only(path, what="deploy file", hint=_DEPLOY_HINT), path)


def build_deploy_model(record: dict[str, Any]) -> nn.Module:
    """The base model a deploy record's state dict fits: biases on ``added_biases``, BN folded if ``fold_bn``."""
    model = build_model(record["model"]["name"], num_classes=record["model"]["num_classes"], block="base")
    add_conv_biases(model, record.get("added_biases", []))
    if record.get("fold_bn"):
        model = fuse(model, fold_bn=True, inplace=True)
    return model


def model_from_record(record: dict[str, Any], path: str | os.PathLike = "deploy record") -> nn.Module:
    """The ready ``nn.Module`` (eval mode, CPU) of a checked deploy record; ValueError names ``path``."""
    bad = nonfinite_entries(record["state_dict"])
    if bad:
        raise ValueError(
            f"{path}: weights are not finite, {nonfinite_message(bad, len(record['state_dict']))}: "
            "the model outputs NaN (its training diverged); deploy a checkpoint from before the divergence"
        )
    try:
        model = build_deploy_model(record)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    try:
        model.load_state_dict(record["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{path}: weights do not fit model {record['model']['name']!r} "
            f"(num_classes={record['model']['num_classes']}): {state_dict_error(err)}"
        ) from None
    return model.eval()


def load_deployed(path: str | os.PathLike) -> nn.Module:
    """The ready ``nn.Module`` (eval mode, CPU) of a ``deploy.pt`` written by train.py or deploy.py."""
    return model_from_record(read_deploy_record(path), path)
