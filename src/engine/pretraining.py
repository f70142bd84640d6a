"""The backbone's own training on a fold's training spots, before the trials train a head on its features.

With random weights (``model.pretrained: false``, no ``model.weights``) a frozen prefix computes
random features, and a search over the last blocks and the head cannot make up for it: a plain,
fully trained ResNet-18 beat every such recipe on both simulated families. The seed fine-tuned the
last stage of an ImageNet backbone; here, as a stand-in for those weights, every CV fold first
trains the whole backbone on its own training spots with one fixed recipe (``pretrain``: MSE on
log(abundance + epsilon), flips, no coordinates, no smoothing; ``pretrain.epochs`` passes), and every
trial of the study starts from that fold's weights (by default it trains only a head on their
cached features; ``model.unfrozen_blocks`` > 0 also trains the last blocks). A fold's validation
spots are never seen, so the CV stays honest; the delivered fold models carry their own weights.
A backbone that starts from trained weights (a pathology encoder from ``model.weights`` or the hub) is
used as it is unless ``pretrain.from_weights`` says otherwise.

The weights are kept under ``train.cache_dir/backbones``, keyed by the patch store, the fold's rows,
the backbone, its input and this recipe, so a study trains each fold's backbone once (under a file
lock when workers share the folder) and stage ``train`` finds them again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from src.core.files import atomic_path
from src.core.locations import shared_path
from src.core.sections import LossConfig, Params
from src.data.preprocessing.patch_set import PatchSet
from src.model.backbone import backbone_block_count, starts_from_weights


def pretraining_params(params: Params) -> Params:
    """The fixed recipe that trains the whole backbone: nothing a trial searches reaches it (only the
    backbone, its input and the run settings of ``train`` that no default space searches)."""
    pre = params.pretrain
    model = dataclasses.replace(params.model, unfrozen_blocks=backbone_block_count(params.model.backbone, params.model.weights),
                                fusion="none", context=pre.context, dropout=0.1, neighbour_radius=0.0, coord_dim=1)
    loss = LossConfig(alpha=0.0, regularization=0.1, target_transform="log", log_epsilon=pre.log_epsilon)
    train = dataclasses.replace(params.train, epochs=pre.epochs, lr_backbone=pre.lr, lr_head=pre.lr,
                                weight_decay=pre.weight_decay, warmup_fraction=0.1, feature_cache=False,
                                cache_dir="", num_workers=0, compile=False, final="ensemble")
    return dataclasses.replace(params, model=model, loss=loss, train=train)


def _key(params: Params, patch_set: PatchSet, rows: np.ndarray) -> str:
    """Everything the backbone's training depends on: the recipe it runs, the patches and the rows."""
    recipe = pretraining_params(params)
    what = {"patches": patch_set.digest(),
            "rows": hashlib.blake2b(np.sort(rows).astype(np.int64).tobytes(), digest_size=16).hexdigest(),
            "model": dataclasses.asdict(recipe.model), "loss": dataclasses.asdict(recipe.loss),
            "train": dataclasses.asdict(recipe.train)}
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pretrains(params: Params) -> bool:
    """Whether the folds train their backbone first: on by ``pretrain.epochs``, for a backbone with random
    weights; one that starts from trained weights (a pathology encoder, ImageNet) only with
    ``pretrain.from_weights`` (a whole ViT at the head's rate would overwrite what it learnt)."""
    return params.pretrain.epochs > 0 and (params.pretrain.from_weights or not starts_from_weights(params.model))


def backbone_folder(params: Params) -> Path:
    """Where the folds' trained backbones are kept."""
    return shared_path(params.train.cache_dir) / "backbones"


def fold_backbone(params: Params, patch_set: PatchSet, rows: np.ndarray, device: torch.device | None = None,
                  log=print) -> Path | None:
    """The weights file of the backbone trained on ``rows`` (built once); None when pretraining is off."""
    if not pretrains(params):
        return None
    from src.engine.fit import fit

    folder = backbone_folder(params)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{_key(params, patch_set, rows)}.pt"
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            fitted = fit(pretraining_params(params), patch_set, rows, device=device, show_progress=False)
            with atomic_path(path) as tmp:
                torch.save(fitted.model.backbone.state_dict(), tmp)
            log(f"trained the {params.model.backbone} backbone on {len(rows)} spots ({params.pretrain.epochs} "
                f"epochs): {path}")
    return path


def with_backbone(params: Params, weights: Path | None) -> Params:
    """``params`` whose backbone starts from ``weights`` (unchanged when None)."""
    if weights is None:
        return params
    return dataclasses.replace(params, model=dataclasses.replace(params.model, weights=str(weights), pretrained=False))
