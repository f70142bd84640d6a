"""Train one model: seeding, the warm-up/cosine schedule, the epoch loop and its progress display."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from src.core.devices import autocast, check_device, default_device
from src.core.locations import shared_path
from src.core.sections import Params
from src.data.preprocessing.patch_set import PatchSet
from src.engine.batches import Batches
from src.engine.inference import predict
from src.engine.metrics import competition_score
from src.model.feature_cache import FeatureCache, FeatureCaches
from src.model.losses import AbundanceLoss
from src.model.network import SpatialCellModel
from src.model.targets import target_ranks, transform_targets

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
    cache: FeatureCache | None = None  # the cached prefix features it trained on, if any


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
        show_progress: bool = True, reuse: FeatureCaches | None = None) -> FitResult:
    """Train a fresh model on ``train_rows``; report the validation score after each epoch. ``reuse``:
    feature caches shared with other fits (default: a fresh set in ``train.cache_dir``)."""
    device = device or default_device()
    check_device(device)
    cfg = params.train
    if reuse is None and cfg.feature_cache:
        reuse = FeatureCaches(shared_path(cfg.cache_dir), device)
    generator = seed_everything(cfg.seed)
    model = SpatialCellModel(params.model, n_outputs=len(patch_set.targets)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    abundance = patch_set.abundance
    targets = transform_targets(abundance, params.loss.target_transform, params.loss.log_epsilon)
    ranks = target_ranks(abundance)
    model.init_output_bias(torch.from_numpy(targets[train_rows].mean(axis=0)))
    batches = Batches(params, model, patch_set, np.asarray(train_rows), targets, ranks, generator, device, reuse)
    if cfg.compile:
        for module in batches.compiled_modules():
            module.compile()
    backbone_params, head_params = model.trainable_parameter_groups()
    groups = [{"params": head_params, "lr": cfg.lr_head}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": cfg.lr_backbone})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=True)  # one kernel per step
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.epochs * len(batches), cfg.warmup_fraction))
    loss_fn = AbundanceLoss(params.loss)
    result = FitResult(model=model, epochs_run=0, cache=batches.cache)
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
                               cache=batches.cache, reuse=reuse)
                score = competition_score(pred, abundance[val_rows])
                result.val_scores.append(score)
                status += f"  val spearman {score:.4f}"
            progress.update(task, status=status)
            if on_epoch is not None and result.val_scores:
                on_epoch(epoch, result.val_scores[-1])
    return result
