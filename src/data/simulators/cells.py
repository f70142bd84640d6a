"""A second family of simulated slides (``simulate.family: cells``), built on other assumptions than the
embedded default's compartments, so that a recipe chosen on one family can be scored on data it was
not designed on.

Where the default links the image to the abundances through large tissue compartments (hundreds of
px), this family links them cell by cell, at the scale of the spot itself:

- **Cells, not compartments.** Every cell is drawn: its nucleus shape, size, darkness, texture and the
  cytoplasm around it follow one of ten morphological classes (lymphoid, plasma, myeloid, granulocyte,
  epithelial, tumour, fibroblast, endothelial, smooth muscle, adipocyte). A spot's abundances are the
  cells whose centres lie within its 55-µm disc (soft-edged, as transcripts diffuse a few µm).
- **What H&E cannot tell.** Several cell types share a class (T-cell subsets are all small dark round
  nuclei): the image shows the class, while the split between its types follows slide-wide
  proportions and a smooth hidden field that no pixel shows.
- **The signal's scale.** Cells are placed by small niches of one to two spot pitches (immune
  aggregates, glands, vessels, stroma, fat), so the context that matters is the spot's own
  neighbourhood, not a region ten spots wide.
- **How slides differ.** Each slide comes from another scanner and section: its colour response
  (gamma and white balance per channel), focus blur and section thickness differ, and its patient's
  niche mix and subtype split differ. Test slides are scanned on another instrument than any training
  slide (stronger blur, a colour response outside the training range) and their niche mix is drawn
  from a shifted prior: what changes between training and test is the acquisition and the patient.
- **Deconvolution-like labels.** Observed abundances are the counts seen through deconvolution:
  types of one class leak into each other, a heavy-tailed residue keeps every value positive (about ten
  decades, as the competition's), and the noise is multiplicative.

Training slides are misregistered by ``simulate.offsets`` as in the default family.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, signal
from scipy.spatial import cKDTree

from src.core.sections import SimulateConfig
from src.data.simulators.compartments import (
    E_VECTOR,
    H_VECTOR,
    SimulatedSlide,
    ellipse_kernel,
    smooth_field,
    spot_lattice,
)
from src.data.spatial import SPOT_RADIUS


@dataclass(frozen=True)
class CellClass:
    name: str
    radii: tuple[float, float]  # nucleus semi-axes, px (2.1 µm/px)
    od: float  # haematoxylin of the nucleus
    cytoplasm: float  # eosin of the cytoplasm around it
    cytoplasm_radius: float  # px
    lobes: int = 1  # granulocytes: a multilobed nucleus
    nucleolus: bool = False  # vesicular nuclei with a dark nucleolus
    oriented: bool = False  # spindle cells follow the local fibre direction
    pleomorphic: bool = False  # sizes vary several-fold


CLASSES = (
    CellClass("lymphoid", (2.3, 2.1), 1.55, 0.10, 2.8),
    CellClass("plasma", (2.6, 2.4), 1.25, 0.55, 4.5),
    CellClass("myeloid", (3.4, 2.6), 0.85, 0.50, 6.0),
    CellClass("granulocyte", (1.2, 1.1), 1.40, 0.45, 4.0, lobes=3),
    CellClass("epithelial", (4.2, 3.2), 0.75, 0.55, 6.5, nucleolus=True),
    CellClass("tumour", (5.0, 4.0), 1.20, 0.45, 7.0, nucleolus=True, pleomorphic=True),
    CellClass("fibroblast", (6.0, 1.3), 1.00, 0.20, 3.0, oriented=True),
    CellClass("endothelial", (5.0, 1.1), 0.95, 0.15, 2.5, oriented=True),
    CellClass("smooth_muscle", (7.0, 1.6), 0.85, 0.90, 5.0, oriented=True),
    CellClass("adipocyte", (2.0, 1.0), 0.70, 0.00, 0.0),
)
# Niches: a composition over classes (relative cell frequencies), cells per 1000 px², stroma eosin.
NICHES = {
    "immune": ({"lymphoid": 8, "plasma": 1.5, "myeloid": 1.5, "granulocyte": 0.5, "endothelial": 0.5}, 16.0, 0.25),
    "gland": ({"epithelial": 8, "lymphoid": 0.6, "myeloid": 0.4, "fibroblast": 0.5}, 11.0, 0.35),
    "tumour": ({"tumour": 8, "myeloid": 1.0, "lymphoid": 1.0, "fibroblast": 0.8, "endothelial": 0.4}, 10.0, 0.40),
    "stroma": ({"fibroblast": 6, "endothelial": 1.5, "myeloid": 1.0, "plasma": 0.8, "smooth_muscle": 1.0}, 4.0, 0.85),
    "vessel": ({"endothelial": 5, "smooth_muscle": 4, "fibroblast": 1, "granulocyte": 1.0}, 6.0, 0.75),
    "fat": ({"adipocyte": 6, "fibroblast": 1.0, "endothelial": 0.6}, 1.0, 0.10),
}
NICHE_SCALE_PX = 22.0  # smoothness of the niche fields (about one spot pitch)
NICHE_PRIOR_SD = 0.9  # log-scale sd of a niche's weight between patients
TEST_NICHE_SHIFT = 0.8  # log-scale shift of the test patients' niche prior (drawn once per data set)
SPLIT_CONCENTRATION = 2.0  # Dirichlet concentration of a class's split into its types, per slide
HIDDEN_SPLIT_SD = 0.7  # log-scale sd of the hidden field moving that split within a slide
HIDDEN_SPLIT_SCALE_PX = 60.0
LEAK_WITHIN_CLASS = 0.25  # share of a type's cells deconvolution assigns to the other types of its class
BACKGROUND_DECADES = (-3.5, -0.8)  # what deconvolution reports of a type where it is absent, relative to a
# spot's cells: a level per type, the same on every spot (reference signatures overlap), so types keep a
# common ranking everywhere (the real data's floor of about 0.55)
DEEP_BACKGROUND_SHARE = 0.25  # types whose signature is distinct: their background sits far lower
DEEP_BACKGROUND_DECADES = (-6.0, -3.5)
BACKGROUND_SPREAD_SD = 1.3  # log-scale spread of that background from spot to spot
NOISE_SD = 0.45  # multiplicative noise of the observed abundances (log scale)
SPOT_EDGE_PX = 2.0  # soft edge of a spot's disc (transcript diffusion)


def simulate_cells(cfg: SimulateConfig) -> tuple[list[tuple[str, str, SimulatedSlide]], list[str]]:
    """All slides as (split, name, slide), plus the cell-type names."""
    rng = np.random.default_rng(cfg.seed)
    type_class = _assign_types(rng, cfg.n_types)
    background = 10.0 ** rng.uniform(*BACKGROUND_DECADES, cfg.n_types)
    deep = rng.random(cfg.n_types) < DEEP_BACKGROUND_SHARE
    background[deep] = 10.0 ** rng.uniform(*DEEP_BACKGROUND_DECADES, int(deep.sum()))
    test_shift = rng.normal(0.0, TEST_NICHE_SHIFT, len(NICHES))
    slides = []
    for i in range(cfg.n_train + cfg.n_test):
        split = "Train" if i < cfg.n_train else "Test"
        offset = tuple(cfg.offsets[i]) if split == "Train" else (0, 0)
        extent = float(rng.uniform(*cfg.tissue_extent))
        niche_prior = rng.normal(0.0, NICHE_PRIOR_SD, len(NICHES)) + (test_shift if split == "Test" else 0.0)
        slides.append((split, f"S_{i + 1}", _render(rng, cfg.size, cfg.pitch, type_class, background, niche_prior,
                                                   extent, split == "Test", offset)))
    return slides, [f"C{i + 1}" for i in range(cfg.n_types)]


def _assign_types(rng, n_types: int) -> np.ndarray:
    """The class of each cell type: every class at least one type (when there are enough), the rest
    where cells are common, as deconvolution references split immune and stromal cells finely."""
    weights = np.array([3, 1, 2, 1, 2, 1.5, 2, 1, 1, 0.5])
    first = np.arange(min(n_types, len(CLASSES)))
    rest = rng.choice(len(CLASSES), n_types - len(first), p=weights / weights.sum())
    return rng.permutation(np.concatenate([first, rest]))


def _render(rng, size: int, pitch: float, type_class: np.ndarray, background: np.ndarray, niche_prior: np.ndarray,
            extent: float, is_test: bool, offset: tuple[int, int]) -> SimulatedSlide:
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    tissue = smooth_field(rng, (size, size), size / 8) - 2.5 * (xx**2 + yy**2) / (0.25 * extent**2) + 1.6 > 0
    tissue = ndimage.binary_opening(tissue, iterations=3)
    scores = np.stack([smooth_field(rng, (size, size), NICHE_SCALE_PX) * 1.6 + w for w in niche_prior])
    niche = np.argmax(scores, axis=0)
    cells_xy, cell_class = _place_cells(rng, tissue, niche)
    haematoxylin, eosin = _draw(rng, size, tissue, niche, cells_xy, cell_class)
    image = _scan(rng, haematoxylin, eosin, is_test)

    x, y = spot_lattice(rng, tissue, pitch)
    dx, dy = offset
    inside = (x - dx >= 0) & (x - dx < size) & (y - dy >= 0) & (y - dy < size)
    x, y = x[inside], y[inside]
    counts = _spot_class_counts(cells_xy, cell_class, x, y)  # N x classes: what the image shows
    cells = _split_into_types(rng, counts, type_class, size, x, y)
    expected, observed = _deconvolve(rng, cells, type_class, background)
    return SimulatedSlide(image, x - dx, y - dy, observed, expected, (int(dx), int(dy)))


def _place_cells(rng, tissue: np.ndarray, niche: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres (x, y) and classes: a Poisson process per niche at its density, each cell's class
    drawn from its niche's composition."""
    index = {c.name: k for k, c in enumerate(CLASSES)}
    xy, classes = [], []
    for n, (composition, density, _) in enumerate(NICHES.values()):
        rows, cols = np.nonzero(tissue & (niche == n))
        count = rng.poisson(density * len(rows) / 1000.0)
        if count == 0:
            continue
        pick = rng.integers(0, len(rows), count)
        xy.append(np.stack([cols[pick], rows[pick]], axis=1) + rng.uniform(-0.5, 0.5, (count, 2)))
        p = np.array(list(composition.values()), float)
        classes.append(np.array([index[c] for c in composition])[rng.choice(len(p), count, p=p / p.sum())])
    if not xy:
        return np.zeros((0, 2)), np.zeros(0, int)
    return np.concatenate(xy), np.concatenate(classes)


def _draw(rng, size: int, tissue, niche, cells_xy, cell_class) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin concentration maps: stroma and fibres, then every cell's nucleus and
    cytoplasm, grouped by class and orientation so each group is one convolution."""
    stroma = np.array([eosin for _, _, eosin in NICHES.values()])[niche] * tissue
    fibre = ndimage.gaussian_filter(rng.standard_normal((size, size)), (0.8, 4.0))
    eosin = stroma * np.clip(1.0 + 0.5 * fibre / (fibre.std() + 1e-12), 0.2, None)
    haematoxylin = np.zeros((size, size))
    direction = np.pi * (smooth_field(rng, (size, size), 40.0) * 0.6)  # local fibre direction
    ix = np.clip(np.rint(cells_xy[:, 0]).astype(int), 0, size - 1)
    iy = np.clip(np.rint(cells_xy[:, 1]).astype(int), 0, size - 1)
    for k, cls in enumerate(CLASSES):
        members = np.flatnonzero(cell_class == k)
        if not len(members):
            continue
        if cls.name == "adipocyte":
            eosin += _adipocyte_membranes(rng, size, cells_xy[members], tissue)
        bins = (np.floor((direction[iy[members], ix[members]] % np.pi) / (np.pi / 6)).astype(int) if cls.oriented
                else rng.integers(0, 3, len(members)))
        sizes = rng.choice([0.75, 1.0, 1.5], len(members)) if cls.pleomorphic else np.ones(len(members))
        for b in np.unique(bins):
            for s in np.unique(sizes):
                group = members[(bins == b) & (sizes == s)]
                impulses = np.zeros((size, size))
                np.add.at(impulses, (iy[group], ix[group]), rng.uniform(0.8, 1.2, len(group)))
                angle = (b + 0.5) * np.pi / 6 if cls.oriented else b * np.pi / 3
                haematoxylin += cls.od * signal.oaconvolve(impulses, _nucleus_kernel(cls, s, angle), mode="same")
                if cls.cytoplasm > 0:
                    disc = ellipse_kernel(cls.cytoplasm_radius * s, cls.cytoplasm_radius * s * 0.8, angle)
                    eosin += cls.cytoplasm * signal.oaconvolve(impulses, disc, mode="same")
    return np.clip(haematoxylin, 0, 2.4), np.clip(eosin, 0, 1.6)


def _nucleus_kernel(cls: CellClass, scale: float, angle: float) -> np.ndarray:
    a, b = cls.radii[0] * scale, cls.radii[1] * scale
    if cls.lobes > 1:  # lobes on a small arc
        half = int(np.ceil(3 * a)) + 2
        kernel = np.zeros((2 * half + 1, 2 * half + 1))
        lobe = ellipse_kernel(a, b, angle)
        r = lobe.shape[0] // 2
        for j in range(cls.lobes):
            theta = angle + (j - 1) * 1.1
            cy, cx = half + int(round(2.2 * a * np.sin(theta))), half + int(round(2.2 * a * np.cos(theta)))
            kernel[cy - r:cy + r + 1, cx - r:cx + r + 1] += lobe
        return np.minimum(kernel, 1.0)
    kernel = ellipse_kernel(a, b, angle)
    if cls.nucleolus:  # vesicular chromatin: a pale rim-stained nucleus with one dark nucleolus
        centre = kernel.shape[0] // 2
        kernel = kernel * 0.7
        kernel[centre - 1:centre + 1, centre - 1:centre + 1] += 0.8
    return kernel


def _adipocyte_membranes(rng, size: int, centres: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Thin eosin rings between neighbouring adipocytes (Voronoi borders around their centres)."""
    if len(centres) < 2:
        return np.zeros((size, size))
    rows, cols = np.nonzero(tissue)
    near, _ = cKDTree(centres).query(np.stack([cols, rows], axis=1), k=2, distance_upper_bound=18.0)
    gap = np.where(np.isfinite(near[:, 1]), near[:, 1] - np.where(np.isfinite(near[:, 0]), near[:, 0], 0.0), np.inf)
    membrane = gap < 1.5
    out = np.zeros((size, size))
    out[rows[membrane], cols[membrane]] = 0.7
    return out


def _scan(rng, haematoxylin: np.ndarray, eosin: np.ndarray, is_test: bool) -> np.ndarray:
    """Beer-Lambert optics, then this slide's section thickness, focus and scanner colour response.
    Test slides come from another scanner: blurrier, with a colour response outside the training range."""
    thickness = rng.uniform(0.75, 1.35)
    h_vec = np.abs(H_VECTOR + rng.normal(0, 0.05, 3))
    e_vec = np.abs(E_VECTOR + rng.normal(0, 0.05, 3))
    h_vec, e_vec = h_vec / np.linalg.norm(h_vec), e_vec / np.linalg.norm(e_vec)
    od = thickness * (haematoxylin[..., None] * h_vec + eosin[..., None] * e_vec) + 0.03
    blur = rng.uniform(1.2, 1.8) if is_test else rng.uniform(0.4, 1.0)
    od = ndimage.gaussian_filter(od, (blur, blur, 0))
    rgb = np.exp(-od)
    gamma = rng.uniform(0.75, 0.85, 3) if is_test else rng.uniform(0.9, 1.15, 3)
    white = rng.uniform(0.9, 1.0, 3)
    rgb = white * rgb**gamma + rng.normal(0, 0.012, rgb.shape)
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


def _spot_class_counts(cells_xy, cell_class, x, y) -> np.ndarray:
    """Cells of each class within each spot's disc, with a soft edge of SPOT_EDGE_PX."""
    counts = np.zeros((len(x), len(CLASSES)))
    if not len(cells_xy):
        return counts
    tree = cKDTree(cells_xy)
    centres = np.stack([x, y], axis=1).astype(float)
    for i, near in enumerate(tree.query_ball_point(centres, SPOT_RADIUS + 3 * SPOT_EDGE_PX)):
        if near:
            d = np.linalg.norm(cells_xy[near] - centres[i], axis=1)
            weight = 1.0 / (1.0 + np.exp((d - SPOT_RADIUS) / (SPOT_EDGE_PX / 2)))
            np.add.at(counts[i], cell_class[near], weight)
    return counts


def _split_into_types(rng, counts, type_class, size: int, x, y) -> np.ndarray:
    """Each class's cells split among its types by this slide's proportions, moved by a hidden field."""
    n_types = len(type_class)
    split = np.zeros(n_types)
    for k in range(len(CLASSES)):
        members = np.flatnonzero(type_class == k)
        if len(members):
            split[members] = rng.dirichlet(np.full(len(members), SPLIT_CONCENTRATION))
    cell = 8
    grid = -(-size // cell)
    hidden = np.stack([smooth_field(rng, (grid, grid), HIDDEN_SPLIT_SCALE_PX / cell) for _ in range(n_types)], -1)
    hidden = hidden[np.minimum(y // cell, grid - 1), np.minimum(x // cell, grid - 1)]
    share = split[None, :] * np.exp(HIDDEN_SPLIT_SD * hidden)
    for k in range(len(CLASSES)):
        members = type_class == k
        if members.any():
            share[:, members] /= share[:, members].sum(axis=1, keepdims=True)
    return counts[:, type_class] * share


def _deconvolve(rng, cells: np.ndarray, type_class: np.ndarray, background: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """(noise-free, observed) reports of a deconvolution method given each spot's cells of each type:
    leakage within a class, a positive heavy-tailed residue, multiplicative noise."""
    expected = cells
    observed = expected * (1 - LEAK_WITHIN_CLASS)
    for k in np.unique(type_class):
        members = type_class == k
        if members.sum() > 1:
            observed[:, members] += LEAK_WITHIN_CLASS * expected[:, members].sum(axis=1, keepdims=True) / members.sum()
        else:
            observed[:, members] += LEAK_WITHIN_CLASS * expected[:, members]
    total = expected.sum(axis=1, keepdims=True) + 1.0
    level = total * background[None, :]
    residue = level * np.exp(rng.normal(0.0, BACKGROUND_SPREAD_SD, expected.shape) - BACKGROUND_SPREAD_SD**2 / 2)
    noise_free = observed + level
    return noise_free, (observed + residue) * np.exp(rng.normal(0.0, NOISE_SD, expected.shape) - NOISE_SD**2 / 2)
