"""Training, CV, inference, checkpoints, evaluation and prediction on the tiny slides."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from src import predict as predict_cli
from src.core.errors import InputError
from src.data.preprocessing.patch_set import load_patch_set
from src.engine.cross_validation import choose_sigma, cross_validate, cv_score
from src.engine.fit import fit, seed_everything, warmup_cosine
from src.engine.inference import predict, predict_abundance
from src.evaluate import evaluate
from src.model.checkpoint import load_checkpoint, save_checkpoint
from src.model.network import Ensemble, SpatialCellModel
from src.model.targets import rank_scale
from src.model.transforms import Preprocessing, build_transform
from tests.conftest import ROOT, fast_params, read_layout, write_datasets
from tests.helpers import format3


@pytest.fixture(scope="module")
def train_set(tiny_patches):
    return load_patch_set(tiny_patches / "patches", "train")


@pytest.fixture(scope="module")
def fitted(train_set):
    params = fast_params()
    rows = np.arange(len(train_set.spots))
    return params, fit(params, train_set, rows[::2], rows[1::2], show_progress=False)


def _all(train_set):
    return np.arange(len(train_set.spots))


def test_fit_reports_finite_loss_and_a_validation_score_above_the_floor(train_set, fitted):
    from src.engine.metrics import floor_score

    params, result = fitted
    rows = _all(train_set)
    assert result.epochs_run == params.train.epochs
    assert np.isfinite(result.train_loss).all() and len(result.val_scores) == params.train.epochs
    floor = floor_score(train_set.abundance[rows[::2]], train_set.abundance[rows[1::2]])
    assert result.val_scores[-1] > floor + 0.03, (result.val_scores, floor)  # measured: 0.598 vs 0.529


def test_training_is_reproducible_on_cpu(train_set, fitted):
    params, first = fitted
    rows = _all(train_set)
    again = fit(params, train_set, rows[::2], rows[1::2], show_progress=False)
    a = predict(first.model, train_set, rows[:20], ["identity"])
    b = predict(again.model, train_set, rows[:20], ["identity"])
    np.testing.assert_array_equal(a, b)


def test_learning_rate_groups_reach_their_parameters(train_set):
    rows = _all(train_set)
    frozen_backbone = fit(fast_params("train.lr_backbone=1.0e-30", "train.weight_decay=0.0"), train_set, rows,
                          show_progress=False).model  # steps of 1e-30 leave float32 weights as they are
    reference = fit(fast_params(), train_set, rows, show_progress=False).model
    trainable = [n for n, p in frozen_backbone.backbone.named_parameters() if p.requires_grad]
    params = fast_params()
    seed_everything(params.train.seed)  # as fit does before it builds the model
    start = SpatialCellModel(params.model, n_outputs=len(train_set.targets))
    for name in trainable:  # moved by at most ~1e-30 per step (from zero-initialized weights too)
        torch.testing.assert_close(frozen_backbone.backbone.get_parameter(name), start.backbone.get_parameter(name),
                                   rtol=1e-6, atol=1e-20)
    assert any(not torch.equal(reference.backbone.get_parameter(n), start.backbone.get_parameter(n)) for n in trainable)


def test_gradient_clipping_changes_the_result(train_set):
    rows = _all(train_set)
    clipped = fit(fast_params("train.grad_clip=0.001"), train_set, rows, show_progress=False).model
    free = fit(fast_params("train.grad_clip=0.0"), train_set, rows, show_progress=False).model
    a = predict(clipped, train_set, rows[:10], ["identity"])
    b = predict(free, train_set, rows[:10], ["identity"])
    assert not np.allclose(a, b)


def test_warmup_then_cosine_schedule():
    factor = warmup_cosine(100, 0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5, abs=0.02) and factor(99) < 0.01
    assert warmup_cosine(100, 0.0)(0) == pytest.approx(1.0)


@pytest.mark.parametrize("option", ["train.flips=true", "train.color_jitter=0.3", "train.resized_crop=0.5"])
def test_each_augmentation_changes_the_training_input(train_set, option):
    params = fast_params("train.flips=false", "train.color_jitter=0.0", "train.resized_crop=0.0", option)
    model = SpatialCellModel(params.model, n_outputs=len(train_set.targets))
    augmented = build_transform(model.preprocessing, 32, params.train)
    plain = build_transform(model.preprocessing, 32, fast_params(
        "train.flips=false", "train.color_jitter=0.0", "train.resized_crop=0.0").train)
    image = torch.from_numpy(np.array(train_set.images[0])).permute(2, 0, 1)
    torch.manual_seed(1)
    outs = [augmented(image) for _ in range(8)]
    assert any(not torch.allclose(o, plain(image)) for o in outs)
    assert all(o.shape == (3, 32, 32) for o in outs)


def test_tta_of_a_flip_invariant_model_is_the_identity(train_set, fitted):
    _, result = fitted
    model = result.model
    rows = _all(train_set)[:16]
    width = model.image_proj[0].in_features
    all_eight = ["identity", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "antitranspose"]
    with pytest.MonkeyPatch.context() as patch:  # undone even when an assert fails: the fixture is shared
        patch.setattr(model, "forward_features",
                      lambda images: images.mean(dim=(2, 3)).repeat(1, width // 3 + 1)[:, :width], raising=False)
        np.testing.assert_allclose(predict(model, train_set, rows, all_eight),
                                   predict(model, train_set, rows, ["identity"]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(predict(model, train_set, rows, all_eight), predict(model, train_set, rows, ["identity"]))


def test_checkpoint_round_trip_predicts_the_same(train_set, fitted, tmp_path):
    params, result = fitted
    path = tmp_path / "model.pt"
    save_checkpoint(path, result.model, targets=train_set.targets, loss=params.loss,
                    patch_size=train_set.patch_size, infer=params.infer, stain={"method": "none"},
                    rank_scale=rank_scale(train_set.abundance).tolist())
    model, meta = load_checkpoint(path)
    assert meta["targets"] == train_set.targets and meta["infer"] == params.infer
    rows = _all(train_set)[:12]
    np.testing.assert_array_equal(predict(model, train_set, rows, ["identity", "vflip"]),
                                  predict(result.model, train_set, rows, ["identity", "vflip"]))
    other = fit(params, train_set, _all(train_set)[::2], show_progress=False).model
    save_checkpoint(tmp_path / "pair.pt", Ensemble([result.model, other]), targets=train_set.targets,
                    loss=params.loss, patch_size=train_set.patch_size, infer=params.infer, stain={"method": "none"},
                    rank_scale=rank_scale(train_set.abundance).tolist())
    pair, _ = load_checkpoint(tmp_path / "pair.pt")
    assert isinstance(pair, Ensemble) and len(pair.members) == 2
    np.testing.assert_allclose(predict(pair, train_set, rows, ["identity", "vflip"]),
                               (predict(result.model, train_set, rows, ["identity", "vflip"])
                                + predict(other, train_set, rows, ["identity", "vflip"])) / 2, rtol=1e-5, atol=1e-6)
    import torch

    torch.save({"model_config": {}, "state_dict": {}}, tmp_path / "old.pt")
    with pytest.raises(InputError, match="written by an earlier version of this project"):
        load_checkpoint(tmp_path / "old.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a checkpoint of this project"):
        load_checkpoint(broken)


def test_a_checkpoint_describes_itself_and_refuses_what_it_cannot_rebuild(train_set, fitted, tmp_path):
    import dataclasses

    import timm
    import torch

    from src.model.checkpoint import FORMAT, code_version

    params, result = fitted
    path = tmp_path / "model.pt"
    save_checkpoint(path, result.model, targets=train_set.targets, loss=params.loss, patch_size=train_set.patch_size,
                    infer=params.infer, stain={"method": "none"},
                    rank_scale=rank_scale(train_set.abundance).tolist(), data_digest=train_set.digest())
    _, meta = load_checkpoint(path)
    assert meta["format"] == FORMAT and meta["data_digest"] == train_set.digest()
    prep = result.model.preprocessing
    assert Preprocessing(**meta["preprocessing"]) == prep and dataclasses.asdict(prep)["input_size"] == 32
    assert meta["versions"]["timm"] == timm.__version__ and torch.__version__.startswith(meta["versions"]["torch"])
    assert meta["code_version"] == code_version() and len(code_version()) == 16
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "format": FORMAT + 1}, tmp_path / "newer.pt")
    with pytest.raises(InputError, match=f"checkpoint format {FORMAT + 1} is newer than this code reads"):
        load_checkpoint(tmp_path / "newer.pt")
    recipe = payload["recipes"][0]
    torch.save({**payload, "recipes": [{**recipe, "preprocessing": {**recipe["preprocessing"], "mean": [0.5] * 3}}]},
               tmp_path / "other_prep.pt")
    with pytest.raises(InputError, match="the model was trained on preprocessing"):
        load_checkpoint(tmp_path / "other_prep.pt")
    rows = _all(train_set)[:6]
    expected = predict(result.model, train_set, rows, ["identity"])
    payload = format3(payload)  # format 3: one recipe at the top level, still read
    torch.save(payload, tmp_path / "format3.pt")
    np.testing.assert_array_equal(predict(load_checkpoint(tmp_path / "format3.pt")[0], train_set, rows, ["identity"]),
                                  expected)
    px = round(prep.context * train_set.patch_size)  # format 2: model.context in px, still read
    torch.save({**payload, "format": 2, "model_config": {**payload["model_config"], "context": px},
                "preprocessing": {**payload["preprocessing"], "context": px}}, tmp_path / "format2.pt")
    older, _ = load_checkpoint(tmp_path / "format2.pt")
    assert older.preprocessing.crop(train_set.patch_size) == prep.crop(train_set.patch_size)
    np.testing.assert_array_equal(predict(older, train_set, rows, ["identity"]), expected)
    del payload["format"], payload["preprocessing"]  # format 1 (before the provenance): still read
    torch.save(payload, tmp_path / "format1.pt")
    np.testing.assert_array_equal(predict(load_checkpoint(tmp_path / "format1.pt")[0], train_set, rows, ["identity"]),
                                  expected)


def test_cross_validation_gives_oof_for_every_spot_and_sigma_needs_no_retraining(train_set):
    params = fast_params("cv.scheme=blocks", "loss.target_transform=log1p")
    result = cross_validate(params, train_set, show_progress=False)
    assert (result.fold_of >= 0).all() and len(result.fold_scores) == params.cv.n_folds
    assert np.isfinite(result.oof).all() and np.isfinite(result.score)
    assert 0 < result.floor < 1
    assert -1 < result.map_floor < 1 and -1 < result.map_score < 1 and len(result.per_type) == len(train_set.targets)
    unsmoothed = cv_score(result.oof, train_set, result.fold_of, params.loss, 0.0, 3.0)[0]
    smoothed = cv_score(result.oof, train_set, result.fold_of, params.loss, 40.0, 3.0)[0]
    assert unsmoothed != smoothed
    sigma, scores = choose_sigma(result.oof, train_set, result.fold_of, params.loss, [0.0, 40.0, 12.5], 3.0)
    assert set(scores) == {0.0, 12.5, 40.0} and scores[sigma] == max(scores.values())
    assert scores[0.0] == pytest.approx(unsmoothed) and scores[40.0] == pytest.approx(smoothed)
    chosen = cross_validate(params, train_set, show_progress=False, sigmas=[0.0, 12.5, 40.0])
    assert chosen.sigma == sigma and chosen.score == pytest.approx(scores[sigma])
    np.testing.assert_array_equal(chosen.oof, result.oof)  # sigma acts after the models: same training
    loso = cross_validate(fast_params("cv.scheme=leave_one_slide_out"), train_set, show_progress=False)
    assert sorted(np.unique(loso.fold_of)) == [0, 1]


@pytest.fixture(scope="module")
def checkpoint(tiny_patches, fitted, train_set, tmp_path_factory):
    params, result = fitted
    path = tmp_path_factory.mktemp("model") / "model.pt"
    stain = json.loads((tiny_patches / "normalized" / "stain.json").read_text())
    save_checkpoint(path, result.model, targets=train_set.targets, loss=params.loss,
                    patch_size=train_set.patch_size, infer=params.infer, stain=stain,
                    rank_scale=rank_scale(train_set.abundance).tolist())
    return path


CV_PER_TYPE = np.linspace(-0.1, 0.6, 35)


TUNE_METRICS = {"cv_spearman": 0.5, "floor_spearman": 0.4, "cv_map_spearman": 0.3, "map_floor_spearman": 0.1,
                "biased_upward": {"best_trial_cv_spearman": 0.55}}


def _evaluate(tiny_patches, checkpoint, truth, out, patches=None, log=print):
    per_type = pd.Series(CV_PER_TYPE, index=[f"C{i}" for i in range(1, 36)])
    return evaluate(checkpoint, patches or tiny_patches / "patches", truth, TUNE_METRICS, per_type,
                    out / "submission.csv", out / "evaluate.json", out / "per_type.csv", out / "plots", log=log)


def test_evaluate_writes_submission_metrics_and_pictures(tiny_patches, tiny_dataset, checkpoint, tmp_path):
    out = tmp_path
    metrics = _evaluate(tiny_patches, checkpoint, tiny_dataset[1], out)
    submission = pd.read_csv(out / "submission.csv")
    test_spots = pd.read_csv(tiny_patches / "patches" / "test_spots.csv")
    assert list(submission.columns) == ["ID"] + [f"C{i}" for i in range(1, 36)]
    assert len(submission) == len(test_spots) and (submission.ID == np.arange(len(test_spots))).all()
    assert np.isfinite(submission.iloc[:, 1:].to_numpy()).all()
    saved = json.loads((out / "evaluate.json").read_text())
    for key in ("cv_spearman", "floor_spearman", "test_spearman", "ceiling_spearman", "skill", "map_spearman",
                "map_floor_spearman", "map_ceiling_spearman"):
        assert np.isfinite(saved[key]), key
    assert saved["floor_spearman"] < saved["ceiling_spearman"]
    assert saved["map_floor_spearman"] < saved["map_ceiling_spearman"]
    assert metrics["test_spearman"] == pytest.approx(saved["test_spearman"], abs=1e-6)
    assert saved["cv_spearman"] == 0.5 and saved["cv_map_spearman"] == 0.3  # the study's nested CV
    assert sorted(p.name for p in (out / "plots" / "maps").iterdir()) == ["S_3.png"]
    assert (out / "plots" / "maps" / "S_3.png").stat().st_size > 1000
    assert (out / "plots" / "per_type_spearman.png").stat().st_size > 1000
    per_type = pd.read_csv(out / "per_type.csv")
    assert list(per_type.columns) == ["cell_type", "cv_spearman", "test_spearman"] and len(per_type) == 35


def test_evaluate_without_truth_writes_every_output_with_the_cv_figures(tiny_patches, checkpoint, tmp_path):
    metrics = _evaluate(tiny_patches, checkpoint, None, tmp_path)
    saved = json.loads((tmp_path / "evaluate.json").read_text())
    assert saved == {"cv_spearman": 0.5, "cv_floor_spearman": 0.4, "cv_map_spearman": 0.3,
                     "cv_map_floor_spearman": 0.1, "n_test_spots": saved["n_test_spots"]}
    assert metrics["cv_spearman"] == 0.5 and not any(k.startswith("test") for k in saved)
    per_type = pd.read_csv(tmp_path / "per_type.csv")
    assert list(per_type.columns) == ["cell_type", "cv_spearman"]
    np.testing.assert_allclose(per_type["cv_spearman"], CV_PER_TYPE, atol=1e-6)
    for name in ("maps/S_3.png", "per_type_spearman.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000
    assert len(pd.read_csv(tmp_path / "submission.csv")) == saved["n_test_spots"]


def test_a_file_without_test_slides_gets_the_cv_figures_and_says_so(tiny_patches, checkpoint, tmp_path):
    """A lab's labelled slides only: the study and the model are what it is after; evaluate reports the
    CV and writes an empty submission instead of stopping on a missing test store."""
    import shutil

    store = tmp_path / "patches"
    shutil.copytree(tiny_patches / "patches", store)
    meta = json.loads((store / "meta.json").read_text())
    del meta["crops"]["test"]
    (store / "meta.json").write_text(json.dumps(meta))
    lines = []
    metrics = _evaluate(tiny_patches, checkpoint, None, tmp_path / "out", patches=store, log=lines.append)
    assert metrics["n_test_spots"] == 0 and metrics["cv_spearman"] == 0.5
    assert len(lines) == 1 and "no Test slide: the figures are the study's CV" in lines[0]
    assert pd.read_csv(tmp_path / "out" / "submission.csv").empty
    assert list((tmp_path / "out" / "plots" / "maps").iterdir()) == []
    with pytest.raises(InputError, match="a truth file, but .* holds no Test slide"):
        _evaluate(tiny_patches, checkpoint, tmp_path / "t.h5", tmp_path / "out2", patches=store)
    assert not (tmp_path / "out2").exists()


def test_a_truth_file_of_other_data_is_a_one_line_error_and_writes_nothing(tiny_patches, checkpoint, tmp_path,
                                                                            tiny_dataset):
    import h5py

    wrong = tmp_path / "wrong_truth.h5"
    with h5py.File(tiny_dataset[1]) as src, h5py.File(wrong, "w") as dst:
        for key in ("Train/S_1", "Train/S_2"):
            src.copy(src[key], dst, name=key)
        observed = src["Test/S_3/observed"][()]
        dst["Test/S_3/observed"] = observed[:-3]  # three spots fewer than the data's test slide
        dst["Test/S_3/expected"] = observed[:-3]
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"{wrong}: slide Test/S_3 has {len(observed) - 3} spots in the truth "
                                         rf"file but {len(observed)} in the data"):
        _evaluate(tiny_patches, checkpoint, wrong, out)
    assert not out.exists()


def test_smoothing_sigma_of_the_checkpoint_is_applied(tiny_patches, checkpoint):
    import dataclasses

    model, meta = load_checkpoint(checkpoint)
    test_set = load_patch_set(tiny_patches / "patches", "test")
    sharp = predict_abundance(model, dict(meta, infer=dataclasses.replace(meta["infer"], smoothing_sigma=0.0)), test_set)
    smooth = predict_abundance(model, dict(meta, infer=dataclasses.replace(meta["infer"], smoothing_sigma=2.0)), test_set)
    assert sharp.shape == smooth.shape and not np.allclose(sharp, smooth)
    assert smooth.std(axis=0).mean() < sharp.std(axis=0).mean()


def test_predict_cli_matches_evaluate_on_the_raw_file(tiny_dataset, tiny_patches, checkpoint, tmp_path):
    out = tmp_path / "preds.csv"
    predict_cli.main(["--model", str(checkpoint), "--h5", str(tiny_dataset[0]), "--out", str(out)])
    frame = pd.read_csv(out)
    assert list(frame.columns[:4]) == ["ID", "slide", "x", "y"] and frame.shape[1] == 39
    model, meta = load_checkpoint(checkpoint)
    expected = predict_abundance(model, meta, load_patch_set(tiny_patches / "patches", "test"))
    np.testing.assert_allclose(frame.iloc[:, 4:].to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_predict_cli_on_a_file_of_test_slides_only(tiny_dataset, checkpoint, tmp_path):
    """The usual case: new slides, no training slides, any number of them; same predictions."""
    full = tmp_path / "full.csv"
    predict_cli.main(["--model", str(checkpoint), "--h5", str(tiny_dataset[0]), "--out", str(full)])
    layout = {k: v for k, v in read_layout(tiny_dataset[0]).items() if "/Test/" in k}
    layout |= {k.replace("S_3", "S_7"): v for k, v in layout.items()}  # a second new slide
    new = write_datasets(tmp_path / "new.h5", layout)
    out = tmp_path / "p.csv"
    predict_cli.main(["--model", str(checkpoint), "--h5", str(new), "--out", str(out)])
    frame, expected = pd.read_csv(out), pd.read_csv(full)
    assert len(frame) == 2 * len(expected) and list(frame["slide"].unique()) == ["S_3", "S_7"]
    for slide in ("S_3", "S_7"):
        rows = frame[frame["slide"] == slide]
        np.testing.assert_allclose(rows.iloc[:, 4:].to_numpy(), expected.iloc[:, 4:].to_numpy(), rtol=1e-5, atol=1e-6)


def test_predict_cli_bad_input_is_one_line_and_writes_nothing(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.h5"
    bad.write_text("nope")
    out = tmp_path / "preds.csv"
    with pytest.raises(SystemExit) as info:
        predict_cli.main(["--model", str(checkpoint), "--h5", str(bad), "--out", str(out)])
    assert info.value.code == 2 and "not an HDF5 file" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        predict_cli.main(["--model", str(tmp_path / "none.pt"), "--h5", str(bad), "--out", str(out)])
    assert "checkpoint not found" in capsys.readouterr().err


def test_offline_predict_of_an_hf_hub_backbone_says_the_config_is_missing_not_the_weights(checkpoint, tiny_dataset,
                                                                                          tmp_path):
    """The checkpoint holds every weight; what timm lacks offline is the hub's config.json of the name."""
    import os
    import subprocess
    import sys

    payload = torch.load(checkpoint, weights_only=True)
    payload["recipes"][0]["model_config"]["backbone"] = "hf-hub:timm/resnet10t.a1_in1k"
    payload["recipes"][0]["encoder"].update(name="hf-hub:timm/resnet10t.a1_in1k", architecture="hf-hub:timm/resnet10t.a1_in1k")
    hub = tmp_path / "hub.pt"
    torch.save(payload, hub)
    run = subprocess.run([sys.executable, "-m", "src.predict", "--model", str(hub), "--h5", str(tiny_dataset[0]),
                          "--out", str(tmp_path / "p.csv")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "config.json" in lines[0] and "could not be fetched" not in lines[0] and "weights of" not in lines[0]
    assert not (tmp_path / "p.csv").exists()


def test_equal_checkpoints_are_equal_bytes_however_their_config_objects_were_made(fitted, train_set, tmp_path):
    """Members read back from the model store carry config strings of their own; members built from
    params.yaml share them. Pickle writes shared objects by reference: the checkpoint must not care."""
    import copy
    import dataclasses

    from src.model.checkpoint import save_recipes

    params, result = fitted
    first, second = result.model, copy.deepcopy(result.model)
    paths = []
    for name, backbone in (("shared", first.cfg.backbone), ("own", "".join(list(first.cfg.backbone)))):
        second.cfg = dataclasses.replace(second.cfg, backbone=backbone)
        paths.append(tmp_path / f"{name}.pt")
        save_recipes(paths[-1], [(first, params.loss, params.infer, 0.5), (second, params.loss, params.infer, 0.5)],
                     targets=list(train_set.targets), patch_size=train_set.patch_size, stain={"method": "none"},
                     rank_scale=rank_scale(train_set.abundance).tolist())
    assert first.cfg.backbone is not second.cfg.backbone  # the second time, two string objects
    assert paths[0].read_bytes() == paths[1].read_bytes()
