"""The second data family (``simulate.family: cells``): valid, realistic where the real data's statistics
are known, and different in kind from the embedded default where it is meant to be."""
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.stats import spearmanr

from src.data.simulators.compartments import write_layout
from src.data.simulators.families import simulate_family
from src.data.slides.validation import validate_file
from src.engine.metrics import competition_score
from src.report.data_statistics import floor as data_floor
from tests.conftest import TINY

CELLS = replace(TINY, family="cells", size=400, n_train=2, n_test=1, tissue_extent=[0.8, 1.0])


@pytest.fixture(scope="module")
def both_families():
    return {family: simulate_family(replace(CELLS, family=family))[0] for family in ("compartments", "cells")}


def test_same_seed_same_data_and_the_layout_is_valid(both_families, tmp_path):
    slides, names = simulate_family(CELLS)
    for (_, _, a), (_, _, b) in zip(slides, both_families["cells"]):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.observed, b.observed)
    write_layout(slides, names, tmp_path / "cells.h5", tmp_path / "truth.h5", CELLS.seed)
    summaries = validate_file(tmp_path / "cells.h5")
    assert [s.ref.split for s in summaries] == ["Train", "Train", "Test"]
    assert all(s.n_spots > 50 for s in summaries)


def test_abundances_look_like_deconvolved_counts(both_families):
    slides = both_families["cells"]
    train = np.concatenate([s.observed for split, _, s in slides if split == "Train"])
    (test,) = [s for split, _, s in slides if split == "Test"]
    assert np.isfinite(train).all() and (train > 0).all()  # strictly positive, as the real data
    assert np.log10(train.max() / train.min()) > 8  # about ten decades
    assert 5 < train.sum(axis=1).mean() < 15  # cells per spot (real: about 9)
    floor = data_floor(train, test.observed)
    ceiling = competition_score(test.expected, test.observed)
    assert 0.35 < floor < 0.7 and ceiling > floor + 0.2, (floor, ceiling)


def _neighbour_correlation(slide, shift: float) -> float:
    """Mean over cell types of the Spearman correlation between a spot's noise-free log abundance and
    that of the spot ``shift`` px to its right."""
    xy = np.stack([slide.x, slide.y], axis=1).astype(float)
    other = cKDTree(xy).query(xy + [shift, 0.0])[1]
    values = np.log(slide.expected + 1e-6)
    return float(np.nanmean([spearmanr(values[:, t], values[other, t])[0] for t in range(values.shape[1])]))


def test_the_signal_lives_at_the_spot_scale_not_the_compartment_scale(both_families):
    """What differs in kind: in the default, compartments hundreds of px wide carry the abundances, so
    spots four pitches apart still agree; here single cells do, and they do not."""
    for family, near_floor, far_ceiling in (("compartments", 0.55, None), ("cells", None, 0.15)):
        train = [s for split, _, s in both_families[family] if split == "Train"]
        near = np.mean([_neighbour_correlation(s, 25.0) for s in train])
        far = np.mean([_neighbour_correlation(s, 100.0) for s in train])
        if near_floor is not None:
            assert near > near_floor and far > 0.2, (family, near, far)
        else:
            assert far < far_ceiling and near > far, (family, near, far)


def test_test_slides_are_scanned_blurrier():
    """An acquisition shift between training and test: the same stain concentrations come out blurrier
    on a test slide's scanner than on any training slide's."""
    from src.data.simulators.cells import _scan

    rng = np.random.default_rng(0)
    haematoxylin = (rng.random((128, 128)) < 0.05) * 1.5
    eosin = np.full((128, 128), 0.5)

    def sharpness(image):
        return float(ndimage.laplace(ndimage.gaussian_filter(image.mean(axis=2), 0.5)).std())

    train = [_scan(np.random.default_rng(seed), haematoxylin, eosin, is_test=False) for seed in range(6)]
    test = [_scan(np.random.default_rng(seed), haematoxylin, eosin, is_test=True) for seed in range(6)]
    assert max(sharpness(i) for i in test) < min(sharpness(i) for i in train)
