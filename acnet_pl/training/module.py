"""The LightningModule: a zoo model (converted to ACB or not), cross-entropy, top-1/top-5, SGD, torch's LR schedules."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.optim import lr_scheduler as schedules
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from acnet_pl.blocks import list_blocks
from acnet_pl.models import build_net, net_summary
from acnet_pl.reparam import ConversionReport
from acnet_pl.utils.config import to_plain

log = logging.getLogger(__name__)

#: The original's recipe: SGD with momentum 0.9, weight decay 1e-4 on every parameter.
DEFAULT_OPTIMIZER: dict[str, Any] = dict(
    _target_="torch.optim.SGD", _partial_=True, lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False
)
#: Cosine annealing to 0, stepped every iteration, optional linear warmup.
DEFAULT_SCHEDULER: dict[str, Any] = dict(
    _target_="acnet_pl.training.module.warmup_cosine", _partial_=True, warmup_epochs=0.0, min_lr_ratio=0.0
)
#: Biases learn twice as fast (the original's rule); None = the optimizer's weight decay.
DEFAULT_PARAM_GROUPS: dict[str, Any] = dict(bias_lr_mult=2.0, bias_weight_decay=None, norm_weight_decay=None)

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    min_lr_ratio: float = 0.0,
) -> schedules.LRScheduler:
    """Linear warmup over `warmup_epochs`, then cosine from each group's lr to `min_lr_ratio` x `optimizer`'s lr.

    torch's LinearLR then CosineAnnealingLR, stepped every iteration (`total_steps` of them): step s of
    the warmup is at (s + 1) / warmup x lr, the cosine reaches its floor at `total_steps`.
    """
    if total_steps < 1:
        raise ValueError(f"the schedule needs at least one training step, got total_steps={total_steps}")
    if warmup_epochs < 0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(
            f"scheduler.warmup_epochs must be >= 0 and scheduler.min_lr_ratio in [0, 1]; "
            f"got {warmup_epochs} and {min_lr_ratio}"
        )
    warmup = min(int(round(warmup_epochs * steps_per_epoch)), total_steps)
    eta_min = min_lr_ratio * optimizer.defaults["lr"]  # one floor for every group (torch's eta_min)
    cosine = schedules.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup), eta_min=eta_min)
    if warmup == 0:
        return cosine
    linear = schedules.LinearLR(optimizer, start_factor=1 / warmup, total_iters=max(1, warmup - 1))
    return schedules.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def multistep_lr(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    milestones: tuple[float, ...] = (0.5, 0.75),
    gamma: float = 0.1,
) -> schedules.MultiStepLR:
    """torch's MultiStepLR, stepped every iteration, with the milestones as fractions of the training.

    DenseNet's CIFAR recipe: lr / 10 at 50% and 75% of the epochs; fractions follow `trainer.max_epochs`.
    """
    fractions = sorted(float(m) for m in milestones)
    if not all(0.0 < m < 1.0 for m in fractions) or not 0.0 < gamma <= 1.0:
        raise ValueError(
            f"scheduler.milestones must be fractions of the training in (0, 1) and scheduler.gamma in (0, 1]; "
            f"got {list(milestones)} and {gamma}"
        )
    epochs = max(1, round(total_steps / max(1, steps_per_epoch)))
    # at an epoch start, never before the first epoch has run (a milestone of a 1-epoch smoke run)
    return schedules.MultiStepLR(
        optimizer, [max(1, round(m * epochs)) * steps_per_epoch for m in fractions], gamma
    )


def constant_lr(
    optimizer: torch.optim.Optimizer, total_steps: int = 0, steps_per_epoch: int = 0
) -> schedules.ConstantLR:
    """No schedule: every group keeps its lr (same call signature as `warmup_cosine`)."""
    return schedules.ConstantLR(optimizer, factor=1.0, total_iters=0)


def parameter_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    bias_lr_mult: float = 2.0,
    bias_weight_decay: float | None = None,
    norm_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Trainable parameters in named groups: weights, norm weights, biases (lr x `bias_lr_mult`).

    `bias_weight_decay` / `norm_weight_decay`: None = `weight_decay` (the original decays every parameter).
    """
    settings = {
        "weights": (lr, weight_decay),
        "norm_weights": (lr, weight_decay if norm_weight_decay is None else norm_weight_decay),
        "biases": (lr * bias_lr_mult, weight_decay if bias_weight_decay is None else bias_weight_decay),
    }
    params: dict[str, list[nn.Parameter]] = {name: [] for name in settings}
    for module in model.modules():
        for local_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            group = "norm_weights" if isinstance(module, _NORM_TYPES) else "weights"
            params["biases" if local_name == "bias" else group].append(param)
    return [
        {"name": name, "params": params[name], "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name in settings
        if params[name]
    ]


class ACNetModule(L.LightningModule):
    """Image classification with any zoo model, in the base form or with re-parameterisable blocks.

    Every argument but `net` is a plain value, so the checkpoint loads with `torch.load(weights_only=True)`
    and `ACNetModule.load_from_checkpoint(path)` needs nothing else.

    Args:
        model: {"name", "num_classes"} and optionally build_model's "init" and "weights" (the file the
            training starts from; not read when a checkpoint rebuilds the module).
        block: {"name": "base" | a block name, **options of `reparam.convert`}.
        optimizer / scheduler: Hydra configs of partials; the optimizer is called with the parameter groups,
            the scheduler as `scheduler(optimizer, total_steps=..., steps_per_epoch=...)`, stepped every
            iteration (None = no schedule).
        param_groups: keyword arguments of `parameter_groups`.
        data: what the deploy file records: {"input_size": [C, H, W], "mean", "std", "class_names"}.
        net: the network, already built (evaluation: a checkpoint's or a deploy file's, described by
            `model` and `block`); None = `build_net(model, block)`, as `load_from_checkpoint` does.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        block: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] = MappingProxyType(DEFAULT_OPTIMIZER),
        scheduler: Mapping[str, Any] | None = MappingProxyType(DEFAULT_SCHEDULER),
        param_groups: Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
        compile: bool = False,
        channels_last: bool = True,
        data: dict[str, Any] | None = None,
        net: nn.Module | None = None,
    ) -> None:
        super().__init__()
        # Plain containers before save_hyperparameters() reads the arguments (weights_only checkpoints).
        model = to_plain(model)
        block = to_plain(block) if block is not None else {"name": "base"}
        optimizer = to_plain(optimizer)
        scheduler = to_plain(scheduler) or None
        param_groups = {**DEFAULT_PARAM_GROUPS, **(to_plain(param_groups) or {})}
        data = to_plain(data)
        if not {"name", "num_classes"} <= set(model) <= {"name", "num_classes", "init", "weights"}:
            raise ValueError(
                f"model must give 'name' and 'num_classes' (optionally 'init' and 'weights'), "
                f"got {sorted(model)}"
            )
        if "name" not in block:
            raise ValueError(f"block needs a 'name' (base, {', '.join(list_blocks())}), got {sorted(block)}")
        if "lr" not in optimizer:
            raise ValueError("optimizer needs an 'lr' (the bias group's lr is derived from it)")
        unknown = set(param_groups) - set(DEFAULT_PARAM_GROUPS)
        if unknown:
            raise ValueError(
                f"unknown param_groups keys {sorted(unknown)}; known: {sorted(DEFAULT_PARAM_GROUPS)}"
            )
        self.save_hyperparameters(ignore=["net"], logger=False)
        self.conversion_report: ConversionReport | None = None

        if net is None:
            net, self.conversion_report = build_net(model, block)
            rank_zero_only(log.info)(net_summary(model["name"], self.conversion_report))
        self.model = net

        num_classes = model["num_classes"]
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        top5 = min(5, num_classes)
        # No argument or NaN checks: each forces a device-to-host sync every step (a NaN loss stays NaN).
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_loss", MeanMetric(nan_strategy="disable"))
            for name, k in (("top1", 1), ("top5", top5)):
                accuracy = MulticlassAccuracy(num_classes, top_k=k, average="micro", validate_args=False)
                setattr(self, f"{stage}_{name}", accuracy)
        # Persistent, so the best accuracy so far survives a resume from checkpoint.
        self.val_top1_best = MaxMetric()
        self.val_top1_best.persistent(True)
        self._compiled: nn.Module | None = None
        self._channels_last = False

    def configure_model(self) -> None:
        """Channels-last on CUDA and `torch.compile`, once, before the strategy wraps the model."""
        if self._trainer is None:  # load_from_checkpoint calls this too; nothing to prepare then
            return
        if self.hparams.channels_last and self.trainer.strategy.root_device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
            self._channels_last = True
        if self.hparams.compile and self._compiled is None:
            # Kept out of the module tree, so state-dict keys stay those of `self.model`.
            object.__setattr__(self, "_compiled", torch.compile(self.model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images."""
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        net = self._compiled if self._compiled is not None else self.model
        return net(x)

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.criterion(logits, y)  # y: class indices, or (N, C) soft targets (MixUp/CutMix)
        labels = y.argmax(dim=1) if y.ndim == 2 else y
        loss_metric = getattr(self, f"{stage}_loss")
        top1, top5 = getattr(self, f"{stage}_top1"), getattr(self, f"{stage}_top5")
        # update, not forward: no per-batch value to compute; Lightning computes each once per epoch
        loss_metric.update(loss.detach())
        top1.update(logits.detach(), labels)
        top5.update(logits.detach(), labels)
        self.log(f"{stage}/loss", loss_metric, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc_top1", top1, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc_top5", top5, on_step=False, on_epoch=True)
        if stage == "train":
            self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Cross-entropy of one batch; logs loss and top-1/top-5."""
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Loss and top-1/top-5 on a validation batch."""
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Loss and top-1/top-5 on a test batch."""
        self._step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        """Track the best validation top-1 so far (`val/acc_top1_best`, the sweeps' default objective)."""
        if self.trainer.sanity_checking:
            return
        self.val_top1_best(self.val_top1.compute())
        self.log("val/acc_top1_best", self.val_top1_best.compute(), sync_dist=True, prog_bar=True)

    @property
    def best_val_top1(self) -> float | None:
        """The best validation top-1 so far, restored with a checkpoint; None before the first validation."""
        value = float(self.val_top1_best.max_value)
        return value if math.isfinite(value) else None

    def configure_optimizers(self) -> Any:
        """The optimizer over the parameter groups, and the per-iteration schedule."""
        opt_cfg = self.hparams.optimizer
        groups = parameter_groups(
            self.model, opt_cfg["lr"], opt_cfg.get("weight_decay", 0.0), **self.hparams.param_groups
        )
        optimizer = instantiate(opt_cfg)(params=groups)
        if not self.hparams.scheduler:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        batches = self.trainer.num_training_batches
        accumulate = self.trainer.accumulate_grad_batches
        steps_per_epoch = total_steps if math.isinf(batches) else max(1, math.ceil(batches / accumulate))
        scheduler = instantiate(self.hparams.scheduler)(
            optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
