"""Parameter and FLOP counts of one forward pass (torch's FlopCounterMode)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def model_stats(model: nn.Module, input_size: Sequence[int]) -> dict[str, int]:
    """Parameter count and FLOPs (2 per multiply-add) of one eval forward pass of a (C, H, W) sample."""
    params = sum(p.numel() for p in model.parameters())
    ref = next(model.parameters(), torch.zeros(()))  # a model without parameters: CPU, default dtype
    x = torch.zeros(1, *input_size, device=ref.device, dtype=ref.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return {"params": int(params), "flops": int(counter.get_total_flops())}
