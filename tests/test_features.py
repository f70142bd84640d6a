"""Frozen-prefix feature cache: same features as the uncached path, keyed, and self-checking."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from src.core.errors import InputError
from src.data.preprocessing.patch_set import load_patch_set
from src.engine.fit import fit
from src.engine.inference import predict
from src.engine.metrics import competition_score
from src.model import feature_cache
from src.model.feature_cache import FeatureCaches, build_or_load, cached_batch, model_cut, needed_variants
from src.model.network import SpatialCellModel
from src.model.transforms import DIHEDRAL, build_transform, dihedral
from tests.conftest import fast_params

EXACT_TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 on a CPU: the cached activations are the computed ones


@pytest.fixture(scope="module")
def train_set(tiny_patches):
    return load_patch_set(tiny_patches / "patches", "train")


def _model(**changes):
    torch.manual_seed(0)
    return SpatialCellModel(replace(fast_params().model, **changes), n_outputs=35).eval()


@pytest.mark.parametrize("backbone, unfrozen, variants", [
    ("resnet10t", 1, DIHEDRAL),
    ("convnext_atto", 2, DIHEDRAL),
    ("vit_tiny_patch16_224", 2, ("identity", "rot90")),
])
def test_cached_features_equal_the_uncached_forward_for_each_variant(train_set, tmp_path, backbone, unfrozen, variants):
    model = _model(backbone=backbone, unfrozen_blocks=unfrozen, input_size=0 if "vit" in backbone else 32)
    rows = np.arange(12)
    small = replace(train_set, images=np.ascontiguousarray(train_set.images[:12]), spots=train_set.spots.iloc[:12])
    cache = build_or_load(model, small, len(model.blocks) - unfrozen, tmp_path, variants=variants, log=lambda _: None)
    rest = model.split_at(cache.cut).rest
    transform = build_transform(model.preprocessing, small.patch_size, train=None)
    images = transform(torch.from_numpy(np.array(small.images)).permute(0, 3, 1, 2))
    with torch.no_grad():
        for v, name in enumerate(variants):
            expected = model.forward_features(dihedral(images, name))
            cached = torch.from_numpy(np.array(cache.array[v, rows])).float()
            got = rest(cached)
            np.testing.assert_allclose(got.numpy(), expected.numpy(), **EXACT_TOL)


def test_cached_and_uncached_predictions_give_the_same_score(train_set, tmp_path):
    """CV scores the cached path, evaluation the uncached one: they must measure the same model."""
    params = fast_params(f"train.cache_dir={tmp_path}", "train.feature_cache=true", "train.color_jitter=0.0")
    rows = np.arange(len(train_set.spots))
    result = fit(params, train_set, rows[::2], rows[1::2], show_progress=False)
    assert result.cache is not None and np.isfinite(result.val_scores).all()
    tta = ["identity", "hflip", "rot90"]
    cached = predict(result.model, train_set, rows[1::2], tta, cache=result.cache)
    plain = predict(result.model, train_set, rows[1::2], tta)
    np.testing.assert_allclose(cached, plain, rtol=1e-4, atol=1e-5)
    truth = train_set.abundance[rows[1::2]]
    assert round(competition_score(cached, truth), 6) == round(competition_score(plain, truth), 6)
    assert result.cache.array.dtype == np.float32  # a CPU computes in fp32, so the cache stores fp32


def test_cache_holds_only_the_variants_a_study_reads(train_set, tmp_path):
    params = fast_params(f"train.cache_dir={tmp_path}", "train.feature_cache=true", "train.flips=false",
                         "infer.tta=[identity, vflip]")
    result = fit(params, train_set, np.arange(len(train_set.spots)), show_progress=False)
    assert result.cache.variants == ("identity", "vflip")
    assert needed_variants(True, ["identity"]) == DIHEDRAL


def test_cached_mode_refuses_input_augmentations_when_params_are_read(tmp_path):
    with pytest.raises(InputError, match="train.feature_cache fixes the backbone input"):
        fast_params(f"train.cache_dir={tmp_path}", "train.feature_cache=true", "train.color_jitter=0.2")


def _folder(model, patch_set, cut, root, **kw):
    return build_or_load(model, patch_set, cut, root, variants=("identity", "hflip"), log=lambda _: None, **kw).folder


def test_cache_key_changes_with_every_part(train_set, tmp_path):
    small = replace(train_set, images=np.ascontiguousarray(train_set.images[:8]), spots=train_set.spots.iloc[:8])
    base = _folder(_model(), small, 3, tmp_path)
    assert _folder(_model(), small, 3, tmp_path) == base  # same key: reused
    torch.manual_seed(1)
    other_weights = SpatialCellModel(fast_params().model, 35).eval()
    changed = {
        "weights": _folder(other_weights, small, 3, tmp_path),
        "backbone": _folder(_model(backbone="resnet14t"), small, 3, tmp_path),
        "input size": _folder(_model(input_size=48), small, 3, tmp_path),
        "cut": _folder(_model(), small, 2, tmp_path),
        "patches": _folder(_model(), replace(small, images=small.images[::-1].copy()), 3, tmp_path),
    }
    changed["variants"] = build_or_load(_model(), small, 3, tmp_path, variants=("identity",), log=lambda _: None).folder
    assert all(folder != base for folder in changed.values()), changed
    assert len(set(changed.values())) == len(changed)


@pytest.mark.parametrize("damage", ["flip bytes", "flip bytes, sampled checksum", "truncate", "drop meta"])
def test_corrupt_or_partial_cache_is_detected_and_rebuilt(train_set, tmp_path, damage, monkeypatch):
    if "sampled" in damage:  # a file larger than the sample: the checksum reads evenly spaced blocks
        monkeypatch.setattr(feature_cache, "CHECKSUM_SAMPLE", (4, 512))
    small = replace(train_set, images=np.ascontiguousarray(train_set.images[:8]), spots=train_set.spots.iloc[:8])
    model = _model()
    folder = _folder(model, small, 3, tmp_path)
    good = np.load(folder / "features.npy").copy()
    path = folder / "features.npy"
    if "sampled" in damage:
        assert path.stat().st_size > 4 * 512 and '"checksum_sample": [\n    4,' in (folder / "meta.json").read_text()
    if damage.startswith("flip bytes"):
        data = bytearray(path.read_bytes())
        data[-10:] = bytes(10)
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        (folder / "meta.json").unlink()
    messages = []
    cache = build_or_load(model, small, 3, tmp_path, variants=("identity", "hflip"), log=messages.append)
    assert any("rebuilding" in m for m in messages)
    np.testing.assert_array_equal(np.asarray(cache.array), good)


def test_in_process_reuse_across_models_with_other_unfrozen_counts(train_set, tmp_path):
    small = replace(train_set, images=np.ascontiguousarray(train_set.images[:8]), spots=train_set.spots.iloc[:8])
    messages = []
    caches = FeatureCaches(tmp_path, torch.device("cpu"), log=messages.append)
    a = caches.for_model(_model(unfrozen_blocks=3), small, 3)
    model = _model(unfrozen_blocks=3)
    b = caches.for_model(model, small, 3)
    assert a is b and len(messages) == 1
    model.train()  # the second model's own rest runs on the first one's cache (stem activations included)
    features = model.split_at(b.cut).rest(torch.from_numpy(np.array(b.array[0, :4])).float())
    assert torch.isfinite(model.forward_head(features, torch.rand(4, 2))).all()
    other = FeatureCaches(tmp_path, torch.device("cpu"), log=messages.append).for_model(model, small, 3)
    assert other is not a and len(messages) == 1  # another holder loads it from disk, nothing is rebuilt


def test_feature_caches_hold_a_bounded_number_and_drop_the_oldest(train_set, tmp_path):
    small = replace(train_set, images=np.ascontiguousarray(train_set.images[:8]), spots=train_set.spots.iloc[:8])
    caches = FeatureCaches(tmp_path, torch.device("cpu"), capacity=2, log=lambda _: None)
    held = [caches.for_model(_model(input_size=size, unfrozen_blocks=3), small, 3) for size in (32, 40, 48)]
    assert caches.for_model(_model(input_size=48, unfrozen_blocks=3), small, 3) is held[2]
    assert caches.for_model(_model(input_size=40, unfrozen_blocks=3), small, 3) is held[1]
    assert caches.for_model(_model(input_size=32, unfrozen_blocks=3), small, 3) is not held[0]  # dropped, loaded again


@pytest.mark.parametrize("backbone, unfrozen", [
    ("resnet10t", 1), ("resnet10t", 0), ("convnext_atto", 1), ("convnext_atto", 0), ("vit_tiny_patch16_224", 0),
])
def test_a_model_training_fewer_blocks_reads_a_deeper_cache_derived_from_the_shared_one(
        train_set, tmp_path, backbone, unfrozen):
    """Its steps run none of its frozen blocks; the derived features are those of the images. A model
    that trains no block reads pooled embeddings built from the images: the shared cut (a ViT's tokens)
    is not built for it."""
    size = 0 if "vit" in backbone else 32
    small = replace(train_set, images=np.ascontiguousarray(train_set.images[:12]), spots=train_set.spots.iloc[:12])
    messages = []
    caches = FeatureCaches(tmp_path / "derived", torch.device("cpu"), log=messages.append)
    model = _model(backbone=backbone, unfrozen_blocks=unfrozen, input_size=size)
    cache = caches.for_model(model, small, 2, variants=("identity", "rot90"))
    assert cache.cut == model_cut(model) == len(model.blocks) - unfrozen
    # the shared cut, then this model's derived from it; head-only: the pooled embeddings alone
    assert [m.split()[0] for m in messages] == (["built"] if unfrozen == 0 else ["built", "built"])
    assert (cache.array.ndim == 3) == (unfrozen == 0)
    direct = build_or_load(model, small, cache.cut, tmp_path / "direct", variants=("identity", "rot90"),
                           log=lambda _: None)
    np.testing.assert_allclose(np.asarray(cache.array), np.asarray(direct.array), **EXACT_TOL)
    images = build_transform(model.preprocessing, small.patch_size, train=None)(
        torch.from_numpy(np.array(small.images)).permute(0, 3, 1, 2))
    with torch.no_grad():
        expected = model.forward_features(dihedral(images, "rot90"))
        got = model.split_at(cache.cut).rest(torch.from_numpy(np.array(cache.array[1])).float())
    np.testing.assert_allclose(got.numpy(), expected.numpy(), **EXACT_TOL)
    again = caches.for_model(_model(backbone=backbone, unfrozen_blocks=unfrozen, input_size=size), small, 2,
                             variants=("identity", "rot90"))
    assert again is cache and len(messages) == (1 if unfrozen == 0 else 2)  # reused in this process, not rebuilt


@pytest.mark.parametrize("backbone", ["convnext_atto", "resnet10t"])
def test_cached_batches_keep_the_memory_layout_the_backbone_produced(train_set, tmp_path, backbone):
    """Stored NCHW, read back as the cut produced it (NHWC for ConvNeXt on a CPU): the blocks after the
    cut then run the same kernels as in the uncached forward."""
    small = replace(train_set, images=np.ascontiguousarray(train_set.images[:8]), spots=train_set.spots.iloc[:8])
    model = _model(backbone=backbone, unfrozen_blocks=1)
    cache = FeatureCaches(tmp_path, torch.device("cpu"), log=lambda _: None).for_model(model, small, 1, ("identity",))
    images = build_transform(model.preprocessing, small.patch_size, train=None)(
        torch.from_numpy(np.array(small.images)).permute(0, 3, 1, 2))
    with torch.no_grad():
        produced = model.split_at(cache.cut).prefix(images)
    read = cached_batch(cache, np.zeros(8, np.int64), np.arange(8), torch.device("cpu"))
    assert read.stride() == produced.stride()
    torch.testing.assert_close(read, produced)


def test_a_frozen_backbone_trains_its_head_on_the_cached_last_block(train_set, tmp_path):
    """unfrozen_blocks 0: the cache holds the last block's output; the model CV scores is the one evaluated."""
    params = fast_params(f"train.cache_dir={tmp_path}", "train.color_jitter=0.0", "model.unfrozen_blocks=0",
                         "train.feature_cache=true")
    rows = np.arange(len(train_set.spots))
    result = fit(params, train_set, rows[::2], rows[1::2], show_progress=False)
    cache = result.cache
    assert cache.cut == len(result.model.blocks) and cache.array.shape[2] == result.model.backbone.num_features
    tta = ["identity", "hflip"]
    cached = predict(result.model, train_set, rows[1::2], tta, cache=result.cache)
    plain = predict(result.model, train_set, rows[1::2], tta)
    truth = train_set.abundance[rows[1::2]]
    assert round(competition_score(cached, truth), 6) == round(competition_score(plain, truth), 6)


@pytest.mark.slow
@pytest.mark.parametrize("cached", [False, True])
def test_compiled_training_matches_the_eager_path(train_set, tmp_path, cached):
    options = [f"train.cache_dir={tmp_path}", f"train.feature_cache={str(cached).lower()}",
               "train.color_jitter=0.0", "train.flips=false"]
    rows = np.arange(len(train_set.spots))
    eager = fit(fast_params(*options), train_set, rows, show_progress=False)
    compiled = fit(fast_params(*options, "train.compile=true"), train_set, rows, show_progress=False)
    np.testing.assert_allclose(compiled.train_loss, eager.train_loss, rtol=1e-2)  # fused kernels round differently
    # Each fold and trial builds a fresh model; its compiled graphs must be reused, not rebuilt.
    graphs = counters["stats"]["unique_graphs"]
    for fold in range(2):
        fit(fast_params(*options, "train.compile=true"), train_set, rows[fold::2], show_progress=False)
    assert counters["stats"]["unique_graphs"] == graphs


def _build_in_worker(patches_dir, root, barrier, results):
    """One of several processes building the same cache at the same moment."""
    torch.set_num_threads(1)
    patch_set = load_patch_set(patches_dir, "train")
    model = _model()
    messages = []
    barrier.wait(timeout=120)
    cache = build_or_load(model, patch_set, 3, root, log=messages.append)
    results.put((messages, str(cache.folder), np.asarray(cache.array).tobytes()))


def test_workers_sharing_a_cache_folder_build_it_once(tiny_patches, tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    workers = [ctx.Process(target=_build_in_worker, args=(tiny_patches / "patches", tmp_path, barrier, results))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    builds = [m for messages, _, _ in outcomes for m in messages if m.startswith("built feature cache")]
    assert len(builds) == 1, [messages for messages, _, _ in outcomes]
    assert len({folder for _, folder, _ in outcomes}) == 1
    assert len({data for _, _, data in outcomes}) == 1  # every worker reads the same, complete features
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [outcomes[0][1].split("/")[-1]]
