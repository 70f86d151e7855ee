"""The one reader of checkpoints and deploy.pt files (``weights_only=True``), for deploy, evaluate, analyze."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch import LightningDataModule
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from acnet_pl.deploy.record import DEPLOY_FORMAT, check_deploy_record, data_meta, model_from_record
from acnet_pl.deploy.verification import nonfinite_entries, nonfinite_message
from acnet_pl.models import build_net, net_summary
from acnet_pl.reparam import added_biases
from acnet_pl.utils.files import run_dir
from acnet_pl.utils.loading import load_weights_only, state_dict_error

log = logging.getLogger(__name__)

CKPT_HINT = "give ckpt_path=<run>/checkpoints/<name>.ckpt written by train.py, or a deploy.pt to re-deploy"


@dataclass
class Source:
    """A model to deploy, evaluate or analyse, with what the deploy files record about it."""

    path: Path | None  # the file read (the fuse callback: the run's last.ckpt, if any)
    kind: str  # "checkpoint", "deploy" (a deploy.pt) or "training" (the fuse callback's model in memory)
    model: nn.Module  # training form (or a deploy file's layout), eval mode, float32
    model_name: str
    num_classes: int
    block: dict[str, Any]
    input_size: list[int]
    mean: list[float]
    std: list[float]
    class_names: list[str] | None
    folded: bool = False  # BN already folded (a fold_bn deploy.pt)
    added_biases: list[str] = field(default_factory=list)  # convs whose fused form gains a bias
    data_config: dict[str, Any] | None = None
    data_config_origin: str = "no data config stored with the checkpoint"
    epoch: int | None = None  # when the weights were saved
    global_step: int | None = None
    pretrained_from: str | None = None  # the weights file the training started from (model.weights)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint or a (checked) deploy.pt with ``weights_only=True``; ValueError when neither."""
    path = Path(path)
    obj = load_weights_only(path, what="checkpoint", hint=CKPT_HINT)
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path}: not a checkpoint written by train.py (it holds a {type(obj).__name__}); {CKPT_HINT}"
        )
    if obj.get("format") == DEPLOY_FORMAT:
        return check_deploy_record(obj, path)
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{path}: a bare state dict ({len(obj)} tensors, first {next(iter(obj))!r}), not a checkpoint "
            f"written by train.py: it has no hyperparameters to rebuild the model from; {CKPT_HINT}"
        )
    hparams = obj.get("hyper_parameters")
    if not isinstance(obj.get("state_dict"), dict) or not isinstance(hparams, dict):
        raise ValueError(
            f"{path}: not a checkpoint written by train.py (no 'state_dict' and 'hyper_parameters' "
            f"entries; found {sorted(map(str, obj))[:6]}); {CKPT_HINT}"
        )
    model = hparams.get("model")
    if not isinstance(model, dict) or "name" not in model or "num_classes" not in model:
        raise ValueError(
            f"{path}: checkpoint hyperparameters have no model={{'name', 'num_classes'}}: not written by "
            f"acnet-pl's train.py; {CKPT_HINT}"
        )
    return obj


def net_from_checkpoint(ckpt: Mapping[str, Any], *, path: str | os.PathLike = "checkpoint") -> nn.Module:
    """The network of a checkpoint dict (from ``load_checkpoint``), weights loaded strictly, eval mode, CPU."""
    # The checkpoint holds the weights: the file the training started from is not read again.
    model = {k: v for k, v in ckpt["hyper_parameters"]["model"].items() if k != "weights"}
    block = ckpt["hyper_parameters"].get("block") or {"name": "base"}
    try:
        net, report = build_net(model, block)
    except (TypeError, ValueError, KeyError) as err:
        message = " ".join(str(err).split())
        raise ValueError(
            f"{path}: its hyperparameters do not build a model: {message}; {CKPT_HINT}"
        ) from None
    log.info(net_summary(model["name"], report))
    weights = {
        key.removeprefix("model.").replace("_orig_mod.", ""): value
        for key, value in ckpt["state_dict"].items()
        if key.startswith("model.")
    }
    bad = nonfinite_entries(weights)
    if bad:
        raise ValueError(
            f"{path}: weights are not finite, {nonfinite_message(bad, len(weights))}: training had diverged "
            "when this checkpoint was saved; give a checkpoint from before the divergence"
        )
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{path}: weights do not fit {model['name']!r} with block {block.get('name', 'base')!r}: "
            f"{state_dict_error(err)}"
        ) from None
    return net.eval()


def _has_nested_target(value: Any) -> bool:
    if isinstance(value, Mapping):
        return "_target_" in value or any(map(_has_nested_target, value.values()))
    return isinstance(value, list) and any(map(_has_nested_target, value))


def _checked_data_config(config: Any, where: str) -> dict[str, Any]:
    # A config could name any callable (``_target_: os.system``) and the checkpoint may come from someone
    # else: only ``acnet_pl.data.*`` classes are ever instantiated.
    if not isinstance(config, Mapping) or not isinstance(config.get("_target_"), str):
        raise ValueError(f"{where} has no data config with a _target_")
    target = config["_target_"]
    if not target.startswith("acnet_pl.data.") or any(
        _has_nested_target(v) for k, v in config.items() if k != "_target_"
    ):
        raise ValueError(f"{where} names {target!r}; only acnet_pl.data datamodules are instantiated")
    return dict(config)


def stored_data_config(
    path: str | os.PathLike, hparams: Mapping[str, Any]
) -> tuple[dict[str, Any] | None, str]:
    """The datamodule config a model was trained with (from ``hparams["data"]["datamodule"]``, else the run
    dir's ``.hydra/config.yaml``), and where it came from (or why there is none)."""
    data = hparams.get("data") or {}
    if isinstance(data, Mapping) and "datamodule" in data:  # train.py stores its data config there
        where = "the checkpoint's hyperparameters (data.datamodule)"
        try:
            return _checked_data_config(data["datamodule"], where), where
        except ValueError as err:
            return None, str(err)
    run_config = run_dir(path) / ".hydra" / "config.yaml"
    if not run_config.is_file():
        return None, f"no data config stored with the checkpoint (no {run_config})"
    try:
        config = OmegaConf.to_container(OmegaConf.load(run_config).data, resolve=True)
        return _checked_data_config(config, str(run_config)), str(run_config)
    except Exception as err:  # noqa: BLE001 - an unreadable run config only means: no validation data
        return None, f"the data config in {run_config} could not be read: " + " ".join(str(err).split())[:200]


def load_source(path: str | os.PathLike) -> Source:
    """Read ``path`` (training checkpoint or deploy.pt, read once) into a ``Source`` holding the unfused model."""
    path = Path(path)
    obj = load_checkpoint(path)
    if obj.get("format") == DEPLOY_FORMAT:
        kind, hparams, described, data = "deploy", {}, obj, obj
        model = model_from_record(obj, path)
        extra = {
            "folded": bool(obj.get("fold_bn")),
            "added_biases": list(obj.get("added_biases", [])),
            "pretrained_from": obj.get("pretrained_from"),
        }
    else:
        kind, hparams = "checkpoint", obj["hyper_parameters"]
        described, data = hparams, hparams.get("data")
        model = net_from_checkpoint(obj, path=path)
        extra = {
            "added_biases": added_biases(model),
            "epoch": obj.get("epoch"),
            "global_step": obj.get("global_step"),
            "pretrained_from": hparams["model"].get("weights"),
        }
    data_config, origin = stored_data_config(path, hparams)
    name = described["model"]["name"]
    return Source(
        path=path,
        kind=kind,
        model=model.float().eval(),
        model_name=name,
        num_classes=int(described["model"]["num_classes"]),
        block=dict(described.get("block") or {"name": "base"}),
        data_config=data_config,
        data_config_origin=origin,
        **data_meta(data, name),
        **extra,
    )


def stored_datamodule(config: Mapping[str, Any]) -> LightningDataModule:
    """The datamodule of a stored config (from ``stored_data_config``), with no download."""
    if not issubclass(get_class(config["_target_"]), LightningDataModule):
        raise ValueError(f"{config['_target_']} is not a LightningDataModule")
    return instantiate({**config, "download": False} if "download" in config else dict(config))


def validation_loader(
    config: Mapping[str, Any], *, batch_size: int | None = None, num_workers: int | None = None
) -> DataLoader:
    """The validation DataLoader of a stored datamodule config: no download, no pinned memory."""
    datamodule = stored_datamodule(config)
    settings = {"persistent_workers": False, "pin_memory": False}
    for attr, value in {**settings, "num_workers": num_workers, "val_batch_size": batch_size}.items():
        if value is not None and hasattr(datamodule, attr):
            setattr(datamodule, attr, value)
    datamodule.setup("validate")
    return datamodule.val_dataloader()
