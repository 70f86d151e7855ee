"""After training: fuse the blocks, prove the fused model equals the trained one, write `deploy/`."""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torch import nn

from acnet_pl.deploy.record import data_meta, deploy_layout, make_deploy_record
from acnet_pl.deploy.report import (
    FUSE_CALLBACK,
    REPORT_NAME,
    file_entries,
    new_report,
    verification_entry,
    write_report,
)
from acnet_pl.deploy.verification import (
    LOGIT_RTOL,
    LogitError,
    full_fp32,
    nonfinite_entries,
    nonfinite_message,
)
from acnet_pl.reparam import added_biases, fuse
from acnet_pl.training.callbacks.divergence import TrainingDiverged
from acnet_pl.utils.files import atomic_torch_save
from acnet_pl.utils.flops import model_stats

log = logging.getLogger(__name__)


class FuseCallback(Callback):
    """When fitting ends: fuse a copy of the trained model and write `deploy.pt` + `report.json`.

    Runs once, on global rank zero only, in `on_fit_end`: Lightning calls that hook after the strategy's
    teardown, so the model is already unwrapped from DDP (and SyncBatchNorm reverted), and after every
    callback's `on_train_end`, so a weight average (`callbacks=ema`) is in place whatever the order of the
    callbacks (tests/test_day_to_day.py runs the config's order, fuse before ema). The work here
    uses no collective, so the other ranks may finish and exit meanwhile. With the subprocess DDP launcher
    rank zero is the process the user started; with `ddp_spawn` it is the first spawned worker, which
    holds the trained weights. Both models are evaluated in eval mode on the full validation set (the
    datamodule's own loader, without a distributed sampler), in float32 with TF32 off
    (`verification.full_fp32`). The fused model is accepted when its weights and both models' logits are
    finite and every logit is within `logit_rtol` x the logit scale of the trained model's
    (`verification.LogitError`, the check deploy.py makes too; `verification.LOGIT_RTOL` says why 1e-3); top-1/top-5 before and after, their agreement and the
    near-ties where rounding may flip a prediction are reported, not judged. Otherwise `report.json`
    records the error, no `deploy.pt` is written and a RuntimeError is raised. An untrained model
    (no training step, e.g. `trainer.max_epochs=0`) is not deployed (ValueError), nor is a run stopped
    by `TrainingDiverged` (`report.json` then says `"status": "diverged"`). `block=base` models go
    through the same path (nothing to fuse, the check still runs).

    Args:
        dirpath: where `deploy.pt` and `report.json` go; relative paths are under the trainer's
            `default_root_dir`.
        fold_bn: also fold every BatchNorm into its conv (fastest inference, no longer the base layout).
        limit_batches: evaluate on at most this many validation batches (None = all).
        logit_rtol: largest accepted max |logit difference| / max |trained logit| (deploy.py's
            `verify.logit_rtol`).
    """

    def __init__(
        self,
        dirpath: str = "deploy",
        fold_bn: bool = False,
        limit_batches: int | None = None,
        logit_rtol: float = LOGIT_RTOL,
    ) -> None:
        super().__init__()
        if limit_batches is not None and limit_batches < 1:
            raise ValueError(f"FuseCallback limit_batches must be None or >= 1, got {limit_batches}")
        if not 0 < logit_rtol < 1:
            raise ValueError(
                f"FuseCallback logit_rtol must be in (0, 1), e.g. {LOGIT_RTOL:g}; got {logit_rtol}"
            )
        self.dirpath = dirpath
        self.fold_bn = fold_bn
        self.limit_batches = limit_batches
        self.logit_rtol = float(logit_rtol)
        self.report: dict[str, Any] | None = None

    # -- hooks -----------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Forget the report of an earlier fit: every fit deploys once."""
        self.report = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Fuse, verify and write the deploy files (global rank zero, once)."""
        if not trainer.is_global_zero or self.report is not None:  # other ranks: nothing to do
            return
        if trainer.global_step == 0:
            message = (
                f"no training step was taken (trainer.max_epochs={trainer.max_epochs}, "
                f"trainer.max_steps={trainer.max_steps}, "
                f"trainer.limit_train_batches={trainer.limit_train_batches}): the model is untrained, "
                "so no deploy.pt was written; train for at least one step"
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
        path = Path(self.dirpath)
        return path if path.is_absolute() else Path(trainer.default_root_dir) / path

    # -- work ------------------------------------------------------------------------------------------
    def deploy(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
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
        with full_fp32():  # TF32 (torch's default for cuDNN convs) would add ~4e-4 of rounding
            comparison = compare_models(
                trained,
                deployed,
                loader,
                device,
                limit_batches=min(limits, default=None),
                rtol=self.logit_rtol,
            )
        error = verdict(comparison, trained, deployed)

        input_size = data["input_size"]
        # The checkpoint holding the weights fused here: last.ckpt (LastCheckpoint, or save_last=True).
        source = next(
            (c.last_model_path for c in trainer.checkpoint_callbacks if getattr(c, "last_model_path", "")),
            None,
        )
        logit_error = comparison.pop("logit_error")
        report = self._new_report(trainer, model_hp, block_hp, source)
        report.update(
            ok=error is None,
            status="deployed" if error is None else "refused",
            error=error,
            layout=deploy_layout(self.fold_bn, added_biases(trained)),
            input_size=list(input_size),
            train_model=model_stats(trained, input_size),
            deploy_model=model_stats(deployed, input_size),
            verification=verification_entry(
                f"validation data ({comparison['samples']} samples)",
                comparison["samples"],
                self.logit_rtol,
                "float32, TF32 off",
            ),
            val=comparison,
            output_dir=str(out_dir.resolve()),
        )
        report["errors"]["fused"] = logit_error.summary()
        deploy_path = out_dir / "deploy.pt"
        if trainer.fast_dev_run:  # a smoke test: the check ran, but one step's weights must not look finished
            log.info(
                "deploy (fast_dev_run, no files written): fused model checked on %d samples, top-1 %.4f -> %.4f%s",
                comparison["samples"],
                comparison["before"]["top1"],
                comparison["after"]["top1"],
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
            report["written"] = file_entries(out_dir, [deploy_path.name])
        report["files"]["report"] = REPORT_NAME
        report_path = write_report(report, out_dir / REPORT_NAME)
        if error is None:
            log.info(
                "deploy: %s top-1 %.4f -> %.4f, max |logit diff| %.2e (%.1e of the logit scale), "
                "params %d -> %d; wrote %s",
                model_hp["name"],
                comparison["before"]["top1"],
                comparison["after"]["top1"],
                report["errors"]["fused"]["max_abs"],
                report["errors"]["fused"]["max_rel"],
                report["train_model"]["params"],
                report["deploy_model"]["params"],
                deploy_path,
            )
        else:
            log.error("deploy: %s", error)
        _log_to_loggers(trainer, report, deploy_path if error is None else None, report_path)
        return report

    def _new_report(
        self, trainer: L.Trainer, model: dict[str, Any], block: dict[str, Any], source: str | None
    ) -> dict[str, Any]:
        """A `deploy_report.new_report` of this callback, with the trainer's epoch and step."""
        report = new_report(
            tool=FUSE_CALLBACK,
            model=model,
            block=block,
            fold_bn=self.fold_bn,
            source=source,
            source_kind="training",
        )
        report.update(epoch=int(trainer.current_epoch), global_step=int(trainer.global_step))
        return report

    def _write_stopped_report(
        self, trainer: L.Trainer, pl_module: L.LightningModule, status: str, error: str
    ) -> dict[str, Any]:
        """`report.json` of a run that has nothing to deploy (`status` says why); no deploy.pt."""
        hparams = dict(pl_module.hparams)
        model = hparams.get("model") or {}
        report = self._new_report(trainer, model, dict(hparams.get("block") or {"name": "base"}), None)
        out_dir = self.output_dir(trainer)
        report.update(status=status, error=error, output_dir=str(out_dir.resolve()))
        report["files"]["report"] = REPORT_NAME
        write_report(report, out_dir / REPORT_NAME)
        return report


def verdict(comparison: dict[str, Any], trained: nn.Module, deployed: nn.Module) -> str | None:
    """Why the fused model must not be deployed (one sentence), or None when it passed.

    Args:
        comparison: what `compare_models` returned for the two models (its `logit_error` judges the logits).
    """
    for name, model in (("trained", trained), ("fused", deployed)):
        state = model.state_dict()
        bad = nonfinite_entries(state)
        if bad:
            return f"the {name} model's weights are not finite: {nonfinite_message(bad, len(state))}"
    samples = comparison["samples"]
    if samples == 0:
        return "the validation set is empty, nothing to verify the fused model on"
    for name, key in (("trained", "before"), ("fused", "after")):
        count = comparison["nonfinite_samples"][key]
        if count:
            return f"the {name} model outputs NaN/Inf logits on {count} of {samples} validation samples"
    return comparison["logit_error"].problem(
        "fused model disagrees with the trained one on the validation set", "logit_rtol"
    )


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
    rtol: float = LOGIT_RTOL,
) -> dict[str, Any]:
    """Top-1/top-5 of both models on `loader`, their logit difference, agreement and near-ties.

    Returns: samples; before / after: top1, top5, correct_top1, correct_top5; nonfinite_samples
    {before, after}; top1_agreement (fraction of samples with the same top-1 class); top1_flips /
    top5_flips (samples whose top-1 / top-5 hit changed); near_ties (samples whose 1st/2nd or 5th/6th
    trained logits are within 2 x rtol x scale: only there can a top-1/top-5 hit change while every
    logit is within tolerance); logit_error (the `verification.LogitError` of the fused model's logits
    against the trained model's, with tolerance `rtol`; not JSON, the callback reports its summary).
    """
    counts = {"before": [0, 0], "after": [0, 0]}
    nonfinite = {"before": 0, "after": 0}
    samples, same_top1, flips1, flips5 = 0, 0, 0, 0
    logit_error = LogitError(rtol)
    gaps: list[torch.Tensor] = []  # per sample: the smaller of the 1st-2nd and 5th-6th logit gaps
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        for index, batch in enumerate(loader):
            if limit_batches is not None and index >= limit_batches:
                break
            x = batch[0].to(device, dtype=torch.float32)
            y = batch[1].to(device)
            out_before, out_after = trained(x).double(), deployed(x).double()
            hits = {}
            for name, logits in (("before", out_before), ("after", out_after)):
                nonfinite[name] += int((~torch.isfinite(logits)).any(dim=1).sum())
                k = min(5, logits.shape[1])
                top = logits.topk(k, dim=1).indices
                hit = top == y[:, None]
                hits[name] = (hit[:, 0], hit.any(dim=1))
                counts[name][0] += int(hit[:, 0].sum())
                counts[name][1] += int(hit.any(dim=1).sum())
            logit_error.update(out_before, out_after)
            same_top1 += int((out_before.argmax(1) == out_after.argmax(1)).sum())
            flips1 += int((hits["before"][0] != hits["after"][0]).sum())
            flips5 += int((hits["before"][1] != hits["after"][1]).sum())
            gaps.append(_rank_gaps(out_before).cpu())
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

    logit_scale = logit_error.summary()["logit_scale"]
    near = 0
    if gaps and logit_scale is not None:
        near = int((torch.cat(gaps) <= 2 * rtol * logit_scale).sum())
    return {
        "samples": samples,
        "before": summary("before"),
        "after": summary("after"),
        "nonfinite_samples": nonfinite,
        "top1_agreement": same_top1 / denominator,
        "top1_flips": flips1,
        "top5_flips": flips5,
        "near_ties": near,
        "logit_error": logit_error,
    }


def _rank_gaps(logits: torch.Tensor) -> torch.Tensor:
    """Per row, the smaller of (1st - 2nd) and (5th - 6th) largest logit (inf where a rank is missing)."""
    k = min(6, logits.shape[1])
    top = logits.topk(k, dim=1).values
    gap = torch.full((logits.shape[0],), float("inf"), dtype=logits.dtype, device=logits.device)
    if k >= 2:
        gap = torch.minimum(gap, top[:, 0] - top[:, 1])
    if k >= 6:
        gap = torch.minimum(gap, top[:, 4] - top[:, 5])
    return gap


def deploy_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The numbers of a deploy report as flat `deploy/...` metrics (none for a run with nothing deployed)."""
    val = report["val"]
    if val is None:
        return {}
    return {
        "deploy/val_top1_before": float(val["before"]["top1"]),
        "deploy/val_top1_after": float(val["after"]["top1"]),
        "deploy/val_top5_before": float(val["before"]["top5"]),
        "deploy/val_top5_after": float(val["after"]["top5"]),
        "deploy/max_abs_logit_diff": _number(report["errors"]["fused"]["max_abs"]),
        "deploy/train_params": float(report["train_model"]["params"]),
        "deploy/train_flops": float(report["train_model"]["flops"]),
        "deploy/params": float(report["deploy_model"]["params"]),
        "deploy/flops": float(report["deploy_model"]["flops"]),
    }


def _number(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _log_to_loggers(
    trainer: L.Trainer, report: dict[str, Any], deploy_path: Path | None, report_path: Path
) -> None:
    """Send the deploy numbers to every logger (they were finalised by the trainer: save again)."""
    metrics = deploy_metrics(report)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()
        _log_wandb_artifact(logger, report, deploy_path, report_path)


def deploy_artifact_name(task_name: str, model: str, block: str) -> str:
    """One W&B artifact name per experiment and arm (`deploy-<task>-<model>-<block>`): runs add versions."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"deploy-{task_name}-{model}-{block}")


def best_alias_due(previous_best_top1: float | None, top1: float) -> bool:
    """Whether a new deploy version takes the `best` alias: no version had it, or it is at least as good."""
    return previous_best_top1 is None or top1 >= previous_best_top1


def deploy_artifact_aliases(run: Any, name: str, top1: float, ok: bool) -> list[str]:
    """Aliases of a new deploy artifact version: `latest`, and `best` when its val top-1 beats the `best` one.

    The `best` version is looked up online (one request to the W&B API); offline (or when the request
    fails) only `latest` is given, since the versions of other runs are not known here. A failed fuse
    check gets `failed` instead.
    """
    if not ok:
        return ["failed"]
    aliases = ["latest"]
    if run.settings.mode in ("offline", "dryrun"):
        return aliases
    try:
        # wandb is slow to import and only runs with a WandbLogger reach this
        import wandb

        try:
            previous = wandb.Api().artifact(f"{run.entity}/{run.project}/{name}:best", type="model")
            previous_top1 = previous.metadata.get("val_top1")
        except ValueError:  # wandb: "... not found": no version has the alias yet
            previous_top1 = None
        if best_alias_due(None if previous_top1 is None else float(previous_top1), top1):
            aliases.append("best")
    except Exception as err:  # noqa: BLE001 - the alias is a convenience; the artifact must still go up
        log.warning("W&B: could not look up the best version of %s (%s); logged as latest only", name, err)
    return aliases


def _log_wandb_artifact(
    logger: Any, report: dict[str, Any], deploy_path: Path | None, report_path: Path
) -> None:
    if not isinstance(logger, WandbLogger):
        return
    try:
        # wandb is slow to import and only runs with a WandbLogger reach this
        import wandb

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
