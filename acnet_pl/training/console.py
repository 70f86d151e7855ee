"""What the console and train.log show: no progress bar outside a terminal, no library noise, run start/end lines."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from acnet_pl.models import qualified_name
from acnet_pl.training.callbacks.fuse import FuseCallback

log = logging.getLogger(__name__)


#: Library output that is not the user's concern in this app (message starts), dropped from logging.
_QUIET_MESSAGES = (
    "💡 Tip: ",  # Lightning advertising its cloud products (litlogger, litmodels) on every run
    "Loading `train_dataloader` to estimate number of stepping batches",  # the cosine schedule asks
    "Trainer already configured with model summary callbacks",  # ours (acnet_pl.launch.model_summary)
)
#: Warnings of library internals that the user cannot act on (regexes of the message start).
_QUIET_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's pytree helper on torch >= 2.10
    r"You're using the WeightAveraging callback with a model that overrides the configure_model",
)


def _not_quiet(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_QUIET_MESSAGES)


def quiet_library_noise() -> None:
    """Silence the library messages and warnings listed above (idempotent; the user's own stay)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_not_quiet)  # added once: addFilter skips a filter it has
    for message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def console_callbacks(callbacks: list[Any], trainer_cfg: Any) -> tuple[list[Any], dict[str, Any]]:
    """The callbacks (and Trainer arguments) for what the console shows: no progress bar outside a terminal
    (a bar prints every frame or only its last; EpochLog's lines tell the story), no summary if disabled."""
    settings: dict[str, Any] = {}
    if not getattr(sys.stdout, "isatty", lambda: False)():
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        settings = {"enable_progress_bar": False}
    if trainer_cfg.get("enable_model_summary") is False:
        callbacks = [c for c in callbacks if not isinstance(c, ModelSummary)]
    return callbacks, settings


def _choice(cfg: DictConfig, group: str, fallback: Any) -> Any:
    """The Hydra choice of a config group (e.g. data=cifar10) when Hydra runs, else `fallback`."""
    choice = HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None
    return fallback if choice is None else choice


@rank_zero_only
def log_run_start(cfg: DictConfig, trainer: Any) -> None:
    """Log the run dir and the choices that make the run (model, block, data, devices, precision, epochs)."""
    run_dir = Path(str(cfg.paths.output_dir)).resolve()
    log.info("run dir: %s", run_dir)
    data = _choice(cfg, "data", str(cfg.data.get("_target_", "?")).rsplit(".", 1)[-1])
    experiment = _choice(cfg, "experiment", None)
    devices = f"{trainer.num_devices} x {trainer.strategy.root_device.type}"
    if trainer.num_nodes > 1:
        devices = f"{trainer.num_nodes} nodes x {devices}"
    parts = [
        f"experiment={experiment}" if experiment else None,
        f"model={qualified_name(cfg.model.name, cfg.model.get('library'))}",  # torchvision:<name>, timm:<name>
        f"block={cfg.block.name}",
        f"data={data}",
        f"batch={cfg.data.get('batch_size', '?')}",
        f"devices={devices}",
        f"precision={trainer.precision}",
        f"max_epochs={trainer.max_epochs}",
        f"seed={cfg.get('seed')}",
    ]
    log.info("run: %s", " ".join(p for p in parts if p))


@rank_zero_only
def log_run_end(trainer: Any) -> None:
    """Log where the results are: best checkpoint (and its score), last checkpoint, deploy file."""
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and getattr(ckpt, "best_model_path", ""):
        score = ckpt.best_model_score
        score_text = f" ({ckpt.monitor} {float(score):.4f})" if score is not None and ckpt.monitor else ""
        log.info("best checkpoint: %s%s", ckpt.best_model_path, score_text)
    if ckpt is not None and getattr(ckpt, "last_model_path", ""):
        log.info("last checkpoint: %s", ckpt.last_model_path)
    for callback in trainer.callbacks:
        if isinstance(callback, FuseCallback) and callback.report is not None:
            files = callback.report["files"]
            where = callback.output_dir(trainer)
            if files.get("deploy"):
                log.info("deploy: %s", where / files["deploy"])
            elif files.get("report"):
                log.info("deploy: not written, see %s", where / files["report"])
    wandb = sys.modules.get("wandb")  # imported once a W&B run started; wandb itself is silent offline
    run = getattr(wandb, "run", None)
    if run is not None and run.settings.mode in ("offline", "dryrun"):
        run_dir = Path(run.dir).parent
        log.info("W&B: offline run %s; upload it with: wandb sync %s", run_dir, run_dir)
