"""Training batches and the forward pass that consumes them: normalized images through the whole
model, or cached prefix features (``src.model.feature_cache``) through the rest of the backbone."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from src.core.sections import Params
from src.data.preprocessing.patch_set import PatchSet
from src.model.dataset import SpotDataset
from src.model.feature_cache import FeatureCache, FeatureCaches, cached_batch, needed_variants
from src.model.neighbours import spot_inputs
from src.model.network import SpatialCellModel
from src.model.transforms import build_transform


def unfrozen_counts(params: Params) -> list[int]:
    """Every ``model.unfrozen_blocks`` a trial of the study may train: the hand-set one and the space's."""
    searched = params.tune.space.get("model", {}).get("unfrozen_blocks", {})
    if "choices" in searched:
        drawn = searched["choices"]
    else:
        drawn = range(int(searched.get("low", 0)), int(searched.get("high", 0)) + 1, int(searched.get("step", 1)))
    return sorted({params.model.unfrozen_blocks, *(int(k) for k in drawn)})


def max_unfrozen(params: Params) -> int:
    """The most blocks any trial of the study trains: the shared feature cache is cut before them."""
    return max(unfrozen_counts(params))


class Batches:
    """(inputs, spot inputs, targets, ranks) per training step, for the chosen rows; ``reuse`` holds the
    feature caches (and spot descriptors) shared with other folds and trials (``train.feature_cache``)."""

    def __init__(self, params: Params, model: SpatialCellModel, patch_set: PatchSet, rows: np.ndarray,
                 targets: np.ndarray, ranks: np.ndarray, generator: torch.Generator, device: torch.device,
                 reuse: FeatureCaches | None = None):
        cfg = params.train
        self.model, self.rows, self.device, self.generator = model, rows, device, generator
        self.batch_size = cfg.batch_size
        self.cache: FeatureCache | None = None
        spot = spot_inputs(model, patch_set, device, params.infer.batch_size, reuse)
        if cfg.feature_cache:
            self.cache = reuse.for_model(model, patch_set, max_unfrozen(params),
                                         needed_variants(cfg.flips, params.infer.tta))
            self.rest = model.split_at(self.cache.cut).rest
            self.flips = cfg.flips
            self.spot = torch.from_numpy(spot)
            self.targets = torch.from_numpy(targets.astype(np.float32))
            self.ranks = torch.from_numpy(ranks.astype(np.float32))
            return
        dataset = SpotDataset(patch_set, rows, build_transform(model.preprocessing, patch_set.patch_size, cfg),
                              targets[rows], ranks[rows], spot)
        self.loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=generator,
                                 drop_last=len(dataset) > cfg.batch_size, num_workers=cfg.num_workers,
                                 pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0)

    def __len__(self) -> int:
        if self.cache is None:
            return len(self.loader)
        return max(1, len(self.rows) // self.batch_size)

    def __iter__(self):
        if self.cache is None:
            yield from self.loader
            return
        order = torch.randperm(len(self.rows), generator=self.generator).numpy()
        identity = self.cache.variant_index("identity")
        for b in range(len(self)):
            rows = self.rows[order[b * self.batch_size : (b + 1) * self.batch_size]]
            if self.flips:
                variants = torch.randint(len(self.cache.variants), (len(rows),), generator=self.generator).numpy()
            else:
                variants = np.full(len(rows), identity)
            yield (cached_batch(self.cache, variants, rows, self.device), self.spot[rows],
                   self.targets[rows], self.ranks[rows])

    def forward(self, inputs: torch.Tensor, spot: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            return self.model(inputs, spot)
        return self.model.forward_head(self.rest(inputs), spot)

    def compiled_modules(self) -> list[torch.nn.Module]:
        """What ``train.compile`` compiles: the whole model, or with cached features the head. (The rest
        of the backbone is a GraphModule made per model, whose generated code torch.compile would
        compile anew for every fold.)"""
        if self.cache is None:
            return [self.model]
        return [self.model.image_proj, self.model.head]
