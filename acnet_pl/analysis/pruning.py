"""Skeleton vs corner pruning (ACNet Sec. 4.3): top-1 after zeroing parts of every KxK kernel."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from acnet_pl.analysis.kernels import skeleton_mask
from acnet_pl.analysis.robustness import cached_batches, evaluate_top1, robustness
from acnet_pl.reparam import fuse

__all__ = ["PRUNE_REGIONS", "prune_mask", "pruned_model", "pruning", "top1_tables"]

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


def _square_convs(model: nn.Module) -> list[nn.Conv2d]:
    """The square KxK convs of ``model``, K > 1 odd."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size[0] == m.kernel_size[1] > 1 and m.kernel_size[0] % 2
    ]


def _zero(convs: list[nn.Conv2d], region: str) -> None:
    with torch.no_grad():
        for m in convs:
            m.weight[..., prune_mask(m.kernel_size[0], region).to(m.weight.device)] = 0.0


def pruned_model(model: nn.Module, region: str | None) -> nn.Module:
    """The deployed form of ``model`` (BN folded) with ``region`` zeroed in every square KxK conv, K > 1 odd.

    1x1 and non-square convs are left as they are. ``region=None`` returns the deployed form unpruned.
    ``model`` itself is not changed.
    """
    deployed = fuse(copy.deepcopy(model), fold_bn=True, inplace=True).eval()
    if region is not None:
        _zero(_square_convs(deployed), region)
    return deployed


def pruning(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str = "cpu",
    limit_batches: int | None = None,
    unpruned: float | None = None,
) -> dict[str, float]:
    """Top-1 of the deployed model unpruned (``none``) and with each of ``PRUNE_REGIONS`` zeroed.

    ``model`` is fused once; each region is zeroed in that copy and its kernels restored after.
    ``unpruned``: the deployed model's top-1 on these batches when already measured.
    """
    return _pruning_in_place(pruned_model(model, None).to(device), loader, device, limit_batches, unpruned)


def _pruning_in_place(
    deployed: nn.Module,
    loader: Iterable,
    device: torch.device | str,
    limit_batches: int | None,
    unpruned: float | None,
) -> dict[str, float]:
    """``pruning`` of a deployed model, each region zeroed in ``deployed`` itself and its kernels restored."""
    convs = _square_convs(deployed)
    kept = [m.weight.detach().clone() for m in convs]
    if unpruned is None:
        unpruned = evaluate_top1(deployed, loader, None, device, limit_batches)
    result = {"none": unpruned}
    for region in PRUNE_REGIONS:
        _zero(convs, region)
        result[region] = evaluate_top1(deployed, loader, None, device, limit_batches)
        with torch.no_grad():
            for m, weight in zip(convs, kept, strict=True):
                m.weight.copy_(weight)
    return result


def top1_tables(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str = "cpu",
    limit_batches: int | None = None,
    *,
    fused: bool = False,
) -> dict[str, dict[str, float]]:
    """``robustness`` and ``pruning`` of ``model``'s deployed form (it computes what ``model`` does in a third
    of the time): fused once, the batches read once (``cached_batches``), the unpruned pass shared.

    ``fused``: ``model`` is a deployed form already (``pruned_model(m, None)``): it is used as it is, not
    copied, its kernels zeroed in turn and restored.
    """
    deployed = (model if fused else pruned_model(model, None)).to(device)
    batches = cached_batches(loader, device, limit_batches)
    flips = robustness(deployed, batches, device, limit_batches)
    pruned = _pruning_in_place(deployed, batches, device, limit_batches, flips["original"])
    return {"robustness": flips, "pruning": pruned}
