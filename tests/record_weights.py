"""Test helper: a callback that records the network's weights after every optimizer step.

Used in-process as `+callbacks.record._target_=record_weights.RecordWeights` (tests/ is on sys.path under
pytest), so that a test runs `train(cfg)` with the callbacks exactly as the composed config orders them and
reads the record afterwards from `RecordWeights.instances[-1]`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from lightning.pytorch.callbacks import Callback


class RecordWeights(Callback):
    """`states`: the float tensors of `pl_module.model` (float64 copies) after each optimizer step."""

    instances: ClassVar[list[RecordWeights]] = []

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        RecordWeights.instances.append(self)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The current weights; a weight-averaging callback updates its own copy, not these.
        state = pl_module.model.state_dict()
        self.states.append(
            {k: v.detach().double().clone() for k, v in state.items() if v.is_floating_point()}
        )
