"""Simulated slides in the competition layout: the embedded default data set.

Tissue is rendered as stain concentrations (haematoxylin in nuclei, eosin in cytoplasm/stroma) and
turned into RGB through the Beer-Lambert law with per-slide stain vectors and intensities, so stain
normalization matters. Each slide is a mosaic of compartments (tumour epithelium, stroma, immune
aggregate, fat, necrosis) with their own morphology and cell-type profile. Spots lie on a hexagonal
lattice inside tissue; their abundances follow the compartments and cell density around them (a
strong common ranking of cell types shared by all compartments, so the mean-profile floor is high,
as in real data), with multiplicative noise and dropout zeros.

``python -m src.synthetic`` writes ``data/simulated.h5`` and ``data/simulated_truth.h5``: the truth
holds every spot's observed abundances (the Test slides' hidden labels) and their noise-free
expectation, so later stages can report a test score, the floor and the ceiling.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage, signal
from scipy.spatial import cKDTree

from src.config import SimulateConfig, add_params_arguments, load_params
from src.errors import exit_on_input_error
from src.io_utils import atomic_path
from src.slides import image_chunks

# Reference H&E optical-density vectors (Ruifrok & Johnston).
H_VECTOR = np.array([0.65, 0.70, 0.29])
E_VECTOR = np.array([0.07, 0.99, 0.11])
SPOT_RADIUS = 13.0  # px: spot diameter about 26 px (55 um) at the competition scale


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


def cell_type_profiles(rng: np.random.Generator, n_types: int) -> np.ndarray:
    """Per-compartment mean abundance of each cell type, K x T."""
    # Shared ranking: a steep log-normal mean profile, as real cell-type abundances are.
    base = np.sort(np.exp(rng.normal(0.0, 1.1, n_types)))[::-1]
    profiles = base[None, :] * np.exp(rng.normal(0.0, 0.45, (len(COMPARTMENTS), n_types)))
    for k in range(len(COMPARTMENTS)):
        markers = rng.choice(n_types, size=4, replace=False)
        profiles[k, markers] *= rng.uniform(3.0, 8.0, size=4)
    return profiles / profiles.sum(axis=1, keepdims=True) * 12.0


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    # Fourier-domain blur: cost independent of sigma (large sigmas are slow in real space).
    spectrum = ndimage.fourier_gaussian(np.fft.rfft2(rng.standard_normal(shape)), sigma, n=shape[1])
    field = np.fft.irfft2(spectrum, s=shape)
    return (field - field.mean()) / (field.std() + 1e-12)


def _tissue_and_compartments(rng, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    radial = -2.5 * (xx**2 + yy**2) / 0.25
    tissue = _smooth_field(rng, (size, size), size / 10) + radial + 1.3 > 0
    tissue = ndimage.binary_opening(tissue, iterations=3)
    scores = np.stack(
        [_smooth_field(rng, (size, size), size / 18) + np.log(c.frequency) for c in COMPARTMENTS]
    )
    return tissue, np.argmax(scores, axis=0)


def _ellipse_kernel(a: float, b: float, angle: float) -> np.ndarray:
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
        kernel = _ellipse_kernel(*comp.nucleus_radii, angle)
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


def render_slide(rng: np.random.Generator, size: int, profiles: np.ndarray, pitch: float,
                 max_offset: int) -> SimulatedSlide:
    tissue, comp_map = _tissue_and_compartments(rng, size)
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

    x, y = _spot_lattice(rng, tissue, pitch)
    expected = _expected_abundance(comp_map, tissue, impulses, profiles, x, y)
    noise = np.exp(rng.normal(0.0, 0.35, expected.shape))
    dropout = rng.random(expected.shape) < np.exp(-expected / 0.05)  # rare types drop to zero
    observed = np.where(dropout, 0.0, expected * noise)

    dx, dy = (rng.integers(-max_offset, max_offset + 1, 2) if max_offset > 0 else (0, 0))
    stored_x = np.clip(x - dx, 0, size - 1)
    stored_y = np.clip(y - dy, 0, size - 1)
    return SimulatedSlide(image, stored_x, stored_y, observed, expected, (int(dx), int(dy)))


def _spot_lattice(rng, tissue: np.ndarray, pitch: float) -> tuple[np.ndarray, np.ndarray]:
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


def _expected_abundance(comp_map, tissue, impulses, profiles, x, y) -> np.ndarray:
    """Noise-free abundance: compartment mix and cell density around each spot."""
    sigma = SPOT_RADIUS * 0.8
    fractions = np.stack([
        ndimage.gaussian_filter(((comp_map == k) & tissue).astype(float), sigma)[y, x]
        for k in range(len(COMPARTMENTS))
    ], axis=1)
    fractions /= fractions.sum(axis=1, keepdims=True) + 1e-12
    density = ndimage.gaussian_filter(impulses, sigma)[y, x]
    density_scale = 0.35 + density / (np.median(density) + 1e-12)
    return (fractions @ profiles) * density_scale[:, None]


def simulate(cfg: SimulateConfig) -> tuple[list[tuple[str, str, SimulatedSlide]], list[str]]:
    """All slides as (split, name, slide), plus the cell-type names."""
    rng = np.random.default_rng(cfg.seed)
    profiles = cell_type_profiles(rng, cfg.n_types)
    names = [f"C{i + 1}" for i in range(cfg.n_types)]
    slides = []
    for i in range(cfg.n_train + cfg.n_test):
        split = "Train" if i < cfg.n_train else "Test"
        slide = render_slide(rng, cfg.size, profiles, cfg.pitch, cfg.max_offset)
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


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/simulated.h5"), help="HDF5 to write")
    parser.add_argument("--truth-out", type=Path, default=Path("data/simulated_truth.h5"),
                        help="truth file to write (observed and noise-free abundances)")
    add_params_arguments(parser, "simulate.size=600")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.set)
    slides, names = simulate(params.simulate)
    write_layout(slides, names, args.out, args.truth_out, params.simulate.seed)
    n_spots = sum(len(s.x) for _, _, s in slides)
    print(f"wrote {args.out} ({len(slides)} slides, {n_spots} spots) and {args.truth_out}")


if __name__ == "__main__":
    main()
