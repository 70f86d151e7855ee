"""After training: fuse the blocks, prove the fused model equals the trained one, write `deploy/`."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from acnet_pl.export import (
    FUSE_REPORT_FORMAT,
    FUSE_REPORT_VERSION,
    atomic_torch_save,
    atomic_write_text,
    data_meta,
    make_deploy_record,
    model_stats,
)
from acnet_pl.reparam import added_biases, fuse

log = logging.getLogger(__name__)


class FuseCallback(Callback):
    """When fitting ends: fuse a copy of the trained model and write `deploy.pt` + `report.json`.

    Runs once, on global rank zero only, in `on_fit_end`: Lightning calls that hook after the strategy's
    teardown, so the model is already unwrapped from DDP (and SyncBatchNorm reverted), and the work here
    uses no collective, so the other ranks may finish and exit meanwhile. With the subprocess DDP launcher
    rank zero is the process the user started; with `ddp_spawn` it is the first spawned worker, which
    holds the trained weights. Both models are evaluated in float32 and eval mode on the full validation
    set (the datamodule's own loader, without a distributed sampler). The top-1/top-5 counts before and
    after fusing must agree within one sample; otherwise `report.json` records the error, no `deploy.pt`
    is written and a RuntimeError is raised. `block=base` models go through the same path (nothing to
    fuse, the check still runs).

    Args:
        dirpath: where `deploy.pt` and `report.json` go; relative paths are under the trainer's
            `default_root_dir`.
        fold_bn: also fold every BatchNorm into its conv (fastest inference, no longer the base layout).
        limit_batches: evaluate on at most this many validation batches (None = all).
    """

    def __init__(
        self, dirpath: str = "deploy", fold_bn: bool = False, limit_batches: int | None = None
    ) -> None:
        super().__init__()
        if limit_batches is not None and limit_batches < 1:
            raise ValueError(f"FuseCallback limit_batches must be None or >= 1, got {limit_batches}")
        self.dirpath = dirpath
        self.fold_bn = fold_bn
        self.limit_batches = limit_batches
        self.report: dict[str, Any] | None = None

    # -- hooks -----------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Forget the report of an earlier fit: every fit exports once."""
        self.report = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Fuse, verify and write the deploy files (global rank zero, once)."""
        if not trainer.is_global_zero or self.report is not None:  # other ranks: nothing to do
            return
        self.report = self.export(trainer, pl_module)
        if not self.report["ok"]:
            raise RuntimeError(
                f"FuseCallback: {self.report['error']} (see {self.output_dir(trainer)}/report.json)"
            )

    def output_dir(self, trainer: L.Trainer) -> Path:
        """The absolute deploy folder of this trainer."""
        path = Path(self.dirpath)
        return path if path.is_absolute() else Path(trainer.default_root_dir) / path

    # -- work ------------------------------------------------------------------------------------------
    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Fuse a copy of `pl_module.model`, compare it with the trained one, write the files; return the report."""
        hparams = dict(pl_module.hparams)
        model_hp, block_hp, data = _meta(hparams, trainer)
        out_dir = self.output_dir(trainer)
        device = trainer.strategy.root_device

        trained = copy.deepcopy(getattr(pl_module, "model", pl_module)).float().eval()
        deployed = fuse(trained, fold_bn=self.fold_bn).eval()
        trained.to(device)
        deployed.to(device)

        loader = _val_loader(trainer)
        limits = [n for n in (self.limit_batches, trainer_val_batches(trainer, loader)) if n is not None]
        comparison = compare_models(
            trained, deployed, loader, device, limit_batches=min(limits, default=None)
        )
        before, after = comparison["before"], comparison["after"]
        errors = []
        for key in ("correct_top1", "correct_top5"):
            if abs(before[key] - after[key]) > 1:
                errors.append(f"{key} {before[key]} before fusing vs {after[key]} after")
        if comparison["samples"] == 0:
            errors.append("the validation set is empty, nothing to verify the fused model on")
        error = None
        if errors:
            error = "fused model disagrees with the trained one on the validation set: " + "; ".join(errors)

        input_size = data["input_size"]
        # The checkpoint holding the weights fused here: last.ckpt (LastCheckpoint, or save_last=True).
        source = next(
            (c.last_model_path for c in trainer.checkpoint_callbacks if getattr(c, "last_model_path", "")),
            None,
        )
        report: dict[str, Any] = {
            "format": FUSE_REPORT_FORMAT,
            "version": FUSE_REPORT_VERSION,
            "ok": error is None,
            "error": error,
            "model": model_hp,
            "block": block_hp,
            "fold_bn": self.fold_bn,
            "epoch": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            "source": source,
            "val": comparison,
            "train_model": model_stats(trained, input_size),
            "deploy_model": model_stats(deployed, input_size),
            "files": {"deploy": None, "report": "report.json"},
        }
        deploy_path = out_dir / "deploy.pt"
        if trainer.fast_dev_run:  # a smoke test: the check ran, but one step's weights must not look finished
            report["files"] = {"deploy": None, "report": None}
            log.info(
                "deploy (fast_dev_run, no files written): fused model checked on %d samples, top-1 %.4f -> %.4f%s",
                comparison["samples"],
                before["top1"],
                after["top1"],
                f"; {error}" if error else "",
            )
            return report
        if error is None:
            record = make_deploy_record(
                deployed.state_dict(),
                model_name=model_hp["name"],
                num_classes=model_hp["num_classes"],
                block=block_hp,
                input_size=input_size,
                mean=data["mean"],
                std=data["std"],
                class_names=data.get("class_names"),
                source=source,
                fold_bn=self.fold_bn,
                added_biases=added_biases(trained),
            )
            atomic_torch_save(record, deploy_path)
            report["files"]["deploy"] = deploy_path.name
        report_path = atomic_write_text(json.dumps(report, indent=2) + "\n", out_dir / "report.json")
        if error is None:
            log.info(
                "deploy: %s top-1 %.4f -> %.4f, max |logit diff| %.2e, params %d -> %d; wrote %s",
                model_hp["name"],
                before["top1"],
                after["top1"],
                comparison["max_abs_logit_diff"],
                report["train_model"]["params"],
                report["deploy_model"]["params"],
                deploy_path,
            )
        else:
            log.error("deploy: %s", error)
        _log_to_loggers(trainer, report, deploy_path if error is None else None, report_path)
        return report


def _meta(hparams: dict[str, Any], trainer: L.Trainer) -> tuple[dict, dict, dict]:
    """Model, block and data descriptions of the module (with the datamodule as fallback for data)."""
    if "model" not in hparams:
        raise ValueError("FuseCallback needs a LightningModule with hparams model={'name', 'num_classes'}")
    model_hp = {"name": hparams["model"]["name"], "num_classes": int(hparams["model"]["num_classes"])}
    block_hp = dict(hparams.get("block") or {"name": "base"})
    data = dict(hparams.get("data") or {})
    dm = trainer.datamodule
    for key in ("input_size", "mean", "std", "class_names"):
        if data.get(key) is None and dm is not None and getattr(dm, key, None) is not None:
            data[key] = list(getattr(dm, key))
    return model_hp, block_hp, data_meta(data, model_hp["name"])


def _val_loader(trainer: L.Trainer) -> Iterable:
    """A fresh validation loader of the whole set (the datamodule's, not the distributed one)."""
    dm = trainer.datamodule
    if dm is not None and callable(getattr(dm, "val_dataloader", None)):
        return dm.val_dataloader()
    loaders = trainer.val_dataloaders
    if loaders is None:
        raise ValueError("FuseCallback needs validation data to check the fused model; pass a datamodule")
    return loaders[0] if isinstance(loaders, Sequence) else loaders


def trainer_val_batches(trainer: L.Trainer, loader: Iterable) -> int | None:
    """The validation batches the trainer was told to use (`fast_dev_run`, `limit_val_batches`); None = all.

    So a smoke run (`debug=fdr`, `debug=limit`) does not check the fused model on the whole validation set.
    """
    if trainer.fast_dev_run:
        return int(trainer.fast_dev_run)  # True counts as 1
    limit = trainer.limit_val_batches
    if isinstance(limit, int):
        return max(1, limit)  # 0 (validation off) still checks one batch: the fused model is verified
    if limit >= 1.0:
        return None
    try:
        return max(1, int(len(loader) * limit))  # type: ignore[arg-type]
    except TypeError:  # an iterable loader without a length: all of it
        return None


@torch.no_grad()
def compare_models(
    trained: nn.Module,
    deployed: nn.Module,
    loader: Iterable,
    device: torch.device | str = "cpu",
    limit_batches: int | None = None,
) -> dict[str, Any]:
    """Top-1/top-5 of both models on `loader` and the largest absolute logit difference between them."""
    counts = {"before": [0, 0], "after": [0, 0]}
    samples, max_diff = 0, 0.0
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        for index, batch in enumerate(loader):
            if limit_batches is not None and index >= limit_batches:
                break
            x = batch[0].to(device, dtype=torch.float32)
            y = batch[1].to(device)
            out_before, out_after = trained(x), deployed(x)
            max_diff = max(max_diff, (out_before - out_after).abs().max().item())
            k = min(5, out_before.shape[1])
            for name, logits in (("before", out_before), ("after", out_after)):
                top = logits.topk(k, dim=1).indices
                hits = top == y[:, None]
                counts[name][0] += int(hits[:, 0].sum())
                counts[name][1] += int(hits.any(dim=1).sum())
            samples += len(y)
    denominator = max(samples, 1)

    def summary(name: str) -> dict[str, Any]:
        top1, top5 = counts[name]
        return {
            "top1": top1 / denominator,
            "top5": top5 / denominator,
            "correct_top1": top1,
            "correct_top5": top5,
        }

    return {
        "samples": samples,
        "before": summary("before"),
        "after": summary("after"),
        "max_abs_logit_diff": max_diff,
    }


def deploy_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The numbers of a deploy report as flat `deploy/...` metrics."""
    val = report["val"]
    return {
        "deploy/val_top1_before": float(val["before"]["top1"]),
        "deploy/val_top1_after": float(val["after"]["top1"]),
        "deploy/val_top5_before": float(val["before"]["top5"]),
        "deploy/val_top5_after": float(val["after"]["top5"]),
        "deploy/max_abs_logit_diff": float(val["max_abs_logit_diff"]),
        "deploy/train_params": float(report["train_model"]["params"]),
        "deploy/train_flops": float(report["train_model"]["flops"]),
        "deploy/params": float(report["deploy_model"]["params"]),
        "deploy/flops": float(report["deploy_model"]["flops"]),
    }


def _log_to_loggers(
    trainer: L.Trainer, report: dict[str, Any], deploy_path: Path | None, report_path: Path
) -> None:
    """Send the deploy numbers to every logger (they were finalised by the trainer: save again)."""
    metrics = deploy_metrics(report)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()
        _log_wandb_artifact(logger, report, deploy_path, report_path)


def _log_wandb_artifact(
    logger: Any, report: dict[str, Any], deploy_path: Path | None, report_path: Path
) -> None:
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return
    try:
        import wandb

        from acnet_pl.logging_utils import deploy_artifact_aliases, deploy_artifact_name

        run = logger.experiment
        name = deploy_artifact_name(
            str(run.config.get("task_name") or "train"), report["model"]["name"], report["block"]["name"]
        )
        top1 = float(report["val"]["after"]["top1"])
        artifact = wandb.Artifact(
            name=name,
            type="model",
            metadata={
                "model": report["model"],
                "block": report["block"],
                "ok": report["ok"],
                "val_top1": top1,
                "val_samples": report["val"]["samples"],
                "run": run.name,
            },
        )
        if deploy_path is not None:
            artifact.add_file(str(deploy_path))
        artifact.add_file(str(report_path))
        run.log_artifact(artifact, aliases=deploy_artifact_aliases(run, name, top1, report["ok"]))
    except Exception as err:  # noqa: BLE001 - a failed upload must not lose the files already on disk
        log.warning(
            "deploy: could not log the W&B artifact (%s); the files are in %s", err, report_path.parent
        )
