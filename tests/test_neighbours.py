"""Neighbour aggregation: the neighbourhood mean, the frozen descriptors, and the model paths that use
them (cached and uncached training, prediction, checkpoints)."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from src.core.errors import InputError
from src.data.preprocessing.patch_set import load_patch_set
from src.engine.fit import fit
from src.engine.inference import predict
from src.model.backbone_split import pool_positions
from src.model.checkpoint import load_checkpoint, save_checkpoint
from src.model.neighbours import neighbour_mean, spot_inputs
from src.model.network import Ensemble, SpatialCellModel
from src.model.targets import rank_scale
from src.model.transforms import build_transform
from tests.conftest import fast_params
from tests.helpers import format3

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def train_set(tiny_patches):
    return load_patch_set(tiny_patches / "patches", "train")


@pytest.fixture(scope="module")
def neighbour_fit(train_set):
    params = fast_params("model.neighbour_radius=1.2")
    rows = np.arange(len(train_set.spots))
    return params, fit(params, train_set, rows[::2], show_progress=False)


def test_neighbour_mean_covers_the_radius_within_one_slide():
    xy = np.array([[0, 0], [25, 0], [50, 0], [100, 0], [0, 0]], float)
    slides = np.array(["a", "a", "a", "a", "b"])
    values = np.array([[1.0], [2.0], [4.0], [8.0], [16.0]])
    pitches = {"a": 25.0, "b": 25.0}
    got = neighbour_mean(values, xy, slides, radius=1.2, pitches=pitches)  # 30 px
    np.testing.assert_allclose(got[:, 0], [1.5, 7 / 3, 3.0, 8.0, 16.0])  # slide b's spot sits on a's first
    np.testing.assert_allclose(neighbour_mean(values, xy, slides, radius=0.4, pitches=pitches), values)


def test_a_radius_in_pitches_is_the_same_ring_on_either_lattice():
    """One ring at the competition's 25 px and at Visium's 47 px: the same neighbours."""
    ring = np.array([[0.0, 0.0]] + [[np.cos(a), np.sin(a)] for a in np.arange(6) * np.pi / 3]
                    + [[2 * np.cos(a), 2 * np.sin(a)] for a in np.arange(6) * np.pi / 3])
    values = np.arange(13, dtype=float)[:, None]
    for pitch in (25.0, 47.3):
        got = neighbour_mean(values, ring * pitch, np.array(["s"] * 13), radius=1.2, pitches={"s": pitch})
        assert got[0, 0] == pytest.approx(values[:7].mean())  # the spot and its first ring, not the second


def test_pooling_over_positions_of_each_layout():
    maps = torch.arange(24.0).reshape(1, 2, 3, 4)
    assert torch.equal(pool_positions(maps), maps.mean(dim=(2, 3)))
    assert torch.equal(pool_positions(maps.permute(0, 2, 3, 1), channels_last=True), maps.mean(dim=(2, 3)))
    tokens = torch.arange(12.0).reshape(1, 4, 3)
    assert torch.equal(pool_positions(tokens), tokens.mean(dim=1))


def test_descriptors_are_the_frozen_blocks_pooled_and_fixed_by_training(train_set, neighbour_fit):
    params, result = neighbour_fit
    model = result.model
    assert model.descriptor_cut == len(model.blocks) - params.model.unfrozen_blocks
    images = build_transform(model.preprocessing, train_set.patch_size, None)(
        torch.from_numpy(np.array(train_set.images[:6])).permute(0, 3, 1, 2))
    torch.manual_seed(params.train.seed)  # fit's model is the first one built after seeding
    untrained = SpatialCellModel(params.model, n_outputs=len(train_set.targets))
    np.testing.assert_array_equal(model.spot_descriptors(images).numpy(), untrained.spot_descriptors(images).numpy())
    inputs = spot_inputs(model, train_set, CPU)
    assert inputs.shape == (len(train_set.spots), 2 + model.descriptor_width) and np.isfinite(inputs).all()
    np.testing.assert_array_equal(inputs[:, :2], train_set.coords())


def test_neighbourhood_reaches_the_prediction_and_gets_gradients(train_set, neighbour_fit):
    _, result = neighbour_fit
    model, rows = result.model, np.arange(12)
    base = predict(model, train_set, rows, ["identity"], device=CPU)
    shifted = train_set.spots.copy()
    first = shifted["slide"] == shifted["slide"].iloc[0]
    positions = shifted.loc[first, ["x", "y"]].to_numpy()  # the same lattice, other spots on it
    shifted.loc[first, ["x", "y"]] = np.random.default_rng(0).permutation(positions)
    moved = replace(train_set, spots=shifted)
    moved.coords = train_set.coords  # keep the coordinate input: only the neighbourhood may change
    assert not np.allclose(predict(model, moved, rows, ["identity"], device=CPU), base)
    model.train()
    spot = torch.from_numpy(spot_inputs(model, train_set, CPU)[:8])
    images = torch.randn(8, 3, model.preprocessing.input_size, model.preprocessing.input_size)
    model(images, spot).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.neighbour_proj.parameters())


def test_neighbourhood_uses_images_not_labels(train_set, neighbour_fit):
    _, result = neighbour_fit
    relabelled = train_set.spots.copy()
    relabelled[train_set.targets] = np.random.default_rng(0).permutation(relabelled[train_set.targets].to_numpy())
    np.testing.assert_array_equal(spot_inputs(result.model, replace(train_set, spots=relabelled), CPU),
                                  spot_inputs(result.model, train_set, CPU))


def test_cached_training_uses_the_same_neighbourhood_and_predicts_alike(train_set, tmp_path):
    params = fast_params("model.neighbour_radius=1.2", f"train.cache_dir={tmp_path}", "train.feature_cache=true")
    rows = np.arange(len(train_set.spots))
    result = fit(params, train_set, rows[::2], rows[1::2], show_progress=False)
    assert result.cache is not None and np.isfinite(result.val_scores).all()
    tta = ["identity", "hflip"]
    np.testing.assert_allclose(predict(result.model, train_set, rows[1::2], tta, cache=result.cache),
                               predict(result.model, train_set, rows[1::2], tta), rtol=2e-2, atol=2e-2)


def test_checkpoint_with_neighbours_predicts_the_same_on_unlabelled_slides(tiny_patches, train_set, neighbour_fit,
                                                                           tmp_path):
    params, result = neighbour_fit
    other = fit(params, train_set, np.arange(len(train_set.spots))[1::2], show_progress=False).model
    test_set = load_patch_set(tiny_patches / "patches", "test")
    for model in (result.model, Ensemble([result.model, other])):
        save_checkpoint(tmp_path / "m.pt", model, targets=train_set.targets, loss=params.loss,
                        patch_size=train_set.patch_size, infer=params.infer, stain={"method": "none"},
                    rank_scale=rank_scale(train_set.abundance).tolist())
        loaded, _ = load_checkpoint(tmp_path / "m.pt")
        rows = np.arange(len(test_set.spots))
        np.testing.assert_allclose(predict(loaded, test_set, rows, ["identity", "vflip"], device=CPU),
                                   predict(model, test_set, rows, ["identity", "vflip"], device=CPU),
                                   rtol=1e-5, atol=1e-6)


def test_ensemble_members_that_describe_spots_differently_each_read_their_own_neighbourhood(train_set,
                                                                                            neighbour_fit):
    params, result = neighbour_fit
    other = SpatialCellModel(params.model, n_outputs=len(train_set.targets))  # other random frozen blocks
    ensemble = Ensemble([result.model, other, result.model])
    assert ensemble.describers == [result.model, other]
    inputs = spot_inputs(ensemble, train_set, CPU)
    assert inputs.shape == (len(train_set.spots), 2 + 2 * result.model.descriptor_width)
    rows, tta = np.arange(len(train_set.spots)), ["identity", "hflip"]
    members = [predict(m, train_set, rows, tta, device=CPU) for m in (result.model, other, result.model)]
    assert not np.allclose(members[0], members[1])
    np.testing.assert_allclose(predict(ensemble, train_set, rows, tta, device=CPU), np.mean(members, axis=0),
                               rtol=1e-5, atol=1e-6)


def test_delivered_fold_models_with_own_backbones_and_neighbours_predict_from_their_checkpoint(
        tiny_patches, train_set, tmp_path):
    from src.engine.final_model import final_model

    params = fast_params("model.neighbour_radius=1.2", "pretrain.epochs=1", f"train.cache_dir={tmp_path}/cache",
                         "train.final=ensemble")
    model, _ = final_model(params, train_set, log=lambda _: None)
    assert isinstance(model, Ensemble) and len(model.describers) == len(model.members) == 2  # own backbones
    save_checkpoint(tmp_path / "m.pt", model, targets=train_set.targets, loss=params.loss,
                    patch_size=train_set.patch_size, infer=params.infer, stain={"method": "none"},
                    rank_scale=rank_scale(train_set.abundance).tolist())
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    test_set = load_patch_set(tiny_patches / "patches", "test")
    rows = np.arange(len(test_set.spots))
    got = predict(loaded, test_set, rows, ["identity", "vflip"], device=CPU)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, np.mean([predict(m, test_set, rows, ["identity", "vflip"], device=CPU)
                                             for m in model.members], axis=0), rtol=1e-5, atol=1e-6)


def test_checkpoint_from_before_neighbour_aggregation_loads(train_set, tmp_path):
    params = fast_params()
    model = fit(params, train_set, np.arange(len(train_set.spots))[::3], show_progress=False).model
    save_checkpoint(tmp_path / "m.pt", model, targets=train_set.targets, loss=params.loss,
                    patch_size=train_set.patch_size, infer=params.infer, stain={"method": "none"},
                    rank_scale=rank_scale(train_set.abundance).tolist())
    payload = format3(torch.load(tmp_path / "m.pt", weights_only=True))
    del payload["model_config"]["neighbour_radius"]
    torch.save(payload, tmp_path / "old.pt")
    loaded, _ = load_checkpoint(tmp_path / "old.pt")
    assert loaded.cfg.neighbour_radius == 0
    rows = np.arange(10)
    np.testing.assert_array_equal(predict(loaded, train_set, rows, ["identity"]), predict(model, train_set, rows, ["identity"]))


def test_a_neighbourhood_needs_frozen_blocks():
    model_cfg = replace(fast_params().model, neighbour_radius=1.2, unfrozen_blocks=5)  # resnet10t: all 5 blocks
    with pytest.raises(InputError, match="model.neighbour_radius = 1.2 .* trains all 5 .* resnet10t"):
        SpatialCellModel(model_cfg, n_outputs=35)
