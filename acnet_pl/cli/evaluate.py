"""`python evaluate.py ckpt_path=...` (or `train.py train=false`): top-1/top-5 of a checkpoint or a deploy.pt,
on the command line's data, else the model's stored data, else `data`; to the loggers and `eval.json`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from acnet_pl.deploy.checkpoint import Source, load_source
from acnet_pl.deploy.report import write_report
from acnet_pl.training.console import console_callbacks, quiet_library_noise
from acnet_pl.training.loggers import (
    build_loggers,
    finish_wandb,
    hydra_job_config,
    is_wandb_config,
    log_config,
    setup_wandb_runs,
)
from acnet_pl.training.module import ACNetModule
from acnet_pl.utils.config import to_plain

log = logging.getLogger(__name__)


def eval_data_config(cfg: DictConfig, source: Source) -> tuple[Any, str]:
    """The datamodule config to evaluate on and a phrase saying where it comes from."""
    hc = hydra_job_config()
    keys = [o.split("=", 1)[0].lstrip("+~") for o in hc.overrides.task] if hc is not None else []
    if any(key.split(".")[0] in ("data", "experiment") for key in keys):  # chosen on the command line
        return cfg.data, "the command line"
    if source.data_config is not None:
        return OmegaConf.create(source.data_config), source.data_config_origin
    return cfg.data, "the config (data=...)"


def _eval_logger_config(cfg: DictConfig, source: Source) -> DictConfig:
    """`cfg` with W&B set up for an evaluation: job_type=eval, a name saying what was evaluated."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.ckpt_path = None  # a new W&B run, not the continuation of the training run
        for logger_cfg in (cfg.get("logger") or {}).values():
            if is_wandb_config(logger_cfg):
                logger_cfg.job_type = "eval"
                block = source.block.get("name", "base")
                logger_cfg.name = logger_cfg.get("name") or f"eval {source.model_name}-{block} {source.kind}"
    return cfg


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Top-1/top-5 (and loss) of `cfg.ckpt_path` on the validation set; also written to `<run dir>/eval.json`."""
    quiet_library_noise()
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        raise ValueError(
            "evaluation needs a model: give ckpt_path=<run>/checkpoints/<name>.ckpt or <run>/deploy/deploy.pt"
        )
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path} is not a file; give a checkpoint or a deploy.pt to evaluate"
        )
    source = load_source(ckpt_path)
    data_cfg, data_origin = eval_data_config(cfg, source)
    datamodule = instantiate(data_cfg)
    datamodule.prepare_data()
    if int(datamodule.num_classes) != source.num_classes:
        raise ValueError(
            f"{ckpt_path} has {source.num_classes} classes but the data ({data_origin}) have "
            f"{datamodule.num_classes}; choose the data it was trained on with data=..."
        )
    module = ACNetModule(  # the checkpoint's network (training form) or the deploy file's (fused)
        model={"name": source.model_name, "num_classes": source.num_classes},
        block=source.block,
        data={"input_size": source.input_size, "mean": source.mean, "std": source.std},
        net=source.model,
    )
    eval_cfg = _eval_logger_config(cfg, source)
    loggers = build_loggers(eval_cfg)
    settings = {"devices": 1, "num_nodes": 1, "strategy": "auto", "callbacks": [], "logger": loggers or False}
    _, console = console_callbacks([], cfg.trainer)  # no progress bar outside a terminal, as in training
    trainer: L.Trainer = instantiate(cfg.trainer, **settings, **console)
    try:
        setup_wandb_runs(loggers, cfg.paths.output_dir)
        log_config(loggers, eval_cfg)
        log.info(
            f"eval: {ckpt_path} ({source.kind}, block={source.block.get('name')}) on data from {data_origin}"
        )
        results = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    finally:
        finish_wandb(loggers)
    metrics = {key: float(value) for key, value in results.items()}
    samples = len(getattr(datamodule.val_dataloader(), "dataset", []))
    report = {
        "ckpt_path": str(Path(ckpt_path).resolve()),
        "kind": source.kind,
        "model": {"name": source.model_name, "num_classes": source.num_classes},
        "block": source.block,
        "data": to_plain(data_cfg),
        "samples": samples,
        "top1": metrics.get("val/acc_top1"),
        "top5": metrics.get("val/acc_top5"),
        "loss": metrics.get("val/loss"),
    }
    out = write_report(report, Path(str(cfg.paths.output_dir)) / "eval.json")
    top1, top5, loss = 100 * report["top1"], 100 * report["top5"], report["loss"]
    log.info(
        f"eval: top-1 {top1:.2f}%  top-5 {top5:.2f}%  loss {loss:.4f}  on {samples:d} images; wrote {out}"
    )
    return metrics
