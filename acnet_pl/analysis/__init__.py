"""What ACB does to a network: kernel magnitude maps, flip/rotation robustness, skeleton/corner pruning.

Plain functions on any model (base, ACB in training form, or a deploy file's); ``python -m
acnet_pl.cli.analyze`` runs them on run dirs, checkpoints and deploy files and writes figures and numbers.
"""

from acnet_pl.analysis.kernels import (
    average_maps,
    branch_gamma_stats,
    deployed_kernels,
    gamma_branches,
    kernel_maps,
    magnitude_map,
    mean_branch_gammas,
    skeleton_mask,
    skeleton_share,
    summarize_kernels,
)
from acnet_pl.analysis.pruning import PRUNE_REGIONS, prune_mask, pruned_model, pruning, top1_tables
from acnet_pl.analysis.robustness import TRANSFORMS, cached_batches, evaluate_top1, robustness

__all__ = [
    "PRUNE_REGIONS",
    "TRANSFORMS",
    "average_maps",
    "branch_gamma_stats",
    "cached_batches",
    "deployed_kernels",
    "gamma_branches",
    "evaluate_top1",
    "kernel_maps",
    "magnitude_map",
    "mean_branch_gammas",
    "prune_mask",
    "pruned_model",
    "pruning",
    "robustness",
    "skeleton_mask",
    "skeleton_share",
    "summarize_kernels",
    "top1_tables",
]
