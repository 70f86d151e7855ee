"""Lightning's model summary, of the network only (no metric rows) and with real FLOPs per image.

Lightning's summary lists every child of the LightningModule (here: a dozen torchmetrics objects) and
counts FLOPs only when the module has an `example_input_array`. `ModelSummary` here keeps Lightning's
callback and table, drops the rows of metric objects and runs one zero image of the recorded input size
through the model. It uses two Lightning internals (`ModelSummary._summary`, the summary's
`named_modules`); tests/test_day_to_day.py fails when they change.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.utilities.model_summary import ModelSummary as Summary
from torch import nn
from torchmetrics import Metric


class NetworkSummary(Summary):
    """Lightning's `ModelSummary` without the rows of torchmetrics objects."""

    @property
    def named_modules(self) -> list[tuple[str, nn.Module]]:
        """The summary's modules, metric objects (and what they hold) left out."""
        metrics = [name for name, module in self._model.named_modules() if isinstance(module, Metric)]
        return [
            (name, module)
            for name, module in super().named_modules
            if not any(name == m or name.startswith(m + ".") for m in metrics)
        ]


class ModelSummary(LightningModelSummary):
    """Lightning's model summary callback with FLOPs per image (`hparams.data.input_size`) and no metric rows.

    Args:
        max_depth: rows down to this depth of the LightningModule (2: the network's top-level layers).
    """

    def __init__(self, max_depth: int = 2, **summarize_kwargs: Any) -> None:
        super().__init__(max_depth=max_depth, **summarize_kwargs)

    def _summary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Summary:
        data = dict(pl_module.hparams).get("data") or {}
        input_size = data.get("input_size") if isinstance(data, dict) else None
        previous = pl_module.example_input_array
        if previous is None and input_size:
            # One image: the FLOPs column then reads per image, whatever the batch size.
            pl_module.example_input_array = torch.zeros(1, *input_size)
        try:
            return NetworkSummary(pl_module, max_depth=self._max_depth)
        finally:
            pl_module.example_input_array = previous
