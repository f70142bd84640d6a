from dataclasses import replace

import h5py
import numpy as np
from scipy.spatial import cKDTree
from scipy.stats import spearmanr

from src.config import SimulateConfig
from src.synthetic import simulate, write_layout
from src.validate import validate_file
from tests.conftest import TINY, read_layout


def _mean_spot_spearman(pred, truth):
    return np.nanmean([spearmanr(p, t).statistic for p, t in zip(pred, truth)])


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


def test_abundances_look_like_the_real_data(tiny_dataset):
    with h5py.File(tiny_dataset[1]) as truth:
        observed = np.concatenate([truth[f"Train/{s}/observed"][()] for s in ("S_1", "S_2")])
        expected = np.concatenate([truth[f"Train/{s}/expected"][()] for s in ("S_1", "S_2")])
        test_observed = truth["Test/S_3/observed"][()]
    assert (observed >= 0).all() and (observed == 0).any()  # zeros occur
    assert observed.max() > 1 and not np.allclose(observed.sum(1), 1)  # not proportions
    floor = _mean_spot_spearman(np.tile(observed.mean(0), (len(test_observed), 1)), test_observed)
    ceiling = _mean_spot_spearman(expected, observed)
    assert 0.5 < floor < ceiling < 0.98  # strong common ranking, and room above it
    # Spots differ with their tissue: the expectation is far from one shared profile.
    assert np.std(expected / expected.sum(1, keepdims=True), axis=0).mean() > 0.005


def test_offsets_shift_stored_spots_off_the_tissue(tmp_path):
    cfg = SimulateConfig(seed=1, n_train=1, n_test=0, size=200, pitch=25.0, n_types=35, max_offset=20)
    slides, names = simulate(cfg)
    write_layout(slides, names, tmp_path / "s.h5", tmp_path / "t.h5", cfg.seed)
    with h5py.File(tmp_path / "t.h5") as truth:
        dx, dy = truth["Train/S_1"].attrs["offset"]
    assert (dx, dy) != (0, 0) and max(abs(dx), abs(dy)) <= 20
    assert slides[0][2].offset == (dx, dy)


def test_stain_colour_differs_between_slides(tiny_dataset):
    with h5py.File(tiny_dataset[0]) as h5:
        means = [h5[f"images/Train/{s}"][()].reshape(-1, 3).mean(0) for s in ("S_1", "S_2")]
    assert np.abs(means[0] - means[1]).max() > 0.01
