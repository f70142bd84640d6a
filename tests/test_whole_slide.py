"""H&E-only slides: ``python -m src.predict --wsi`` lays the model's lattice over the tissue of a scanner
file, predicts at the spot table's positions exactly what the spot path predicts, writes files the
field reads, runs a cohort restartably in shards, and refuses bad input in one line."""
import json
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from src import ingest, predict, simulate
from src.core.errors import InputError
from src.data.preprocessing.stain import StainNormalizer
from src.data.preprocessing.whole_slide import CropFile, reflect
from src.data.slides.layout import open_h5, read_fullres, read_image_uint8, slide_refs
from src.data.spatial import COMPETITION_UM_PER_PX, hex_lattice, lattice_pitch
from src.engine.whole_slide import predict_whole_slide
from src.model.checkpoint import load_checkpoint
from tests.conftest import ROOT, write_tiny_checkpoint

SMALL = ["--set", "simulate.size=320", "--set", "simulate.n_train=1", "--set", "simulate.n_test=1",
         "--set", "simulate.tissue_extent=[0.8, 1.1]", "--set", "simulate.offsets=[[0, 0]]"]


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """The simulator's test slide as Space Ranger writes it (an Aperio .svs, 4 px per layout px), and
    the layout file ``ingest`` makes of it."""
    folder = tmp_path_factory.mktemp("wsi")
    simulate.main(["--out", str(folder / "sim.h5"), "--truth-out", str(folder / "truth.h5"), "--visium",
                   str(folder / "visium"), "--fullres-scale", "4", "--geometry", "competition", *SMALL])
    manifest = pd.read_csv(folder / "visium" / "manifest_spaceranger.csv")
    manifest[manifest["split"] == "test"].to_csv(folder / "visium" / "test.csv", index=False)
    ingest.main([str(folder / "visium" / "test.csv"), "--out", str(folder / "test.h5")])
    svs = next((folder / "visium" / "images").glob("*.svs"))
    return svs, folder / "test.h5"


@pytest.fixture(scope="module")
def checkpoint(slide, tmp_path_factory):
    """A model with neighbour aggregation and a Vahadane reference with luminosity standardization,
    measuring stains on a sample (fit_pixels small enough that the slides are sampled, not read whole)."""
    with open_h5(slide[1]) as h5:
        reference = read_image_uint8(h5, slide_refs(h5)[0])
    stain = StainNormalizer("vahadane", True, 4_000, 3).fit(reference).to_dict()
    return write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "model.pt", stain, "model.neighbour_radius=1.2")


def test_reflect_indexes_as_numpy_pads():
    for n, pad in ((2, 5), (7, 6), (7, 20)):
        axis = np.arange(n)
        np.testing.assert_array_equal(reflect(np.arange(-pad, n + pad), n), np.pad(axis, pad, mode="reflect"))
    np.testing.assert_array_equal(reflect(np.arange(-3, 4), 1), 0)


def test_the_lattice_is_hexagonal_at_the_pitch():
    xy = hex_lattice(1000, 800, 47.3)
    assert lattice_pitch(xy[:, 0], xy[:, 1]) == pytest.approx(47.3, abs=0.01)
    rows = np.unique(np.round(xy[:, 1], 6))
    np.testing.assert_allclose(np.diff(rows), 47.3 * np.sqrt(3) / 2)
    assert xy[:, 0].min() >= 0 and xy[:, 0].max() < 1000 and xy[:, 1].max() < 800


def test_a_crop_file_reads_back_as_an_array(tmp_path):
    patches = np.random.default_rng(0).integers(0, 255, (5, 4, 4, 3), dtype=np.uint8)
    crops = CropFile(tmp_path / "p.u8", 5, 4)
    for i in (3, 0, 4, 1, 2):
        crops.write(i, patches[i])
    np.testing.assert_array_equal(crops[2], patches[2])
    np.testing.assert_array_equal(crops[1:4], patches[1:4])
    np.testing.assert_array_equal(crops[np.array([4, 0])], patches[[4, 0]])
    np.testing.assert_array_equal(np.asarray(crops), patches)
    crops.close()


def test_at_the_spot_tables_positions_the_wsi_path_predicts_what_the_spot_path_does(slide, checkpoint, tmp_path):
    svs, h5_path = slide
    spot_path = predict.predict_file(checkpoint, h5_path, tmp_path / "sub.csv", log=lambda _: None)
    with open_h5(h5_path) as h5:
        fullres = read_fullres(h5, slide_refs(h5)[0])[0]
    model, meta = load_checkpoint(checkpoint)
    result = predict_whole_slide(model, meta, checkpoint, svs, spots_fullres=fullres, log=lambda _: None)
    np.testing.assert_array_equal(result.patch_set.spots[["x", "y"]].to_numpy(), spot_path[["x", "y"]].to_numpy())
    np.testing.assert_array_equal(result.pred, spot_path.iloc[:, 4:].to_numpy())  # same crops, same numbers


def test_the_command_maps_the_tissue_into_files_the_field_reads(slide, checkpoint, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import squidpy as sq
    from matplotlib import pyplot as plt

    svs, h5_path = slide
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "src.predict", "--model", str(checkpoint), "--wsi", str(svs),
                          "--h5ad", str(out / "s.h5ad"), "--table", str(out / "s.csv"), "--maps", str(out / "maps"),
                          "--geojson", str(out / "s.geojson")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "spots at a 53-um pitch" in run.stdout
    adata = anndata.read_h5ad(out / "s.h5ad")
    with tifffile.TiffFile(svs) as tif:
        height, width = tif.pages[0].shape[:2]
    xy = adata.obsm["spatial"]
    with open_h5(h5_path) as h5:
        in_tissue = len(read_fullres(h5, slide_refs(h5)[0])[0])  # Space Ranger's spots under the tissue
    assert 0.8 < len(adata) / in_tissue < 1.25, (len(adata), in_tissue)
    assert (xy >= 0).all() and (xy[:, 0] < width).all() and (xy[:, 1] < height).all()
    # on the slide's own lattice: 25 layout px x 4 = 100 full-resolution px apart
    assert lattice_pitch(xy[:, 0], xy[:, 1]) == pytest.approx(100.0, abs=1.0)
    # the lattice covers the tissue Space Ranger's spots cover: each one's nearest other within a pitch
    from scipy.spatial import cKDTree

    with open_h5(h5_path) as h5:
        listed = read_fullres(h5, slide_refs(h5)[0])[0]
    assert (cKDTree(listed).query(xy)[0] < 100).mean() > 0.9
    assert (cKDTree(xy).query(listed)[0] < 100).mean() > 0.9
    frame = adata.obsm["predicted_abundance"]
    assert list(frame.columns) == [f"C{i}" for i in range(1, 36)] and np.isfinite(frame.to_numpy()).all()
    library = adata.obs["library_id"].iloc[0]
    entry = adata.uns["spatial"][library]
    assert {"hires", "lowres"} <= set(entry["images"]) and entry["scalefactors"]["spot_diameter_fullres"] == \
        pytest.approx(55 / (COMPETITION_UM_PER_PX / 4), rel=0.01)
    sq.pl.spatial_scatter(adata, color="C1")  # squidpy draws it with its defaults
    plt.close("all")
    table = pd.read_csv(out / "s.csv")
    assert len(table) == len(adata) and {"x_fullres", "y_fullres", "C35"} <= set(table.columns)
    geo = json.loads((out / "s.geojson").read_text())
    assert len(geo["features"]) == len(adata)
    first = geo["features"][0]
    assert first["geometry"]["type"] == "Polygon" and len(first["properties"]["measurements"]) == 35
    assert (out / "maps" / f"{svs.name.split('.')[0]}.png").stat().st_size > 10_000


def test_a_cohort_runs_in_shards_skips_what_is_done_and_goes_on_past_a_bad_slide(slide, checkpoint, tmp_path, capsys):
    import shutil

    svs = slide[0]
    for name in ("a", "b", "2023.05.01_c"):
        shutil.copy(svs, tmp_path / f"{name}.svs")
    (tmp_path / "bad.svs").write_bytes(b"not a slide at all" * 100)
    (tmp_path / "cohort.csv").write_text("image,name\na.svs,\nb.svs,\nbad.svs,\n2023.05.01_c.svs,\ngone.svs,\n")
    base = ["--model", str(checkpoint), "--wsi", str(tmp_path / "cohort.csv"), "--out-dir", str(tmp_path / "out"),
            "--outputs", "h5ad,table"]
    predict.main([*base, "--shard", "1/2"])  # rows 1 and 3: b and 2023.05.01_c
    files = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert files == ["2023.05.01_c.csv", "2023.05.01_c.h5ad", "b.csv", "b.h5ad"]
    before = (tmp_path / "out" / "b.h5ad").stat().st_mtime_ns
    with pytest.raises(SystemExit) as stopped:
        predict.main([*base, "--shard", "0/2"])  # a, bad and gone: one line for each bad one, a written
    assert stopped.value.code == 2
    out, err = capsys.readouterr()
    assert "bad.svs" in out and "gone.svs: slide not found" in out and "2 slides failed" in err
    assert (tmp_path / "out" / "a.h5ad").is_file() and not (tmp_path / "out" / "bad.h5ad").exists()
    (tmp_path / "cohort.csv").write_text("image,name\na.svs,\nb.svs,\n2023.05.01_c.svs,\n")
    predict.main(base)
    assert "3 of 3 slides already done with this model: skipped" in capsys.readouterr().out
    assert (tmp_path / "out" / "b.h5ad").stat().st_mtime_ns == before
    other = write_tiny_checkpoint(tmp_path / "other.pt", None, "model.fusion=none")  # a new model: all again
    predict.main([*base[:1], str(other), *base[2:]])
    assert "already done" not in capsys.readouterr().out
    assert (tmp_path / "out" / "b.h5ad").stat().st_mtime_ns != before


@pytest.mark.parametrize("args, message", [
    (["--out-dir", "x"], "--out-dir: for a manifest of slides"),
    (["--h5ad", "x.h5ad", "--shard", "0/2"], "--shard: for a manifest of slides"),
])
def test_options_of_the_other_mode_are_refused(args, message, slide, checkpoint, capsys):
    with pytest.raises(SystemExit):
        predict.main(["--model", str(checkpoint), "--wsi", str(slide[0]), *args])
    assert message in capsys.readouterr().err


def _old_checkpoint(checkpoint, path):
    payload = torch.load(checkpoint, weights_only=True)
    payload["format"] = 5
    del payload["um_per_px"], payload["pitch"]
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("case, message", [
    ("no pixel size", "no pixel size: the file records none"),
    ("no tissue", "no tissue found"),
    ("coarser", "is coarser than the model's 2.11538 um/px"),
    ("unreadable", "bad.svs"),
    ("old checkpoint", "checkpoint format 5 does not record the resolution and spot pitch"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, message, slide, checkpoint, tmp_path, capsys):
    svs = slide[0]
    model, extra = checkpoint, []
    if case == "no pixel size":
        svs = tmp_path / "plain.tif"
        tifffile.imwrite(svs, np.full((400, 400, 3), 200, np.uint8))
    elif case == "no tissue":
        svs = tmp_path / "glass.tif"
        tifffile.imwrite(svs, np.full((600, 600, 3), 245, np.uint8), resolution=(1e4 / 0.5, 1e4 / 0.5),
                         resolutionunit="CENTIMETER")
    elif case == "coarser":
        extra = ["--um-per-px", "4.0"]
    elif case == "unreadable":
        svs = tmp_path / "bad.svs"
        svs.write_bytes(b"\x00" * 1000)
    else:
        model = _old_checkpoint(checkpoint, tmp_path / "old.pt")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        predict.main(["--model", str(model), "--wsi", str(svs), "--h5ad", str(out / "p.h5ad"), *extra])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_a_lattice_with_no_spot_on_tissue_is_refused(slide, checkpoint):
    model, meta = load_checkpoint(checkpoint)
    with pytest.raises(InputError, match="no tissue found"):
        predict_whole_slide(model, dict(meta, pitch=10_000.0), checkpoint, slide[0], log=lambda _: None)


def test_train_delivers_a_position_free_model_and_predict_says_when_a_model_fuses_positions(
        tiny_patches, slide, checkpoint, tmp_path, capsys):
    from src import train
    from src.engine.whole_slide import fused_positions
    from tests.conftest import FAST

    (tmp_path / "stain.json").write_text(json.dumps(load_checkpoint(checkpoint)[1]["stain"]))
    sets = [a for o in [*FAST, "model.fusion=film"] for a in ("--set", o)]
    train.main(["--patches", str(tiny_patches / "patches"), "--stain", str(tmp_path / "stain.json"),
                "--out", str(tmp_path / "he.pt"), "--fusion", "none", *sets])
    model, _ = load_checkpoint(tmp_path / "he.pt")
    assert fused_positions(model) == [] and fused_positions(load_checkpoint(checkpoint)[0]) == ["product"]
    for path, noted in ((checkpoint, True), (tmp_path / "he.pt", False)):
        predict.main(["--model", str(path), "--wsi", str(slide[0]), "--h5ad", str(tmp_path / f"{path.stem}.h5ad")])
        assert ("a position-free model maps sections no assay has seen better" in capsys.readouterr().out) == noted


def test_patches_at_the_tissue_boxs_edge_show_the_slide_beyond_it_not_a_mirror(slide, tmp_path):
    from src.data.preprocessing.whole_slide import cut_patches, plan_whole_slide

    svs, h5_path = slide
    with open_h5(h5_path) as h5:
        fullres = read_fullres(h5, slide_refs(h5)[0])[0]
    plain = StainNormalizer("none")
    patches = []
    for from_tissue in (False, True):
        plan = plan_whole_slide(svs, COMPETITION_UM_PER_PX, 52.9, spots_fullres=fullres, region_from_tissue=from_tissue)
        (tmp_path / str(from_tissue)).mkdir()
        patches.append(np.asarray(cut_patches(plan, plain, 96, [], tmp_path / str(from_tissue), 2.1).images))
    assert plan.region[2:] != plan.shape  # the box is smaller than the slide
    np.testing.assert_array_equal(patches[0], patches[1])


def test_a_model_trained_on_true_visium_geometry_lays_its_100_um_lattice(slide, tmp_path):
    """Trained at 100-um spot pitch (47.3 px at 2.115 um/px), the lattice is 100 um apart on any slide."""
    model = write_tiny_checkpoint(tmp_path / "visium.pt", None, pitch=100 / COMPETITION_UM_PER_PX)
    predict.main(["--model", str(model), "--wsi", str(slide[0]), "--h5ad", str(tmp_path / "v.h5ad")])
    xy = anndata.read_h5ad(tmp_path / "v.h5ad").obsm["spatial"]
    full_um_per_px = COMPETITION_UM_PER_PX / 4  # the export's full-resolution pixels
    assert lattice_pitch(xy[:, 0], xy[:, 1]) * full_um_per_px == pytest.approx(100.0, rel=0.01)
