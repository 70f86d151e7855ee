"""Logger setup for train(): W&B online/offline by credentials, run id kept across resumes, config logging."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

#: File in the run dir holding the W&B run id, read again when a later run resumes from this run's checkpoint.
WANDB_RUN_ID_FILE = "wandb_run_id"
WANDB_TARGETS = ("lightning.pytorch.loggers.WandbLogger", "lightning.pytorch.loggers.wandb.WandbLogger")


def is_wandb_config(logger_cfg: Any) -> bool:
    """True when a logger config instantiates Lightning's WandbLogger."""
    target = logger_cfg.get("_target_", "") if isinstance(logger_cfg, (dict, DictConfig)) else ""
    return target in WANDB_TARGETS or str(target).endswith(".WandbLogger")


def wandb_has_credentials() -> bool:
    """Whether W&B could log online: WANDB_API_KEY is set or the netrc file has an entry for the API host.

    The netrc file is $NETRC or ~/.netrc (`wandb login` writes it); the host comes from WANDB_BASE_URL
    (default https://api.wandb.ai). Nothing is sent over the network.
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else []
    candidates += [str(Path.home() / ".netrc"), str(Path.home() / "_netrc")]
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            entry = netrc.netrc(path).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            continue
        if entry and entry[2]:
            return True
    return False


def previous_wandb_run_id(ckpt_path: str | os.PathLike | None) -> str | None:
    """The W&B run id stored in the run dir a checkpoint belongs to (`<run>/checkpoints/x.ckpt`), if any."""
    if not ckpt_path:
        return None
    run_dir = Path(ckpt_path).resolve().parent.parent
    id_file = run_dir / WANDB_RUN_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        return run_id or None
    return None


def configure_wandb(logger_cfg: DictConfig, ckpt_path: str | None) -> tuple[DictConfig, str | None]:
    """A copy of a WandbLogger config with mode and run id decided; returns it and a notice line (or None).

    Mode: `offline: true` in the config wins; else a WANDB_MODE the user set is left to wandb; else online
    when credentials exist, offline otherwise (the notice says how to upload later). When `ckpt_path`
    resumes a run that logged to W&B, the same run id is reused.
    """
    cfg = logger_cfg.copy()
    notice = None
    with open_dict(cfg):
        # `mode` goes straight to wandb.init; WandbLogger(offline=True) would set WANDB_MODE for the whole
        # process and leak into the next job of a multirun.
        explicit_offline = bool(cfg.pop("offline", False))
        if explicit_offline:
            cfg.mode = "offline"
        elif os.environ.get("WANDB_MODE"):
            pass
        elif not wandb_has_credentials():
            cfg.mode = "offline"
            wandb_dir = Path(str(cfg.get("save_dir") or ".")) / "wandb"
            notice = (
                "W&B: no credentials found (WANDB_API_KEY, ~/.netrc or `wandb login`), logging offline; "
                f"upload later with: wandb sync {wandb_dir}/offline-run-*"
            )
        run_id = previous_wandb_run_id(ckpt_path)
        if run_id and not cfg.get("id"):
            cfg.id = run_id
            cfg.resume = "allow"
    return cfg, notice


@rank_zero_only
def remember_wandb_run(loggers: list[Logger], run_dir: str | os.PathLike) -> None:
    """Write the W&B run id into the run dir (so a resume from this run's checkpoints continues the run)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run_id = getattr(logger.experiment, "id", None)
            if run_id:
                Path(run_dir).mkdir(parents=True, exist_ok=True)
                (Path(run_dir) / WANDB_RUN_ID_FILE).write_text(f"{run_id}\n")


@rank_zero_only
def log_config(loggers: list[Logger], cfg: DictConfig) -> None:
    """Log the resolved config (without Hydra's own node) as hyperparameters of every logger."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    for logger in loggers:
        logger.log_hyperparams(resolved)


def finish_wandb(loggers: list[Logger]) -> None:
    """`wandb.finish()` when a W&B run was started in this process (safe to call on every rank)."""
    from lightning.pytorch.loggers import WandbLogger

    if not any(isinstance(logger, WandbLogger) for logger in loggers):
        return
    import wandb

    if wandb.run is not None:
        wandb.finish()
