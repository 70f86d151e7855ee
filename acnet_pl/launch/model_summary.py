"""Lightning's model summary of the network only (no torchmetrics rows), with the FLOPs of one image.

Lightning lists every child of the LightningModule (here a dozen metric objects) and counts FLOPs only
with an `example_input_array`. Lightning internals relied on (tests/test_launch.py fails when they
change): the callback's `_summary` hook and `_max_depth`, the summary's `named_modules` and `_model`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch import callbacks
from lightning.pytorch.utilities.model_summary import ModelSummary as Summary
from torch import nn
from torchmetrics import Metric


class NetworkSummary(Summary):
    """Lightning's `ModelSummary` table without the rows of torchmetrics objects (and what they hold)."""

    @property
    def named_modules(self) -> list[tuple[str, nn.Module]]:
        metrics = [name + "." for name, module in self._model.named_modules() if isinstance(module, Metric)]
        return [(name, m) for name, m in super().named_modules if not (name + ".").startswith(tuple(metrics))]


class ModelSummary(callbacks.ModelSummary):
    """Lightning's model summary callback: FLOPs per image (`hparams.data.input_size`), no metric rows;
    `max_depth=2` lists the network's top-level layers."""

    def __init__(self, max_depth: int = 2, **summarize_kwargs: Any) -> None:
        super().__init__(max_depth=max_depth, **summarize_kwargs)

    def _summary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Summary:
        input_size = (dict(pl_module.hparams).get("data") or {}).get("input_size")
        previous = pl_module.example_input_array
        if previous is None and input_size:  # one image: the FLOPs column reads per image
            pl_module.example_input_array = torch.zeros(1, *input_size)
        # compile=true: the batch-1 eval-mode forward runs the eager network; through the compiled one it
        # would compile first and make training recompile (TORCH_LOGS=recompiles)
        compiled = getattr(pl_module, "_compiled", None)
        if compiled is not None:
            object.__setattr__(pl_module, "_compiled", None)
        try:
            return NetworkSummary(pl_module, max_depth=self._max_depth)
        finally:
            pl_module.example_input_array = previous
            if compiled is not None:
                object.__setattr__(pl_module, "_compiled", compiled)
