"""The backbone's own training per CV fold: on the fold's training spots only, once, and carried by
the fold models it starts."""
import shutil

import numpy as np
import torch

from src.data.preprocessing.patch_set import load_patch_set
from src.engine.cross_validation import cross_validate
from src.engine.folds import make_folds
from src.engine.inference import predict
from src.engine.pretraining import fold_backbone
from src.model.network import SpatialCellModel
from tests.conftest import fast_params


def _params(tmp_path, *extra):
    return fast_params("pretrain.epochs=1", f"train.cache_dir={tmp_path}/cache", *extra)


def test_each_fold_trains_its_backbone_on_its_own_training_spots_once(tmp_path, tiny_patches):
    train_set = load_patch_set(tiny_patches / "patches", "train")
    params = _params(tmp_path)
    first = cross_validate(params, train_set, show_progress=False, keep_models=True)
    saved = sorted((tmp_path / "cache" / "backbones").glob("*.pt"))
    folds = make_folds(train_set.xy(), train_set.slides, params.cv, train_set.patch_size, train_set.pitches(),
                       train_set.um_per_px)
    assert len(saved) == len(folds) == 2
    # a fold's weights are found again from its training rows alone: they are keyed by (and trained on) them
    assert sorted(fold_backbone(params, train_set, f.train, log=lambda _: None) for f in folds) == saved
    again = cross_validate(params, train_set, show_progress=False)
    assert sorted((tmp_path / "cache" / "backbones").glob("*.pt")) == saved  # nothing trained twice
    np.testing.assert_allclose(again.oof, first.oof, rtol=1e-5, atol=1e-6)
    # the fold models start from their fold's backbone: the frozen stem holds its weights, not random ones
    for fold, model in zip(folds, first.models):
        weights = torch.load(fold_backbone(params, train_set, fold.train), weights_only=True)
        stem = model.blocks[0][0]
        assert torch.equal(model.backbone.state_dict()[stem], weights[stem])
        fresh = SpatialCellModel(params.model, n_outputs=len(train_set.targets))
        assert not torch.equal(fresh.backbone.state_dict()[stem], weights[stem])


def test_pretraining_changes_the_cv_and_the_models_need_no_cache_to_predict(tmp_path, tiny_patches):
    train_set = load_patch_set(tiny_patches / "patches", "train")
    off = cross_validate(fast_params(f"train.cache_dir={tmp_path}/cache"), train_set, show_progress=False)
    on = cross_validate(_params(tmp_path), train_set, show_progress=False, keep_models=True)
    assert not np.allclose(on.oof, off.oof)
    rows = np.arange(len(train_set.spots))
    before = predict(on.models[0], train_set, rows, ["identity"])
    shutil.rmtree(tmp_path / "cache")
    np.testing.assert_array_equal(predict(on.models[0], train_set, rows, ["identity"]), before)


def test_what_a_trial_searches_does_not_reach_the_backbone_training(tmp_path, tiny_patches):
    from src.engine.pretraining import _key

    train_set = load_patch_set(tiny_patches / "patches", "train")
    rows = np.arange(len(train_set.spots))
    base = _key(_params(tmp_path), train_set, rows)
    searched = ("train.weight_decay=0.01", "train.lr_head=0.01", "train.lr_backbone=0.0003", "train.epochs=4",
                "loss.alpha=0.2", "loss.regularization=0.5", "loss.target_transform=rank", "model.fusion=film",
                "model.dropout=0.4", "model.context=0.5", "model.unfrozen_blocks=0", "model.neighbour_radius=1.2",
                "model.coord_dim=8", "infer.smoothing_sigma=1.0")
    assert _key(_params(tmp_path, *searched), train_set, rows) == base
    for changed in ("pretrain.epochs=2", "pretrain.lr=0.01", "model.input_size=48", "model.backbone=resnet18"):
        assert _key(_params(tmp_path, changed), train_set, rows) != base, changed
    assert _key(_params(tmp_path), train_set, rows[1:]) != base
