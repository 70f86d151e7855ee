"""`callbacks=ema`: Lightning's EMAWeightAveraging with the average updated by a few foreach kernels, no host read.

Lightning's callback gives torch's `AveragedModel` a per-tensor `avg_fn`: every update is a Python loop of
about four kernels per tensor (1,004 tensors for ResNet-56 ACB) and two host reads of `n_averaged`. Here
the same `AveragedModel` (same checkpoint keys, same resume) is updated by `torch._foreach_*` ops on
lists built once, with a host-side count of the updates: the same averages, to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["EMA", "ForeachEMAModel"]


class ForeachEMAModel(AveragedModel):
    """An `AveragedModel` whose `update_parameters` is the EMA of `get_ema_avg_fn(decay)` as foreach ops.

    Floating tensors: `ema.lerp_(model, 1 - decay)`; integer buffers (BN's `num_batches_tracked`):
    `decay * ema + (1 - decay) * model`, truncated, exactly as `avg_fn`. The first update copies.
    With `warmup`, update n (n = 1, 2, ...) uses `min(decay, (1 + n) / (10 + n))` (the `num_updates` rule
    of TensorFlow's ExponentialMovingAverage): without it a decay meant for a long run (0.9998: the last
    ~5000 steps) averages a short run's first, untrained weights and ships them.
    """

    decay: float = 0.999
    warmup: bool = False
    _updates: int | None = None  # host copy of n_averaged; None = read it once (after a load)
    _lists: tuple[Any, ...] | None = None

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._updates = None
        return super().load_state_dict(*args, **kwargs)

    def _tensor_lists(self, model: nn.Module) -> tuple[Any, ...]:
        """(ours, theirs) float lists, (ours, theirs) integer lists; built once per model."""
        if self._lists is None or self._lists[0] is not model:
            if self.use_buffers:
                ours = [*self.module.parameters(), *self.module.buffers()]
                theirs = [*model.parameters(), *model.buffers()]
            else:
                ours, theirs = list(self.parameters()), list(model.parameters())
            pairs = [(a.detach(), b.detach()) for a, b in zip(ours, theirs, strict=True)]
            floats = [p for p in pairs if p[0].is_floating_point()]
            ints = [p for p in pairs if not p[0].is_floating_point()]
            self._lists = (model, *([[a for a, _ in g], [b for _, b in g]] for g in (floats, ints)))
        return self._lists[1:]

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        (ours, theirs), (ours_int, theirs_int) = self._tensor_lists(model)
        if ours and ours[0].device != theirs[0].device:  # an average kept on another device
            theirs = [t.to(ours[0].device) for t in theirs]
            theirs_int = [t.to(ours[0].device) for t in theirs_int]
        if self._updates is None:
            self._updates = int(self.n_averaged)
        if self._updates == 0:
            torch._foreach_copy_(ours + ours_int, theirs + theirs_int)
        else:
            n = self._updates
            decay = min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay
            if ours:
                torch._foreach_lerp_(ours, theirs, 1.0 - decay)
            if ours_int:
                mixed = torch._foreach_add(
                    torch._foreach_mul(ours_int, decay), torch._foreach_mul(theirs_int, 1.0 - decay)
                )
                torch._foreach_copy_(ours_int, mixed)
        if not self.use_buffers:
            for ema, cur in zip(self.module.buffers(), model.buffers(), strict=True):
                ema.detach().copy_(cur.detach())
        self.n_averaged += 1
        self._updates += 1


class EMA(EMAWeightAveraging):
    """`lightning.pytorch.callbacks.EMAWeightAveraging` (same arguments, plus `warmup`: see
    `ForeachEMAModel`) whose average is a `ForeachEMAModel`."""

    def __init__(self, decay: float = 0.999, warmup: bool = False, **kwargs: Any) -> None:
        super().__init__(decay=decay, **kwargs)
        self.decay = decay
        self.warmup = warmup

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            # Lightning builds a plain AveragedModel in its private `_average_model` (every hook of it reads
            # that); the same object as a ForeachEMAModel differs only in update_parameters
            # (tests/test_ema.py fails when that changes).
            self._average_model.__class__ = ForeachEMAModel
            self._average_model.decay = self.decay
            self._average_model.warmup = self.warmup
