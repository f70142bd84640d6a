"""Every bad-input case: one line naming file/slide/field/value, exit code 2, nothing written."""
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from numpy.lib import recfunctions

from src import normalize, validate
from src.core.config import read_raw
from src.data.preprocessing.normalization import normalize_file
from src.data.slides.validation import validate_file
from tests.conftest import ROOT, read_layout, write_datasets

TRAIN_SPOTS = "spots/Train/S_1"
TRAIN_IMAGE = "images/Train/S_1"


def _set(key, fn):
    def mutate(d):
        d[key] = fn(d[key])
    return mutate


def _drop(*keys):
    def mutate(d):
        for key in [k for k in d if any(k.startswith(p) for p in keys)]:
            del d[key]
    return mutate


def _assign(key, field, index, value):
    def fn(table):
        table = table.copy()
        table[field][index] = value
        return table
    return _set(key, fn)


def _duplicate_first_spot(table):
    table = table.copy()
    table["x"][1], table["y"][1] = table["x"][0], table["y"][0]
    return table


def _image_value(value):
    def fn(image):
        image = image.copy()
        image[5, 7, 1] = value
        return image
    return _set(TRAIN_IMAGE, fn)


CASES = {
    "images group missing": (_drop("images/"), "group 'images' missing"),
    "spots group missing": (_drop("spots/"), "group 'spots' missing"),
    "image without spots": (_drop(TRAIN_SPOTS), "slide Train/S_1 has an image but no spots/Train/S_1"),
    "spots without image": (_drop(TRAIN_IMAGE), "slide Train/S_1 has spots but no images/Train/S_1"),
    "image not HxWx3": (_set(TRAIN_IMAGE, lambda im: im[..., :2]), "images/Train/S_1: image shape (240, 240, 2) is not H x W x 3"),
    "image 2-D": (_set(TRAIN_IMAGE, lambda im: im[..., 0]), "images/Train/S_1: image shape (240, 240) is not H x W x 3"),
    "float above 1": (_image_value(1.5), "images/Train/S_1: pixel (row 5, col 7) value 1.5 outside 0-1"),
    "float below 0": (_image_value(-0.25), "pixel (row 5, col 7) value -0.25 outside 0-1"),
    "NaN pixel": (_image_value(np.nan), "images/Train/S_1: pixel (row 5, col 7) is nan"),
    "NaN abundance": (_assign(TRAIN_SPOTS, "C3", 4, np.nan), "spots/Train/S_1: spot 4 field 'C3' = nan is NaN"),
    "negative abundance": (_assign(TRAIN_SPOTS, "C9", 2, -0.5), "spot 2 field 'C9' = -0.5 is a negative abundance"),
    "infinite abundance": (_assign(TRAIN_SPOTS, "C1", 0, np.inf), "spot 0 field 'C1' = inf is infinite"),
    "spot right of image": (_assign(TRAIN_SPOTS, "x", 3, 240), "spots/Train/S_1: spot 3 field 'x' = 240 outside the image (0..239)"),
    "spot above image": (_assign(TRAIN_SPOTS, "y", 1, -2), "spot 1 field 'y' = -2 outside the image"),
    "duplicate coordinates": (_set(TRAIN_SPOTS, _duplicate_first_spot), "spots/Train/S_1: spots 0 and 1 share the coordinates"),
    "missing x": (_set(TRAIN_SPOTS, lambda t: recfunctions.drop_fields(t, "x", usemask=False)), "spots/Train/S_1: field 'x' missing"),
    "missing y on test": (_set("spots/Test/S_3", lambda t: recfunctions.drop_fields(t, "y", usemask=False)), "spots/Test/S_3: field 'y' missing"),
    "missing target column": (_set("spots/Train/S_2", lambda t: recfunctions.drop_fields(t, "C7", usemask=False)), "spots/Train/S_2: target columns differ from S_1 (field C7)"),
    "no target columns": (_set(TRAIN_SPOTS, lambda t: recfunctions.repack_fields(t[["x", "y"]])), "spots/Train/S_1: no target (cell-type) fields"),
    "zero spots": (_set(TRAIN_SPOTS, lambda t: t[:0]), "spots/Train/S_1: slide has zero spots"),
}


def _bad_file(tiny_dataset, tmp_path, mutate):
    datasets = read_layout(tiny_dataset[0])
    mutate(datasets)
    return write_datasets(tmp_path / "bad.h5", datasets)


def _assert_one_line_exit_2(capsys, fn, expected):
    with pytest.raises(SystemExit) as exit_info:
        fn()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert expected in err, err
    return err


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_file_is_one_line_exit_2_and_writes_nothing(case, tiny_dataset, tmp_path, capsys):
    mutate, expected = CASES[case]
    path = _bad_file(tiny_dataset, tmp_path, mutate)
    err = _assert_one_line_exit_2(capsys, lambda: validate.main([str(path)]), expected)
    assert str(path) in err

    # The normalize stage validates first and leaves no partial output behind.
    raw = read_raw(ROOT / "params.yaml")
    raw["data"]["h5"] = str(path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    out = tmp_path / "normalized"
    _assert_one_line_exit_2(capsys, lambda: normalize.main(["--out", str(out), "--params", str(params)]), expected)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5", "params.yaml"]


def test_a_file_to_predict_validates_but_is_no_training_data(tiny_dataset, tmp_path, capsys):
    path = _bad_file(tiny_dataset, tmp_path, _drop("images/Train", "spots/Train"))
    validate.main([str(path)])
    assert "no Train slides: a file to predict" in capsys.readouterr().out
    raw = read_raw(ROOT / "params.yaml")
    raw["data"]["h5"] = str(path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "normalized"
    _assert_one_line_exit_2(capsys, lambda: normalize.main(["--out", str(out), "--params", str(tmp_path / "params.yaml")]),
                            "no Train slides under images/Train")
    assert not out.exists()


def test_missing_file_and_not_hdf5(tmp_path, capsys):
    missing = tmp_path / "absent.h5"
    _assert_one_line_exit_2(capsys, lambda: validate.main([str(missing)]), f"{missing}: file not found")
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    _assert_one_line_exit_2(capsys, lambda: validate.main([str(text)]), f"{text}: not an HDF5 file")


def test_good_file_prints_summary_and_exits_0(tiny_dataset, capsys):
    validate.main([str(tiny_dataset[0])])
    out = capsys.readouterr().out
    assert "S_1" in out and "Train" in out and "Test" in out
    assert "training spots" in out


def test_cli_shows_no_traceback(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x00" * 64)
    result = subprocess.run([sys.executable, "-m", "src.validate", str(bad)], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {bad}: not an HDF5 file"
    assert "Traceback" not in result.stderr


def test_uint8_images_are_accepted(tiny_dataset, tmp_path):
    datasets = read_layout(tiny_dataset[0])
    for key in [k for k in datasets if k.startswith("images/")]:
        datasets[key] = (datasets[key] * 255).round().astype(np.uint8)
    summaries = validate_file(write_datasets(tmp_path / "u8.h5", datasets))
    assert {s.dtype for s in summaries} == {"uint8"}


def _float_coordinates(table, jitter):
    """The spot table with float x, y (as scanpy/squidpy exports hold), moved by ``jitter`` px."""
    fields = [(name, "<f8" if name in ("x", "y") else table.dtype[name]) for name in table.dtype.names]
    out = np.zeros(len(table), dtype=fields)
    for name in table.dtype.names:
        out[name] = table[name]
    out["x"] += jitter
    out["y"] -= jitter
    return out


def test_float_coordinates_are_rounded_and_said_so_then_every_stage_runs(tiny_dataset, tmp_path, capsys):
    from src.core.sections import PatchesConfig, StainConfig
    from src.data.preprocessing.patch_extraction import extract_patches

    datasets = read_layout(tiny_dataset[0])
    exact = read_layout(tiny_dataset[0])
    for key in [k for k in datasets if k.startswith("spots/")]:
        datasets[key] = _float_coordinates(datasets[key], 0.3)
    path = write_datasets(tmp_path / "float.h5", datasets)
    validate.main([str(path)])
    out = capsys.readouterr().out
    assert "float spot coordinates on S_1, S_2, S_3 are rounded to whole pixels (largest change 0.30 px)" in out
    normalize_file(path, tmp_path / "n", StainConfig("none", "", False, 1000, 0), log=lambda _: None)
    extract_patches(tmp_path / "n" / "slides.h5", tmp_path / "p", PatchesConfig(16, "none", 4.0, {}),
                    log=lambda _: None)
    spots = pd.read_csv(tmp_path / "p" / "train_spots.csv")
    s1 = exact["spots/Train/S_1"]
    assert spots.loc[spots.slide == "S_1", "x"].tolist() == s1["x"].tolist()  # 0.3 px rounds back
    assert spots.loc[spots.slide == "S_1", "y"].tolist() == s1["y"].tolist()


def test_float_coordinates_that_collide_once_rounded_are_an_error(tiny_dataset, tmp_path, capsys):
    datasets = read_layout(tiny_dataset[0])
    table = _float_coordinates(datasets[TRAIN_SPOTS], 0.0)
    table["x"][1], table["y"][1] = table["x"][0] + 0.4, table["y"][0] - 0.2
    datasets[TRAIN_SPOTS] = table
    path = write_datasets(tmp_path / "collide.h5", datasets)
    _assert_one_line_exit_2(capsys, lambda: validate.main([str(path)]),
                            "spots/Train/S_1: spots 0 and 1 share the coordinates")
    err_path = tmp_path / "edge.h5"
    table = _float_coordinates(read_layout(tiny_dataset[0])[TRAIN_SPOTS], 0.0)
    table["x"][2] = 239.6  # rounds to 240: outside a 240-px image
    datasets[TRAIN_SPOTS] = table
    write_datasets(err_path, datasets)
    _assert_one_line_exit_2(capsys, lambda: validate.main([str(err_path)]),
                            "spot 2 field 'x' = 239.6 outside the image (0..239)")


@pytest.mark.parametrize("truth, expected", [
    ("absent.h5", "absent.h5': file not found (set data.truth to \"\" for data without one"),
    ("other", "no truth for slide Test/S_3 of"),
])
def test_a_truth_file_that_does_not_fit_the_data_stops_the_first_stage(tiny_dataset, tmp_path, capsys, truth,
                                                                       expected):
    """Forgetting `data.truth: ""` with a file of one's own fails at normalize, not after the study."""
    if truth == "other":
        with h5py.File(tmp_path / "other.h5", "w") as h5:
            h5["Test/S_9/observed"] = np.zeros((3, 35))
    raw = read_raw(ROOT / "params.yaml")
    raw["data"] = {"h5": str(tiny_dataset[0]), "truth": str(tmp_path / (truth if truth.endswith(".h5") else "other.h5"))}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "normalized"
    _assert_one_line_exit_2(capsys, lambda: normalize.main(["--out", str(out), "--params", str(tmp_path / "params.yaml")]),
                            expected)
    assert not out.exists()
