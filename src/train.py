"""Training: ``fit`` one model, ``cross_validate`` over spatial folds, and stage ``train``
(fit on every training spot, write a self-describing checkpoint)."""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch.utils.data import DataLoader

from src.checkpoint import save_checkpoint
from src.config import Params, add_params_arguments, apply_overrides, load_params, read_raw
from src.data import PatchSet, SpotDataset, build_transform, load_patch_set
from src.devices import autocast, check_device, default_device
from src.errors import InputError, exit_on_input_error
from src.inference import predict
from src.locations import shared_path
from src.losses import AbundanceLoss, target_ranks, transform_targets
from src.metrics import competition_score, per_type_spearman
from src.model import Ensemble, SpatialCellModel
from src.neighbours import spot_inputs
from src.recipe import params_for_best
from src.smoothing import smooth
from src.splits import balanced_blocks, make_folds

EpochCallback = Callable[[int, float], None]  # (epoch, validation score); may raise to stop


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup_fraction`` of the steps, then cosine to 0."""
    warmup = max(1, int(round(total_steps * warmup_fraction))) if warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class FitResult:
    model: SpatialCellModel
    epochs_run: int
    train_loss: list[float] = field(default_factory=list)
    val_scores: list[float] = field(default_factory=list)  # per epoch, no TTA or smoothing
    cached: tuple | None = None  # (FeatureCache, PrefixSplit) when trained on cached features


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
    """Training batches (inputs, spot inputs, targets, ranks) and the forward pass that consumes them:
    normalized images through the whole model, or cached prefix features through the rest of it."""

    def __init__(self, params: Params, model: SpatialCellModel, patch_set: PatchSet, rows: np.ndarray,
                 targets: np.ndarray, ranks: np.ndarray, generator: torch.Generator, device: torch.device):
        cfg = params.train
        self.model, self.rows, self.device, self.generator = model, rows, device, generator
        self.batch_size = cfg.batch_size
        self.cache = None
        spot = spot_inputs(model, patch_set, device, params.infer.batch_size)
        if cfg.feature_cache:
            from src.features import cache_for, needed_variants

            if cfg.color_jitter > 0 or cfg.resized_crop > 0:
                raise InputError("params: train.feature_cache fixes the backbone input: set train.color_jitter "
                                 "and train.resized_crop to 0 (dihedral flips stay available)")
            self.cache, self.split = cache_for(model, patch_set, max_unfrozen(params), shared_path(cfg.cache_dir), device,
                                               needed_variants(cfg.flips, params.infer.tta))
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
        from src.features import cached_batch

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
        features = self.split.features(inputs, self.model.preprocessing.input_size)
        return self.model.forward_head(features, spot)

    @property
    def cached(self):
        return None if self.cache is None else (self.cache, self.split)


def train_epoch(batches: Batches, loss_fn: AbundanceLoss, optimizer: torch.optim.Optimizer, scheduler,
                grad_clip: float, device: torch.device, after_step: Callable[[], None] = lambda: None) -> float:
    """One pass over the training batches; returns the mean loss (one host sync per epoch)."""
    model = batches.model
    model.train()
    running = torch.zeros((), device=device)
    for inputs, spot, batch_targets, batch_ranks in batches:
        inputs = inputs.to(device, non_blocking=True)
        if device.type == "cuda" and inputs.ndim == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            pred = batches.forward(inputs, spot.to(device, non_blocking=True))
        loss = loss_fn(pred, batch_targets.to(device, non_blocking=True), batch_ranks.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        running += loss.detach()
        after_step()
    return float(running) / max(1, len(batches))


def fit(params: Params, patch_set: PatchSet, train_rows: np.ndarray, val_rows: np.ndarray | None = None,
        on_epoch: EpochCallback | None = None, device: torch.device | None = None,
        show_progress: bool = True) -> FitResult:
    """Train a fresh model on ``train_rows``; report the validation score after each epoch."""
    device = device or default_device()
    check_device(device)
    generator = seed_everything(params.train.seed)
    model = SpatialCellModel(params.model, n_outputs=len(patch_set.targets)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    abundance = patch_set.abundance
    targets = transform_targets(abundance, params.loss.target_transform, params.loss.log_epsilon)
    ranks = target_ranks(abundance)
    model.init_output_bias(torch.from_numpy(targets[train_rows].mean(axis=0)))
    cfg = params.train
    batches = Batches(params, model, patch_set, np.asarray(train_rows), targets, ranks, generator, device)
    if cfg.compile:
        # In cached mode the backbone's prefix is swapped per batch, so only the rest is compiled.
        for module in ([model.image_proj, model.head] if batches.cache is not None else [model]):
            module.compile()
    backbone_params, head_params = model.trainable_parameter_groups()
    groups = [{"params": head_params, "lr": cfg.lr_head}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": cfg.lr_backbone})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=True)  # one kernel per step
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.epochs * len(batches), cfg.warmup_fraction))
    loss_fn = AbundanceLoss(params.loss)
    result = FitResult(model=model, epochs_run=0)
    result.cached = batches.cached
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), disable=not show_progress,
                        transient=False)
    with progress:
        for epoch in range(cfg.epochs):
            task = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(batches), status="")
            epoch_loss = train_epoch(batches, loss_fn, optimizer, scheduler, cfg.grad_clip, device,
                                     lambda: progress.advance(task))
            result.train_loss.append(epoch_loss)
            result.epochs_run = epoch + 1
            status = f"loss {epoch_loss:.4f}"
            if val_rows is not None and len(val_rows):
                pred = predict(model, patch_set, val_rows, ["identity"], params.infer.batch_size, device,
                               cached=batches.cached)
                score = competition_score(pred, abundance[val_rows])
                result.val_scores.append(score)
                status += f"  val spearman {score:.4f}"
            progress.update(task, status=status)
            if on_epoch is not None and result.val_scores:
                on_epoch(epoch, result.val_scores[-1])
    return result


@dataclass
class CVResult:
    oof: np.ndarray  # N x T out-of-fold predictions (target space, TTA, no smoothing)
    fold_of: np.ndarray  # fold of each training spot
    fold_scores: list[float]  # per fold, after smoothing with ``sigma``
    score: float  # competition score of all OOF predictions smoothed with ``sigma``
    sigma: float  # smoothing sigma (px) of ``score``: the best of the sigmas scored
    sigma_scores: dict[float, float]  # CV score of every sigma scored
    floor: float  # training-mean-profile score on the same validation spots
    per_type: np.ndarray  # per-cell-type Spearman of the smoothed OOF predictions
    epochs_run: list[int]
    dropped: list[int]  # training spots removed by the buffer, per fold
    seconds: float
    models: list[SpatialCellModel] = field(default_factory=list)  # the fold models, when kept


def cv_score(oof: np.ndarray, patch_set: PatchSet, fold_of: np.ndarray, sigma: float, truncate: float
             ) -> tuple[float, list[float], np.ndarray]:
    """Score smoothed OOF predictions: overall, per fold and per cell type (sigma needs no retraining)."""
    truth = patch_set.abundance
    smoothed = smooth(oof, patch_set.xy(), patch_set.spots["slide"].to_numpy(), sigma, truncate)
    folds = [competition_score(smoothed[fold_of == k], truth[fold_of == k]) for k in np.unique(fold_of)]
    return competition_score(smoothed, truth), folds, per_type_spearman(smoothed, truth)


def choose_sigma(oof: np.ndarray, patch_set: PatchSet, fold_of: np.ndarray, sigmas: list[float],
                 truncate: float) -> tuple[float, dict[float, float]]:
    """The smoothing sigma whose smoothed OOF predictions score best (ties: the smaller sigma).

    Smoothing acts after the model, so every sigma is scored on the same predictions for free."""
    xy, slides, truth = patch_set.xy(), patch_set.spots["slide"].to_numpy(), patch_set.abundance
    scores = {float(s): competition_score(smooth(oof, xy, slides, s, truncate), truth) for s in sorted(set(sigmas))}
    best = max(scores, key=lambda s: (scores[s], -s))
    return best, scores


PRUNING_INSTANCES = 4  # validation blocks per fold reported to the pruner (WilcoxonPruner's instances)


def instance_scores(pred: np.ndarray, truth: np.ndarray, xy: np.ndarray, slides: np.ndarray) -> list[float]:
    """A fold's score on ``PRUNING_INSTANCES`` contiguous blocks of its validation spots (split evenly
    among its slides): the same blocks in every trial, so trials can be compared block by block."""
    names = list(dict.fromkeys(slides))
    per_slide = max(1, PRUNING_INSTANCES // len(names))
    out = []
    for name in names:
        rows = np.flatnonzero(slides == name)
        blocks = balanced_blocks(xy[rows], min(per_slide, len(rows)))
        out += [competition_score(pred[rows[blocks == b]], truth[rows[blocks == b]]) for b in np.unique(blocks)]
    return out


FoldCallback = Callable[[int, list[float]], None]  # (fold, its validation blocks' scores); may raise


def cross_validate(params: Params, patch_set: PatchSet, on_fold: FoldCallback | None = None,
                   on_epoch: Callable[[int, int, float], None] | None = None, device: torch.device | None = None,
                   show_progress: bool = True, sigmas: list[float] | None = None,
                   keep_models: bool = False) -> CVResult:
    """Spatial CV: one model per fold, TTA predictions for its validation spots, scored after smoothing
    with the best of ``sigmas`` (default: the recipe's own ``infer.smoothing_sigma``)."""
    start = time.perf_counter()
    folds = make_folds(patch_set.xy(), patch_set.spots["slide"].to_numpy(), params.cv, patch_set.patch_size)
    abundance = patch_set.abundance
    xy, slides = patch_set.xy(), patch_set.spots["slide"].to_numpy()
    oof = np.zeros_like(abundance)
    fold_of = np.full(len(abundance), -1)
    floor_preds = np.zeros_like(abundance)
    epochs_run, models = [], []
    for k, fold in enumerate(folds):
        callback = (lambda epoch, score, k=k: on_epoch(k, epoch, score)) if on_epoch else None
        result = fit(params, patch_set, fold.train, fold.val if on_epoch else None, callback, device, show_progress)
        oof[fold.val] = predict(result.model, patch_set, fold.val, params.infer.tta,
                                params.infer.batch_size, device, cached=result.cached)
        fold_of[fold.val] = k
        floor_preds[fold.val] = abundance[fold.train].mean(axis=0)
        epochs_run.append(result.epochs_run)
        if keep_models:
            models.append(result.model)
        if on_fold is not None:
            on_fold(k, instance_scores(oof[fold.val], abundance[fold.val], xy[fold.val], slides[fold.val]))
    sigma, sigma_scores = choose_sigma(oof, patch_set, fold_of, sigmas or [params.infer.smoothing_sigma],
                                       params.infer.smoothing_truncate)
    score, fold_scores, per_type = cv_score(oof, patch_set, fold_of, sigma, params.infer.smoothing_truncate)
    return CVResult(oof=oof, fold_of=fold_of, fold_scores=fold_scores, score=score, sigma=sigma,
                    sigma_scores=sigma_scores, floor=competition_score(floor_preds, abundance),
                    per_type=per_type, epochs_run=epochs_run, dropped=[f.dropped for f in folds],
                    seconds=time.perf_counter() - start, models=models)


def train_final(params: Params, patches_dir: Path, stain_file: Path, out: Path, log=print) -> list[int]:
    """Build the delivered model and write its checkpoint; returns the epochs each member trained.

    ``train.final: ensemble``: the recipe's CV is run again and its fold models, the very models the CV
    scored, are averaged (the CV score is printed as a check). ``retrain``: one model on every training
    spot, with the fold models' epoch count (its schedule is not validated by the CV)."""
    patch_set = load_patch_set(patches_dir, "train")
    if params.train.final == "ensemble":
        result = cross_validate(params, patch_set, keep_models=True)
        log(f"fold models: CV spearman {result.score:.4f} (sigma {result.sigma:g} px), "
            f"floor {result.floor:.4f}")
        model, epochs = Ensemble(result.models), result.epochs_run
    elif params.train.final == "retrain":
        fitted = fit(params, patch_set, np.arange(len(patch_set.spots)))
        model, epochs = fitted.model, [fitted.epochs_run]
    else:
        raise InputError(f"params: train.final = {params.train.final!r}: choose ensemble or retrain")
    save_checkpoint(out, model, targets=patch_set.targets, loss=params.loss, patch_size=patch_set.patch_size,
                    infer=params.infer, stain=json.loads(stain_file.read_text()))
    return epochs


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.train", description=__doc__.split("\n")[0])
    parser.add_argument("--patches", type=Path, default=Path("data/patches"), help="patch store")
    parser.add_argument("--stain", type=Path, default=Path("data/normalized/stain.json"),
                        help="fitted stain reference (stored in the checkpoint for predict)")
    parser.add_argument("--out", type=Path, default=Path("models/model.pt"), help="checkpoint to write")
    parser.add_argument("--best", type=Path, default=None,
                        help="best_params.yaml of a study: retrain its best trial (else params.yaml as is)")
    add_params_arguments(parser, "train.epochs=2")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.set)
    if args.best is not None:
        params = params_for_best(args.best, apply_overrides(read_raw(args.params), args.set))
    epochs = train_final(params, args.patches, args.stain, args.out)
    kind = f"ensemble of {len(epochs)} fold models" if params.train.final == "ensemble" else "retrained model"
    print(f"wrote {args.out}: {kind}, epochs {epochs}, smoothing sigma {params.infer.smoothing_sigma:g} px")


if __name__ == "__main__":
    main()
