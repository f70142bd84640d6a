"""Frozen-prefix feature cache: compute the frozen start of the backbone once per patch and
dihedral variant, reuse it across epochs, folds and trials.

The backbone is cut at a block boundary (``cut`` leading blocks of ``backbone_blocks``). The cache
holds the activation at that boundary, fp16, memory-mapped, for every patch and variant. Training then
runs only the blocks after the cut (frozen ones without gradient) and the head: while the cached
features are fed in, every module of the prefix is short-circuited (the module at the cut returns the
cached batch, the others a zero placeholder of their recorded shape), so this works for any timm
backbone whose prefix modules return tensors -- ResNet, ConvNeXt, ViT, EfficientNet, ...

Cache key: backbone name, prefix weights, patches, input size and normalization, cut and variants.
A file whose size or checksum does not match its metadata is rebuilt, never used. Processes that
share a cache folder (the workers of one study) build each cache once, under a file lock.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from torch import nn

from src.data import DIHEDRAL, PatchSet, build_transform, dihedral
from src.errors import InputError
from src.io_utils import atomic_path
from src.model import SpatialCellModel

CACHE_DTYPE = np.float16


class _StopForward(Exception):
    """Raised by a hook once the cut activation is captured: the rest of the forward is skipped."""


class PrefixSplit:
    """The backbone's first ``cut`` blocks as swappable modules, and the activation at the cut."""

    def __init__(self, model: SpatialCellModel, cut: int):
        if not 0 < cut <= len(model.blocks):
            raise ValueError(f"cut {cut} outside 1..{len(model.blocks)}")
        self.model = model
        self.cut = cut
        prefix_params = {name for block in model.blocks[:cut] for name in block}
        self.modules = _maximal_modules(model.backbone, prefix_params)
        self.order: list[str] = []  # execution order of self.modules
        self.shapes: dict[str, tuple[int, ...]] = {}

    def adopt(self, recorded: "PrefixSplit") -> "PrefixSplit":
        """Take another instance's recorded layout (same architecture): no second recording run."""
        self.order, self.shapes = list(recorded.order), dict(recorded.shapes)
        self.modules = {name: self.model.backbone.get_submodule(name) for name in self.order}
        return self

    @property
    def cut_module(self) -> str:
        return self.order[-1]

    @torch.no_grad()
    def _record(self, images: torch.Tensor) -> None:
        """Run once: the prefix modules' execution order and output shapes. Parameter-free siblings
        that finish before the cut (a stem's activation and max-pool, ViT's position dropout) join
        the prefix, so none of the prefix computes on placeholders later."""
        candidates = dict(self.modules)
        for parent in {name.rpartition(".")[0] for name in self.modules}:
            owner = self.model.backbone.get_submodule(parent) if parent else self.model.backbone
            for child_name, child in owner.named_children():
                full = f"{parent}.{child_name}" if parent else child_name
                if full not in candidates and not list(child.parameters()):
                    candidates[full] = child
        finished: list[tuple[str, torch.Tensor]] = []

        def hook(name):
            def fn(module, args, output):
                finished.append((name, output))
            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in candidates.items()]
        try:
            self.model.backbone(images)
        finally:
            for handle in handles:
                handle.remove()
        last_prefix = max(i for i, (name, _) in enumerate(finished) if name in self.modules)
        for name, output in finished[: last_prefix + 1]:
            if not isinstance(output, torch.Tensor):
                raise InputError(f"train.feature_cache: {self.model.cfg.backbone} module {name} "
                                 "returns no tensor; set train.feature_cache: false")
            if name not in self.shapes:
                self.order.append(name)
                self.shapes[name] = tuple(output.shape[1:])
        self.modules = {name: candidates[name] for name in self.order}

    @torch.no_grad()
    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """The activation at the cut for a batch of normalized images (uncached path)."""
        if not self.order:
            self._record(images[:1])
        captured = {}

        def grab(module, args, output):
            captured["out"] = output
            raise _StopForward

        handle = self.modules[self.cut_module].register_forward_hook(grab)
        try:
            self.model.backbone(images)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["out"]

    @contextlib.contextmanager
    def substitute(self, cached: torch.Tensor):
        """Within the block, the backbone's prefix returns ``cached`` instead of computing it."""
        batch = cached.shape[0]
        originals = {}
        for name, module in self.modules.items():
            originals[name] = module.forward
            if name == self.cut_module:
                module.forward = lambda *a, **k: cached
            else:  # never read: an expanded zero costs no memory and no compute
                shape = self.shapes[name]
                module.forward = lambda *a, _s=shape, **k: cached.new_zeros(()).expand(batch, *_s)
        try:
            yield
        finally:
            for name, module in self.modules.items():
                module.forward = originals[name]

    def features(self, cached: torch.Tensor, input_size: int) -> torch.Tensor:
        """Pooled backbone features from cached activations (runs only the blocks after the cut)."""
        dummy = cached.new_zeros((cached.shape[0], 3, input_size, input_size))
        with self.substitute(cached):
            return self.model.forward_features(dummy)


def _maximal_modules(backbone: nn.Module, prefix_params: set[str]) -> dict[str, nn.Module]:
    """Largest submodules whose parameters all lie in the prefix (children of mixed modules)."""
    out: dict[str, nn.Module] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            names = {f"{full}.{n}" for n, _ in child.named_parameters()}
            if not names:
                continue
            if names <= prefix_params:
                out[full] = child
            elif names & prefix_params:
                visit(full + ".", child)

    visit("", backbone)
    return out


def deepest_cut(model: SpatialCellModel, max_unfrozen: int) -> int:
    """Cache as many blocks as no trial of the study will train (at least the stem)."""
    return max(1, len(model.blocks) - max_unfrozen)


def _digest_tensors(tensors) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _digest_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class FeatureCache:
    """Cached activations: ``array[v, i]`` is variant ``variants[v]`` of patch ``i``."""

    array: np.ndarray  # V x N x C x ... fp16 (memory-mapped)
    variants: tuple[str, ...]
    cut: int
    folder: Path
    resident: torch.Tensor | None = None  # the same array on the GPU, when it fits

    def keep_on(self, device: torch.device, share: float = 0.5) -> None:
        """Copy the cache to the GPU if it takes at most ``share`` of the free memory there."""
        if device.type != "cuda" or self.resident is not None:
            return
        free, _ = torch.cuda.mem_get_info(device)
        if self.array.nbytes <= share * free:
            self.resident = torch.from_numpy(np.ascontiguousarray(self.array)).to(device)

    def variant_index(self, name: str) -> int:
        if name not in self.variants:
            raise InputError(f"feature cache holds variants {', '.join(self.variants)}; {name!r} is not one")
        return self.variants.index(name)


def cache_key(model: SpatialCellModel, split: PrefixSplit, patch_set: PatchSet,
              variants: tuple[str, ...]) -> dict:
    prefix_weights = [p for block in model.blocks[: split.cut] for p in
                      (model.backbone.get_parameter(n) for n in block)]
    buffers = [b for n, b in model.backbone.named_buffers()
               if any(n.startswith(m + ".") for m in split.modules)]
    prep = model.preprocessing
    return {"backbone": model.cfg.backbone, "weights": _digest_tensors(prefix_weights + buffers),
            "patches": patch_set.images_digest(), "patch_size": patch_set.patch_size,
            "input_size": prep.input_size, "context": prep.crop(patch_set.patch_size), "mean": list(prep.mean), "std": list(prep.std),
            "cut": split.cut, "variants": list(variants), "dtype": np.dtype(CACHE_DTYPE).name}


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
    return _digest_file(array_path) == meta.get("checksum")


def build_or_load(model: SpatialCellModel, patch_set: PatchSet, cut: int, root: Path,
                  variants: tuple[str, ...] = DIHEDRAL, batch_size: int = 128,
                  device: torch.device | None = None, log=print) -> tuple[FeatureCache, PrefixSplit]:
    """The cache for this model's prefix and these patches: loaded if valid, else (re)built."""
    device = device or torch.device("cpu")
    split = PrefixSplit(model, cut)
    transform = build_transform(model.preprocessing, patch_set.patch_size, train=None)

    def batch(start: int) -> torch.Tensor:
        raw = torch.from_numpy(np.array(patch_set.images[start : start + batch_size])).permute(0, 3, 1, 2)
        return transform(raw).to(device)

    model.eval().to(device)
    split._record(batch(0)[:1])
    key = cache_key(model, split, patch_set, variants)
    folder = Path(root) / hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    if _valid(folder, key):
        return _load(folder, variants, cut), split
    # Workers sharing train.cache_dir (several processes of a study) build a cache once: the first
    # takes the lock and builds, the others wait and then load what it wrote.
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if _valid(folder, key):
            return _load(folder, variants, cut), split
        if folder.exists():
            log(f"feature cache {folder} is incomplete or corrupt: rebuilding it")
        n = len(patch_set.images)
        shape = (len(variants), n, *split.shapes[split.cut_module])
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            array = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=CACHE_DTYPE, shape=shape)
            with torch.inference_mode():
                for start in range(0, n, batch_size):
                    images = batch(start)
                    for v, name in enumerate(variants):
                        out = split.prefix(dihedral(images, name))
                        array[v, start : start + len(images)] = out.float().cpu().numpy().astype(CACHE_DTYPE)
            array.flush()
            del array
            meta = {"key": key, "bytes": (tmp / "features.npy").stat().st_size,
                    "checksum": _digest_file(tmp / "features.npy")}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        log(f"built feature cache {folder} ({shape[0]} variants x {shape[1]} patches, {tuple(shape[2:])})")
    return _load(folder, variants, cut), split


def _load(folder: Path, variants: tuple[str, ...], cut: int) -> FeatureCache:
    return FeatureCache(np.load(folder / "features.npy", mmap_mode="r"), variants, cut, folder)


_LOADED: dict[tuple, tuple[FeatureCache, PrefixSplit]] = {}


def cache_for(model: SpatialCellModel, patch_set: PatchSet, max_unfrozen: int, root: Path,
              device: torch.device, log=print) -> tuple[FeatureCache, PrefixSplit]:
    """The feature cache for ``model`` (built, loaded from disk, or reused within this process).

    A model with the same prefix weights (same backbone and seed) on the same patches shares it,
    whatever its own unfrozen block count up to ``max_unfrozen``."""
    cut = deepest_cut(model, max_unfrozen)
    prefix = [model.backbone.get_parameter(n) for block in model.blocks[:cut] for n in block]
    memo = (patch_set.images_digest(), model.cfg.backbone, cut, model.preprocessing, _digest_tensors(prefix), str(root))
    if memo in _LOADED:
        cache, template = _LOADED[memo]
        return cache, PrefixSplit(model, cut).adopt(template)
    cache, split = build_or_load(model, patch_set, cut, root, device=device, log=log)
    cache.keep_on(device)
    _LOADED[memo] = (cache, split)
    return cache, split


def cached_batch(cache: FeatureCache, variant_index: np.ndarray, rows: np.ndarray,
                 device: torch.device) -> torch.Tensor:
    """float32 features of ``rows`` (one variant per row) as a device tensor."""
    if cache.resident is not None:  # gathered on the GPU: no host copy, no sync
        index = torch.from_numpy(variant_index).to(device), torch.from_numpy(rows).to(device)
        return cache.resident[index].float()
    order = np.argsort(rows, kind="stable")  # memmap reads are faster in file order
    block = np.empty((len(rows), *cache.array.shape[2:]), dtype=CACHE_DTYPE)
    block[order] = cache.array[variant_index[order], rows[order]]
    return torch.from_numpy(block).to(device, non_blocking=True).float()
