"""Simulated slides in the competition layout: the embedded default data set.

Tissue is rendered as stain concentrations (haematoxylin in nuclei, eosin in cytoplasm/stroma) and
turned into RGB through the Beer-Lambert law with per-slide stain vectors and intensities, so stain
normalization matters. Each slide is a mosaic of compartments (tumour epithelium, stroma, immune
aggregate, fat, necrosis) with their own morphology, in proportions and tissue extents that differ
between slides. Spots lie on a hexagonal lattice inside tissue.

Abundances mimic deconvolved cell counts as the competition's are: about 9 cells per spot, strictly
positive, spanning about ten decades. Most cell types live everywhere (a common ranking, so the
training mean profile already scores ~0.55); the others live in one or two compartments and sink
1.5-3 decades elsewhere (bimodal within-spot ranks: what the image can tell). On each slide a third of
the types rise or fall up to 6x beyond what the tissue explains, a smooth field that the image does
not show moves every type a little, and measurement noise widens for rare types. The training slides'
stored spot coordinates are misregistered by ``simulate.offsets`` (the test slides are aligned).

``python -m src.simulate`` writes ``data/simulated.h5`` and ``data/simulated_truth.h5``: the truth
holds every spot's observed abundances (the Test slides' hidden labels), their noise-free
expectation and each slide's offset, so later stages can report a test score, the floor and the
ceiling, and check the registration.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage, signal
from scipy.spatial import cKDTree

from src.core.files import atomic_path
from src.core.sections import SimulateConfig
from src.data.slides.layout import image_chunks
from src.data.spatial import SPOT_RADIUS

# Reference H&E optical-density vectors (Ruifrok & Johnston).
H_VECTOR = np.array([0.65, 0.70, 0.29])
E_VECTOR = np.array([0.07, 0.99, 0.11])
# Abundance model, calibrated to the real competition data's printed statistics (README "Embedded
# default"): strictly positive, ~10 decades, ~9 cells per spot, floor ~0.55, strong slide effects.
CELLS_PER_SPOT = 9.0  # mean summed abundance of a spot of mean cell density (real: about 8.9)
LEVEL_LOG_MEAN, LEVEL_LOG_SD = -1.5, 1.0  # log-normal level of a type where it lives (before scaling)
UBIQUITOUS_SHARE = 0.6  # types present in every compartment; the others live in one or two
COMPARTMENT_GAIN_SD = 0.5  # log-scale sd of a type's level between compartments where it lives
RESIDUE_DECADES = (-3.0, -1.5)  # where a region-specific type is absent: decades below its level
COMPARTMENT_MIX_SD = 1.4  # log-scale sd of a compartment's frequency between slides
SLIDE_EFFECT_SHARE = 0.35  # types whose abundance differs between slides beyond the tissue mix
SLIDE_EFFECT_SD = 1.2  # log-scale sd of that difference
MAX_SLIDE_EFFECT = 1.8  # capped at e^1.8 = 6x either way
MAX_DENSITY_SCALE = 2.5  # the densest spots hold at most 2.5x the cells of a mean one
HIDDEN_SD = 0.6  # log-scale sd of abundance variation that the image does not show
HIDDEN_SCALE_PX = 75.0  # its spatial scale (three spot pitches)
PRESENT_NOISE_SD = 0.7  # log-scale measurement noise where a type is present
RESIDUE_NOISE_SD_PER_DECADE = 0.5  # ... growing with each decade below the type's peak
MAX_NOISE_SD = 2.0

@dataclass(frozen=True)
class Compartment:
    name: str
    frequency: float  # prior weight in the mosaic
    nuclei_per_kpx: float  # nuclei per 1000 px^2
    nucleus_radii: tuple[float, float]  # ellipse semi-axes in px
    nucleus_od: float  # haematoxylin concentration of a nucleus
    eosin: float  # eosin concentration of the background tissue
    fibres: bool  # anisotropic fibrous eosin texture
    fat: bool  # empty adipocytes with thin membranes


COMPARTMENTS = (
    Compartment("tumour", 1.0, 6.0, (4.5, 3.5), 1.1, 0.45, False, False),
    Compartment("stroma", 1.0, 1.2, (6.0, 1.8), 1.0, 0.85, True, False),
    Compartment("immune", 0.6, 11.0, (2.4, 2.2), 1.5, 0.25, False, False),
    Compartment("fat", 0.45, 0.15, (3.0, 1.5), 0.8, 0.5, False, True),
    Compartment("necrosis", 0.35, 2.5, (1.5, 1.2), 0.7, 0.35, False, False),
)


@dataclass(frozen=True)
class SimulatedSlide:
    image: np.ndarray  # H x W x 3 float32, 0-1
    x: np.ndarray  # stored spot columns (misregistered by offset)
    y: np.ndarray  # stored spot rows
    observed: np.ndarray  # N x T abundances with noise
    expected: np.ndarray  # N x T noise-free expectation
    offset: tuple[int, int]  # (dx, dy) that maps stored coordinates back onto the tissue


@dataclass(frozen=True)
class CellTypes:
    """What each compartment holds: ``profiles[k, t]`` is the abundance of type t in a spot fully
    covered by compartment k at mean cell density."""

    profiles: np.ndarray  # K x T
    specific: np.ndarray  # T bool: present in one or two compartments only (region-specific)


def cell_types(rng: np.random.Generator, n_types: int) -> CellTypes:
    """UBIQUITOUS_SHARE of the types live everywhere (a ranking shared by every spot); the others live
    in one or two compartments and drop RESIDUE_DECADES elsewhere, so their within-spot rank is bimodal
    and they carry most of what the image can tell. Levels are log-normal: a few types reach tens of
    cells."""
    level = np.exp(rng.normal(LEVEL_LOG_MEAN, LEVEL_LOG_SD, n_types))
    specific = np.ones(n_types, dtype=bool)
    specific[rng.choice(n_types, max(1, round(UBIQUITOUS_SHARE * n_types)), replace=False)] = False
    present = np.zeros((len(COMPARTMENTS), n_types), dtype=bool)
    present[:, ~specific] = True
    for t in np.flatnonzero(specific):
        homes = rng.choice(len(COMPARTMENTS), rng.choice([1, 1, 2]), replace=False)
        present[homes, t] = True
    background = 10.0 ** rng.uniform(*RESIDUE_DECADES, n_types)  # absent: cell2location-style residue
    gain = np.exp(rng.normal(0.0, COMPARTMENT_GAIN_SD, present.shape))
    profiles = level[None, :] * np.where(present, gain, background[None, :])
    return CellTypes(profiles * CELLS_PER_SPOT / profiles.sum(axis=1).mean(), specific)


@dataclass(frozen=True)
class SlideStyle:
    """What differs between slides besides the tissue itself."""

    compartment_weights: np.ndarray  # K: how common each compartment is on this slide
    extent: float  # tissue radius relative to the slide (spot counts differ several-fold)
    type_effect: np.ndarray  # T log-factors: a few types are much more or less abundant on this slide


def slide_style(rng: np.random.Generator, n_types: int, extent: list[float]) -> SlideStyle:
    weights = np.array([c.frequency for c in COMPARTMENTS]) * np.exp(rng.normal(0.0, COMPARTMENT_MIX_SD, len(COMPARTMENTS)))
    effect = np.zeros(n_types)
    shifted = rng.choice(n_types, max(1, round(SLIDE_EFFECT_SHARE * n_types)), replace=False)
    effect[shifted] = np.clip(rng.normal(0.0, SLIDE_EFFECT_SD, len(shifted)), -MAX_SLIDE_EFFECT, MAX_SLIDE_EFFECT)
    return SlideStyle(weights, float(rng.uniform(*extent)), effect)


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    # Fourier-domain blur: cost independent of sigma (large sigmas are slow in real space).
    spectrum = ndimage.fourier_gaussian(np.fft.rfft2(rng.standard_normal(shape)), sigma, n=shape[1])
    field = np.fft.irfft2(spectrum, s=shape)
    return (field - field.mean()) / (field.std() + 1e-12)


def _tissue_and_compartments(rng, size: int, style: SlideStyle) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    radial = -2.5 * (xx**2 + yy**2) / (0.25 * style.extent**2)
    tissue = smooth_field(rng, (size, size), size / 10) + radial + 1.3 > 0
    tissue = ndimage.binary_opening(tissue, iterations=3)
    scores = np.stack(
        [smooth_field(rng, (size, size), size / 18) + np.log(w) for w in style.compartment_weights]
    )
    return tissue, np.argmax(scores, axis=0)


def ellipse_kernel(a: float, b: float, angle: float) -> np.ndarray:
    half = int(np.ceil(max(a, b))) + 1
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(float)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    r = (u / a) ** 2 + (v / b) ** 2
    return np.clip(1.5 - r, 0.0, 1.0)  # soft-edged filled ellipse


def _render_nuclei(rng, region: np.ndarray, comp: Compartment) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin from nuclei in ``region``; also the nuclei centre impulses (for cell density)."""
    n = rng.poisson(comp.nuclei_per_kpx * region.sum() / 1000.0)
    impulses = np.zeros(region.shape)
    if n == 0:
        return impulses, impulses
    rows, cols = np.nonzero(region)
    pick = rng.integers(0, len(rows), n)
    amplitude = comp.nucleus_od * rng.uniform(0.7, 1.3, n)
    haematoxylin = np.zeros(region.shape)
    n_orientations = 4
    group = rng.integers(0, n_orientations, n)
    base_angle = rng.uniform(0, np.pi)
    for g in range(n_orientations):
        sel = group == g
        layer = np.zeros(region.shape)
        np.add.at(layer, (rows[pick[sel]], cols[pick[sel]]), amplitude[sel])
        angle = base_angle + (g * np.pi / n_orientations if not comp.fibres else g * 0.15)
        kernel = ellipse_kernel(*comp.nucleus_radii, angle)
        haematoxylin += signal.oaconvolve(layer, kernel, mode="same")
    np.add.at(impulses, (rows[pick], cols[pick]), 1.0)
    return np.minimum(haematoxylin, comp.nucleus_od * 1.6), impulses


def _render_fat(rng, region: np.ndarray) -> np.ndarray:
    """Eosin of adipocyte membranes: thin Voronoi borders around empty cells (about 30 px)."""
    eosin = np.zeros(region.shape)
    rows, cols = np.nonzero(region)
    if len(rows) < 2:
        return eosin
    n = max(2, int(region.sum() / 700))
    centres = np.stack([rows, cols], axis=1)[rng.integers(0, len(rows), n)]
    dist, _ = cKDTree(centres).query(np.stack([rows, cols], axis=1), k=2)
    membrane = (dist[:, 1] - dist[:, 0]) < 2.0
    eosin[rows[membrane], cols[membrane]] = 0.6
    return eosin


def render_slide(rng: np.random.Generator, size: int, types: CellTypes, style: SlideStyle, pitch: float,
                 offset: tuple[int, int] = (0, 0)) -> SimulatedSlide:
    """One slide: tissue image, spots (stored misregistered by ``offset``) and their abundances."""
    tissue, comp_map = _tissue_and_compartments(rng, size, style)
    haematoxylin = np.zeros((size, size))
    eosin = np.zeros((size, size))
    impulses = np.zeros((size, size))
    texture_fine = ndimage.gaussian_filter(rng.standard_normal((size, size)), 1.0)
    texture_fibre = ndimage.gaussian_filter(rng.standard_normal((size, size)), (0.8, 5.0))
    texture_fibre /= texture_fibre.std() + 1e-12
    texture_fine /= texture_fine.std() + 1e-12
    for k, comp in enumerate(COMPARTMENTS):
        region = tissue & (comp_map == k)
        if comp.fat:
            eosin += _render_fat(rng, region)
        else:
            texture = texture_fibre if comp.fibres else texture_fine
            eosin += region * comp.eosin * np.clip(1.0 + 0.35 * texture, 0.2, None)
        h, imp = _render_nuclei(rng, region, comp)
        haematoxylin += h
        impulses += imp

    # Per-slide stain colour and intensity: what stain normalization has to undo.
    h_vec = np.abs(H_VECTOR + rng.normal(0, 0.07, 3))
    e_vec = np.abs(E_VECTOR + rng.normal(0, 0.07, 3))
    h_vec, e_vec = h_vec / np.linalg.norm(h_vec), e_vec / np.linalg.norm(e_vec)
    h_gain, e_gain = rng.uniform(0.7, 1.3), rng.uniform(0.7, 1.3)
    od = (h_gain * haematoxylin)[..., None] * h_vec + (e_gain * eosin)[..., None] * e_vec
    od = ndimage.gaussian_filter(od, (0.7, 0.7, 0))  # optical blur
    od += 0.02 + 0.01 * rng.standard_normal((size, size, 1))
    image = np.exp(-np.clip(od, 0, None)) + rng.normal(0, 0.01, od.shape)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)

    x, y = spot_lattice(rng, tissue, pitch)
    dx, dy = offset
    # Stored coordinates are misregistered; spots whose stored position leaves the image are not
    # part of the table (a real export holds only spots inside the image).
    inside = (x - dx >= 0) & (x - dx < size) & (y - dy >= 0) & (y - dy < size)
    x, y = x[inside], y[inside]
    expected, peak = _expected_abundance(comp_map, tissue, impulses, types, style, x, y)
    expected *= np.exp(HIDDEN_SD * _hidden_fields(rng, size, types.profiles.shape[1], x, y) - HIDDEN_SD**2 / 2)
    sd = _noise_sd(expected, peak)
    observed = expected * np.exp(rng.standard_normal(expected.shape) * sd - sd**2 / 2)  # mean-preserving
    return SimulatedSlide(image, x - dx, y - dy, observed, expected, (int(dx), int(dy)))


def _hidden_fields(rng, size: int, n_types: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """N x T smooth unit-variance fields over the slide, one per type, sampled at the spots: what
    changes a type's abundance without changing the tissue's look (cell states that H&E does not
    show). Neighbouring spots share it; the image does not."""
    cell = 8  # px per grid cell: the fields vary over ~HIDDEN_SCALE_PX, far above a cell
    grid = -(-size // cell)
    fields = np.stack([smooth_field(rng, (grid, grid), HIDDEN_SCALE_PX / cell) for _ in range(n_types)], axis=-1)
    return fields[np.minimum(y // cell, grid - 1), np.minimum(x // cell, grid - 1)]


def _noise_sd(expected: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """Log-scale noise: moderate where a type is present, wide where it is only a residue (real
    deconvolved abundances span about ten decades, down to ~1e-10, with no exact zeros)."""
    decades_below_peak = np.clip(-np.log10(expected / peak[None, :]), 0.0, None)
    return np.minimum(PRESENT_NOISE_SD + RESIDUE_NOISE_SD_PER_DECADE * decades_below_peak, MAX_NOISE_SD)


def spot_lattice(rng, tissue: np.ndarray, pitch: float) -> tuple[np.ndarray, np.ndarray]:
    """Hexagonal lattice (Visium-like) of spots whose disc is mostly tissue."""
    size = tissue.shape[0]
    row_step = pitch * np.sqrt(3) / 2
    origin = rng.uniform(0, pitch, 2)
    ys = np.arange(origin[1] + SPOT_RADIUS, size - SPOT_RADIUS, row_step)
    xs, yy = [], []
    for i, y in enumerate(ys):
        row_x = np.arange(origin[0] + SPOT_RADIUS + (pitch / 2) * (i % 2), size - SPOT_RADIUS, pitch)
        xs.append(row_x)
        yy.append(np.full_like(row_x, y))
    x = np.rint(np.concatenate(xs)).astype(np.int64)
    y = np.rint(np.concatenate(yy)).astype(np.int64)
    coverage = ndimage.uniform_filter(tissue.astype(float), size=int(2 * SPOT_RADIUS))
    keep = coverage[y, x] > 0.6
    return x[keep], y[keep]


def _expected_abundance(comp_map, tissue, impulses, types: CellTypes, style: SlideStyle, x, y
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free abundance from the compartment mix and cell density around each spot, with this
    slide's type effects; also each type's peak (a spot fully inside its richest compartment)."""
    sigma = SPOT_RADIUS * 0.8
    fractions = np.stack([
        ndimage.gaussian_filter(((comp_map == k) & tissue).astype(float), sigma)[y, x]
        for k in range(len(COMPARTMENTS))
    ], axis=1)
    fractions /= fractions.sum(axis=1, keepdims=True) + 1e-12
    density = ndimage.gaussian_filter(impulses, sigma)[y, x]
    density_scale = np.minimum(0.35 + 0.65 * density / (density.mean() + 1e-12), MAX_DENSITY_SCALE)  # mean ~1
    profiles = types.profiles * np.exp(style.type_effect)[None, :]
    # A spot holds about as many cells on every slide: types that rise crowd the others out.
    profiles *= types.profiles.sum(axis=1, keepdims=True) / profiles.sum(axis=1, keepdims=True)
    expected = (fractions @ profiles) * density_scale[:, None]
    return expected, profiles.max(axis=0)


def simulate(cfg: SimulateConfig) -> tuple[list[tuple[str, str, SimulatedSlide]], list[str]]:
    """All slides as (split, name, slide), plus the cell-type names."""
    rng = np.random.default_rng(cfg.seed)
    types = cell_types(rng, cfg.n_types)
    names = [f"C{i + 1}" for i in range(cfg.n_types)]
    slides = []
    for i in range(cfg.n_train + cfg.n_test):
        split = "Train" if i < cfg.n_train else "Test"
        offset = tuple(cfg.offsets[i]) if split == "Train" else (0, 0)
        slide = render_slide(rng, cfg.size, types, slide_style(rng, cfg.n_types, cfg.tissue_extent), cfg.pitch, offset)
        slides.append((split, f"S_{i + 1}", slide))
    return slides, names


def write_layout(slides, names: list[str], h5_path: Path, truth_path: Path, seed: int) -> None:
    """Write the competition layout and the truth file (each file appears only once complete)."""
    rng = np.random.default_rng(seed + 1)
    with atomic_path(h5_path) as tmp_h5, atomic_path(truth_path) as tmp_truth:
        with h5py.File(tmp_h5, "w") as h5, h5py.File(tmp_truth, "w") as truth:
            truth.attrs["target_names"] = names
            for split, name, s in slides:
                h5.create_dataset(f"images/{split}/{name}", data=s.image, chunks=image_chunks(s.image.shape))
                if split == "Train":
                    dtype = [("x", "<i8"), ("y", "<i8")] + [(n, "<f8") for n in names]
                    table = np.zeros(len(s.x), dtype=dtype)
                    for j, n in enumerate(names):
                        table[n] = s.observed[:, j]
                else:
                    table = np.zeros(len(s.x), dtype=[("x", "<i8"), ("y", "<i8"), ("Test_Set", "<i8")])
                    table["Test_Set"] = rng.integers(1, 3, len(s.x))
                table["x"], table["y"] = s.x, s.y
                h5.create_dataset(f"spots/{split}/{name}", data=table)
                group = truth.create_group(f"{split}/{name}")
                group.create_dataset("observed", data=s.observed)
                group.create_dataset("expected", data=s.expected)
                group.attrs["offset"] = s.offset
