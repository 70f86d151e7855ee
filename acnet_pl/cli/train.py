"""`train(cfg)`: config -> datamodule, ACNetModule (build_model + convert), Trainer -> fit -> fuse -> metrics."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from omegaconf import DictConfig, open_dict

from acnet_pl.blocks import list_blocks
from acnet_pl.cli.common import is_launching_process, register_resolvers
from acnet_pl.data.base import per_process_batch_size
from acnet_pl.launch.ddp import GRACE_S, use_hydra_job_launcher
from acnet_pl.launch.stop_signals import agree_on_stop_signals, is_stop_exception, stopped
from acnet_pl.models import default_input_size
from acnet_pl.models.registry import check_input_size, pretrained_normalization, qualified_name
from acnet_pl.models.weights import recorded_normalization, weights_source
from acnet_pl.training.callbacks.fuse import FuseCallback, deploy_metrics
from acnet_pl.training.checkpointing import (
    SPECIAL_CKPT_PATHS,
    check_ckpt_path,
    check_resume_checkpoint,
    check_writable,
    checkpoint_dirs,
    resume_checkpoint,
    stop_checkpoints,
)
from acnet_pl.training.console import console_callbacks, log_run_end, log_run_start, quiet_library_noise
from acnet_pl.training.loggers import build_loggers, finish_wandb, log_config, setup_wandb_runs
from acnet_pl.training.module import ACNetModule
from acnet_pl.utils.config import to_plain

log = logging.getLogger(__name__)

# For the compose API (tests, notebooks); train.py registers them itself before Hydra composes.
register_resolvers()


#: Block options an experiment sets for whichever block converts convs (`block: {gamma_init, bare_convs}`),
#: so that one experiment serves `-m block=base,acb,dbb`: block=base converts nothing and drops them.
RECIPE_BLOCK_OPTIONS = ("gamma_init", "bare_convs", "preserve")


def block_hparams(block_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The `block` config ({name, **options of `reparam.convert`}) as plain hyperparameters; base drops the recipe's."""
    options = to_plain(block_cfg)
    if "name" not in options:
        raise ValueError(
            "the block config needs a 'name' entry; choose block=base, "
            + ", ".join(f"block={name}" for name in list_blocks())
            + " or your own: block=custom block.name=package.module:ClassName"
        )
    name = options.pop("name")
    if name == "base":
        extra = sorted(set(options) - set(RECIPE_BLOCK_OPTIONS))
        if extra:
            raise ValueError(
                f"block=base converts nothing and has no option {', '.join('block.' + k for k in extra)}; "
                "drop them or choose a block that converts, e.g. block=acb"
            )
        return {"name": "base"}
    return {"name": name, **options}


def _num_classes(cfg: DictConfig, datamodule: Any) -> int:
    """`model.num_classes`, filled from the datamodule when null; ValueError when the two disagree."""
    extra = set(cfg.model) - {"name", "num_classes", "init", "library", "weights", "pretrained"}
    if extra:
        raise ValueError(f"model config has keys that nothing reads: {sorted(extra)}; remove them")
    data_classes = int(datamodule.num_classes)
    wanted = cfg.model.get("num_classes")
    if wanted is not None and int(wanted) != data_classes:
        raise ValueError(
            f"model.num_classes={wanted} but the data has {data_classes} classes; "
            "drop model.num_classes (it is filled from the data) or choose matching data"
        )
    return data_classes


def choose_normalization(cfg: DictConfig) -> None:
    """Set `data.mean`/`data.std` to those the starting weights were trained with, as `normalize` says.

    normalize=auto: with model.pretrained the library's (torchvision's transforms, timm's pretrained_cfg),
    with model.weights the file's record (a deploy.pt or train.py checkpoint) else the library's; from
    scratch, or with data.mean set, the data config's. model: the library's always; data: the data config's.
    """
    mode = cfg.get("normalize", "auto")
    if mode not in ("auto", "data", "model"):
        raise ValueError(f"normalize={mode} is unknown; choose normalize=auto, data or model")
    name = qualified_name(cfg.model.name, cfg.model.get("library"))
    weights = cfg.model.get("weights")
    starts_trained = bool(weights or cfg.model.get("pretrained"))
    if mode == "data" or mode == "auto" and (not starts_trained or cfg.data.get("mean") is not None):
        return
    stats = recorded_normalization(weights) if mode == "auto" and weights else None
    source = f"recorded in {weights}" if stats else f"of {name}'s pretrained weights"
    stats = stats or pretrained_normalization(name)
    if stats is None:
        if mode == "model":
            raise ValueError(
                f"normalize=model but {name} has no library normalisation; use normalize=auto or data"
            )
        return
    with open_dict(cfg.data):
        cfg.data.mean, cfg.data.std = [float(v) for v in stats[0]], [float(v) for v in stats[1]]
    if is_launching_process():
        log.info("normalisation %s: mean=%s std=%s (normalize=data keeps the data set's)", source, *stats)


def set_tf32(enabled: bool) -> None:
    """Allow or forbid TF32 for float32 cuDNN convolutions and cuBLAS matmuls (the original trained in true fp32)."""
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)


def build_module(cfg: DictConfig, datamodule: Any) -> ACNetModule:
    """The LightningModule of `cfg`, with num_classes and the data description taken from `datamodule`."""
    num_classes = _num_classes(cfg, datamodule)
    name = qualified_name(cfg.model.name, cfg.model.get("library"))
    check_input_size(name, datamodule.input_size)
    weights = weights_source(name, cfg.model.get("weights"), bool(cfg.model.get("pretrained")))
    data = {
        "input_size": list(datamodule.input_size),
        "mean": list(datamodule.mean),
        "std": list(datamodule.std),
        "class_names": datamodule.class_names,
        # The datamodule's own config, so a checkpoint alone can rebuild its validation data (deploy.py).
        "datamodule": to_plain(cfg.data),
    }
    return ACNetModule(
        model={
            "name": name,
            "num_classes": num_classes,
            "init": cfg.model.get("init", "default"),
            # the file it starts from (model.pretrained=true: the cached one), recorded as pretrained_from
            **({"weights": weights} if weights else {}),
        },
        block=block_hparams(cfg.block),
        optimizer=to_plain(cfg.optimizer),
        scheduler=to_plain(cfg.get("scheduler")) or None,
        param_groups=to_plain(cfg.get("param_groups")) or None,
        label_smoothing=float(cfg.get("label_smoothing", 0.0)),
        compile=bool(cfg.get("compile", False)),
        channels_last=bool(cfg.get("channels_last", True)),
        data=data,
    )


def build_callbacks(cfg: DictConfig, with_logger: bool) -> list[Callback]:
    """Every callback of `cfg.callbacks` (name -> config); the LR monitor only when something logs."""
    configs = [
        c for c in (cfg.get("callbacks") or {}).values() if isinstance(c, DictConfig) and "_target_" in c
    ]
    callbacks = [instantiate(c) for c in configs]
    return [c for c in callbacks if with_logger or not isinstance(c, LearningRateMonitor)]


def _check_devices(trainer_cfg: Mapping[str, Any]) -> None:
    """ValueError when several devices are asked for with accelerator=auto on a machine without a GPU.

    Lightning would start that many CPU processes (DDP over gloo) on however many cores there are.
    """
    if str(trainer_cfg.get("accelerator", "auto")) != "auto" or torch.cuda.is_available():
        return
    devices = to_plain(trainer_cfg.get("devices", 1))
    text = str(devices).strip()  # an int or a string of one; "auto", -1 and True ask for no count
    count = len(devices) if isinstance(devices, list) else int(text) if text.isdigit() else 0
    if count > 1:
        raise ValueError(
            f"trainer.devices={count} but no GPU is visible: add trainer.accelerator=cpu to run {count} CPU "
            "processes (DDP over gloo), or use trainer.devices=1"
        )


def _check_batch_divides(trainer: L.Trainer, datamodule: Any) -> None:
    """Fail before any process is started when a global batch does not split over the processes."""
    world = trainer.num_devices * trainer.num_nodes
    for attr in ("batch_size", "val_batch_size"):
        value = getattr(datamodule, attr, None)
        if isinstance(value, int):
            per_process_batch_size(value, world, f"data.{attr}")


def _final_metrics(trainer: L.Trainer) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for key, value in trainer.callback_metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1 or isinstance(value, (int, float)):
            metrics[key] = float(value)
    best = trainer.lightning_module.best_val_top1
    if best is not None:  # a rerun of a finished run validates nothing: the best restored from last.ckpt
        metrics.setdefault("val/acc_top1_best", best)
    for callback in trainer.callbacks:
        if isinstance(callback, FuseCallback) and callback.report is not None:
            metrics.update(deploy_metrics(callback.report))
    return metrics


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model, fuse it, write `checkpoints/` + `deploy/` in `cfg.paths.output_dir`; return
    the final metrics (no `deploy/...` ones on DDP ranks other than zero)."""
    quiet_library_noise()
    check_ckpt_path(cfg.get("ckpt_path"))
    _check_devices(cfg.trainer)
    # an unknown model name fails here, before any data is read
    default_input_size(qualified_name(cfg.model.name, cfg.model.get("library")))
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    set_tf32(cfg.get("tf32", True))  # every DDP rank runs train(), so each process gets the setting
    choose_normalization(cfg)
    datamodule = instantiate(cfg.data)
    # The data are checked (downloaded when asked) and read before any logger exists: a missing data set
    # must not leave a logger run behind (an offline W&B run, wandb_run_id) or its output on the console.
    # Lightning calls prepare_data again in fit; on data that are there it returns at once.
    if is_launching_process():
        datamodule.prepare_data()
    module = build_module(cfg, datamodule)  # reads num_classes: the class folders of an image tree
    ckpt_path = resume_checkpoint(cfg)
    if ckpt_path is not None and ckpt_path not in SPECIAL_CKPT_PATHS:
        check_resume_checkpoint(ckpt_path, module)  # before any logger starts, like the data check
    if is_launching_process():
        for dirpath in checkpoint_dirs(cfg):
            check_writable(dirpath)  # a checkpoints dir that cannot be written fails now, not after an epoch
    loggers = build_loggers(cfg, ckpt_path)
    callbacks = build_callbacks(cfg, with_logger=bool(loggers))
    callbacks, console = console_callbacks(callbacks, cfg.trainer)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **console)
    _check_batch_divides(trainer, datamodule)
    signals = agree_on_stop_signals(trainer)  # every rank stops at the same step
    hydra_launcher = use_hydra_job_launcher(trainer, float(cfg.get("ddp_grace_s", GRACE_S)))
    failed: BaseException | None = None
    try:
        if is_launching_process():
            setup_wandb_runs(loggers, cfg.paths.output_dir)
            log_config(loggers, cfg)
            log_run_start(cfg, trainer)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SystemExit as error:
            if is_stop_exception(error):
                raise stopped(signals, trainer, stop_checkpoints(trainer)) from None
            raise
        metrics = _final_metrics(trainer)
        log_run_end(trainer)
    except BaseException as error:
        failed = error
        if trainer.world_size > 1:
            error.ddp_rank = trainer.global_rank  # type: ignore[attr-defined]  # named by the error line
        raise
    finally:
        finish_wandb(loggers)
        if hydra_launcher is not None:
            hydra_launcher.cleanup(failed)  # RankFailed when another rank failed first
    return metrics


def optimized_metric(cfg: DictConfig, metrics: Mapping[str, float]) -> float | None:
    """The value of `cfg.optimized_metric` in `metrics` (what a Hydra sweeper optimises), or None if unset."""
    name = cfg.get("optimized_metric")
    if name and name not in metrics and is_launching_process():  # deploy/... metrics exist on rank zero only
        raise ValueError(
            f"optimized_metric={name} was not logged; choose one of: {', '.join(sorted(metrics))}"
        )
    return float(metrics[name]) if name in metrics else None
