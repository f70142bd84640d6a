"""Visium slides in: Space Ranger folders and .h5ad files written by the simulator go through
`python -m src.ingest` into the layout, agree with the slides they came from, and every kind of bad
input is one line, exit 2, nothing written."""
import json
import re
import shutil

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile

from src import ingest, simulate
from src.data.slides.layout import open_h5, read_barcodes, read_image_uint8, read_spots, slide_refs

TINY = ["--set", "simulate.size=240", "--set", "simulate.n_train=2", "--set", "simulate.n_test=1",
        "--set", "simulate.tissue_extent=[0.8, 1.1]", "--set", "simulate.offsets=[[0, 0], [0, 0]]"]


def _export(folder, scale=4):
    simulate.main(["--out", str(folder / "sim.h5"), "--truth-out", str(folder / "truth.h5"),
                   "--visium", str(folder / "visium"), "--fullres-scale", str(scale), "--geometry", "competition", *TINY])
    return folder / "visium"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("visium"))


@pytest.fixture(scope="module")
def imported(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported")
    files = {}
    for route in ("spaceranger", "h5ad"):
        files[route] = out / f"{route}.h5"
        ingest.main([str(exported / f"manifest_{route}.csv"), "--out", str(files[route]),
                     "--truth-out", str(out / f"{route}_truth.h5")])
    return files


def _layout(path):
    with open_h5(path) as h5:
        return {r.name: (r.split, read_image_uint8(h5, r), read_spots(h5, r), read_barcodes(h5, r))
                for r in slide_refs(h5)}


def test_both_routes_import_the_simulated_slides_they_came_from(exported, imported):
    original = _layout(exported.parent / "sim.h5")
    for route, path in imported.items():
        slides = _layout(path)
        assert sorted(slides) == ["test_S_3", "train_S_1", "train_S_2"]
        for name, (split, image, spots, barcodes) in slides.items():
            _, source_image, source_spots, _ = original[name.split("_", 1)[1]]
            assert split == name.split("_")[0].capitalize()
            assert image.shape == source_image.shape  # back at the layout's scale
            assert np.abs(image.astype(int) - source_image).mean() < 2.5, (route, name)
            assert len(barcodes) == len(spots) and len(set(barcodes)) == len(barcodes)
            kept = source_spots.set_index(["x", "y"]).index
            assert pd.MultiIndex.from_arrays([spots["x"], spots["y"]]).isin(kept).all()  # within 0.5 px
            if split == "Train":  # cell types by name, from the data; a few spots had none and are gone
                assert list(spots.columns[2:6]) == ["B cells", "Plasma cells", "CD4+ T cells", "CD8+ T cells"]
                assert spots.shape[1] == 2 + 35
                assert 0.9 * len(source_spots) <= len(spots) <= len(source_spots)
            else:
                assert len(spots) == len(source_spots)
    with h5py.File(imported["spaceranger"].parent / "spaceranger_truth.h5") as truth:
        assert truth["Test/test_S_3/observed"].shape == (len(original["S_3"][2]), 35)


def test_the_import_reads_the_pyramid_level_that_fits(exported, tmp_path, capsys):
    ingest.main([str(exported / "manifest_spaceranger.csv"), "--out", str(tmp_path / "a.h5")])
    out = capsys.readouterr().out
    assert "level 1 of 2, 960 x 960 -> 240 x 240 px" in out  # 4x finer source: the coarsest level still finer
    assert "40 spots listed" not in out and "in tissue" in out
    ingest.main([str(exported / "manifest_spaceranger.csv"), "--out", str(tmp_path / "b.h5"), "--resolution", "1.058"])
    assert "level 1 of 2, 960 x 960 -> 480 x 480 px" in capsys.readouterr().out  # twice the competition's detail


def test_two_source_resolutions_give_patches_that_agree(exported, imported, tmp_path):
    twice = _export(tmp_path, scale=2)
    ingest.main([str(twice / "manifest_spaceranger.csv"), "--out", str(tmp_path / "x2.h5")])
    fine, coarse = _layout(imported["spaceranger"]), _layout(tmp_path / "x2.h5")
    for name in fine:
        a, b = fine[name][1].astype(int), coarse[name][1].astype(int)
        assert np.abs(a - b).mean() < 2.0, name
        np.testing.assert_allclose(fine[name][2][["x", "y"]], coarse[name][2][["x", "y"]], atol=0.5)
        x, y = int(fine[name][2]["x"].iloc[0]), int(fine[name][2]["y"].iloc[0])
        patch = np.s_[max(0, y - 16): y + 16, max(0, x - 16): x + 16]
        assert np.abs(a[patch] - b[patch]).mean() < 3.0


def _copy(exported, tmp_path):
    folder = tmp_path / "v"
    shutil.copytree(exported, folder)
    return folder


def _positions(folder):
    return folder / "spaceranger/train_S_1/outs/spatial/tissue_positions.csv"


def _edit_csv(path, edit, **read):
    """Rewrite a CSV through ``edit(frame) -> frame``."""
    edit(pd.read_csv(path, **read)).to_csv(path, index="index_col" in read)


def _abundances(f, slide, edit):
    _edit_csv(f / f"abundances/{slide}.csv", edit, index_col=0)


def _set_cell(frame, row, column, value):
    frame = frame.astype({column: object}) if isinstance(value, str) else frame.copy()
    frame.iloc[row, frame.columns.get_loc(column)] = value
    return frame


def _unknown_barcodes(f, n=3):
    _abundances(f, "train_S_1", lambda t: t.rename(index=dict(zip(t.index[:n], [f"TTTTTTTTTTTT{i:04d}-1" for i in
                                                                                   range(n)]))))


def _mostly_unknown(f):
    _unknown_barcodes(f, 30)


def _negative(f):
    _abundances(f, "train_S_2", lambda t: _set_cell(t, 4, "CD8+ T cells", -1.0))


def _text(f):
    _abundances(f, "train_S_2", lambda t: _set_cell(t, 2, "Tregs", "n/a"))


def _other_types(f):
    _abundances(f, "train_S_2", lambda t: t.rename(columns={"NK cells": "NK"}))


def _outside(f):
    _edit_csv(_positions(f), lambda t: _set_cell(t, int(np.flatnonzero(t["in_tissue"] == 1)[0]), "pxl_col_in_fullres", 5000))


def _scalefactors(value):
    def edit(f):
        path = f / "spaceranger/train_S_1/outs/spatial/scalefactors_json.json"
        factors = json.loads(path.read_text())
        if value is None:
            path.unlink()
        else:
            factors["spot_diameter_fullres"] = value
            path.write_text(json.dumps(factors))
    return edit


def _small_image(f):
    image = tifffile.imread(f / "images/train_S_1_fullres.tif", level=1)
    tifffile.imwrite(f / "images/train_S_1_fullres.tif", image, photometric="rgb")


def _no_spatial(f):
    path = f / "h5ad/train_S_1.h5ad"
    adata = anndata.read_h5ad(path)
    del adata.obsm["spatial"]
    # read back with pandas' string index (Arrow-backed where pyarrow is installed): written as object again
    adata.obs_names = pd.Index(adata.obs_names.to_numpy(dtype=object), dtype=object)
    adata.var_names = pd.Index(adata.var_names.to_numpy(dtype=object), dtype=object)
    for key, frame in list(adata.obsm.items()):
        if isinstance(frame, pd.DataFrame):
            adata.obsm[key] = frame.set_axis(pd.Index(frame.columns.to_numpy(dtype=object), dtype=object), axis=1)
    adata.write_h5ad(path)


def _image(f, slide="train_S_1"):
    return f / "images" / (f"{slide}.svs" if slide.startswith("test") else f"{slide}_fullres.tif")


def _spatial(f, slide="train_S_1"):
    return f / f"spaceranger/{slide}/outs/spatial"


def _rewrite_image(f, scale=1.0, um_per_px=None):
    """The slide's image again, ``scale`` times the size, as a plain TIFF with the given pixel size (or none)."""
    image = tifffile.imread(_image(f), level=0)
    if scale != 1.0:
        from PIL import Image
        size = round(image.shape[1] * scale), round(image.shape[0] * scale)
        image = np.asarray(Image.fromarray(image).resize(size))
    tags = {} if um_per_px is None else {"resolution": (1e4 / um_per_px, 1e4 / um_per_px), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(_image(f), image, photometric="rgb", tile=(256, 256), compression="jpeg", **tags)


def _twice_the_size(f):  # the issue of labs: a full-resolution image twice what the positions imply
    _rewrite_image(f, 2.0, um_per_px=0.5288 / 2)


def _metadata_disagrees(f):
    (_spatial(f) / "tissue_hires_image.png").unlink()
    _rewrite_image(f, um_per_px=0.25)


def _no_pixel_size(f):
    _rewrite_image(f)
    path = _spatial(f) / "scalefactors_json.json"
    factors = json.loads(path.read_text())
    del factors["spot_diameter_fullres"]
    path.write_text(json.dumps(factors))


def _missing_last_image(f):
    _image(f, "test_S_3").unlink()


def _truncated(f):
    path = _image(f, "train_S_2")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncated_svs(f):
    path = _image(f, "test_S_3")
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


def _not_an_image(f):
    _image(f).write_text("slide,scanner\nS1,unknown\n")


BAD = {
    "image twice the size the positions imply": ("spaceranger", _twice_the_size, "1920 x 1920 px, but the hires image that comes with tissue_positions.csv"),
    "pixel size of the file and the scalefactors disagree": (
        "spaceranger", _metadata_disagrees, "pixel size 0.25 um/px (TIFF resolution tags (centimetre)) and Space "
        "Ranger's 0.528846 um/px"),
    "no pixel size anywhere": ("spaceranger", _no_pixel_size, "no pixel size: the file gives none"),
    "image of the last row missing": ("spaceranger", _missing_last_image, "row 3: image of slide test_S_3 not found"),
    "truncated TIFF": ("spaceranger", _truncated, "train_S_2_fullres.tif: truncated"),
    "truncated SVS": ("h5ad", _truncated_svs, "test_S_3.svs: truncated"),
    "an image no reader takes": ("spaceranger", _not_an_image, "not an image format the readers take"),
    "barcodes mostly matching no spot": ("spaceranger", _mostly_unknown,
                                         "abundances/train_S_1.csv: 30 of 41 barcodes match no spot of"),
    "negative abundance": ("spaceranger", _negative, "cell type 'CD8+ T cells' of barcode"),
    "non-numeric abundance": ("spaceranger", _text, "cell type 'Tregs' of barcode"),
    "cell types differ between slides": ("spaceranger", _other_types, "cell types differ from those of slide train_S_1"),
    "coordinates outside the image": ("spaceranger", _outside, "1 of 41 spots lie outside the image (960 x 960 px"),
    "scalefactors missing": ("spaceranger", _scalefactors(None), "scalefactors_json.json: scalefactors file not found"),
    "scalefactors of another image": ("spaceranger", _scalefactors(10.4), "spot_diameter_fullres = 10.4 px does not fit"),
    "scalefactors not a number": ("spaceranger", _scalefactors("big"), "spot_diameter_fullres = 'big' (expected a positive"),
    "image smaller than the hires image implies": ("spaceranger", _small_image,
                                                   "480 x 480 px, but the hires image that comes with"),
    "h5ad without obsm spatial": ("h5ad", _no_spatial, "train_S_1.h5ad: no obsm['spatial']"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, exported, tmp_path, capsys):
    route, edit, expected = BAD[case]
    folder = _copy(exported, tmp_path)
    edit(folder)
    out, truth = tmp_path / "out.h5", tmp_path / "truth.h5"
    with pytest.raises(SystemExit) as info:
        ingest.main([str(folder / f"manifest_{route}.csv"), "--out", str(out), "--truth-out", str(truth)])
    printed = capsys.readouterr()
    err = printed.err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert expected in err, err
    assert "Train/" not in printed.out  # found before any slide was resampled
    assert not out.exists() and not truth.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_a_manifest_naming_no_abundances_for_a_training_slide_is_an_error(exported, tmp_path, capsys):
    folder = _copy(exported, tmp_path)
    _edit_csv(folder / "manifest_spaceranger.csv", lambda t: t.assign(abundances=t["abundances"].where(
        t["split"] != "train", "")))
    with pytest.raises(SystemExit):
        ingest.main([str(folder / "manifest_spaceranger.csv"), "--out", str(tmp_path / "o.h5")])
    assert "row 1: training slide train_S_1 has no abundances" in capsys.readouterr().err


@pytest.mark.parametrize("rename, rule", [
    (lambda b: b, "as written"),
    (lambda b: b.removesuffix("-1"), "without the -N suffix"),  # R exports
    (lambda b: f"A1_{b}", "the 16-letter barcode inside a sample prefix or suffix"),  # anndata.concat, scripts
    (lambda b: f"{b}-A1", "the 16-letter barcode inside a sample prefix or suffix"),
])
def test_tables_as_tools_write_them_are_joined_on_the_barcode(exported, imported, tmp_path, capsys, rename, rule):
    """The same abundances whatever the table does to the barcodes, the rule named in the report; a few
    rows of spots a filter removed since are dropped and counted."""
    folder = _copy(exported, tmp_path)
    _abundances(folder, "train_S_1", lambda t: t.rename(index=rename))
    strays = dict(zip(["GGGGGGGGGGGGGGGA-1", "GGGGGGGGGGGGGGGC-1"], range(2)))  # of no spot of the slide
    _abundances(folder, "train_S_2", lambda t: pd.concat([t.rename(index=rename), t.iloc[:2].set_axis(
        [rename(b) for b in strays])]))
    out = tmp_path / "x.h5"
    ingest.main([str(folder / "manifest_spaceranger.csv"), "--out", str(out)])
    report = capsys.readouterr().out
    train_lines = [line for line in report.splitlines() if line.startswith("Train/")]
    assert len(train_lines) == 2 and all(f"barcodes matched {rule}" in line for line in train_lines)
    assert re.search(r"2 of \d+ table rows match no spot and were dropped", train_lines[1]), train_lines[1]
    expected, got = _layout(imported["spaceranger"]), _layout(out)
    for slide in ("train_S_1", "train_S_2"):
        pd.testing.assert_frame_equal(got[slide][2], expected[slide][2])
        np.testing.assert_array_equal(got[slide][3], expected[slide][3])


@pytest.mark.slow
def test_imported_slides_go_through_dvc_repro_to_predictions_scanpy_reads(tmp_path):
    """The README's commands: simulator -> Space Ranger folders -> ingest -> dvc repro -> predict with
    barcodes, a CSV and an .h5ad. The figures are those of the same slides through the HDF5 route."""
    import subprocess
    import sys

    import yaml

    from tests.dvc_repo import SMALL, make_repo, run_ok

    path, env = make_repo(tmp_path / "repo", SMALL)
    visium = tmp_path / "visium"
    run_ok([sys.executable, "-m", "src.simulate", "--out", "data/sim.h5",  # truth: data/sim_truth.h5
            "--visium", str(visium), "--geometry", "competition", *[a.replace("240", "400") for a in TINY]], path, env)
    run_ok([sys.executable, "-m", "src.ingest", str(visium / "manifest_spaceranger.csv"), "--out", "data/visium.h5",
            "--truth-out", "data/visium_truth.h5"], path, env)
    figures = {}
    for name, h5, truth in (("hdf5", "data/sim.h5", "data/sim_truth.h5"), ("visium", "data/visium.h5", "data/visium_truth.h5")):
        params = yaml.safe_load((path / "params.yaml").read_text())
        params["data"] = {"h5": h5, "truth": truth}
        (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run_ok(["dvc", "repro", "evaluate"], path, env)
        figures[name] = json.loads((path / "metrics/evaluate.json").read_text())
    hdf5, metrics = figures["hdf5"], figures["visium"]
    assert metrics["cv_spearman"] > metrics["cv_floor_spearman"] + 0.03, metrics
    assert "ceiling_spearman" not in metrics  # real labels: no noise-free expectation
    for key in ("cv_spearman", "cv_floor_spearman", "test_spearman", "floor_spearman"):
        assert abs(metrics[key] - hdf5[key]) < 0.03, (key, metrics, hdf5)
    per_type = pd.read_csv(path / "metrics/per_type.csv")
    assert per_type["cell_type"].iloc[2] == "CD4+ T cells"

    run = subprocess.run([sys.executable, "-m", "src.predict", "--model", "models/model.pt", "--h5", "data/visium.h5",
                          "--out", "out/submission.csv", "--table", "out/predictions.csv", "--h5ad", "out/predictions.h5ad",
                          "--maps", "out/maps"],
                         cwd=path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (path / "out/maps/test_S_3.png").stat().st_size > 1000
    table = pd.read_csv(path / "out/predictions.csv")
    positions = pd.read_csv(visium / "spaceranger/test_S_3/outs/spatial/tissue_positions.csv")
    in_tissue = positions[positions["in_tissue"] == 1].set_index("barcode")
    assert list(table.columns[:6]) == ["barcode", "slide", "x", "y", "x_fullres", "y_fullres"]
    assert set(table["barcode"]) == set(in_tissue.index)
    np.testing.assert_array_equal(table["x_fullres"], in_tissue.loc[table["barcode"], "pxl_col_in_fullres"])
    adata = anndata.read_h5ad(path / "out/predictions.h5ad")
    assert list(adata.obs_names) == list(table["barcode"])
    assert list(adata.obsm["predicted_abundance"].columns) == list(table.columns[6:])
    np.testing.assert_allclose(adata.obsm["predicted_abundance"].to_numpy(), table.iloc[:, 6:].to_numpy(), rtol=1e-5)
    np.testing.assert_array_equal(adata.obsm["spatial"], table[["x_fullres", "y_fullres"]].to_numpy())
    assert adata.uns["spatial"]["test_S_3"]["scalefactors"]["spot_diameter_fullres"] == 104.0
    submission = pd.read_csv(path / "outputs/submission.csv")  # the pipeline's own prediction of the slide
    np.testing.assert_allclose(submission.iloc[:, 1:].to_numpy(), table.iloc[:, 6:].to_numpy(), rtol=1e-4, atol=1e-6)


def test_a_file_without_a_pixel_size_takes_the_manifests(exported, tmp_path, capsys):
    folder = _copy(exported, tmp_path)
    _no_pixel_size(folder)
    _edit_csv(folder / "manifest_spaceranger.csv", lambda t: t.assign(um_per_px=["0.52885", "", ""]))
    ingest.main([str(folder / "manifest_spaceranger.csv"), "--out", str(tmp_path / "a.h5")])
    assert "0.5289 um/px (the manifest's um_per_px)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _edit_csv(folder / "manifest_spaceranger.csv", lambda t: t.assign(um_per_px=["fine", "", ""]))
        ingest.main([str(folder / "manifest_spaceranger.csv"), "--out", str(tmp_path / "b.h5")])
    assert "row 1: um_per_px of slide train_S_1 is 'fine'" in capsys.readouterr().err


def test_an_image_coarser_than_the_pipeline_is_refused(exported, tmp_path, capsys):
    with pytest.raises(SystemExit):
        ingest.main([str(exported / "manifest_h5ad.csv"), "--out", str(tmp_path / "a.h5"), "--resolution", "0.25"])
    err = capsys.readouterr().err
    assert "train_S_1_fullres.tif: 0.528846 um/px (TIFF resolution tags (centimetre)) is coarser than the " \
           "pipeline's 0.25 um/px" in err and err.count("\n") == 1
    assert not (tmp_path / "a.h5").exists()


def test_true_visium_geometry_keeps_its_pitch_in_um(tmp_path, capsys):
    """The lab export's spots sit 100 um apart: 47 px at 2.115 um/px, 94 px at 1.058, recorded per slide."""
    simulate.main(["--out", str(tmp_path / "sim.h5"), "--visium", str(tmp_path / "v"), *TINY[:-2],
                   "--set", "simulate.size=500", "--set", "simulate.offsets=[[0, 0], [0, 0]]"])
    capsys.readouterr()
    for resolution, pitch in (("2.1154", 47.3), ("1.0577", 94.6)):
        ingest.main([str(tmp_path / "v/manifest_spaceranger.csv"), "--out", str(tmp_path / f"{resolution}.h5"),
                     "--resolution", resolution])
        found = re.findall(r"spot pitch ([0-9.]+) px \((\d+) um\)", capsys.readouterr().out)
        assert [float(p) for p, _ in found] == pytest.approx([pitch] * 3, abs=0.6)
        assert [um for _, um in found] == ["100"] * 3
        with h5py.File(tmp_path / f"{resolution}.h5") as h5:
            assert h5.attrs["um_per_px"] == pytest.approx(float(resolution))
            assert [h5[f"fullres/{s}"].attrs["pitch"] for s in ("Train/train_S_1", "Test/test_S_3")] == \
                pytest.approx([pitch, pitch], abs=0.6)
