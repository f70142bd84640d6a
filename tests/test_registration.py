"""Spot misregistration found from the data, and how the patch stage applies and records it."""
import json

import numpy as np
import pytest

from src.core.sections import PatchesConfig, SimulateConfig
from src.data.preprocessing.patch_extraction import extract_patches
from src.data.preprocessing.patch_set import load_patch_set
from src.data.preprocessing.registration import estimate_offset
from src.data.simulators.compartments import simulate, write_layout

HALF_PITCH = 12  # px: the bar for every estimate


def _slides(seed: int, offsets: list[list[int]], size: int = 600):
    cfg = SimulateConfig(seed=seed, n_train=len(offsets), n_test=0, size=size, pitch=25.0, n_types=35,
                         tissue_extent=[0.6, 1.1], offsets=offsets)
    return simulate(cfg)[0]


def _uint8(image: np.ndarray) -> np.ndarray:
    return (image * 255).round().astype(np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [4, 5, 6, 7])
def test_estimates_land_within_half_a_pitch_of_the_truth_on_shifted_and_aligned_slides(seed):
    rng = np.random.default_rng(seed)
    large = rng.integers(40, 91, 2) * rng.choice([-1, 1], 2)
    small = rng.integers(15, 31, 2) * rng.choice([-1, 1], 2)
    offsets = [[0, 0], large.tolist(), [0, 0], small.tolist()]
    for (_, name, slide), truth in zip(_slides(seed, offsets), offsets):
        reg = estimate_offset(_uint8(slide.image), slide.x, slide.y, slide.observed, max_shift=100)
        error = np.abs(np.subtract(reg.offset, truth)).max()
        assert error <= HALF_PITCH, f"seed {seed} {name}: true {truth}, estimated {reg.offset}"
        if truth != [0, 0]:
            assert reg.gain > 0.02  # a real shift is found clearly, not at the edge of the criterion


def test_abundances_unrelated_to_the_image_keep_the_spots_where_they_are():
    (_, _, slide), = _slides(8, [[0, 0]], size=500)
    shuffled = np.random.default_rng(0).permutation(slide.observed)  # labels of other spots
    reg = estimate_offset(_uint8(slide.image), slide.x, slide.y, shuffled, max_shift=100)
    assert reg.offset == (0, 0) and reg.source == "estimated"
    assert reg.r2 == reg.r2_unshifted


def test_max_shift_zero_searches_nothing():
    (_, _, slide), = _slides(8, [[20, 20]], size=500)
    reg = estimate_offset(_uint8(slide.image), slide.x, slide.y, slide.observed, max_shift=0)
    assert reg.offset == (0, 0) and reg.candidate == (0, 0)


@pytest.fixture(scope="module")
def shifted_store(tmp_path_factory):
    """A normalized file whose S_1 is shifted by (-30, 20) and S_2 aligned (both large enough)."""
    from src.core.sections import StainConfig
    from src.data.preprocessing.normalization import normalize_file

    folder = tmp_path_factory.mktemp("shifted")
    cfg = SimulateConfig(seed=3, n_train=2, n_test=1, size=400, pitch=25.0, n_types=35,
                         tissue_extent=[0.8, 1.1], offsets=[[-30, 20], [0, 0]])
    slides, names = simulate(cfg)
    write_layout(slides, names, folder / "slides.h5", folder / "truth.h5", cfg.seed)
    normalize_file(folder / "slides.h5", folder / "normalized", StainConfig("vahadane", "", True, 20_000, 0),
                   log=lambda _: None)
    return folder / "normalized" / "slides.h5"


def test_patch_stage_estimates_applies_and_records_the_offsets(shifted_store, tmp_path):
    lines = []
    extract_patches(shifted_store, tmp_path / "p", PatchesConfig(32, "auto", 4.0, {}), log=lines.append)
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert np.abs(np.subtract(meta["offsets"]["S_1"], [-30, 20])).max() <= HALF_PITCH
    assert np.abs(meta["offsets"]["S_2"]).max() <= HALF_PITCH
    assert meta["offsets"]["S_3"] == [0, 0] and meta["registration"]["S_3"]["source"] == "none"  # test slide
    s1 = meta["registration"]["S_1"]
    assert s1["source"] == "estimated" and s1["gain"] > 0.02 and s1["cv_r2"] > s1["cv_r2_unshifted"]
    assert len(s1["off_tissue_spots"]) < s1["off_tissue_before_shift"]
    assert any(line.startswith("Train/S_1: offset [") and "estimated" in line for line in lines), lines


def test_hand_set_offsets_override_the_estimate_and_none_turns_it_off(shifted_store, tmp_path):
    extract_patches(shifted_store, tmp_path / "set", PatchesConfig(32, "auto", 4.0, {"S_1": [5, -5]}),
                    log=lambda _: None)
    meta = json.loads((tmp_path / "set" / "meta.json").read_text())
    assert meta["offsets"]["S_1"] == [5, -5] and meta["registration"]["S_1"]["source"] == "set"
    assert meta["registration"]["S_2"]["source"] == "estimated"
    extract_patches(shifted_store, tmp_path / "none", PatchesConfig(32, "none", 4.0, {}), log=lambda _: None)
    meta = json.loads((tmp_path / "none" / "meta.json").read_text())
    assert meta["offsets"] == {"S_1": [0, 0], "S_2": [0, 0], "S_3": [0, 0]}
    set_patches = load_patch_set(tmp_path / "set").images[:]
    none_patches = load_patch_set(tmp_path / "none").images[:]
    s1 = slice(0, meta["slides"]["S_1"]["n_spots"])
    assert not np.array_equal(set_patches[s1], none_patches[s1])


def test_slides_with_too_few_spots_are_not_estimated(tiny_patches):
    meta = json.loads((tiny_patches / "patches" / "meta.json").read_text())
    for name in ("S_1", "S_2"):  # 32 and 40 spots
        assert meta["offsets"][name] == [0, 0]
        assert meta["registration"][name]["source"].startswith("not estimated: ")
