"""GPU-path costs fixed on CPU-checkable behaviour: channels-last stacked ACB, metrics without host syncs."""

from __future__ import annotations

import math

import pytest
import torch

from acnet_pl.blocks.acb import ACBlock
from acnet_pl.training.module import ACNetModule


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("train", [True, False])
def test_stacked_acb_keeps_channels_last(groups, train):
    torch.manual_seed(0)
    block = ACBlock(8, 12, 3, padding=1, groups=groups, impl="stacked").train(train)
    for bn in (block.square_bn, block.ver_bn, block.hor_bn):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 8, 7, 9, dtype=torch.float64)
    block = block.double()
    reference = block(x)
    out = block(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert torch.allclose(out, reference, rtol=1e-12, atol=1e-12)
    assert block(x).is_contiguous()  # NCHW in, NCHW out


def test_metrics_skip_the_checks_that_sync_with_the_host():
    module = ACNetModule(model={"name": "cifar_quick", "num_classes": 4})
    assert module.train_top1.validate_args is False and module.val_top5.validate_args is False
    # nan_strategy="disable": no `nans.any()` sync, and a NaN loss is averaged as NaN, not dropped.
    module.train_loss(torch.tensor(1.0))
    module.train_loss(torch.tensor(float("nan")))
    assert math.isnan(float(module.train_loss.compute()))
