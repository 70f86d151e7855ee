"""Logger setup for train(): W&B online/offline by credentials, run id kept across resumes, config logging."""

from __future__ import annotations

import contextlib
import logging
import netrc
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from acnet_pl.deploy.checkpoint import run_dir
from acnet_pl.launch.wandb_logger import drop_anonymous_argument
from acnet_pl.training.callbacks.fuse import FuseCallback
from acnet_pl.training.callbacks.summary import ModelSummary

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
    id_file = run_dir(Path(ckpt_path).resolve()) / WANDB_RUN_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        return run_id or None
    return None


def configure_wandb(
    logger_cfg: DictConfig, ckpt_path: str | None, run_cfg: DictConfig | None = None
) -> tuple[DictConfig, str | None]:
    """A copy of a WandbLogger config with mode, run id, group and name decided; returns it and a notice line.

    Mode: `offline: true` in the config wins; else a WANDB_MODE the user set is left to wandb; else online
    when credentials exist, offline otherwise (the notice says how to upload later). When `ckpt_path`
    resumes a run that logged to W&B, the same run id is reused. With `run_cfg` (the whole config), a null
    `group` becomes the sweep (`sweep_group`) and a null `name` the job's swept overrides (`run_name`).
    wandb's own console output is reduced to what the user acts on (settings quiet/silent, see below).
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
        if run_cfg is not None:
            if not cfg.get("group"):
                cfg.group = sweep_group(run_cfg)
            if not cfg.get("name"):
                cfg.name = run_name(run_cfg)
        # Offline, wandb prints three notices at start and a sync hint at the end: log_run_end says where
        # the run is and how to upload it, once. Online, `quiet` keeps the run's URL and drops the rest.
        offline = cfg.get("mode") == "offline" or os.environ.get("WANDB_MODE") in ("offline", "dryrun")
        quiet = {"silent": True} if offline else {"quiet": True}
        cfg.settings = {**quiet, **to_container(cfg.get("settings"))}
        cfg._convert_ = "all"  # wandb.init reads `settings` only as a dict, not as an OmegaConf node
    return cfg, notice


def to_container(value: Any) -> dict[str, Any]:
    """A (possibly None) mapping config value as a plain dict."""
    if value is None:
        return {}
    if isinstance(value, DictConfig):
        return dict(OmegaConf.to_container(value, resolve=True))
    return dict(value)


def hydra_job_config() -> Any | None:
    """Hydra's config of the running job; None without one (compose API: no run dir, nothing swept)."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return None if OmegaConf.is_missing(hc.runtime, "output_dir") else hc


def sweep_group(run_cfg: DictConfig) -> str:
    """The W&B group of a run: `<task_name>-<sweep dir name>` (a multirun), `<task_name>-<run dir name>`.

    So the jobs of one sweep (e.g. `-m block=base,acb seed=0,1,2`) share a group, and a later sweep of
    the same experiment gets its own. Without Hydra (compose API): the task name.
    """
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
    if hc is None:
        return []

    if hc.mode != RunMode.MULTIRUN:
        return []

    overrides: list[str] = list(sys.argv[1:])
    sweep_file = Path(hc.runtime.output_dir).parent / "multirun.yaml"
    if sweep_file.is_file():
        # An unreadable file only means: the command line is used.
        with contextlib.suppress(Exception):
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
    for key in (hc.sweeper.get("params") or {}) if "sweeper" in hc else {}:
        if key not in keys:
            keys.append(str(key))
    return keys


def run_name(run_cfg: DictConfig) -> str:
    """The W&B run name: the job's values of the swept keys (`block=acb seed=1`), else model-block-seed."""
    hc = hydra_job_config()
    if hc is not None:
        values = {}
        for text in hc.overrides.task:
            key, _, value = text.partition("=")
            values[key.lstrip("+~")] = value
        swept = [f"{key}={values[key]}" for key in swept_keys() if key in values]
        if swept:
            return " ".join(swept)
    return f"{run_cfg.model.name}-{run_cfg.block.name}-seed{run_cfg.get('seed')}"


def hydra_summary() -> dict[str, Any] | None:
    """The Hydra side of a run for the loggers: group choices, the job's overrides, the sweep's keys."""
    hc = hydra_job_config()
    if hc is None:
        return None
    return {
        "choices": {k: v for k, v in hc.runtime.choices.items() if not str(k).startswith("hydra/")},
        "overrides": list(hc.overrides.task),
        "swept": swept_keys(),
        "job_num": hc.job.get("num"),
        "output_dir": hc.runtime.output_dir,
    }


#: Summaries of accuracies: the best value (W&B's default is the last).
_MAX_METRICS = ("val/acc_top1", "val/acc_top5", "val/acc_top1_best", "train/acc_top1", "train/acc_top5")


def setup_wandb_runs(loggers: list[Logger], run_dir: str | os.PathLike) -> None:
    """Start the W&B run of every WandbLogger: max summaries, `.hydra/` uploaded, run id kept in the run dir."""
    drop_anonymous_argument(loggers)
    remember_wandb_run(loggers, run_dir)
    _setup_wandb_runs(loggers, run_dir)


@rank_zero_only
def _setup_wandb_runs(loggers: list[Logger], run_dir: str | os.PathLike) -> None:
    hydra_dir = Path(run_dir) / ".hydra"
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        run = logger.experiment
        if run.settings.mode in ("offline", "dryrun"):  # wandb is silent offline: say where the run is
            log.info(
                "W&B: offline run %s (group %s, job_type %s, name %s)",
                Path(run.dir).parent,
                run.group,
                run.job_type,
                run.name,
            )
        for key in _MAX_METRICS:
            run.define_metric(key, summary="max")
        if hydra_dir.is_dir():
            # Copied into the run's files/ first: run.save of files elsewhere symlinks them and warns.
            files_dir = Path(run.dir)
            shutil.copytree(hydra_dir, files_dir / ".hydra", dirs_exist_ok=True)
            run.save(str(files_dir / ".hydra" / "*.yaml"), base_path=str(files_dir), policy="now")


@rank_zero_only
def remember_wandb_run(loggers: list[Logger], run_dir: str | os.PathLike) -> None:
    """Write the W&B run id into the run dir (so a resume from this run's checkpoints continues the run)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run_id = getattr(logger.experiment, "id", None)
            if run_id:
                Path(run_dir).mkdir(parents=True, exist_ok=True)
                (Path(run_dir) / WANDB_RUN_ID_FILE).write_text(f"{run_id}\n")


@rank_zero_only
def log_config(loggers: list[Logger], cfg: DictConfig) -> None:
    """Log the resolved config as hyperparameters of every logger, with the Hydra choices and overrides."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    hydra = hydra_summary()
    if hydra is not None:
        resolved["hydra"] = hydra
    for logger in loggers:
        logger.log_hyperparams(resolved)


def finish_wandb(loggers: list[Logger]) -> None:
    """`wandb.finish()` when a W&B run was started in this process (safe to call on every rank)."""
    if not any(isinstance(logger, WandbLogger) for logger in loggers):
        return
    import wandb  # slow to import; only runs with a WandbLogger reach this

    if wandb.run is not None:
        wandb.finish()


# --------------------------------------------------------------------------------------------------
# The console and train.log: what the user reads


#: Library output that is not the user's concern in this app (message starts), dropped from logging.
_QUIET_MESSAGES = (
    "💡 Tip: ",  # Lightning advertising its cloud products (litlogger, litmodels) on every run
    "Loading `train_dataloader` to estimate number of stepping batches",  # the cosine schedule asks
    "Trainer already configured with model summary callbacks",  # ours (acnet_pl.training.callbacks.ModelSummary)
)
#: Warnings of library internals that the user cannot act on (regexes of the message start).
_QUIET_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's pytree helper on torch >= 2.10
    r"You're using the WeightAveraging callback with a model that overrides the configure_model",
)


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of `_QUIET_MESSAGES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_QUIET_MESSAGES)


def quiet_library_noise() -> None:
    """Silence the library messages and warnings listed above (idempotent; the user's own stay)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        lib_logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in lib_logger.filters):
            lib_logger.addFilter(_DropMessages())
    for message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def stdout_is_terminal() -> bool:
    """Whether stdout is an interactive terminal (not SLURM's file, nohup, `| tee`, a pipe)."""
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


def without_progress_bars(callbacks: list[Any]) -> list[Any]:
    """`callbacks` without progress bars: outside a terminal a bar prints its frames (or only its last)."""
    return [callback for callback in callbacks if not isinstance(callback, ProgressBar)]


def console_callbacks(callbacks: list[Any], trainer_cfg: Any) -> tuple[list[Any], dict[str, Any]]:
    """The callbacks (and Trainer arguments) for what the console shows.

    Outside a terminal (SLURM, nohup, a pipe) no progress bar (EpochLog's lines tell the story);
    `trainer.enable_model_summary=false` also turns off our `ModelSummary` callback, as it does Lightning's.
    """
    settings: dict[str, Any] = {}
    if not stdout_is_terminal():
        callbacks, settings = without_progress_bars(callbacks), {"enable_progress_bar": False}
    if trainer_cfg.get("enable_model_summary") is False:
        callbacks = [c for c in callbacks if not isinstance(c, ModelSummary)]
    return callbacks, settings


def _choice(cfg: DictConfig, group: str, fallback: Any) -> Any:
    """The Hydra choice of a config group (e.g. data=cifar10) when Hydra runs, else `fallback`."""
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get(group)
        if choice is not None:
            return choice
    return fallback


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
        f"model={cfg.model.name}",
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
    _log_wandb_location(trainer.loggers)


def _log_wandb_location(loggers: list[Logger]) -> None:
    """Where an offline W&B run is and how to upload it (wandb itself is kept silent offline)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            run = logger.experiment
            if run.settings.mode in ("offline", "dryrun"):
                run_dir = Path(run.dir).parent
                log.info("W&B: offline run %s; upload it with: wandb sync %s", run_dir, run_dir)
