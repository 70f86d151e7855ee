"""Skeleton vs corner pruning (ACNet Sec. 4.3): top-1 after zeroing parts of every KxK kernel."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from acnet_pl.analysis.kernels import skeleton_mask
from acnet_pl.analysis.robustness import evaluate_top1
from acnet_pl.reparam import fuse

__all__ = ["PRUNE_REGIONS", "prune_mask", "pruned_model", "pruning"]

#: The parts of a KxK kernel that can be zeroed: the corners (off the centre cross), the skeleton
#: without its centre, the centre alone.
PRUNE_REGIONS = ("corners", "skeleton", "centre")


def prune_mask(k: int, region: str) -> torch.Tensor:
    """Boolean KxK mask of the positions ``region`` zeroes (odd K)."""
    skeleton = skeleton_mask(k)
    centre = torch.zeros(k, k, dtype=torch.bool)
    centre[k // 2, k // 2] = True
    masks = {"corners": ~skeleton, "skeleton": skeleton & ~centre, "centre": centre}
    if region not in masks:
        raise ValueError(f"unknown pruning region {region!r}; choose one of: {', '.join(PRUNE_REGIONS)}")
    return masks[region]


def pruned_model(model: nn.Module, region: str | None) -> nn.Module:
    """The deployed form of ``model`` (BN folded) with ``region`` zeroed in every square KxK conv, K > 1 odd.

    1x1 and non-square convs are left as they are. ``region=None`` returns the deployed form unpruned.
    ``model`` itself is not changed.
    """
    deployed = fuse(copy.deepcopy(model), fold_bn=True, inplace=True).eval()
    if region is None:
        return deployed
    with torch.no_grad():
        for m in deployed.modules():
            if not isinstance(m, nn.Conv2d):
                continue
            kh, kw = m.kernel_size
            if kh == kw and kh > 1 and kh % 2 == 1:
                m.weight[..., prune_mask(kh, region).to(m.weight.device)] = 0.0
    return deployed


def pruning(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str = "cpu",
    limit_batches: int | None = None,
) -> dict[str, float]:
    """Top-1 of the deployed model unpruned (``none``) and with each of ``PRUNE_REGIONS`` zeroed."""
    return {
        str(region).lower(): evaluate_top1(
            pruned_model(model, region).to(device), loader, None, device, limit_batches
        )
        for region in (None, *PRUNE_REGIONS)
    }
