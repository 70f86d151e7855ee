"""Dashboard diagnostics of what ACB does: kernel maps and branch gammas every few epochs, tables at the end.

During training nothing runs forward: the kernel magnitude map and the branch-gamma statistics are read
off the weights after the validation of every ``every_n_epochs``-th epoch (rank zero; the other ranks wait,
so the default interval keeps it under 2% of a CIFAR epoch). At the end of fit (rank zero, once) the
robustness and pruning tables on a bounded part of the validation set, the per-layer fusion error (on
``FUSION_ERROR_IMAGES`` images) and the conversion table are computed. Everything goes to
every active logger (W&B: images and tables; TensorBoard: images and scalars; any logger: scalars) and
to files in ``<run>/diagnostics/`` so that a run without a dashboard shows them too.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset

from acnet_pl.analysis import (
    branch_gamma_stats,
    cached_batches,
    gamma_branches,
    mean_branch_gammas,
    summarize_kernels,
    top1_tables,
)
from acnet_pl.analysis.figures import (
    figure_to_array,
    kernel_maps_figure,
    pruning_figure,
    robustness_figure,
    save_figure,
)
from acnet_pl.reparam import fuse
from acnet_pl.training.callbacks.fuse import whole_val_loader
from acnet_pl.utils.files import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["FUSION_ERROR_IMAGES", "DiagnosticsCallback", "fusion_errors"]

#: Images of the first validation batch the per-layer fusion error is measured on (every block's whole
#: input tensor counts: 8 images of 32x32 are 8,192 positions per channel at the first layers).
FUSION_ERROR_IMAGES = 8


@torch.no_grad()
def fusion_errors(model: nn.Module, x: torch.Tensor, fused: nn.Module | None = None) -> dict[str, float]:
    """Per block of ``model``: max |block(x_in) - fused_conv(x_in)| / max |block(x_in)| on the block's input.

    The inputs are those the blocks see when ``model`` (eval mode) runs on ``x``: one forward pass. ``model``
    is left in the mode it was in. ``fused``: ``reparam.fuse(model, fold_bn=True)`` in ``x``'s dtype when
    made already (each block's fused conv is there under the block's name), else each block is fused here.
    """
    blocks = {
        name: m
        for name, m in model.named_modules()
        if callable(getattr(m, "fused_conv_module", None)) and not getattr(m, "deploy", False)
    }
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, args[0]))
        for name, m in blocks.items()
    ]
    was_training = model.training
    try:
        model.eval()  # the blocks too: their BNs must use the running statistics the fused convs hold
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()
        errors = {}
        for name, xin in inputs.items():
            block = blocks[name]
            ref = block(xin)
            conv = block.fused_conv_module() if fused is None else fused.get_submodule(name)
            out = conv.eval()(xin)
            errors[name] = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    finally:
        model.train(was_training)
    return errors


class DiagnosticsCallback(Callback):
    """Kernel maps and branch gammas every ``every_n_epochs`` validation epochs; robustness, pruning, fusion
    error and conversion tables at the end. Does nothing when the trainer has no logger.

    Args:
        dirpath: folder of the files (relative: inside the trainer's ``default_root_dir``).
        every_n_epochs: after the validation of epochs N-1, 2N-1, ...; 0 = only at the end of fit.
        limit_batches: the end-of-fit robustness/pruning use at most this many validation batches
            (None = all); they are 9 passes over them.
    """

    def __init__(
        self, dirpath: str = "diagnostics", every_n_epochs: int = 10, limit_batches: int | None = 20
    ) -> None:
        super().__init__()
        if limit_batches is not None and limit_batches < 1:
            raise ValueError(f"DiagnosticsCallback limit_batches must be None or >= 1, got {limit_batches}")
        if every_n_epochs < 0:
            raise ValueError(f"DiagnosticsCallback every_n_epochs must be >= 0, got {every_n_epochs}")
        self.dirpath = dirpath
        self.every_n_epochs = every_n_epochs
        self.limit_batches = limit_batches
        self.report: dict[str, Any] | None = None

    def output_dir(self, trainer: L.Trainer) -> Path:
        """The absolute diagnostics folder of this trainer."""
        path = Path(self.dirpath)
        return path if path.is_absolute() else Path(trainer.default_root_dir) / path

    def _active(self, trainer: L.Trainer) -> bool:
        return bool(trainer.loggers) and trainer.is_global_zero

    def _files_dir(self, trainer: L.Trainer) -> Path | None:
        """Where the files go, created; None in a fast dev run (debug=fdr), which writes nothing that looks
        like a result (as the fuse callback: everything is computed, no file is written)."""
        if trainer.fast_dev_run:
            return None
        out = self.output_dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        return out

    # -- every validation epoch -------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Forget the report of an earlier fit."""
        self.report = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Kernel map image and branch-gamma statistics of the current weights (no forward pass)."""
        epoch = int(trainer.current_epoch)
        due = self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0
        if trainer.sanity_checking or not due or not self._active(trainer):
            return
        model = getattr(pl_module, "model", pl_module)
        kernels = summarize_kernels(model)  # the model fused once: the maps and their shares
        gammas = branch_gamma_stats(model)
        step = int(trainer.global_step)
        scalars = {
            f"diagnostics/skeleton_share_{k}x{k}": a["skeleton_share"] for k, a in kernels["average"].items()
        }
        for branch, value in mean_branch_gammas(gammas).items():
            if value is not None:
                scalars[f"diagnostics/gamma_{branch}"] = value
        out = self._files_dir(trainer)
        run = {"label": _block_name(pl_module), "kernels": kernels}
        image = _maps_image(
            run, out and out / "kernel_maps.png", f"epoch {epoch}", _takes_images(trainer.loggers)
        )
        line = {"epoch": epoch, "step": step, **scalars, "branch_gamma": gammas}
        if out is not None:
            with open(out / "epochs.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            _log_image(logger, "diagnostics/kernel_maps", image, step)

    # -- end of fit -------------------------------------------------------------------------------------
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Robustness, pruning, fusion error and conversion tables: files, logger tables and scalars."""
        if not self._active(trainer) or self.report is not None:
            return
        model = _float32_model(getattr(pl_module, "model", pl_module))
        device = trainer.strategy.root_device
        # fused once, in float64 for the kernel maps; robustness and pruning evaluate it in float32
        deployed = fuse(copy.deepcopy(model).double(), fold_bn=True, inplace=True).eval().to(device)
        report: dict[str, Any] = {
            "label": _block_name(pl_module),
            "epoch": int(trainer.current_epoch),
            "kernels": summarize_kernels(deployed),
            "branch_gamma": branch_gamma_stats(model),
            "conversion": _conversion_rows(getattr(pl_module, "conversion_report", None)),
            "robustness": None,
            "pruning": None,
            "fusion_error": None,
        }
        loader = _val_loader(trainer, self.limit_batches)
        if loader is not None:
            batches = cached_batches(loader, device, self.limit_batches)  # also the fusion error's batch
            deployed.float()  # in place: the passes and the fusion error run in float32, as training
            report.update(top1_tables(deployed, batches, device, self.limit_batches, fused=True))
            images = next(iter(batches))[0][:FUSION_ERROR_IMAGES].to(device, dtype=torch.float32)
            report["fusion_error"] = fusion_errors(model, images, deployed)
        self.report = report
        self._write(trainer, report)

    def _write(self, trainer: L.Trainer, report: dict[str, Any]) -> None:
        out = self._files_dir(trainer)
        step = int(trainer.global_step)
        arrays = _takes_images(trainer.loggers)
        images = {
            "diagnostics/kernel_maps": _maps_image(
                report, out and out / "kernel_maps.png", "end of training", arrays
            )
        }
        if report["robustness"] is not None:
            for key, figure in (
                ("robustness", robustness_figure([report])),
                ("pruning", pruning_figure([report])),
            ):
                if out is not None:
                    save_figure(figure, out / f"{key}.png")
                images[f"diagnostics/{key}"] = figure_to_array(figure) if arrays else None
        if out is not None:
            atomic_write_text(json.dumps(report, indent=2) + "\n", out / "diagnostics.json")
        tables = _tables(report)
        scalars = {}
        for key in ("robustness", "pruning"):
            for name, value in (report[key] or {}).items():
                scalars[f"diagnostics/{key}_{name}"] = value
        if report["fusion_error"]:
            scalars["diagnostics/fusion_error_max"] = max(report["fusion_error"].values())
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            for key, image in images.items():
                _log_image(logger, key, image, step)
            _log_tables(logger, tables, step)
            logger.save()
        if out is not None:
            log.info("diagnostics: wrote %s", out)


# --------------------------------------------------------------------------------------------------
# helpers


def _float32_model(model: nn.Module) -> nn.Module:
    """``model`` itself when its floating-point tensors are float32 (the analyses only read it; the fusion
    error's forward puts it in eval mode and back), else a float32 copy (16-true, bf16-true): a copy of
    ResNet-20 alone takes 25 ms."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    if all(t.dtype == torch.float32 for t in tensors if t.is_floating_point()):
        return model
    return copy.deepcopy(model).float()


def _block_name(pl_module: L.LightningModule) -> str:
    block = (getattr(pl_module, "hparams", {}) or {}).get("block") or {}
    return str(block.get("name", "model"))


def _takes_images(loggers: Iterable[Any]) -> bool:
    """Whether a logger shows images (drawing a figure a second time, to an array, costs as much as the PNG)."""
    return any(isinstance(logger, (WandbLogger, TensorBoardLogger)) for logger in loggers)


def _maps_image(run: Mapping[str, Any], path: Path | None, when: str, array: bool = True) -> Any:
    fig = kernel_maps_figure([{**run, "label": f"{run['label']}, {when}"}])
    if path is not None:
        save_figure(fig, path)
    return figure_to_array(fig) if array else None


def _conversion_rows(report: Any) -> dict[str, Any] | None:
    if report is None:
        return None
    return {
        "block": report.block,
        "converted": list(report.converted),
        "skipped": [{"conv": name, "reason": reason} for name, reason in report.skipped],
        "untraced": [{"module": name, "error": error} for name, error in report.untraced],
    }


def _tables(report: Mapping[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """Name -> (columns, rows) of every end-of-fit table."""
    tables: dict[str, tuple[list[str], list[list[Any]]]] = {}
    for key in ("robustness", "pruning"):
        if report[key]:
            tables[f"diagnostics/{key}"] = (["setting", "val_top1"], [[k, v] for k, v in report[key].items()])
    if report["fusion_error"]:
        tables["diagnostics/fusion_error"] = (
            ["layer", "max_rel_error"],
            [[k, v] for k, v in report["fusion_error"].items()],
        )
    gammas = report["branch_gamma"]
    if gammas:
        branches = gamma_branches(gammas)
        tables["diagnostics/branch_gamma"] = (
            ["layer", *branches],
            [[name, *(s.get(b) for b in branches)] for name, s in gammas.items()],
        )
    layers = report["kernels"]["layers"]
    if layers:
        tables["diagnostics/skeleton_share"] = (
            ["layer", "kernel_size", "skeleton_share"],
            [[name, v["kernel_size"], v["skeleton_share"]] for name, v in layers.items()],
        )
    conversion = report["conversion"]
    if conversion is not None:
        rows = [[name, "converted", ""] for name in conversion["converted"]]
        rows += [[s["conv"], "skipped", s["reason"]] for s in conversion["skipped"]]
        rows += [[u["module"], "not traced", u["error"]] for u in conversion["untraced"]]
        tables["diagnostics/conversion"] = (["conv", "status", "reason"], rows)
    return tables


def _log_image(logger: Any, key: str, image: Any, step: int) -> None:
    if image is None:
        return
    try:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=step, dataformats="HWC")
    except Exception as err:  # noqa: BLE001 - a dashboard failure must not stop training; the PNG is on disk
        log.warning("diagnostics: could not log image %s to %s (%s)", key, type(logger).__name__, err)


def _log_tables(
    logger: Any, tables: Mapping[str, tuple[Sequence[str], Sequence[Sequence[Any]]]], step: int
) -> None:
    try:
        if isinstance(logger, WandbLogger):
            for key, (columns, rows) in tables.items():
                logger.log_table(key=key, columns=list(columns), data=[list(r) for r in rows], step=step)
        elif isinstance(logger, TensorBoardLogger):
            # TensorBoard has no tables: a markdown table per key in the Text tab.
            for key, (columns, rows) in tables.items():
                lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                lines += ["| " + " | ".join(_cell(v) for v in r) + " |" for r in rows]
                logger.experiment.add_text(key, "\n".join(lines), global_step=step)
    except Exception as err:  # noqa: BLE001 - as for images
        log.warning("diagnostics: could not log tables to %s (%s)", type(logger).__name__, err)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _val_loader(trainer: L.Trainer, limit_batches: int | None) -> Iterable | None:
    """The datamodule's validation loader (not the distributed one), or None when there is none.

    A DataLoader with workers is rebuilt on its first ``limit_batches`` batches with a worker for every core
    (the other ranks wait meanwhile; a rank's share is cores / devices), kept alive for the passes that
    re-read it (batches too large for ``analysis.cached_batches``).
    """
    loader = whole_val_loader(trainer)
    if (
        not isinstance(loader, DataLoader)
        or loader.num_workers == 0
        or loader.batch_size is None
        or isinstance(loader.dataset, IterableDataset)
    ):
        return loader
    dataset = loader.dataset
    if limit_batches is not None:
        dataset = Subset(dataset, range(min(len(dataset), limit_batches * loader.batch_size)))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return DataLoader(
        dataset,
        batch_size=loader.batch_size,
        num_workers=max(cores, loader.num_workers),
        collate_fn=loader.collate_fn,
        worker_init_fn=loader.worker_init_fn,
        pin_memory=loader.pin_memory,
        persistent_workers=True,
    )
