"""Pictures of a prediction: spatial maps of a few cell types and per-cell-type Spearman bars.

Figures are built with matplotlib's object API (``Figure``), not pyplot: no GUI backend is chosen,
no global figure state is kept, and importing this module changes nothing in the process.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from scipy.spatial import cKDTree

from src.core.files import atomic_path
from src.model.targets import ABUNDANCE_FLOOR


def spatial_map(path: Path, xy: np.ndarray, pred: np.ndarray, names: list[str], true: np.ndarray | None,
                slide: str, image: np.ndarray | None = None, n_types: int = 4) -> None:
    """Predicted (and true, when known) abundance of the most variable cell types over one slide,
    drawn on the tissue (``image``, in the pixels of ``xy``) when given.

    Each cell type has one logarithmic colour scale, shared by its predicted and true panels and shown
    by a colour bar, so the maps compare by value, not only by pattern (the 2nd to 98th percentile span
    the colours; values beyond take the end colours)."""
    reference = true if true is not None else pred
    chosen = np.argsort(np.log(np.clip(reference, ABUNDANCE_FLOOR, None)).std(axis=0))[::-1][:n_types]
    rows = [("predicted", pred)] + ([("true", true)] if true is not None else [])
    fig = Figure(figsize=(3.4 * len(chosen), 3.0 * len(rows) + 0.6), layout="constrained")
    axes = fig.subplots(len(rows), len(chosen), squeeze=False)
    background = _thumbnail(image)
    size = _marker_size(xy, image, panel_points=0.8 * 3.0 * 72)
    for c, j in enumerate(chosen):
        values = np.concatenate([v[:, j] for _, v in rows])
        low, high = np.percentile(np.clip(values, ABUNDANCE_FLOOR, None), [2, 98])
        norm = LogNorm(vmin=low, vmax=max(high, low * 1.0001), clip=True)
        for r, (label, values) in enumerate(rows):
            ax = axes[r, c]
            if background is not None:
                ax.imshow(background, extent=(0, image.shape[1], image.shape[0], 0), interpolation="bilinear",
                          alpha=0.5)
            points = ax.scatter(xy[:, 0], xy[:, 1], c=np.clip(values[:, j], ABUNDANCE_FLOOR, None), s=size, norm=norm,
                                cmap="viridis", linewidths=0)
            ax.set_title(f"{names[j]} {label}", fontsize=9)
            if background is None:
                ax.invert_yaxis()
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
        bar = fig.colorbar(points, ax=axes[:, c], orientation="horizontal", shrink=0.8)
        bar.set_label(f"{names[j]} abundance (log scale)", fontsize=8)
    fig.suptitle(f"slide {slide}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")


def _marker_size(xy: np.ndarray, image: np.ndarray | None, panel_points: float) -> float:
    """Marker area (points²) of a disc 0.8 spot pitches across, for a panel ``panel_points`` wide."""
    if len(xy) < 2:
        return 20.0
    pitch = float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]))
    extent = max(image.shape[:2]) if image is not None else float(np.ptp(xy, axis=0).max()) + pitch
    return float(np.clip((0.8 * pitch * panel_points / extent) ** 2, 1.0, 200.0))


def _thumbnail(image: np.ndarray | None, longest: int = 1200) -> np.ndarray | None:
    """Every k-th pixel of ``image`` so that its longer side is at most ``longest`` (enough behind a map)."""
    if image is None:
        return None
    step = max(1, int(np.ceil(max(image.shape[:2]) / longest)))
    return np.asarray(image[::step, ::step])


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
