"""Deploy files: the ``deploy.pt`` format, atomic writes, model statistics, loading a deployed model."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEPLOY_FORMAT = "acnet-pl-deploy"
DEPLOY_VERSION = 1


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write through ``write(tmp_path)`` into a temp file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` that never leaves a half-written file at ``path``."""
    return _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` atomically (temp file + rename)."""
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def model_stats(model: nn.Module, input_size: Sequence[int]) -> dict[str, int]:
    """Parameter count and FLOPs (2 per multiply-add, torch's FlopCounterMode) of one eval forward pass.

    Args:
        input_size: (C, H, W) of one sample.
    """
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    ref = next(model.parameters(), None)
    x = torch.zeros(
        1,
        *input_size,
        device=ref.device if ref is not None else "cpu",
        dtype=ref.dtype if ref is not None else None,
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return {"params": int(params), "flops": int(counter.get_total_flops())}


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
) -> dict[str, Any]:
    """The ``deploy.pt`` payload: plain containers and CPU tensors, loadable with ``weights_only=True``."""
    return {
        "format": DEPLOY_FORMAT,
        "version": DEPLOY_VERSION,
        "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
        "model": {"name": str(model_name), "num_classes": int(num_classes)},
        "block": _plain(block),
        "fold_bn": bool(fold_bn),
        "layout": "conv+bias (BN folded)" if fold_bn else "base model (conv + BatchNorm)",
        "input_size": [int(v) for v in input_size],
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "class_names": None if class_names is None else [str(c) for c in class_names],
        "source": None if source is None else str(source),
    }


def _plain(value: Any) -> Any:
    """Turn OmegaConf containers, tuples and other mappings into plain dict/list/scalars."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_deploy_record(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a ``deploy.pt``; FileNotFoundError / ValueError say what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file; give the path of a deploy.pt written by train.py or deploy.py"
        )
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any load failure is a bad file for the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a readable deploy file ({first[:200]})") from None
    if not isinstance(record, dict) or record.get("format") != DEPLOY_FORMAT:
        raise ValueError(f"{path}: not an acnet-pl deploy file (no format={DEPLOY_FORMAT!r} entry)")
    if record.get("version", 0) > DEPLOY_VERSION:
        raise ValueError(
            f"{path}: deploy format version {record['version']} is newer than this acnet-pl reads"
        )
    return record


def build_deploy_model(record: dict[str, Any]) -> nn.Module:
    """The base architecture a deploy record's state dict belongs to (BN folded when the record says so)."""
    from acnet_pl.models import build_model
    from acnet_pl.reparam import fuse

    model = build_model(record["model"]["name"], num_classes=record["model"]["num_classes"], block="base")
    if record.get("fold_bn"):
        model = fuse(model, fold_bn=True, inplace=True)
    return model


def load_deployed(path: str | os.PathLike) -> nn.Module:
    """The ready ``nn.Module`` (eval mode) of a ``deploy.pt`` written by train.py or deploy.py."""
    record = read_deploy_record(path)
    model = build_deploy_model(record)
    try:
        model.load_state_dict(record["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{path}: weights do not fit model {record['model']['name']!r}: {str(err).splitlines()[0]}"
        ) from None
    return model.eval()
