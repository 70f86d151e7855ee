"""After training: the deploy pipeline on the trained model, its files in `deploy/`, its numbers to the loggers."""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from acnet_pl.deploy.checkpoint import Source
from acnet_pl.deploy.config import LOGIT_RTOL, quantize_options
from acnet_pl.deploy.pipeline import deploy_source
from acnet_pl.deploy.quantization import calibration_images
from acnet_pl.deploy.record import data_meta
from acnet_pl.deploy.report import FUSE_CALLBACK, REPORT_NAME, new_report, write_report
from acnet_pl.reparam import added_biases
from acnet_pl.training.callbacks.divergence import TrainingDiverged
from acnet_pl.training.checkpointing import last_checkpoint

log = logging.getLogger(__name__)


class FuseCallback(Callback):
    """When fitting ends: fuse a copy of the trained model, verify it, write `deploy.pt` + `report.json`.

    Runs `deploy.pipeline.deploy_source` once, on global rank zero, in `on_fit_end`: Lightning calls it
    after the strategy's teardown (no DDP wrapper, SyncBatchNorm reverted) and after every `on_train_end`,
    so a weight average (`callbacks=ema`) is in place whatever the callbacks' order; the pipeline uses no
    collective, so the other ranks may exit meanwhile. A refused model: `report.json` says why, no
    `deploy.pt`, RuntimeError; no training step: ValueError; under `fast_dev_run` nothing is written.

    Args:
        dirpath: where the files go; relative paths are under the trainer's `default_root_dir`.
        fold_bn: also fold every BatchNorm into its conv (fastest inference, no longer the base layout).
        limit_batches: check on at most this many validation batches (None = all).
        logit_rtol: largest accepted max |logit difference| / max |trained logit|.
        quantize: `int8` (or a mapping of `deploy.config.QuantizeOptions`): also deploy.onnx and the verified
            deploy.int8.onnx, calibrated on the datamodule's training images.
    """

    def __init__(
        self,
        dirpath: str = "deploy",
        fold_bn: bool = False,
        limit_batches: int | None = None,
        logit_rtol: float = LOGIT_RTOL,
        quantize: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if limit_batches is not None and limit_batches < 1:
            raise ValueError(f"FuseCallback limit_batches must be None or >= 1, got {limit_batches}")
        if not 0 < logit_rtol < 1:
            raise ValueError(
                f"FuseCallback logit_rtol must be in (0, 1), e.g. {LOGIT_RTOL:g}; got {logit_rtol}"
            )
        self.dirpath, self.fold_bn, self.limit_batches = dirpath, fold_bn, limit_batches
        self.logit_rtol = float(logit_rtol)
        self.quantize = quantize_options(quantize)
        self.report: dict[str, Any] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Forget the report of an earlier fit: every fit deploys once."""
        self.report = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Fuse, verify and write the deploy files (global rank zero, once)."""
        if not trainer.is_global_zero or self.report is not None:
            return
        if trainer.global_step == 0:
            message = (
                f"no training step was taken (trainer.max_epochs={trainer.max_epochs}, "
                f"trainer.max_steps={trainer.max_steps}, trainer.limit_train_batches="
                f"{trainer.limit_train_batches}): the model is untrained, so no deploy.pt was written; "
                "train for at least one step"
            )
            self.report = self._write_stopped_report(trainer, pl_module, "not_trained", message)
            raise ValueError(message)
        self.report = self.deploy(trainer, pl_module)
        if not self.report["ok"]:
            raise RuntimeError(
                f"FuseCallback: {self.report['error']} (see {self.output_dir(trainer)}/report.json)"
            )

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """A run stopped by `TrainingDiverged`: `report.json` says so (no deploy.pt), on global rank zero."""
        if isinstance(exception, TrainingDiverged) and trainer.is_global_zero and self.report is None:
            self.report = self._write_stopped_report(trainer, pl_module, "diverged", str(exception))

    def output_dir(self, trainer: L.Trainer) -> Path:
        """The absolute deploy folder of this trainer."""
        return Path(trainer.default_root_dir) / self.dirpath  # an absolute dirpath stays as it is

    def deploy(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The deploy pipeline on a copy of `pl_module.model` and the trainer's validation data; the report."""
        loader = whole_val_loader(trainer)
        if loader is None:
            raise ValueError("FuseCallback needs validation data to check the fused model; pass a datamodule")
        limits = [n for n in (self.limit_batches, trainer_val_batches(trainer, loader)) if n is not None]
        out_dir = None if trainer.fast_dev_run else self.output_dir(trainer)  # one step's weights: no files
        quantize = self.quantize if out_dir is not None else None
        calibration = None
        if quantize is not None:
            calibration = calibration_images(trainer.datamodule, quantize.calibration_images, quantize.seed)
        report = deploy_source(
            _source(trainer, pl_module),
            loader,
            "the validation set",
            tool=FUSE_CALLBACK,
            output_dir=out_dir,
            fold_bn=self.fold_bn,
            rtol=self.logit_rtol,
            device=trainer.strategy.root_device,
            limit_batches=min(limits, default=None),
            report_refusal=True,
            quantize=quantize,
            calibration=calibration,
        )
        val, error, rel = report["val"], report["error"], report["errors"]["fused"]["max_rel"]
        checked = f"fused model checked on {val['samples']} samples, top-1 {val['before']['top1']:.4f} -> "
        checked += f"{val['after']['top1']:.4f}, logit error {'NaN/Inf' if rel is None else f'{rel:.1e}'}"
        if out_dir is None:
            log.info("deploy (fast_dev_run, no files written): %s%s", checked, f"; {error}" if error else "")
            return report
        if error:
            log.error("deploy: %s", error)
        else:
            log.info("deploy: %s; wrote %s", checked, out_dir / "deploy.pt")
        deploy_path = None if error else out_dir / "deploy.pt"
        metrics = deploy_metrics(report)
        for logger in trainer.loggers:  # finalised by the trainer already: save again
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
            if isinstance(logger, WandbLogger):
                _log_wandb_artifact(logger, report, deploy_path, out_dir / REPORT_NAME)
        return report

    def _write_stopped_report(
        self, trainer: L.Trainer, pl_module: L.LightningModule, status: str, error: str
    ) -> dict[str, Any]:
        """`report.json` of a run that has nothing to deploy (`status` says why); no deploy.pt."""
        hparams, out_dir = dict(pl_module.hparams), self.output_dir(trainer)
        model = hparams.get("model") or {}
        report = new_report(
            FUSE_CALLBACK,
            status=status,
            error=error,
            model={"name": model.get("name"), "num_classes": model.get("num_classes")},
            block=dict(hparams.get("block") or {"name": "base"}),
            fold_bn=self.fold_bn,
            source_kind="training",
            epoch=trainer.current_epoch,
            global_step=trainer.global_step,
            files={"report": REPORT_NAME},  # new_report keeps the other file keys, null
            output_dir=str(out_dir.resolve()),
        )
        write_report(report, out_dir / REPORT_NAME)
        return report


def _source(trainer: L.Trainer, pl_module: L.LightningModule) -> Source:
    """A float32 copy of the trained network, described by the module's hparams (gaps: the datamodule's)."""
    hparams = dict(pl_module.hparams)
    if "model" not in hparams:
        raise ValueError("FuseCallback needs a LightningModule with hparams model={'name', 'num_classes'}")
    data = dict(hparams.get("data") or {})
    for key in ("input_size", "mean", "std", "class_names"):
        if data.get(key) is None and getattr(trainer.datamodule, key, None) is not None:
            data[key] = list(getattr(trainer.datamodule, key))
    model = copy.deepcopy(getattr(pl_module, "model", pl_module)).float().eval()
    last = last_checkpoint(trainer)  # the checkpoint holding the weights fused here
    return Source(
        path=None if last is None else Path(last),
        kind="training",
        model=model,
        model_name=hparams["model"]["name"],
        num_classes=int(hparams["model"]["num_classes"]),
        block=dict(hparams.get("block") or {"name": "base"}),
        added_biases=added_biases(model),
        epoch=int(trainer.current_epoch),
        global_step=int(trainer.global_step),
        pretrained_from=hparams["model"].get("weights"),
        **data_meta(data, hparams["model"]["name"]),
    )


def whole_val_loader(trainer: L.Trainer) -> Iterable | None:
    """A fresh validation loader of the whole set (the datamodule's, not the distributed one); None if none."""
    dm = trainer.datamodule
    if dm is not None and callable(getattr(dm, "val_dataloader", None)):
        return dm.val_dataloader()
    loaders = trainer.val_dataloaders
    return loaders[0] if isinstance(loaders, Sequence) else loaders


def trainer_val_batches(trainer: L.Trainer, loader: Iterable) -> int | None:
    """The validation batches the trainer was told to use (`fast_dev_run`, `limit_val_batches`); None = all."""
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


def deploy_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The numbers of a deploy report as flat `deploy/...` metrics (none for a run with nothing deployed)."""
    val = report["val"]
    if val is None:
        return {}
    max_abs = report["errors"]["fused"]["max_abs"]
    metrics = {
        f"deploy/val_{k}_{when}": val[when][k] for k in ("top1", "top5") for when in ("before", "after")
    }
    metrics["deploy/max_abs_logit_diff"] = float("nan") if max_abs is None else max_abs
    for prefix, model in (("deploy/train_", "train_model"), ("deploy/", "deploy_model")):
        metrics |= {prefix + k: report[model][k] for k in ("params", "flops")}
    return {k: float(v) for k, v in metrics.items()}


def deploy_artifact_name(task_name: str, model: str, block: str) -> str:
    """One W&B artifact name per experiment and arm (`deploy-<task>-<model>-<block>`): runs add versions."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"deploy-{task_name}-{model}-{block}")


def best_alias_due(previous_best_top1: float | None, top1: float) -> bool:
    """Whether a new deploy version takes the `best` alias: no version had it, or it is at least as good."""
    return previous_best_top1 is None or top1 >= previous_best_top1


def deploy_artifact_aliases(run: Any, name: str, top1: float, ok: bool) -> list[str]:
    """`failed` for a refused model; else `latest`, and `best` when its val top-1 is at least the `best`
    version's, looked up online (one W&B API request; offline or when it fails: `latest` only)."""
    if not ok:
        return ["failed"]
    if run.settings.mode in ("offline", "dryrun"):
        return ["latest"]
    try:
        import wandb  # slow to import; only runs with a WandbLogger reach this

        try:
            previous = wandb.Api().artifact(f"{run.entity}/{run.project}/{name}:best", type="model")
            previous_top1 = previous.metadata.get("val_top1")
        except ValueError:  # wandb: "... not found": no version has the alias yet
            previous_top1 = None
        due = best_alias_due(None if previous_top1 is None else float(previous_top1), top1)
    except Exception as err:  # noqa: BLE001 - the alias is a convenience; the artifact must still go up
        log.warning("W&B: could not look up the best version of %s (%s); logged as latest only", name, err)
        due = False
    return ["latest", "best"] if due else ["latest"]


def _log_wandb_artifact(
    logger: WandbLogger, report: dict[str, Any], deploy_path: Path | None, report_path: Path
) -> None:
    """`deploy.pt` (if written) and `report.json` as a new version of the run's deploy artifact."""
    try:
        import wandb  # slow to import; only runs with a WandbLogger reach this

        run = logger.experiment
        task = str(run.config.get("task_name") or "train")
        name = deploy_artifact_name(task, report["model"]["name"], report["block"]["name"])
        top1 = float(report["val"]["after"]["top1"])
        meta = {"model": report["model"], "block": report["block"], "ok": report["ok"], "val_top1": top1}
        meta |= {"val_samples": report["val"]["samples"], "run": run.name}
        artifact = wandb.Artifact(name=name, type="model", metadata=meta)
        for path in (p for p in (deploy_path, report_path) if p is not None):
            artifact.add_file(str(path))
        run.log_artifact(artifact, aliases=deploy_artifact_aliases(run, name, top1, report["ok"]))
    except Exception as err:  # noqa: BLE001 - a failed upload must not lose the files already on disk
        log.warning(
            "deploy: could not log the W&B artifact (%s); the files are in %s", err, report_path.parent
        )
