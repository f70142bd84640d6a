"""The embedded default: the competition layout, and the real data's statistics."""
from dataclasses import replace

import h5py
import numpy as np
import pytest
from scipy.spatial import cKDTree

from src.core.config import load_params
from src.core.errors import InputError
from src.data.preprocessing.registration import feature_maps, sample, tissue_cover, tissue_fraction
from src.data.simulators.compartments import simulate, write_layout
from src.data.slides.validation import validate_file
from src.engine.metrics import competition_score
from src.report.data_statistics import abundance_statistics
from src.report.data_statistics import floor as data_floor
from tests.conftest import ROOT, TINY, read_layout


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    paths = []
    for i, seed in enumerate((5, 5, 6)):
        slides, names = simulate(replace(TINY, seed=seed, n_train=1, n_test=1))
        write_layout(slides, names, tmp_path / f"{i}.h5", tmp_path / f"t{i}.h5", seed)
        paths.append(tmp_path / f"{i}.h5")
    a, b, c = (read_layout(p) for p in paths)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["images/Train/S_1"], c["images/Train/S_1"])


def test_layout_is_valid_and_matches_the_competition(tiny_dataset):
    summaries = validate_file(tiny_dataset[0])
    assert [(s.ref.split, s.ref.name) for s in summaries] == [("Train", "S_1"), ("Train", "S_2"), ("Test", "S_3")]
    assert summaries[0].targets == tuple(f"C{i}" for i in range(1, 36))
    with h5py.File(tiny_dataset[0]) as h5:
        assert h5["images/Train/S_1"].dtype == np.float32
        test = h5["spots/Test/S_3"][()]
        assert set(test.dtype.names) == {"x", "y", "Test_Set"}
        assert set(np.unique(test["Test_Set"])) <= {1, 2}


def test_hexagonal_lattice_with_visium_pitch(tiny_dataset):
    with h5py.File(tiny_dataset[0]) as h5:
        spots = h5["spots/Train/S_1"][()]
    xy = np.stack([spots["x"], spots["y"]], axis=1).astype(float)
    dist, _ = cKDTree(xy).query(xy, k=7)
    assert 24 <= np.median(dist[:, 1]) <= 26.5
    neighbours = (dist[:, 1:] < 27).sum(axis=1)  # hexagonal: interior spots have exactly six
    assert neighbours.max() == 6 and (neighbours == 6).sum() >= 5


def test_tiny_abundances_are_strictly_positive_counts(tiny_dataset):
    with h5py.File(tiny_dataset[1]) as truth:
        observed = np.concatenate([truth[f"Train/{s}/observed"][()] for s in ("S_1", "S_2")])
    assert (observed > 0).all()  # like the real data: no exact zeros
    assert observed.max() > 1 and not np.allclose(observed.sum(1), 1)  # cell counts, not proportions


@pytest.fixture(scope="module")
def default_data():
    """The embedded default exactly as stage `simulate` writes it (params.yaml's simulate section)."""
    cfg = load_params(ROOT / "params.yaml").simulate
    slides, _ = simulate(cfg)
    return cfg, slides


def test_default_data_has_the_real_data_statistics(default_data):
    """The competition's printed statistics: strictly positive over ~10 decades, ~9 cells per spot,
    mean/median from ~2 to hundreds, a mean-profile floor of 0.50-0.62 on the test slide and per-slide
    floors spread within 0.27-0.70, strong slide effects on a subset of types, bimodal region-specific
    types beside always-high ones."""
    _, slides = default_data
    train = {name: s.observed for split, name, s in slides if split == "Train"}
    test = [s for split, _, s in slides if split == "Test"][0]
    stats = abundance_statistics(train, test.observed, test.expected)
    assert stats["zero_fraction"] == 0 and (test.observed > 0).all()
    assert stats["min"] < 1e-7 and 10 < stats["max"] < 100
    assert stats["decades"] >= 8
    assert 6 < stats["cells_per_spot"] < 12
    assert stats["mean_median_ratio"][0] < 3 and stats["mean_median_ratio"][1] > 100
    assert stats["types_median_below_1e-3"] >= 4  # many types are mostly a residue

    assert 0.50 <= stats["test_floor"] <= 0.62, stats["test_floor"]
    per_slide = list(stats["per_slide_floors"].values())
    assert all(0.27 <= f <= 0.70 for f in per_slide) and max(per_slide) - min(per_slide) >= 0.1, per_slide
    assert stats["test_ceiling"] - stats["test_floor"] >= 0.25

    assert stats["slide_ratio_max"] >= 20 and 3 <= stats["types_slide_ratio_over_10"] <= stats["n_types"] / 2
    assert stats["types_rank_sd_over_9"] >= 3 and stats["types_rank_sd_under_5"] >= 1  # bimodal, always-high


def test_default_image_carries_a_signal_a_model_can_learn(default_data):
    """A ridge regression on cheap local image features, fitted on the training slides at their true
    positions, beats the floor on the test slide by 0.1-0.3 and stays below the noise ceiling."""
    _, slides = default_data
    features, targets = [], []
    for _, _, s in slides:
        maps = feature_maps((s.image * 255).round().astype(np.uint8))
        f = sample(maps, s.x + s.offset[0], s.y + s.offset[1])
        features.append(np.c_[f, f**2])
        targets.append(np.log(s.observed))
    x_train, y_train = np.concatenate(features[:-1]), np.concatenate(targets[:-1])
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a = np.c_[(x_train - mu) / sd, np.ones(len(x_train))]
    coef = np.linalg.solve(a.T @ a + 0.1 * len(a) * np.eye(a.shape[1]), a.T @ y_train)
    pred = np.c_[(features[-1] - mu) / sd, np.ones(len(features[-1]))] @ coef
    test = slides[-1][2]
    floor = data_floor(np.concatenate([s.observed for _, _, s in slides[:-1]]), test.observed)
    score = competition_score(pred, test.observed)
    assert 0.1 <= score - floor <= 0.3, (score, floor)
    assert score < competition_score(test.expected, test.observed)


def test_training_slides_are_misregistered_and_the_test_slide_aligned(default_data):
    cfg, slides = default_data
    for i, (split, name, s) in enumerate(slides):
        assert s.offset == (tuple(cfg.offsets[i]) if split == "Train" else (0, 0)), name
        image = (s.image * 255).round().astype(np.uint8)
        cover = tissue_cover(image)
        off_stored = (tissue_fraction(cover, s.x, s.y) < 0.5).mean()
        off_true = (tissue_fraction(cover, s.x + s.offset[0], s.y + s.offset[1]) < 0.5).mean()
        assert off_true < 0.04, name  # spots lie on tissue where they were measured
        if max(map(abs, s.offset)) >= 55:  # the two large shifts move many stored spots off tissue
            assert off_stored >= 0.04, name
    shifts = [max(map(abs, s.offset)) for split, _, s in slides if split == "Train"]
    assert min(shifts) >= 15 and max(shifts) <= 90 and sum(m >= 55 for m in shifts) == 2


def test_offsets_must_cover_every_training_slide():
    with pytest.raises(InputError, match=r"simulate.offsets lists 2 shifts for simulate.n_train = 3"):
        simulate(replace(TINY, n_train=3))


def test_stain_colour_differs_between_slides(tiny_dataset):
    with h5py.File(tiny_dataset[0]) as h5:
        means = [h5[f"images/Train/{s}"][()].reshape(-1, 3).mean(0) for s in ("S_1", "S_2")]
    assert np.abs(means[0] - means[1]).max() > 0.01
