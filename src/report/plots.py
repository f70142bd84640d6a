"""Pictures of a prediction: spatial maps of a few cell types and per-cell-type Spearman bars.

Figures are built with matplotlib's object API (``Figure``), not pyplot: no GUI backend is chosen,
no global figure state is kept, and importing this module changes nothing in the process.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import rankdata

from src.core.files import atomic_path


def spatial_map(path: Path, xy: np.ndarray, pred: np.ndarray, names: list[str],
                true: np.ndarray | None, slide: str, n_types: int = 4) -> None:
    """Predicted (and true, when known) abundance of the most variable cell types over one slide.

    Colours are ranks within the panel, so predicted and true maps compare by pattern, not scale."""
    reference = true if true is not None else pred
    chosen = np.argsort(np.log1p(np.clip(reference, 0, None)).std(axis=0))[::-1][:n_types]
    rows = [("predicted", pred)] + ([("true", true)] if true is not None else [])
    fig = Figure(figsize=(3.2 * n_types, 3.2 * len(rows)))
    axes = fig.subplots(len(rows), n_types, squeeze=False)
    for r, (label, values) in enumerate(rows):
        for c, j in enumerate(chosen):
            ax = axes[r, c]
            ax.scatter(xy[:, 0], xy[:, 1], c=rankdata(values[:, j]), s=6, cmap="viridis")
            ax.set_title(f"{names[j]} {label}", fontsize=9)
            ax.invert_yaxis()
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"slide {slide}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")


def per_type_bars(path: Path, names: list[str], series: dict[str, np.ndarray]) -> None:
    """Spearman across spots per cell type, one bar per series (e.g. out-of-fold CV and test slide),
    cell types ordered by the first series."""
    labels = list(series)
    order = np.argsort(np.nan_to_num(series[labels[0]], nan=-2))
    height = 0.8 / len(labels)
    fig = Figure(figsize=(6, 0.22 * len(names) * max(1, len(labels) * 0.75) + 1))
    ax = fig.subplots()
    positions = np.arange(len(names))
    for i, label in enumerate(labels):
        ax.barh(positions + (i - (len(labels) - 1) / 2) * height, np.nan_to_num(series[label][order]),
                height=height, label=label)
    ax.set_yticks(positions, [names[i] for i in order])
    ax.set_xlabel("Spearman across spots")
    ax.axvline(0, color="black", linewidth=0.6)
    ax.tick_params(axis="y", labelsize=7)
    if len(labels) > 1:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
