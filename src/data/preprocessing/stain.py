"""Stain normalization (Vahadane / Macenko) with staintools' stain extraction and a fast transform.

staintools' ``StainNormalizer.transform`` refits the source stain matrix on every pixel of the image
and solves one SPAMS lasso per pixel. Here the source stain matrix is fitted once per slide on a
seeded sample of tissue pixels (staintools' Macenko extractor; SPAMS dictionary learning for
Vahadane, as staintools does), and the per-pixel positive lasso -- two unknowns against a 2 x 3 stain
matrix -- is solved in closed form, vectorized over all pixels. The objective and the scaling are
staintools' (lasso lambda 0.01, 99th-percentile concentration matching), so the output agrees with
staintools to about one grey level (``python -m src.bench stain``).
"""
from __future__ import annotations

import typing
from dataclasses import dataclass

import numpy as np

from src.core.errors import InputError
from src.core.sections import StainMethod

METHODS: tuple[str, ...] = typing.get_args(StainMethod)
LASSO_LAMBDA = 0.01  # staintools.miscellaneous.get_concentrations default
VAHADANE_LAMBDA = 0.1  # staintools VahadaneStainExtractor regularizer
VAHADANE_ITERATIONS = 100  # from a Macenko warm start; see vahadane_stain_matrix
LUMINOSITY_THRESHOLD = 0.8  # staintools' tissue mask: LAB luminosity below this is tissue
MIN_TISSUE_PIXELS = 64
CHUNK = 1 << 16  # pixels per step: temporaries stay in cache (2-3x faster than whole-slide arrays)

# Optical density of each uint8 level, staintools' convention: 0 counts as 1, floor 1e-6.
_OD_LUT = np.maximum(-np.log(np.maximum(np.arange(256), 1) / 255.0), 1e-6).astype(np.float32)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 (any shape ending in 3) -> optical density, N x 3 float32."""
    return _OD_LUT[rgb.reshape(-1, 3)]


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean mask of tissue pixels (staintools' luminosity threshold), same H x W as ``rgb``."""
    import cv2

    lab = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2LAB)
    return lab[..., 0] < LUMINOSITY_THRESHOLD * 255.0  # == L / 255 < threshold, without a float copy


def macenko_stain_matrix(tissue_rgb: np.ndarray) -> np.ndarray:
    """staintools' Macenko stain matrix (2 x 3, haematoxylin first) of N x 3 tissue pixels."""
    from staintools import MacenkoStainExtractor

    return MacenkoStainExtractor.get_stain_matrix(np.ascontiguousarray(tissue_rgb.reshape(-1, 1, 3)))


def vahadane_stain_matrix(tissue_rgb: np.ndarray) -> np.ndarray:
    """staintools' Vahadane dictionary learning, warm-started, with a fixed iteration count.

    staintools calls ``spams.trainDL`` from a random start with its default ``iter=-1``, which means
    "run for one second": slow, and machine-dependent (not reproducible). Started from the Macenko
    estimate of the same pixels, 100 iterations land within 0.005 of staintools' matrix (measured on
    scikit-image's IHC section; 0.06 from a random start). SPAMS with several OpenMP threads also
    hangs inside forked workers, so it gets one thread. It sets that count on the OpenMP runtime it
    shares with torch, which would leave every later torch op of the process on one thread; the
    threadpool limit puts the process's count back when it returns.
    """
    import spams
    from threadpoolctl import threadpool_limits

    start = macenko_stain_matrix(tissue_rgb)
    with threadpool_limits(limits=1, user_api="openmp"):
        dictionary = spams.trainDL(
            X=np.asfortranarray(optical_density(tissue_rgb).T, dtype=np.float64),
            D=np.asfortranarray(start.T, dtype=np.float64), K=2, lambda1=VAHADANE_LAMBDA, mode=2,
            modeD=0, posAlpha=True, posD=True, verbose=False, iter=VAHADANE_ITERATIONS, numThreads=1,
        ).T
    if dictionary[0, 0] < dictionary[1, 0]:  # haematoxylin first, as staintools orders them
        dictionary = dictionary[[1, 0], :]
    norms = np.linalg.norm(dictionary, axis=1, keepdims=True)
    return dictionary / np.where(norms > 0, norms, np.nan)  # a zero atom fails is_separable


def is_separable(stain_matrix: np.ndarray) -> bool:
    """Two finite, distinct stain vectors (a uniform patch yields a degenerate matrix)."""
    if not np.isfinite(stain_matrix).all():
        return False
    return bool(np.linalg.det(stain_matrix @ stain_matrix.T) > 1e-4)


def positive_lasso_2(od: np.ndarray, stain_matrix: np.ndarray, lam: float = LASSO_LAMBDA) -> np.ndarray:
    """Exact ``argmin_c 0.5 ||od - c @ M||^2 + lam * sum(c)``, ``c >= 0``, for every row of ``od``.

    Same problem as ``spams.lasso(mode=2, pos=True)`` with a 2-atom dictionary ``M`` (2 x 3). With two
    unknowns the optimum lies in the interior or on one of the axes: solve the unconstrained 2 x 2
    system, and where a component is not positive take the better of the two one-stain solutions.
    Returns N x 2 float32 (haematoxylin, eosin).
    """
    od = np.asarray(od, dtype=np.float32)
    c_h, c_e = _lasso_channels([od[:, 0], od[:, 1], od[:, 2]], stain_matrix, lam)
    return np.stack([c_h, c_e], axis=1)


def _lasso_channels(od: list[np.ndarray], stain_matrix: np.ndarray, lam: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    m = stain_matrix.astype(np.float32)
    lam32 = np.float32(lam)
    r_h = od[0] * m[0, 0] + od[1] * m[0, 1] + od[2] * m[0, 2] - lam32
    r_e = od[0] * m[1, 0] + od[1] * m[1, 1] + od[2] * m[1, 2] - lam32
    gram = stain_matrix @ stain_matrix.T
    inv = np.linalg.inv(gram).astype(np.float32)
    g_hh, g_ee = np.float32(gram[0, 0]), np.float32(gram[1, 1])
    c_h = inv[0, 0] * r_h + inv[0, 1] * r_e  # interior solution
    c_e = inv[1, 0] * r_h + inv[1, 1] * r_e
    interior = (c_h > 0) & (c_e > 0)
    only_h = np.maximum(r_h, 0) / g_hh  # one-stain solutions and their objective values
    only_e = np.maximum(r_e, 0) / g_ee
    use_h = (0.5 * g_hh * only_h - r_h) * only_h <= (0.5 * g_ee * only_e - r_e) * only_e
    np.copyto(c_h, np.where(use_h, only_h, 0), where=~interior)
    np.copyto(c_e, np.where(use_h, 0, only_e), where=~interior)
    return c_h, c_e


def concentrations(rgb: np.ndarray, stain_matrix: np.ndarray, lam: float = LASSO_LAMBDA
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin concentration of every pixel (two float32 vectors), chunk by chunk."""
    import cv2

    channels = [c.reshape(-1) for c in cv2.split(np.ascontiguousarray(rgb))]
    n = len(channels[0])
    c_h, c_e = np.empty(n, np.float32), np.empty(n, np.float32)
    for start in range(0, n, CHUNK):
        part = slice(start, start + CHUNK)
        od = [np.take(_OD_LUT, channel[part]) for channel in channels]
        c_h[part], c_e[part] = _lasso_channels(od, stain_matrix, lam)
    return c_h, c_e


def upper_percentile(values: np.ndarray, q: float, rng: np.random.Generator | None = None) -> float:
    """``np.percentile(values, q)`` (linear interpolation) for a high ``q``, exact but faster.

    Preselects the values above a bound taken from a small sample, so only a few percent of the data
    is partitioned; falls back to ``np.percentile`` if the bound was not low enough.
    """
    n = len(values)
    if n < 100_000:
        return float(np.percentile(values, q))
    position = q / 100.0 * (n - 1)
    lower = int(np.floor(position))
    rng = rng or np.random.default_rng(0)
    bound = np.percentile(values[rng.integers(0, n, 20_000)], max(0.0, q - 1.0))
    top = values[values >= bound]
    rank = lower - (n - len(top))  # rank of the lower order statistic inside ``top``
    if rank < 0:
        return float(np.percentile(values, q))
    upper = min(rank + 1, len(top) - 1)
    part = np.partition(top, [rank, upper])
    low, high = float(part[rank]), float(part[upper])
    return low + (position - lower) * (high - low)


@dataclass(frozen=True)
class SlideStain:
    """What normalizing one slide needs, measured once on a sample of its pixels
    (:meth:`StainNormalizer.measure`): applied to any tile of that slide, pixel by pixel, it gives the
    same pixels as normalizing the whole slide at once."""

    luminosity_p: float | None  # the 95th percentile of LAB luminosity (luminosity standardization), or None
    matrix: np.ndarray | None  # the slide's 2 x 3 stain matrix; None: no separable tissue, left as it is
    target: np.ndarray | None  # the reference matrix scaled by the concentration ratio (2 x 3 float32)


def standardize_luminosity(rgb: np.ndarray, percentile_value: float) -> np.ndarray:
    """staintools' ``LuminosityStandardizer.standardize`` with the luminosity percentile given (measured
    on the whole slide's sample), so a tile gets what the whole slide would."""
    import cv2

    lab = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2LAB)
    luminosity = lab[..., 0].astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        lab[..., 0] = np.clip(255 * luminosity / percentile_value, 0, 255).astype(np.uint8)
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


class StainNormalizer:
    """Map a slide's stain colours onto a reference slide's (same API shape as staintools').

    Everything measured on a slide (its luminosity percentile, stain matrix and concentration
    percentiles) comes from one seeded sample of its pixels (:meth:`sample_index`: every pixel of a
    slide up to ``4 * fit_pixels``, staintools' whole-image statistics; a uniform sample beyond), so a
    slide streamed tile by tile is normalized exactly as the same slide in memory."""

    def __init__(self, method: str = "vahadane", standardize_luminosity: bool = False,
                 fit_pixels: int = 100_000, seed: int = 0):
        if method not in METHODS:
            raise ValueError(f"unknown stain method {method!r} (choose {', '.join(METHODS)})")
        self.method = method
        self.standardize_luminosity = standardize_luminosity
        self.fit_pixels = fit_pixels
        self.seed = seed
        self.stain_matrix_target: np.ndarray | None = None
        self.max_conc_target: np.ndarray | None = None

    def sample_index(self, n_pixels: int) -> np.ndarray | None:
        """Sorted flat indices of the pixels measured on an image of ``n_pixels``; None: all of them."""
        if n_pixels <= 4 * self.fit_pixels:
            return None
        return np.sort(np.random.default_rng(self.seed).integers(0, n_pixels, 4 * self.fit_pixels))

    def sample(self, rgb: np.ndarray) -> np.ndarray:
        """The pixels of an H x W x 3 uint8 image that :meth:`measure` reads (N x 3)."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 uint8 image, got {rgb.dtype} {rgb.shape}")
        pixels = rgb.reshape(-1, 3)
        index = self.sample_index(len(pixels))
        return pixels if index is None else pixels[index]

    def _luminosity(self, pixels: np.ndarray) -> tuple[float | None, np.ndarray]:
        """The sample's luminosity percentile (None when not standardizing) and the sample standardized."""
        if not self.standardize_luminosity:
            return None, pixels
        import cv2

        luminosity = cv2.cvtColor(np.ascontiguousarray(pixels.reshape(-1, 1, 3)), cv2.COLOR_RGB2LAB)[..., 0]
        p = float(np.percentile(luminosity.astype(float), 95))
        return p, standardize_luminosity(pixels.reshape(-1, 1, 3), p).reshape(-1, 3)

    def stain_matrix(self, rgb: np.ndarray) -> np.ndarray | None:
        """Fit a 2 x 3 stain matrix (H first) on the tissue pixels of a seeded sample of ``rgb`` (any
        shape ending in 3). None when there is too little tissue or the two stains cannot be separated."""
        pixels = rgb.reshape(-1, 3)
        if len(pixels) > 4 * self.fit_pixels:  # sample before masking: the mask is the slow part
            pixels = pixels[self.sample_index(len(pixels))]
        tissue = pixels[tissue_mask(pixels.reshape(-1, 1, 3)).reshape(-1)][: self.fit_pixels]
        if len(tissue) < MIN_TISSUE_PIXELS:
            return None
        with np.errstate(invalid="ignore", divide="ignore"):
            fit = vahadane_stain_matrix if self.method == "vahadane" else macenko_stain_matrix
            matrix = fit(tissue)
        return matrix if is_separable(matrix) else None

    def _max_concentrations(self, pixels: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        return np.array([upper_percentile(c, 99) for c in concentrations(pixels.reshape(-1, 1, 3), matrix)])

    def fit(self, rgb: np.ndarray) -> "StainNormalizer":
        """Fit the target (reference) stain matrix and its 99th-percentile concentrations."""
        if self.method == "none":
            return self
        _, pixels = self._luminosity(self.sample(rgb))
        matrix = self.stain_matrix(pixels)
        if matrix is None:
            raise InputError("stain reference: no tissue with two separable stains found")
        self.stain_matrix_target = matrix
        self.max_conc_target = self._max_concentrations(pixels, matrix)
        return self

    def measure(self, pixels: np.ndarray) -> SlideStain:
        """A slide's stain, from its :meth:`sample` (N x 3 uint8)."""
        if self.method == "none":
            return SlideStain(None, None, None)
        if self.stain_matrix_target is None:
            raise RuntimeError("StainNormalizer.measure called before fit")
        p, pixels = self._luminosity(pixels)
        matrix = self.stain_matrix(pixels)
        if matrix is None:  # background or a single colour: nothing to normalize, keep it as it is
            return SlideStain(p, None, None)
        scale = self.max_conc_target / np.maximum(self._max_concentrations(pixels, matrix), 1e-6)
        return SlideStain(p, matrix, (self.stain_matrix_target * scale[:, None]).astype(np.float32))

    def apply(self, rgb: np.ndarray, stain: SlideStain) -> np.ndarray:
        """Normalize pixels of a slide whose stain was measured (any H x W x 3 uint8 part of it).
        Background stays white."""
        if stain.luminosity_p is not None:
            rgb = standardize_luminosity(rgb, stain.luminosity_p)
        if stain.matrix is None:
            return rgb.copy()
        c_h, c_e = concentrations(rgb, stain.matrix)
        target = stain.target
        out = np.empty(rgb.shape, dtype=np.uint8).reshape(-1, 3)
        for start in range(0, len(c_h), CHUNK):
            part = slice(start, start + CHUNK)
            h, e = c_h[part], c_e[part]
            for channel in range(3):
                od = h * -target[0, channel] - e * target[1, channel]
                np.exp(od, out=od)
                od *= np.float32(255.0)
                out[part, channel] = od  # truncation, as staintools' astype(uint8): keeps them equal
        return out.reshape(rgb.shape)

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        """Normalize a whole slide: its stain measured on its sample, then applied to every pixel."""
        if self.method == "none":
            return rgb.copy()
        return self.apply(rgb, self.measure(self.sample(rgb)))

    def to_dict(self) -> dict:
        """JSON-able state: enough to rebuild the fitted normalizer (stored in checkpoints)."""
        return {
            "method": self.method,
            "standardize_luminosity": self.standardize_luminosity,
            "fit_pixels": self.fit_pixels,
            "seed": self.seed,
            "stain_matrix_target": None if self.stain_matrix_target is None
            else self.stain_matrix_target.tolist(),
            "max_conc_target": None if self.max_conc_target is None else self.max_conc_target.tolist(),
        }

    @classmethod
    def from_dict(cls, state: dict) -> "StainNormalizer":
        norm = cls(state["method"], state["standardize_luminosity"], state["fit_pixels"], state["seed"])
        if state.get("stain_matrix_target") is not None:
            norm.stain_matrix_target = np.asarray(state["stain_matrix_target"], dtype=np.float64)
            norm.max_conc_target = np.asarray(state["max_conc_target"], dtype=np.float64)
        return norm
