"""Logger setup for train(): W&B online/offline by credentials, run id kept across resumes, config logging."""

from __future__ import annotations

import contextlib
import logging
import netrc
import os
import shutil
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from acnet_pl.launch.wandb_logger import drop_anonymous_argument
from acnet_pl.utils.files import run_dir

log = logging.getLogger(__name__)

#: File in the run dir holding the W&B run id, read again when a later run resumes from this run's checkpoint.
WANDB_RUN_ID_FILE = "wandb_run_id"


def is_wandb_config(logger_cfg: Any) -> bool:
    """True when a logger config instantiates Lightning's WandbLogger."""
    target = logger_cfg.get("_target_", "") if isinstance(logger_cfg, (dict, DictConfig)) else ""
    return str(target).endswith(".WandbLogger")  # lightning.pytorch.loggers[.wandb].WandbLogger


def wandb_has_credentials() -> bool:
    """Whether W&B could log online: WANDB_API_KEY, or an entry for WANDB_BASE_URL's host in $NETRC or ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else []
    candidates += [str(Path.home() / ".netrc"), str(Path.home() / "_netrc")]
    for path in candidates:
        with contextlib.suppress(netrc.NetrcParseError, OSError):  # a missing or unreadable file has no entry
            entry = netrc.netrc(path).authenticators(host)
            if entry and entry[2]:
                return True
    return False


def previous_wandb_run_id(ckpt_path: str | os.PathLike | None) -> str | None:
    """The W&B run id stored in the run dir a checkpoint belongs to (`<run>/checkpoints/x.ckpt`), if any."""
    if not ckpt_path:
        return None
    id_file = run_dir(Path(ckpt_path).resolve()) / WANDB_RUN_ID_FILE
    return (id_file.read_text().strip() or None) if id_file.is_file() else None


def configure_wandb(
    logger_cfg: DictConfig, ckpt_path: str | None, run_cfg: DictConfig
) -> tuple[DictConfig, str | None]:
    """A copy of a WandbLogger config with mode, run id, group and name decided; returns it and a notice line.

    Mode: `offline: true` wins; else a WANDB_MODE the user set; else online only with credentials. The run
    id of the run `ckpt_path` belongs to is reused. A null `group` / `name` becomes `sweep_group` /
    `run_name` of `run_cfg` (the whole config).
    """
    cfg = logger_cfg.copy()
    notice = None
    with open_dict(cfg):
        # `mode` goes straight to wandb.init; WandbLogger(offline=True) would set WANDB_MODE for the whole
        # process and leak into the next job of a multirun.
        if cfg.pop("offline", False):
            cfg.mode = "offline"
        elif not os.environ.get("WANDB_MODE") and not wandb_has_credentials():
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
        if not cfg.get("group"):
            cfg.group = sweep_group(run_cfg)
        if not cfg.get("name"):
            cfg.name = run_name(run_cfg)
        # Offline, wandb prints three notices at start and a sync hint at the end: log_run_end says where
        # the run is and how to upload it, once. Online, `quiet` keeps the run's URL and drops the rest.
        offline = cfg.get("mode") == "offline" or os.environ.get("WANDB_MODE") in ("offline", "dryrun")
        quiet = {"silent": True} if offline else {"quiet": True}
        cfg.settings = quiet | OmegaConf.to_container(cfg.get("settings") or OmegaConf.create(), resolve=True)
        cfg._convert_ = "all"  # wandb.init reads `settings` only as a dict, not as an OmegaConf node
    return cfg, notice


def hydra_job_config() -> Any | None:
    """Hydra's config of the running job; None without one (compose API: no run dir, nothing swept)."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return None if OmegaConf.is_missing(hc.runtime, "output_dir") else hc


def sweep_group(run_cfg: DictConfig) -> str:
    """The W&B group: `<task_name>-<sweep dir name>` (one per multirun), `<task_name>-<run dir name>`, or the task."""
    task = str(run_cfg.get("task_name") or "train")
    hc = hydra_job_config()
    if hc is None:
        return task
    output_dir = Path(hc.runtime.output_dir)
    stamp = output_dir.parent.name if hc.mode == RunMode.MULTIRUN else output_dir.name
    return f"{task}-{stamp}"


def swept_keys() -> list[str]:
    """The override keys a Hydra multirun sweeps (`block=base,acb` -> block), in command line order.

    Read from the sweep dir's multirun.yaml (what the launcher wrote; also right for jobs started on
    other machines) or else the command line, plus the parameters of a sweeper (Optuna's `params`).
    """
    hc = hydra_job_config()
    if hc is None or hc.mode != RunMode.MULTIRUN:
        return []
    overrides: list[str] = list(sys.argv[1:])
    sweep_file = Path(hc.runtime.output_dir).parent / "multirun.yaml"
    with contextlib.suppress(Exception):  # a missing or unreadable file: the command line is used
        overrides = list(OmegaConf.load(sweep_file).hydra.overrides.task)
    keys: list[str] = []
    parser = OverridesParser.create()
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except Exception:  # noqa: BLE001 - flags (-m, --config-name) and the like
            continue
        if override.is_sweep_override():
            keys.append(override.get_key_element().lstrip("+~"))
    params = (hc.sweeper.get("params") or {}) if "sweeper" in hc else {}
    return keys + [str(key) for key in params if key not in keys]


def run_name(run_cfg: DictConfig) -> str:
    """The W&B run name: the job's values of the swept keys (`block=acb seed=1`), else model-block-seed."""
    hc = hydra_job_config()
    if hc is not None:
        values = {key.lstrip("+~"): value for key, _, value in (t.partition("=") for t in hc.overrides.task)}
        swept = [f"{key}={values[key]}" for key in swept_keys() if key in values]
        if swept:
            return " ".join(swept)
    return f"{run_cfg.model.name}-{run_cfg.block.name}-seed{run_cfg.get('seed')}"


#: Summaries of accuracies: the best value (W&B's default is the last).
_MAX_METRICS = ("val/acc_top1", "val/acc_top5", "val/acc_top1_best", "train/acc_top1", "train/acc_top5")


@rank_zero_only  # the other ranks' WandbLoggers start no run
def setup_wandb_runs(loggers: list[Logger], run_dir: str | os.PathLike) -> None:
    """Start the W&B run of every WandbLogger: max summaries, `.hydra/` uploaded, run id kept in the run dir
    (a resume from this run's checkpoints continues the run)."""
    drop_anonymous_argument(loggers)
    hydra_dir = Path(run_dir) / ".hydra"
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        run = logger.experiment
        if getattr(run, "id", None):
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            (Path(run_dir) / WANDB_RUN_ID_FILE).write_text(f"{run.id}\n")
        if run.settings.mode in ("offline", "dryrun"):  # wandb is silent offline: say where the run is
            where = Path(run.dir).parent
            log.info(
                f"W&B: offline run {where} (group {run.group}, job_type {run.job_type}, name {run.name})"
            )
        for key in _MAX_METRICS:
            run.define_metric(key, summary="max")
        if hydra_dir.is_dir():
            # Copied into the run's files/ first: run.save of files elsewhere symlinks them and warns.
            files_dir = Path(run.dir)
            shutil.copytree(hydra_dir, files_dir / ".hydra", dirs_exist_ok=True)
            run.save(str(files_dir / ".hydra" / "*.yaml"), base_path=str(files_dir), policy="now")


@rank_zero_only
def log_config(loggers: list[Logger], cfg: DictConfig) -> None:
    """Log the resolved config as hyperparameters of every logger, with the Hydra choices and overrides."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    hc = hydra_job_config()
    if hc is not None:
        resolved["hydra"] = {
            "choices": {k: v for k, v in hc.runtime.choices.items() if not str(k).startswith("hydra/")},
            "overrides": list(hc.overrides.task),
            "swept": swept_keys(),
            "job_num": hc.job.get("num"),
            "output_dir": hc.runtime.output_dir,
        }
    for logger in loggers:
        logger.log_hyperparams(resolved)


def build_loggers(cfg: DictConfig, ckpt_path: str | None = None) -> list[Logger]:
    """Every logger of `cfg.logger`; W&B offline without credentials, going on with `ckpt_path`'s run."""
    loggers: list[Logger] = []
    for logger_cfg in (cfg.get("logger") or {}).values():
        if not isinstance(logger_cfg, DictConfig) or "_target_" not in logger_cfg:
            continue
        if is_wandb_config(logger_cfg):
            logger_cfg, notice = configure_wandb(logger_cfg, ckpt_path or cfg.get("ckpt_path"), cfg)
            if notice:
                rank_zero_only(log.warning)(notice)  # once, not again by each DDP rank
        loggers.append(instantiate(logger_cfg))
    return loggers


def finish_wandb(loggers: list[Logger]) -> None:
    """`wandb.finish()` when a W&B run was started in this process (safe to call on every rank)."""
    if not any(isinstance(logger, WandbLogger) for logger in loggers):
        return
    import wandb  # slow to import; only runs with a WandbLogger reach this

    if wandb.run is not None:
        wandb.finish()
