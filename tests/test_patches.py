import json

import numpy as np
import pandas as pd
import pytest

from src.core.errors import InputError
from src.core.sections import PatchesConfig, StainConfig
from src.data.preprocessing.normalization import SLIDES_FILE, normalize_file
from src.data.preprocessing.patch_extraction import extract_patches
from src.data.preprocessing.patch_set import load_patch_set
from src.data.preprocessing.patch_store import SlideCrops
from src.data.slides.layout import SlideRef, open_h5, read_image_uint8


def crop_patches(image, x, y, size, offset=(0, 0)):
    return SlideCrops.from_slides([(image, x, y, offset)], size)[:]


def test_crop_is_centred_on_the_spot_with_reflect_padding():
    image = np.arange(20 * 30 * 3, dtype=np.int32).reshape(20, 30, 3)
    x, y = np.array([10, 0, 29]), np.array([5, 0, 19])
    patches = crop_patches(image, x, y, size=8)
    assert patches.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(patches[0], image[1:9, 6:14])  # img[y-h:y+h, x-h:x+h]
    for patch, (cx, cy) in zip(patches, zip(x, y)):
        np.testing.assert_array_equal(patch[4, 4], image[cy, cx])
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(patches[1], padded[0:8, 0:8])  # corner spot: reflected border


def test_offsets_move_the_crop():
    image = np.random.default_rng(0).integers(0, 255, (50, 60, 3)).astype(np.uint8)
    shifted = crop_patches(image, np.array([20]), np.array([25]), 10, offset=(-5, 3))
    np.testing.assert_array_equal(shifted[0], crop_patches(image, np.array([15]), np.array([28]), 10)[0])


@pytest.fixture(scope="module")
def normalized(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("norm") / "normalized"
    normalize_file(tiny_dataset[0], out, StainConfig("vahadane", "", True, 20_000, 0), log=lambda _: None)
    return out


def test_patch_stage_writes_memmappable_slides_crops_and_spot_tables(normalized, tmp_path):
    out = tmp_path / "patches"
    extract_patches(normalized / SLIDES_FILE, out, PatchesConfig(size=16, registration="auto", max_shift=4.0, offsets={"S_2": [2, -1]}),
                    log=lambda _: None)
    train = load_patch_set(out, "train").images
    spots = pd.read_csv(out / "train_spots.csv")
    meta = json.loads((out / "meta.json").read_text())
    assert all(isinstance(s, np.memmap) for s in train.slides) and train.dtype == np.uint8
    assert train.shape == (len(spots), 16, 16, 3) and train[:].shape == train.shape
    assert list(spots.columns[:4]) == ["slide", "spot", "x", "y"]
    assert meta["targets"] == [f"C{i}" for i in range(1, 36)]
    assert list(spots.columns[4:]) == meta["targets"]
    assert meta["slides"]["S_1"] == {"split": "Train", "height": 240, "width": 240,
                                     "n_spots": int((spots.slide == "S_1").sum()),
                                     "pitch": pytest.approx(25.0, abs=0.1)}  # the lattice's, measured
    assert meta["um_per_px"] == pytest.approx(55 / 26)
    test_spots = pd.read_csv(out / "test_spots.csv")
    assert list(test_spots.columns) == ["slide", "spot", "x", "y", "Test_Set"]
    assert len(load_patch_set(out, "test").images) == len(test_spots)
    with open_h5(normalized / SLIDES_FILE) as h5:
        image = read_image_uint8(h5, SlideRef("Train", "S_2"))
    row = spots.index[spots.slide == "S_2"][0]
    x, y = spots.loc[row, ["x", "y"]]
    np.testing.assert_array_equal(train[row][8, 8], image[y - 1, x + 2])  # offset applied
    np.testing.assert_array_equal(train[int(row)], crop_patches(image, np.array([x]), np.array([y]), 16, (2, -1))[0])


def test_the_store_holds_the_slides_once_whatever_the_patch_size(normalized, tmp_path):
    """Wide patches overlap many-fold; the store grows with the slides, not with the patch size."""
    def store_bytes(size):
        extract_patches(normalized / SLIDES_FILE, tmp_path / str(size), PatchesConfig(size, "none", 4.0, {}),
                        log=lambda _: None)
        return sum(f.stat().st_size for f in (tmp_path / str(size)).rglob("*.npy")), load_patch_set(tmp_path / str(size))

    small, small_set = store_bytes(16)
    large, large_set = store_bytes(96)
    assert large < 2 * small  # only the padding grows (48 px a side); stored patches would be 36x
    assert large_set.images.shape[1:] == (96, 96, 3)
    assert large_set.images.nbytes < large_set.images.shape[0] * 96 * 96 * 3 / 2  # 72 sparse spots: 3x
    np.testing.assert_array_equal(large_set.images[:][:, 40:56, 40:56], small_set.images[:])  # same centres


def test_slide_crops_index_as_an_array_does():
    rng = np.random.default_rng(0)
    slides = [(rng.integers(0, 255, (40, 50, 3)).astype(np.uint8), rng.integers(0, 50, 7), rng.integers(0, 40, 7),
               (3, -2)), (rng.integers(0, 255, (30, 30, 3)).astype(np.uint8), np.arange(5), np.arange(5), (0, 0))]
    crops = SlideCrops.from_slides(slides, 12)
    dense = crops[:]
    assert len(crops) == 12 and dense.shape == crops.shape == (12, 12, 12, 3)
    for key in (slice(2, 9), slice(None, None, -3), np.array([11, 0, 5, 5]), np.arange(12) % 2 == 0):
        np.testing.assert_array_equal(crops[key], dense[key])
    np.testing.assert_array_equal(crops[-1], dense[-1])
    np.testing.assert_array_equal(np.asarray(crops), dense)
    assert crops[3].base is not None  # one patch is a view of its slide, not a copy
    with pytest.raises(ValueError, match="leaves slide 1"):
        SlideCrops([s for s, *_ in slides], np.array([[1, 25, 0]]), 12)


def test_unknown_offset_slide_is_an_error_and_writes_nothing(normalized, tmp_path):
    out = tmp_path / "patches"
    with pytest.raises(InputError, match=r"patches.offsets.S_9: no such slide"):
        extract_patches(normalized / SLIDES_FILE, out, PatchesConfig(16, "auto", 4.0, {"S_9": [1, 1]}), log=print)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_normalized_file_keeps_the_layout_and_the_reference(normalized, tiny_dataset):
    from src.data.slides.validation import validate_file

    summaries = validate_file(normalized / SLIDES_FILE)
    assert {s.dtype for s in summaries} == {"uint8"}
    state = json.loads((normalized / "stain.json").read_text())
    assert state["reference_slide"] == "S_1" and state["method"] == "vahadane"
    assert np.asarray(state["stain_matrix_target"]).shape == (2, 3)
