"""Kernel skeleton analysis (ACNet Sec. 4.3): where in a KxK kernel the magnitude sits, layer by layer.

Computed on the deployed form (``fuse(..., fold_bn=True)`` in float64), so a base and an ACB model are
compared on the kernels they run with, BN scale included, and a deploy file gives the same maps as the
trained model it came from.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from acnet_pl.reparam import fuse


def skeleton_mask(k: int) -> torch.Tensor:
    """Boolean KxK mask of the skeleton: the centre row and the centre column (odd K)."""
    if k < 1 or k % 2 == 0:
        raise ValueError(f"the skeleton needs an odd kernel size, got {k}")
    mask = torch.zeros(k, k, dtype=torch.bool)
    mask[k // 2, :] = True
    mask[:, k // 2] = True
    return mask


def magnitude_map(weight: torch.Tensor) -> torch.Tensor:
    """The (K, K) map of a conv kernel (out, in, K, K): sum of |w| over channels / its maximum (float64)."""
    if weight.dim() != 4:
        raise ValueError(f"a conv kernel has 4 dimensions (out, in, K, K), got shape {tuple(weight.shape)}")
    total = weight.detach().double().abs().sum(dim=(0, 1))
    peak = total.max()
    return total / peak if peak > 0 else total


def skeleton_share(map_: torch.Tensor) -> float:
    """Share of a (K, K) magnitude map on the centre cross: sum over the skeleton / sum over the kernel."""
    total = float(map_.sum())
    if total == 0.0:
        return float("nan")
    return float(map_[skeleton_mask(map_.shape[-1])].sum()) / total


def deployed_kernels(model: nn.Module) -> dict[str, torch.Tensor]:
    """The KxK kernels (odd K > 1, float64, BN folded in) of every conv of ``model``'s deployed form."""
    deployed = fuse(copy.deepcopy(model).double(), fold_bn=True, inplace=True)
    return {
        name: m.weight.detach()
        for name, m in deployed.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size[0] == m.kernel_size[1] > 1 and m.kernel_size[0] % 2
    }


def kernel_maps(model: nn.Module) -> dict[str, torch.Tensor]:
    """The magnitude map of every KxK conv of ``model``'s deployed form (see ``deployed_kernels``)."""
    return {name: magnitude_map(w) for name, w in deployed_kernels(model).items()}


def average_maps(maps: Mapping[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """The mean map over layers, per kernel size K (each layer's map has maximum 1, so layers weigh alike)."""
    by_k: dict[int, list[torch.Tensor]] = {}
    for m in maps.values():
        by_k.setdefault(int(m.shape[-1]), []).append(m)
    return {k: torch.stack(ms).mean(dim=0) for k, ms in sorted(by_k.items())}


def summarize_kernels(model: nn.Module) -> dict:
    """Every kernel number of ``model`` as plain values: per layer map and share, per K average and share."""
    maps = kernel_maps(model)
    return {
        "layers": {
            name: {"kernel_size": int(m.shape[-1]), "skeleton_share": skeleton_share(m), "map": m.tolist()}
            for name, m in maps.items()
        },
        "average": {
            str(k): {
                "layers": sum(1 for m in maps.values() if m.shape[-1] == k),
                "skeleton_share": skeleton_share(m),
                "map": m.tolist(),
            }
            for k, m in average_maps(maps).items()
        },
    }


def _mean_abs(bn: nn.Module | None) -> float | None:
    weight = getattr(bn, "weight", None)
    return None if weight is None else float(weight.detach().abs().mean())


def branch_gamma_stats(model: nn.Module) -> dict[str, dict[str, float | None]]:
    """Mean |gamma| of each BN of every block's ``branch_norms()``, by block name (None: a BN without affine)."""
    stats: dict[str, dict[str, float | None]] = {}
    for name, m in model.named_modules():
        norms = m.branch_norms() if callable(getattr(m, "branch_norms", None)) else {}
        if norms:
            stats[name] = {branch: _mean_abs(bn) for branch, bn in norms.items()}
    return stats


def gamma_branches(*stats: Mapping[str, Mapping[str, float | None]]) -> list[str]:
    """The branch names of ``branch_gamma_stats`` results, in order of first appearance (table columns)."""
    return list(dict.fromkeys(branch for s in stats for block in s.values() for branch in block))


def mean_branch_gammas(stats: Mapping[str, Mapping[str, float | None]]) -> dict[str, float | None]:
    """Mean over blocks of each branch's mean |gamma| (None where no block has a value for it)."""
    out: dict[str, float | None] = {}
    for branch in gamma_branches(stats):
        values = [s[branch] for s in stats.values() if s.get(branch) is not None]
        out[branch] = sum(values) / len(values) if values else None
    return out
