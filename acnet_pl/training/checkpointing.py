"""Checkpoints a run can always resume from: atomic writes, last.ckpt every epoch, RNG state, resume checks."""

from __future__ import annotations

import logging
import os
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from acnet_pl.deploy.record import DEPLOY_FORMAT
from acnet_pl.launch.preemption import resume_candidates
from acnet_pl.utils.files import atomic_torch_save
from acnet_pl.utils.loading import load_weights_only, state_dict_error

log = logging.getLogger(__name__)

#: `ckpt_path` values Lightning resolves itself instead of reading a file.
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")
#: The fix named by every resume-checkpoint message.
RESUME_HINT = "give a training checkpoint of this model (<run dir>/checkpoints/last.ckpt), or ckpt_path=null to start anew"
#: np.random.get_state()'s tuple, as the named entries a checkpoint holds.
_NUMPY_STATE = ("name", "keys", "pos", "has_gauss", "cached_gaussian")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (read-only or full disk, a path that cannot be a folder)."""


def _write_error(path: str | os.PathLike, error: OSError) -> CheckpointWriteError:
    reason = error.strerror or str(error) or type(error).__name__
    return CheckpointWriteError(
        f"cannot write checkpoint {path}: {reason}; free disk space or make {Path(path).parent} writable, "
        "or write checkpoints elsewhere (callbacks.model_checkpoint.dirpath=..., "
        "callbacks.last_checkpoint.dirpath=...)"
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that writes `path` through a temp file in the same dir: fsync, then rename.

    Lightning's own atomic save stages the bytes in the system temp dir: on another filesystem the move is
    a copy, which a kill truncates. Here a kill leaves the previous checkpoint and at most a hidden
    `.<name>.<random>.tmp` beside it (removed by `LastCheckpoint`). Remote paths are left to Lightning.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path) or storage_options is not None:  # Lightning's: refuses storage_options
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        try:
            atomic_torch_save(checkpoint, path)
        except OSError as error:
            raise _write_error(path, error) from None


def check_writable(dirpath: str | os.PathLike) -> None:
    """CheckpointWriteError (one line) unless files can be created in `dirpath` (a missing dir: its nearest
    existing parent); leaves nothing behind."""
    path = Path(dirpath).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())  # "/" at the latest
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(existing))
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise _write_error(path / "last.ckpt", error) from None


def remove_partial_writes(dirpath: str | os.PathLike) -> list[Path]:
    """Delete the temp files of checkpoint writes a kill interrupted (`.<name>.ckpt.*.tmp`); return them."""
    removed = list(Path(dirpath).glob(".*.ckpt.*.tmp"))  # none in a missing dir
    for tmp in removed:
        tmp.unlink(missing_ok=True)
    return removed


class LastCheckpoint(ModelCheckpoint):
    """`<dirpath>/last.ckpt` at every epoch end (after validation) and when a stop signal ends the run.

    Lightning's `save_last=True` rewrites it only with a new top-k checkpoint. Only a stop signal saves on
    an exception, so a crash or a diverged run never overwrites the last good checkpoint.
    """

    def __init__(self, dirpath: str | os.PathLike, filename: str = "last", **kwargs: Any) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=None,
            save_top_k=1,
            save_last=False,
            enable_version_counter=False,
            save_on_exception=True,
            **kwargs,
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the dir can be written and drop temp files of writes a kill interrupted (rank zero)."""
        super().setup(trainer, pl_module, stage)
        if self.dirpath is not None:
            # Where last.ckpt is (what the fuse report names as its source), as ModelCheckpoint(save_last=True).
            self.last_model_path = self.format_checkpoint_name({})
        if trainer.is_global_zero and self.dirpath is not None:
            check_writable(self.dirpath)
            for tmp in remove_partial_writes(self.dirpath):
                log.info(f"removed {tmp.name}, the temp file of an interrupted checkpoint write")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Save only when a stop signal ended training."""
        if isinstance(exception, SIGTERMException):
            super().on_exception(trainer, pl_module, exception)


class RandomState(Callback):
    """The global random states (torch, CUDA, numpy, python) in every checkpoint, restored on resume.

    Lightning restores the loops and a DistributedSampler's epoch, not these: a resumed run would draw a new
    shuffle and new augmentations. Callbacks are restored before the training data are iterated, and the
    sanity check runs in `isolate_rng`, so the next epoch draws what the uninterrupted run drew. Every rank
    restores rank zero's state. Not reproduced: the rest of an epoch after a mid-epoch (stop signal)
    checkpoint, and worker state kept by `persistent_workers=true`.
    """

    def state_dict(self) -> dict[str, Any]:
        """The random states now (at the save)."""
        numpy = dict(zip(_NUMPY_STATE, np.random.get_state(), strict=True))
        # A tensor, not an ndarray: checkpoints must stay loadable with torch.load(weights_only=True).
        numpy["keys"] = torch.from_numpy(numpy["keys"].astype(np.int64))
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": numpy,
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the saved random states (CUDA only with as many devices)."""
        if not state_dict:
            return
        torch.set_rng_state(state_dict["torch"])
        cuda = list(state_dict.get("cuda") or [])
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        numpy = {**state_dict["numpy"], "keys": state_dict["numpy"]["keys"].numpy().astype(np.uint32)}
        np.random.set_state(tuple(numpy[key] for key in _NUMPY_STATE))
        python = state_dict["python"]
        # A checkpoint read back holds lists where random.getstate() gave tuples.
        random.setstate((python[0], tuple(python[1]), python[2]))


def _block_name(hparams: Mapping[str, Any]) -> str:
    return (hparams.get("block") or {}).get("name", "base")


def _describe(hparams: Mapping[str, Any]) -> str:
    model = hparams.get("model") or {}
    return f"{model.get('name')} with block {_block_name(hparams)}, {model.get('num_classes')} classes"


def check_resume_checkpoint(path: str | os.PathLike, module: L.LightningModule) -> None:
    """ValueError (one line naming `path` and the fix) unless `path` is a training checkpoint of `module`."""
    ckpt = load_weights_only(Path(path), what="checkpoint", hint=RESUME_HINT)
    theirs = (ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
    ours = dict(module.hparams)
    if not isinstance(ckpt, dict):
        problem = f"holds a {type(ckpt).__name__}, not a training checkpoint"
    elif ckpt.get("format") == DEPLOY_FORMAT:
        problem = "a deploy file (fused weights only), not a training checkpoint"
    elif not isinstance(ckpt.get("state_dict"), dict) or not {"loops", "optimizer_states"} <= ckpt.keys():
        lacks = "state_dict" if "state_dict" not in ckpt else "optimizer and loop states"
        problem = f"not a resumable training checkpoint (it lacks the {lacks})"
    # model and block name (block options that change the layout, e.g. kernel_sizes, show as shapes below)
    elif "model" in theirs and (theirs["model"], _block_name(theirs)) != (
        ours.get("model"),
        _block_name(ours),
    ):
        problem = f"a checkpoint of {_describe(theirs)}, but this run builds {_describe(ours)}"
    else:  # shapes: a mismatch here is what load_state_dict would report as a many-line traceback
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items() if isinstance(v, torch.Tensor)}
        missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
        if not (missing or unexpected or wrong):
            return
        detail = f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {wrong[:3]}"
        problem = f"its weights do not fit {_describe(ours)} ({state_dict_error(RuntimeError(detail))})"
    raise ValueError(f"ckpt_path={path}: {problem}; {RESUME_HINT}")


def check_ckpt_path(ckpt_path: str | None) -> None:
    """FileNotFoundError when `ckpt_path` is neither a file nor one Lightning resolves (last, best, ...)."""
    if ckpt_path is None or ckpt_path in SPECIAL_CKPT_PATHS:
        return
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path} is not a file; give a checkpoint to resume from, "
            "such as <run dir>/checkpoints/last.ckpt"
        )


def checkpoint_dirs(cfg: DictConfig) -> list[str]:
    """The `dirpath` of every configured checkpoint callback (ModelCheckpoint, LastCheckpoint) that saves."""
    return [
        str(c.dirpath)
        for c in (cfg.get("callbacks") or {}).values()
        if isinstance(c, DictConfig)
        and c.get("dirpath")
        and "Checkpoint" in str(c.get("_target_", ""))
        and c.get("save_top_k", 1) != 0
    ]


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """`cfg.ckpt_path`, or else the newest checkpoint already in the run dir (a requeued or rerun job).

    Looked for: `last*.ckpt` in every checkpoint callback's `dirpath` and SLURM's `hpc_ckpt_<n>.ckpt` in
    `trainer.default_root_dir`; the most recently written wins (Lightning's rule for `ckpt_path="last"`).
    """
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None:
        return str(ckpt_path)
    root = cfg.trainer.get("default_root_dir") or cfg.paths.output_dir
    existing = [p for p in resume_candidates(checkpoint_dirs(cfg), root) if p.is_file()]
    if not existing:
        return None
    newest = max(existing, key=lambda p: p.stat().st_mtime_ns)
    message = f"resuming from {newest}: the newest checkpoint in this run dir (requeued or rerun job)"
    rank_zero_only(log.info)(message)
    return str(newest)


def last_checkpoint(trainer: L.Trainer) -> str | None:
    """Where the trainer's last.ckpt goes (LastCheckpoint, or save_last=True); None without one."""
    ckpts = getattr(trainer, "checkpoint_callbacks", None) or []
    return next((c.last_model_path for c in ckpts if getattr(c, "last_model_path", "")), None)


def stop_checkpoints(trainer: L.Trainer) -> list[Path]:
    """Where `LastCheckpoint` callbacks save when a stop signal ends training."""
    return [
        Path(cb.dirpath) / f"{cb.filename}{cb.FILE_EXTENSION}"
        for cb in trainer.callbacks
        if isinstance(cb, LastCheckpoint) and cb.dirpath
    ]
