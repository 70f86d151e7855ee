"""The PNG figures of the analysis, from the plain results (``{"label", "kernels", "robustness", "pruning"}``
per run, as ``acnet_pl.cli.analyze`` builds them).

Drawn by matplotlib's Agg canvas directly, without pyplot: nothing needs a display (a cluster node, a
test) and importing this module leaves the user's backend alone (a notebook keeps its inline plots).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure, SubFigure

from acnet_pl.utils.files import atomic_write

ROBUSTNESS_LABELS = {"original": "original", "flip_lr": "flip L-R", "flip_ud": "flip U-D"}
ROBUSTNESS_LABELS |= {f"rot{angle}": f"rot {angle}" for angle in (90, 180, 270)}
PRUNING_LABELS = {
    "none": "none",
    "corners": "corners",
    "skeleton": "skeleton\n(no centre)",
    "centre": "centre",
}
_COLORS = matplotlib.colormaps["tab10"].colors


def _kernel_sizes(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    sizes = {k for run in runs for k in (run.get("kernels") or {}).get("average", {})}
    return sorted(sizes, key=int)


#: What a kernel map's cells show (``analysis.kernels.magnitude_map``, averaged by ``average_maps``).
MAP_VALUE = "sum |w| / layer max (mean over layers)"
#: Maps up to this size print their values in the cells (a colour bar only for larger ones: it would repeat
#: them at half the figure's drawing time).
ANNOTATED_MAX_K = 7


def _draw_maps(fig: Figure | SubFigure, runs: Sequence[Mapping[str, Any]], title: bool = True) -> None:
    sizes = _kernel_sizes(runs)
    if not sizes:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no KxK convs", ha="center", va="center")
        ax.axis("off")
        return
    axes = fig.subplots(len(sizes), len(runs), squeeze=False)
    image, annotated = None, True
    for row, k in enumerate(sizes):
        for col, run in enumerate(runs):
            ax = axes[row][col]
            ax.set(xticks=[], yticks=[])
            average = (run.get("kernels") or {}).get("average", {}).get(k)
            if average is None:
                ax.axis("off")
                continue
            values = np.asarray(average["map"])
            image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="magma")
            if values.shape[0] <= ANNOTATED_MAX_K:
                for (i, j), v in np.ndenumerate(values):
                    color = "black" if v > 0.6 else "white"
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color=color)
            else:
                annotated = False
            ax.set_title(
                f"{run['label']}\n{k}x{k}, {average['layers']} layers\n"
                f"skeleton share {average['skeleton_share']:.2f} (uniform {(2 * int(k) - 1) / int(k) ** 2:.2f})",
                fontsize=9,
            )
    if image is not None and not annotated:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label=MAP_VALUE)
    if title:
        fig.suptitle(f"Kernel magnitude (deployed kernels)\n{MAP_VALUE}", fontsize=10)


def _draw_bars(
    ax: Any, runs: Sequence[Mapping[str, Any]], key: str, labels: Mapping[str, str], title: str
) -> None:
    """Grouped bars of ``run[key]`` per run; a legend only for several runs (one run's label is in the title:
    a legend placed by ``loc="best"`` costs a third of the figure)."""
    have = [run for run in runs if run.get(key)]
    if not have:
        ax.text(0.5, 0.5, f"no {key} numbers (no validation data)", ha="center", va="center")
        ax.axis("off")
        return
    names = [name for name in labels if any(name in run[key] for run in have)]
    x = np.arange(len(names))
    width = 0.8 / len(have)
    for i, run in enumerate(have):
        values = [100.0 * run[key].get(name, np.nan) for name in names]
        offset = (i - (len(have) - 1) / 2) * width
        bars = ax.bar(x + offset, values, width, label=run["label"], color=_COLORS[i % len(_COLORS)])
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(x, [labels[name] for name in names], fontsize=8)
    ax.set(ylabel="val top-1 (%)", ylim=(0, 105))
    ax.set_title(title if len(have) > 1 else f"{title} ({have[0]['label']})", fontsize=10)
    if len(have) > 1:
        ax.legend(fontsize=8, loc="best")
    ax.grid(axis="y", alpha=0.3)


def _figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


#: Margins (inches: left, right, bottom, top) of a bar figure's one axes: room for the y label, two-line
#: tick labels and the title. Its texts are fixed, so the margins are too: the constrained layout they
#: replace would measure every text again at each save (40% of the figure's time).
BAR_MARGINS = (0.6, 0.15, 0.5, 0.35)


def _bars_axes(figsize: tuple[float, float]) -> Any:
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    left, right, bottom, top = BAR_MARGINS
    width, height = figsize
    fig.subplots_adjust(
        left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height
    )
    return fig.subplots()


def kernel_maps_figure(runs: Sequence[Mapping[str, Any]]) -> Figure:
    """The average magnitude map per kernel size (rows) of every run (columns), with the skeleton share."""
    sizes = max(1, len(_kernel_sizes(runs)))
    fig = _figure(figsize=(2.6 * len(runs) + 1.2, 2.9 * sizes + 0.4))
    _draw_maps(fig, runs)
    return fig


def robustness_figure(runs: Sequence[Mapping[str, Any]]) -> Figure:
    """Top-1 of every run on the validation set as it is, flipped and rotated (grouped bars)."""
    ax = _bars_axes((7, 3.6))
    _draw_bars(ax, runs, "robustness", ROBUSTNESS_LABELS, "Flips and rotations of the validation images")
    return ax.figure


def pruning_figure(runs: Sequence[Mapping[str, Any]]) -> Figure:
    """Top-1 of every run's deployed model with corners / skeleton / centre of every KxK kernel zeroed."""
    ax = _bars_axes((6, 3.6))
    _draw_bars(ax, runs, "pruning", PRUNING_LABELS, "Zeroing part of every KxK kernel")
    return ax.figure


def overview_figure(runs: Sequence[Mapping[str, Any]]) -> Figure:
    """Maps, robustness and pruning in one figure (the README's)."""
    sizes = max(1, len(_kernel_sizes(runs)))
    maps_width = 2.4 * len(runs) + 1.2
    fig = _figure(figsize=(maps_width + 11, max(3.2 * sizes, 4.0)))
    left, middle, right = fig.subfigures(1, 3, width_ratios=[maps_width, 6, 5])
    _draw_maps(left, runs, title=False)
    left.suptitle(f"Kernel magnitude (deployed kernels)\n{MAP_VALUE}", fontsize=10)
    _draw_bars(middle.subplots(), runs, "robustness", ROBUSTNESS_LABELS, "Flips and rotations")
    _draw_bars(right.subplots(), runs, "pruning", PRUNING_LABELS, "Zeroing part of every KxK kernel")
    return fig


def quantization_figure(runs: Sequence[Mapping[str, Any]]) -> Figure:
    """Per conv of each run (a deploy report's ``quantization`` with a ``label``), side by side: the logit
    error of that conv alone quantized (bars, log scale) and its kernels' mean per-channel max|w|/std."""
    fig = _figure((5.5 * len(runs), 3.6))
    axes = np.atleast_1d(fig.subplots(1, len(runs), sharey=True))
    for i, (ax, run) in enumerate(zip(axes, runs, strict=True)):
        layers = run["layers"]
        x = np.arange(len(layers))
        ax.bar(x, [r["alone_logit_rel_error"] or np.nan for r in layers], color=_COLORS[i % len(_COLORS)])
        ax.set_yscale("log")
        ax.set_xlabel("conv (graph order)")
        top1 = run["top1"]
        ax.set_title(
            f"{run['label']}: top-1 {100 * top1['fp32']:.2f} -> {100 * top1['int8']:.2f}%", fontsize=9
        )
        peak = ax.twinx()
        peak.plot(x, [(r["kernel"] or {}).get("max_over_std_mean", np.nan) for r in layers], "k.-", lw=0.8)
        peak.set_ylabel("mean max|w|/std", fontsize=8)
    axes[0].set_ylabel("logit error, that conv alone INT8", fontsize=8)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically (``utils.files.atomic_write``)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def figure_to_array(fig: Figure) -> np.ndarray:
    """The (H, W, 3) uint8 RGB image of ``fig`` (for TensorBoard and W&B images)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
