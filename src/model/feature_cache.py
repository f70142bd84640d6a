"""Frozen-prefix feature cache: compute the frozen start of the backbone once per patch and
dihedral variant, reuse it across epochs, folds and trials.

The backbone is cut at a block boundary (``SpatialCellModel.split_at``: a prefix and the rest, real
modules sharing the backbone's weights). The cache holds the prefix's output for every patch and
variant, memory-mapped, computed on the training device with its precision (``src.core.devices.autocast``:
fp32 on a CPU, bf16 autocast on CUDA) and stored in the dtype that produced, so the cached path (CV)
and the uncached one (evaluation, prediction) run the same numbers. Training then runs only the rest
(its frozen blocks without gradient) and the head.

Cache key: backbone name, prefix weights, patches, input size and normalization, cut, variants and
dtype. Only the variants a study reads are built: all 8 dihedral ones with ``train.flips``, else the
test-time ones. A file whose size or (sampled) checksum does not match its metadata is rebuilt, never
used. Processes that share a cache folder (the workers of one study) build each cache once, under a
file lock. Within a process, :class:`FeatureCaches` (held by its caller: a CV run, a study's objective)
keeps the caches it opened for the next fold or trial, a bounded number of them.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from filelock import FileLock

from src.core.devices import autocast
from src.core.errors import InputError
from src.core.files import atomic_path
from src.data.preprocessing.patch_set import PatchSet
from src.model.network import SpatialCellModel, Split
from src.model.transforms import DIHEDRAL, build_transform, dihedral

# Activation dtype -> how the array stores it (numpy has no bfloat16: its bits are kept as int16).
STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}


def deepest_cut(model: SpatialCellModel, max_unfrozen: int) -> int:
    """Cache as many blocks as no trial of the study will train (at least the stem)."""
    return max(1, len(model.blocks) - max_unfrozen)


def model_cut(model: SpatialCellModel) -> int:
    """Every block this model keeps frozen: the deepest cut its training can read."""
    return deepest_cut(model, model.cfg.unfrozen_blocks)


# The checksum reads this many evenly spaced blocks of the file, the first and the last among them (64 MiB,
# whatever the cache's size: a 224-px cache of competition size is 5-20 GB, which a whole-file hash
# would read at every process start). Truncation is caught by the size, a partial build never becomes
# visible (it is written under a temporary name), and damage at either end or in a sampled block by
# the checksum.
CHECKSUM_SAMPLE = (64, 1 << 20)


def _digest_file(path: Path, sample: tuple[int, int] | None) -> str:
    """blake2b of the file, or with ``sample`` = (blocks, bytes) of that many evenly spaced blocks."""
    h = hashlib.blake2b(digest_size=16)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if sample is None or sample[0] * sample[1] >= size:
            while block := f.read(1 << 24):
                h.update(block)
        else:
            blocks, length = sample
            for start in np.linspace(0, size - length, blocks).astype(np.int64):
                f.seek(int(start))
                h.update(f.read(length))
            h.update(str(size).encode())
    return h.hexdigest()


@dataclass
class FeatureCache:
    """Cached activations: ``array[v, i]`` is variant ``variants[v]`` of patch ``i``."""

    array: np.ndarray  # V x N x C x ... (memory-mapped), in STORAGE[dtype]
    variants: tuple[str, ...]
    cut: int
    folder: Path
    dtype: torch.dtype  # of the activations stored
    resident: torch.Tensor | None = None  # the same array on the GPU, when it fits
    channels_last: bool = False  # the activation at the cut is NHWC in memory (stored NCHW, restored on read)

    def batch(self, block: torch.Tensor) -> torch.Tensor:
        """A batch read from the cache in the memory layout the backbone produced at the cut: the blocks
        after it run their fast kernels (oneDNN's 1x1 convolutions are 2x slower on NCHW)."""
        return block.contiguous(memory_format=torch.channels_last) if self.channels_last else block

    def tensor(self, block: np.ndarray) -> torch.Tensor:
        """A block of the array as the activations it stores (no copy)."""
        out = torch.from_numpy(block)
        return out.view(torch.bfloat16) if self.dtype == torch.bfloat16 else out

    def keep_on(self, device: torch.device, share: float = 0.5) -> None:
        """Copy the cache to the GPU if it takes at most ``share`` of the free memory there."""
        if device.type != "cuda" or self.resident is not None:
            return
        free, _ = torch.cuda.mem_get_info(device)
        if self.array.nbytes <= share * free:
            self.resident = self.tensor(np.ascontiguousarray(self.array)).to(device)

    def variant_index(self, name: str) -> int:
        if name not in self.variants:
            raise ValueError(f"feature cache holds variants {', '.join(self.variants)}; {name!r} is not one")
        return self.variants.index(name)


def cache_key(model: SpatialCellModel, split: Split, patch_set: PatchSet,
              variants: tuple[str, ...], dtype: torch.dtype) -> dict:
    prep = model.preprocessing
    return {"backbone": model.cfg.backbone, "weights": split.weights_digest(),
            "patches": patch_set.images_digest(), "patch_size": patch_set.patch_size,
            "input_size": prep.input_size, "context": prep.crop(patch_set.patch_size), "mean": list(prep.mean),
            "std": list(prep.std), "interpolation": prep.interpolation, "cut": split.cut, "variants": list(variants),
            "dtype": str(dtype).removeprefix("torch.")}


def _valid(folder: Path, key: dict) -> bool:
    meta_path, array_path = folder / "meta.json", folder / "features.npy"
    if not meta_path.is_file() or not array_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return False
    if meta.get("key") != key or array_path.stat().st_size != meta.get("bytes"):
        return False
    sample = meta.get("checksum_sample")  # absent: a whole-file checksum (caches built before sampling)
    return _digest_file(array_path, tuple(sample) if sample else None) == meta.get("checksum")


def build_or_load(model: SpatialCellModel, patch_set: PatchSet, cut: int, root: Path,
                  variants: tuple[str, ...] = DIHEDRAL, batch_size: int = 128,
                  device: torch.device | None = None, log=print,
                  source: Callable[[], FeatureCache] | None = None) -> FeatureCache:
    """The cache of ``model``'s prefix up to ``cut`` for these patches: loaded if valid, else (re)built.

    ``source``, when given, returns a cache of the same model at a shallower cut holding the same
    variants: a build then runs only the blocks between the two cuts on its features, not the whole
    prefix on the images."""
    device = device or torch.device("cpu")
    split = model.split_at(cut)
    transform = build_transform(model.preprocessing, patch_set.patch_size, train=None)

    def batch(start: int) -> torch.Tensor:
        raw = torch.from_numpy(np.array(patch_set.images[start : start + batch_size])).permute(0, 3, 1, 2)
        return transform(raw).to(device)

    model.eval().to(device)
    with torch.inference_mode(), autocast(device):
        probe = split.prefix(batch(0)[:1])
    dtype = probe.dtype  # what the device's precision path produces at the cut ...
    layout = {"channels_last": probe.ndim == 4 and not probe.is_contiguous()
              and probe.is_contiguous(memory_format=torch.channels_last)}  # ... and its memory layout
    key = cache_key(model, split, patch_set, variants, dtype)
    folder = Path(root) / hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    if _valid(folder, key):
        return _load(folder, variants, cut, dtype, layout)
    # Workers sharing train.cache_dir (several processes of a study) build a cache once: the first
    # takes the lock and builds, the others wait and then load what it wrote.
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if _valid(folder, key):
            return _load(folder, variants, cut, dtype, layout)
        if folder.exists():
            log(f"feature cache {folder} is incomplete or corrupt: rebuilding it")
        n = len(patch_set.images)
        shape = (len(variants), n, *probe.shape[1:])
        check_room(folder.parent, shape, STORAGE[dtype], model.cfg.backbone, cut, len(model.blocks), log)
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            array = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=STORAGE[dtype], shape=shape)
            if source is not None:
                activations = _from_cache(split, model, source(), variants, batch_size, device)
            else:
                activations = _from_images(split, batch, n, variants, batch_size)
            started = time.perf_counter()
            with torch.inference_mode(), autocast(device):
                for step, (start, v, out) in enumerate(activations):
                    out = out.to(dtype).cpu()
                    array[v, start : start + len(out)] = (
                        out.view(torch.int16) if dtype == torch.bfloat16 else out).numpy()
                    if step == 1:  # a large encoder on a CPU takes minutes to hours: say so after two batches
                        announce_duration((time.perf_counter() - started) / 2 * len(variants) * -(-n // batch_size),
                                          model.cfg.backbone, shape, log)
            array.flush()
            del array
            meta = {"key": key, "bytes": (tmp / "features.npy").stat().st_size,
                    "checksum": _digest_file(tmp / "features.npy", CHECKSUM_SAMPLE),
                    "checksum_sample": list(CHECKSUM_SAMPLE)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        log(f"built feature cache {folder} ({shape[0]} variants x {shape[1]} patches, {tuple(shape[2:])})")
    return _load(folder, variants, cut, dtype, layout)


def check_room(root: Path, shape: tuple[int, ...], storage: type, backbone: str, cut: int, blocks: int,
               log=print) -> int:
    """The bytes a cache of ``shape`` takes, said before it is built when it is large; one line when the
    disk under ``root`` has not that much free (a ViT's tokens take ~200x its pooled embedding)."""
    size = int(np.prod(shape)) * np.dtype(storage).itemsize
    free = shutil.disk_usage(root).free
    what = (f"the {backbone} feature cache ({shape[0]} variants x {shape[1]} patches x {tuple(shape[2:])}, "
            f"{'pooled embeddings' if cut == blocks else f'activations after block {cut} of {blocks}'})")
    if size > 0.95 * free:
        raise InputError(f"train.cache_dir: {what} takes {size / 1e9:.1f} GB, {root} has {free / 1e9:.1f} GB free; "
                         "free space, set train.cache_dir elsewhere, or train fewer blocks (model.unfrozen_blocks 0 "
                         "caches pooled embeddings)")
    if size > LARGE_CACHE:
        log(f"building {what}: {size / 1e9:.1f} GB ({size / shape[1] / 1e6:.2f} MB a spot)")
    return size


LARGE_CACHE = 1 << 30  # caches this large are announced before they are built
LONG_BUILD_S = 60.0  # builds expected to take longer are announced with their expected time


def announce_duration(expected_s: float, backbone: str, shape: tuple[int, ...], log=print) -> None:
    if expected_s > LONG_BUILD_S:
        log(f"building the {backbone} feature cache ({shape[0]} variants x {shape[1]} patches): about "
            f"{expected_s / 60:.0f} min at this device's pace")


def _from_images(split: Split, batch: Callable[[int], torch.Tensor], n: int, variants: tuple[str, ...],
                 batch_size: int):
    """(first row, variant index, activations at the cut) of every batch: the prefix run on the images."""
    for start in range(0, n, batch_size):
        images = batch(start)
        for v, name in enumerate(variants):
            yield start, v, split.prefix(dihedral(images, name))


def _from_cache(split: Split, model: SpatialCellModel, source: FeatureCache, variants: tuple[str, ...],
                batch_size: int, device: torch.device):
    """The same, from a shallower cut's cache: only the blocks between the cuts run."""
    if source.cut >= split.cut or source.variants != variants:
        raise ValueError(f"a cache at cut {split.cut} cannot be derived from one at cut {source.cut}")
    between = split.between(model.split_at(source.cut))
    for start in range(0, source.array.shape[1], batch_size):
        for v in range(len(variants)):
            cached = source.batch(source.tensor(np.array(source.array[v, start : start + batch_size])).to(device))
            yield start, v, between(cached)


def _load(folder: Path, variants: tuple[str, ...], cut: int, dtype: torch.dtype, layout: dict) -> FeatureCache:
    return FeatureCache(np.load(folder / "features.npy", mmap_mode="r"), variants, cut, folder, dtype, **layout)


def needed_variants(flips: bool, tta: list[str]) -> tuple[str, ...]:
    """The dihedral variants a study reads: training draws all 8 with flips; else identity and the TTA ones."""
    return DIHEDRAL if flips else tuple(v for v in DIHEDRAL if v == "identity" or v in tta)


class FeatureCaches:
    """The feature caches (and other results of frozen blocks, such as spot descriptors) one caller
    reuses across folds and trials: at most ``capacity`` of each are held, the least recently used
    dropped first (with its memory map and GPU copy)."""

    def __init__(self, root: Path, device: torch.device, capacity: int = 8, log=print):
        self.root, self.device, self.capacity, self.log = Path(root), device, capacity, log
        self._caches: OrderedDict[tuple, FeatureCache] = OrderedDict()
        self._results: OrderedDict[tuple, Any] = OrderedDict()

    def for_model(self, model: SpatialCellModel, patch_set: PatchSet, max_unfrozen: int,
                  variants: tuple[str, ...] = DIHEDRAL) -> FeatureCache:
        """The feature cache ``model`` trains on (built, loaded from disk, or reused).

        Every trial of a study that trains backbone blocks shares the cache cut before the last
        ``max_unfrozen`` blocks (same backbone and seed, same prefix weights). A model that trains fewer
        blocks reads a cache cut after all of its frozen ones, derived from that shared one, so its steps
        run no frozen block at all. A model that trains none reads pooled embeddings, computed from the
        images: a study's head-only trials never build the shared cache, which for a ViT holds tokens
        (~200x the embeddings), until a trial that trains blocks needs it."""
        shared_cut = deepest_cut(model, max_unfrozen)
        own_cut = max(shared_cut, model_cut(model))

        def shared() -> FeatureCache:
            return self._at(model, patch_set, shared_cut, variants)

        if own_cut == shared_cut:
            cache = shared()
        elif own_cut == len(model.blocks):
            cache = self._at(model, patch_set, own_cut, variants)
        else:
            cache = self._at(model, patch_set, own_cut, variants, source=shared)
        cache.keep_on(self.device)
        return cache

    def _at(self, model: SpatialCellModel, patch_set: PatchSet, cut: int, variants: tuple[str, ...],
            source=None) -> FeatureCache:
        key = (patch_set.images_digest(), model.cfg.backbone, cut, model.preprocessing,
               model.split_at(cut).weights_digest(), variants, self.device.type)
        return self.remember_cache(key, lambda: build_or_load(model, patch_set, cut, self.root, variants=variants,
                                                              device=self.device, log=self.log, source=source))

    def remember_cache(self, key: tuple, build: Callable[[], FeatureCache]) -> FeatureCache:
        return _remember(self._caches, key, build, self.capacity)

    def remember(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()``, or its result for ``key`` from an earlier call."""
        return _remember(self._results, key, compute, self.capacity)

    def clear(self) -> None:
        self._caches.clear()
        self._results.clear()


def _remember(store: OrderedDict, key: tuple, compute: Callable[[], Any], capacity: int) -> Any:
    if key in store:
        store.move_to_end(key)
        return store[key]
    value = compute()
    store[key] = value
    while len(store) > capacity:
        store.popitem(last=False)
    return value


def cached_batch(cache: FeatureCache, variant_index: np.ndarray, rows: np.ndarray,
                 device: torch.device) -> torch.Tensor:
    """float32 features of ``rows`` (one variant per row) as a device tensor (exactly the stored values)."""
    if cache.resident is not None:  # gathered on the GPU: no host copy, no sync
        index = torch.from_numpy(variant_index).to(device), torch.from_numpy(rows).to(device)
        return cache.batch(cache.resident[index].float())
    order = np.argsort(rows, kind="stable")  # memmap reads are faster in file order
    block = np.empty((len(rows), *cache.array.shape[2:]), dtype=cache.array.dtype)
    block[order] = cache.array[variant_index[order], rows[order]]
    return cache.batch(cache.tensor(block).to(device, non_blocking=True).float())
