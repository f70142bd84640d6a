"""Encoder presets without downloads: tiny random models built with each ViT preset's arguments
(LayerScale, register tokens, SwiGLU, CLS + mean pooling), saved as the hub lays them out and loaded
through the presets; their splits, caches, checkpoints and a tune -> train -> predict run."""
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from src.core.errors import InputError
from src.model.backbone import backbone_block_count, check_weights
from src.model.encoders import PRESETS, layer_args
from src.model.network import Ensemble, SpatialCellModel
from tests.conftest import FAST, ROOT, fast_params, study_named

VIT_PRESETS = [name for name, preset in PRESETS.items() if preset.foundation]
SHRINK = {"embed_dim": 32, "depth": 3, "num_heads": 2}  # the preset's shape, made tiny
PREFIX_TOKENS = {"uni": 1, "uni2-h": 9, "h-optimus-0": 5, "h-optimus-1": 5, "virchow2": 5, "prov-gigapath": 1}


def tiny_folder(folder: Path, preset: str, seed: int = 0, **changes) -> Path:
    """A hub-style weights folder (config.json + model.safetensors) of ``preset`` made tiny: the
    preset's own arguments, a smaller width and depth."""
    encoder = PRESETS[preset]
    args = {**encoder.args, **SHRINK, **changes}
    torch.manual_seed(seed)
    model = timm.create_model(encoder.architecture, pretrained=False, num_classes=0, **layer_args(args))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architecture": encoder.architecture, "model_args": args}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def _cfg(backbone: str, weights: Path | str = "", **changes):
    return replace(fast_params().model, backbone=backbone, weights=str(weights), **changes)


def test_the_registry_names_the_field_encoders():
    for name in ("uni", "uni2-h", "h-optimus-0", "h-optimus-1", "virchow2", "prov-gigapath", "convnext_small",
                 "resnet10t"):
        assert name in PRESETS
    assert PRESETS["h-optimus-0"].mean == pytest.approx((0.707223, 0.578729, 0.703617))
    assert PRESETS["virchow2"].pooling == "cls_mean"
    assert all(PRESETS[n].input_size == 224 and PRESETS[n].um_per_px == 0.5 for n in VIT_PRESETS)
    # built at full size on the meta device: the block counts and widths of the published models
    assert backbone_block_count("uni") == 25 and backbone_block_count("h-optimus-0") == 41
    assert backbone_block_count("virchow2") == 33 and backbone_block_count("uni2-h") == 25


@pytest.mark.parametrize("preset", VIT_PRESETS)
def test_each_vit_preset_loads_its_tiny_twin_strictly_and_embeds_as_its_card_says(preset, tmp_path):
    folder = tiny_folder(tmp_path / preset, preset)
    model = SpatialCellModel(_cfg(preset, folder), n_outputs=35).eval()
    backbone = model.backbone
    saved = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in saved.items())  # the file's weights
    assert model.preprocessing.input_size == 224 and model.preprocessing.mean == PRESETS[preset].mean
    assert model.preprocessing.interpolation == PRESETS[preset].interpolation
    names = set(backbone.state_dict())
    assert "blocks.0.ls1.gamma" in names  # LayerScale (init_values) is what the weights hold
    assert backbone.num_prefix_tokens == PREFIX_TOKENS[preset]  # CLS and register tokens
    if preset in ("uni2-h", "virchow2", "h-optimus-0", "h-optimus-1", "prov-gigapath"):  # SwiGLU, packed
        mlp = backbone.blocks[0].mlp
        assert type(mlp).__name__ == "GluMlp" and isinstance(mlp.act, torch.nn.SiLU)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = model.forward_features(images)
        tokens = backbone.forward_features(images)
    if PRESETS[preset].pooling == "cls_mean":  # Virchow2: CLS + mean of the patch tokens after the registers
        expected = torch.cat([tokens[:, 0], tokens[:, backbone.num_prefix_tokens:].mean(1)], dim=1)
        assert features.shape == (2, 64)
    else:
        expected = tokens[:, 0]
        assert features.shape == (2, 32)
    assert torch.allclose(features, expected, atol=1e-6)
    assert model(images, torch.rand(2, 2)).shape == (2, 35)


def test_weights_without_the_presets_arguments_fail_the_strict_load_in_one_line(tmp_path):
    """UNI's weights hold LayerScale: a ViT-L built without init_values has nowhere to put them, and one
    built with them refuses a file that lacks them."""
    from src.model.backbone import load_weights

    plain = timm.create_model("vit_large_patch16_224", num_classes=0, **SHRINK)  # no init_values
    save_file(plain.state_dict(), str(tmp_path / "no_layerscale.safetensors"))
    preset = timm.create_model("vit_large_patch16_224", num_classes=0, **layer_args({**PRESETS["uni"].args, **SHRINK}))
    with pytest.raises(InputError, match=r"do not fit uni: keys \d+ missing \(first: blocks\.0\.ls1\.gamma"):
        load_weights(preset, tmp_path / "no_layerscale.safetensors", "uni")
    save_file(preset.state_dict(), str(tmp_path / "uni.safetensors"))
    with pytest.raises(InputError, match=r"do not fit vit_large_patch16_224: keys \d+ unexpected \(first: blocks\.0\.ls1"):
        load_weights(plain, tmp_path / "uni.safetensors", "vit_large_patch16_224")


def test_a_pathology_encoder_without_weights_is_one_line():
    with pytest.raises(InputError, match="'uni' is a pathology encoder: it needs its weights"):
        check_weights(_cfg("uni"))


def test_a_folder_of_several_encoders_weights_gives_each_its_own(tmp_path):
    tiny_folder(tmp_path / "weights" / "uni", "uni")
    tiny_folder(tmp_path / "weights" / "virchow2", "virchow2")
    uni = SpatialCellModel(_cfg("uni", tmp_path / "weights"), n_outputs=35)
    virchow = SpatialCellModel(_cfg("virchow2", tmp_path / "weights"), n_outputs=35)
    assert uni.cfg.weights.endswith("uni") and virchow.cfg.weights.endswith("virchow2")
    cnn = SpatialCellModel(_cfg("resnet10t", tmp_path / "weights"), n_outputs=35)  # none for it: random init
    assert cnn.cfg.weights == ""


def test_a_fixed_size_vit_is_fed_its_own_size_and_caches_pooled_embeddings_when_frozen(tiny_patches, tmp_path):
    from src.data.preprocessing.patch_set import load_patch_set
    from src.model.feature_cache import FeatureCaches

    patch_set = load_patch_set(tiny_patches / "patches", "train")
    model = SpatialCellModel(_cfg("vit_tiny_patch16_224", unfrozen_blocks=0, input_size=32), n_outputs=35).eval()
    assert model.preprocessing.input_size == 224  # built for 224 px: model.input_size does not apply
    caches = FeatureCaches(tmp_path / "cache", torch.device("cpu"), log=lambda _: None)
    pooled = caches.for_model(model, patch_set, 0, ("identity", "hflip"))
    assert pooled.array.shape == (2, len(patch_set.images), 192)  # one embedding a patch and variant
    trains_two = SpatialCellModel(_cfg("vit_tiny_patch16_224", unfrozen_blocks=2), n_outputs=35).eval()
    trains_two.load_state_dict(model.state_dict())
    tokens = caches.for_model(trains_two, patch_set, 2, ("identity", "hflip"))
    assert tokens.array.shape == (2, len(patch_set.images), 197, 192)  # the blocks a trial may train read tokens
    split = model.split_at(tokens.cut)
    rows = np.arange(4)
    with torch.no_grad():
        from_tokens = split.rest(torch.from_numpy(np.array(tokens.array[0, rows])))
    assert torch.allclose(from_tokens, torch.from_numpy(np.array(pooled.array[0, rows])), atol=1e-4)


def test_a_cache_larger_than_the_disk_is_one_line_before_it_is_built(tiny_patches, tmp_path, monkeypatch):
    import shutil

    from src.data.preprocessing.patch_set import load_patch_set
    from src.model import feature_cache

    patch_set = load_patch_set(tiny_patches / "patches", "train")
    model = SpatialCellModel(_cfg("vit_tiny_patch16_224"), n_outputs=35).eval()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda _: usage._replace(free=1_000_000))
    with pytest.raises(InputError, match=r"train.cache_dir: the vit_tiny_patch16_224 feature cache \(8 variants x "
                                         r"\d+ patches x \(197, 192\), activations after block 1 of 13\) takes"):
        feature_cache.build_or_load(model, patch_set, 1, tmp_path / "cache", log=lambda _: None)
    assert not any((tmp_path / "cache").glob("*/features.npy"))


def test_ensemble_members_on_one_frozen_encoder_share_it_in_memory_and_in_the_checkpoint(tmp_path):
    from src.model.checkpoint import load_checkpoint, save_recipes
    from src.model.targets import rank_scale

    folder = tiny_folder(tmp_path / "uni", "uni", depth=6)
    cfg = _cfg("uni", folder, unfrozen_blocks=0)
    members = [SpatialCellModel(cfg, n_outputs=35) for _ in range(4)]
    assert all(m.backbone is members[0].backbone for m in members)  # one copy while training, too
    params = fast_params()
    common = {"targets": [f"C{i}" for i in range(1, 36)], "patch_size": 32, "stain": {"method": "none"},
              "rank_scale": rank_scale(np.random.default_rng(0).random((50, 35))).tolist()}
    save_recipes(tmp_path / "one.pt", [(members[0], params.loss, params.infer, 1.0)], **common)
    save_recipes(tmp_path / "two.pt", [(Ensemble(members), params.loss, params.infer, 0.5),
                                       (Ensemble(members[:2]), params.loss, params.infer, 0.5)], **common)
    one, two = (tmp_path / "one.pt").stat().st_size, (tmp_path / "two.pt").stat().st_size
    backbone_bytes = sum(t.numel() * t.element_size() for t in members[0].backbone.state_dict().values())
    assert two - one < 0.5 * backbone_bytes  # six members, the backbone written once
    model, meta = load_checkpoint(tmp_path / "two.pt")
    loaded = [m for recipe in model.models for m in recipe.members]
    assert len(loaded) == 6 and all(m.backbone is loaded[0].backbone for m in loaded)
    assert meta["format"] == 7 and model.settings[0]["encoder"]["name"] == "uni"
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded[0].forward_features(images), members[0].eval().forward_features(images), atol=1e-6)


def test_pretrained_encoders_are_not_pretrained_again_by_default(tmp_path):
    from src.engine.pretraining import pretrains

    folder = tiny_folder(tmp_path / "uni", "uni")
    params = fast_params("pretrain.epochs=8")
    assert pretrains(params)  # random resnet10t: trained per fold
    with_weights = replace(params, model=replace(params.model, backbone="uni", weights=str(folder)))
    assert not pretrains(with_weights)
    assert pretrains(replace(with_weights, pretrain=replace(params.pretrain, from_weights=True)))


@pytest.mark.slow
def test_tune_train_predict_with_a_tiny_uni_from_a_local_folder(tiny_dataset, tiny_patches, tmp_path):
    """The user's path with a pathology encoder: a study that searches the backbone between the
    fold-trained resnet10t and a (tiny) UNI from a local folder of weights, then train and predict with
    what it delivers; a backbone's failure in a trial is one line, and the study goes on."""
    tiny_folder(tmp_path / "weights" / "uni", "uni")
    sets = [*FAST, "train.feature_cache=true", "model.unfrozen_blocks=0", "model.backbone=uni",
            f"model.weights={tmp_path / 'weights'}", "tune.space.model.backbone={choices: [uni, resnet10t]}",
            f"train.cache_dir={tmp_path / 'cache'}", "tune.pruner=none", "tune.warm_start=0", "train.epochs=6",
            "tune.space.train.epochs={low: 6, high: 8}",
            "tune.space.model.unfrozen_blocks={low: 0, high: 0}",  # frozen encoders: pooled embeddings only
            "cv.scheme=blocks"]  # within-slide blocks: two tiny slides leave too little to learn from one
    overrides = [a for item in sets for a in ("--set", item)]
    tune = subprocess.run([sys.executable, "-m", "src.tune", "--trials", "4", "--study", "encoders",
                           "--storage", f"sqlite:///{tmp_path}/db.sqlite", "--patches", str(tiny_patches / "patches"),
                           "--params", str(ROOT / "params.yaml"), "--best-out", str(tmp_path / "best.yaml"),
                           "--metrics", str(tmp_path / "tune.json"), "--cv-per-type", str(tmp_path / "cv.csv"),
                           "--history", str(tmp_path / "history.csv"), "--artifacts", str(tmp_path / "artifacts"),
                           "--ensemble-out", str(tmp_path / "ensemble.yaml"), *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert tune.returncode == 0, tune.stderr[-3000:]
    assert "Traceback" not in tune.stderr + tune.stdout
    assert "note: uni was trained at 0.5 um/px; it sees 0.30 um/px here" in tune.stdout  # 32 px of 2.115 um/px
    study = study_named(f"sqlite:///{tmp_path}/db.sqlite", "encoders")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    drawn = {t.params["model.backbone"] for t in complete}
    assert "uni" in drawn and all(t.value > t.user_attrs["floor_spearman"] + 0.03 for t in complete)  # 0.46 floor
    caches = {json.loads(m.read_text())["key"]["backbone"] for m in (tmp_path / "cache").glob("*/meta.json")}
    assert "uni" in caches  # each backbone its own cache
    uni_cache = [m for m in (tmp_path / "cache").glob("*/meta.json") if json.loads(m.read_text())["key"]["backbone"] == "uni"]
    assert all(np.load(m.parent / "features.npy", mmap_mode="r").ndim == 3 for m in uni_cache)  # pooled, not tokens
    model = tmp_path / "model.pt"
    train = subprocess.run([sys.executable, "-m", "src.train", "--patches", str(tiny_patches / "patches"),
                            "--stain", str(tiny_patches / "normalized" / "stain.json"), "--out", str(model),
                            "--ensemble", str(tmp_path / "ensemble.yaml"), "--params", str(ROOT / "params.yaml"),
                            *overrides], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    predict = subprocess.run([sys.executable, "-m", "src.predict", "--model", str(model), "--h5", str(tiny_dataset[0]),
                              "--out", str(tmp_path / "submission.csv")], cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert predict.returncode == 0, predict.stderr[-3000:]
    from src.model.checkpoint import load_checkpoint
    from src.model.network import RecipeEnsemble

    delivered, meta = load_checkpoint(model)
    settings = delivered.settings if isinstance(delivered, RecipeEnsemble) else [meta]
    assert {s["encoder"]["name"] for s in settings} <= {"uni", "resnet10t"}
    submission = pd.read_csv(tmp_path / "submission.csv")
    assert len(submission) > 0 and np.isfinite(submission.select_dtypes("number").to_numpy()).all()


def test_a_backbone_that_fails_in_its_trials_is_one_line_and_the_study_goes_on(tiny_patches, tmp_path, monkeypatch,
                                                                               capfd):
    """A searched encoder whose cache cannot be built (no room on the disk) fails its own trials with one
    line each; the other encoder's trials complete, and no traceback is printed."""
    from src.core.config import apply_overrides, read_raw
    from src.data.preprocessing.patch_set import load_patch_set
    from src.model import feature_cache
    from src.search.study import run_study

    tiny_folder(tmp_path / "weights" / "uni", "uni")
    raw = apply_overrides(read_raw(ROOT / "params.yaml"), [
        *FAST, "train.feature_cache=true", "model.unfrozen_blocks=0", f"model.weights={tmp_path / 'weights'}",
        "tune.space.model.backbone={choices: [resnet10t, uni]}", "tune.space.model.unfrozen_blocks={low: 0, high: 0}",
        f"train.cache_dir={tmp_path / 'cache'}", "tune.pruner=none", "tune.warm_start=0"])
    room = feature_cache.check_room

    def no_room_for_uni(root, shape, storage, backbone, *args, **kwargs):
        if backbone == "uni":
            return room(root, (shape[0], 10**12, *shape[2:]), storage, backbone, *args, **kwargs)
        return room(root, shape, storage, backbone, *args, **kwargs)

    monkeypatch.setattr(feature_cache, "check_room", no_room_for_uni)
    study = run_study(raw, load_patch_set(tiny_patches / "patches", "train"), 4, "t", f"sqlite:///{tmp_path}/s.db",
                      artifact_dir=tmp_path / "artifacts", live=False, log=lambda _: None)
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert failed and all(t.params["model.backbone"] == "uni" for t in failed)
    assert all("InputError: train.cache_dir: the uni feature cache" in t.user_attrs["fail_reason"] for t in failed)
    assert len(complete) == 4 and all(t.params["model.backbone"] == "resnet10t" for t in complete)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


def test_the_model_store_keeps_a_frozen_encoders_fold_models_without_its_weights(tiny_patches, tmp_path):
    """A trial's fold models on a frozen encoder are stored as their heads and a reference to the weights
    file (path, size, time); read back they share one encoder and predict as before; a replaced file
    makes the entry unusable (trained again), never silently mixed."""
    import os

    from src.data.preprocessing.patch_set import load_patch_set
    from src.engine.cross_validation import cross_validate
    from src.engine.model_store import load_models, save_models

    folder = tiny_folder(tmp_path / "uni", "uni")
    params = fast_params("train.feature_cache=true", "model.unfrozen_blocks=0", "model.backbone=uni",
                         f"model.weights={folder}", f"train.cache_dir={tmp_path / 'cache'}")
    patch_set = load_patch_set(tiny_patches / "patches", "train")
    result = cross_validate(params, patch_set, keep_models=True, show_progress=False)
    path = save_models(params, patch_set, result.models, result.epochs_run)
    stored = torch.load(path, weights_only=True)["models"]
    assert not any(k.startswith("backbone.") for entry in stored for k in entry["state"])
    loaded, epochs = load_models(params, patch_set)
    assert epochs == result.epochs_run and all(m.backbone is loaded[0].backbone for m in loaded)
    images, spot = torch.randn(3, 3, 224, 224), torch.rand(3, 2)
    with torch.no_grad():
        for old, new in zip(result.models, loaded):
            assert torch.allclose(old.eval()(images, spot), new(images, spot), atol=1e-5)
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert load_models(params, patch_set) is None


def test_a_model_starts_the_same_whether_its_frozen_backbone_is_built_or_shared(tmp_path):
    """The head's initial weights do not depend on whether the backbone was read from its file in this
    process before (shared) or not: a study's trial and stage train's rerun of it build the same model."""
    from src.model import backbone as backbone_module

    folder = tiny_folder(tmp_path / "uni", "uni")
    cfg = _cfg("uni", folder, unfrozen_blocks=0)
    heads = []
    for clear in (True, False):  # built from the file, then taken from the shared copies
        if clear:
            backbone_module._FROZEN.clear()
        torch.manual_seed(48)
        heads.append(SpatialCellModel(cfg, n_outputs=35).head.state_dict())
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_a_long_cache_build_is_announced_with_its_expected_time(tiny_patches, tmp_path, monkeypatch):
    from src.data.preprocessing.patch_set import load_patch_set
    from src.model import feature_cache

    patch_set = load_patch_set(tiny_patches / "patches", "train")
    model = SpatialCellModel(_cfg("vit_tiny_patch16_224"), n_outputs=35).eval()
    messages = []
    monkeypatch.setattr(feature_cache, "LONG_BUILD_S", 0.0)  # every build counts as long
    feature_cache.build_or_load(model, patch_set, len(model.blocks), tmp_path / "cache", variants=("identity", "hflip"),
                                batch_size=16, log=messages.append)
    assert any(re.fullmatch(r"building the vit_tiny_patch16_224 feature cache \(2 variants x \d+ patches\): about "
                            r"\d+ min at this device's pace", m) for m in messages), messages
