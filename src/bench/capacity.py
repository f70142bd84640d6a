"""``python -m src.bench capacity``: what a backbone's capacity buys, and what it costs on this machine.

One leave-one-slide-out fold (``--fold``: which training slide is held out) of a patch store, for each
recipe of ``RECIPES``: trained on the other slides, scored on the held-out one (TTA, no smoothing, and
with sigma 25 px), with its wall time. The recipes: the default (the backbone pretrained on the fold's
spots, a head trained on its features), the same with its last 2 blocks trained too and at 64 px,
the previous default (``convnext_atto`` with a frozen, randomly initialised prefix), and fully
trained small timm backbones at 32 and 64 px (the plain peer's kind). The pretraining's time is part of the first recipe that needs it (later ones reuse its weights).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from src.bench.search import plain_baseline

# name -> overrides of params.yaml
PREVIOUS_DEFAULT = ["model.backbone=convnext_atto", "model.input_size=64", "model.context=0.67", "pretrain.epochs=0"]
RECIPES = {
    "default (pretrained per fold, head only)": [],
    "default, last 2 blocks trained too (unfrozen_blocks 2)": ["model.unfrozen_blocks=2"],
    "default at 64 px": ["model.input_size=64"],
    "previous default (convnext_atto, random frozen prefix)": PREVIOUS_DEFAULT,
    "resnet18 fully trained, 32 px": [*plain_baseline(), "model.input_size=32"],
    "resnet18 fully trained, 64 px (the plain peer)": plain_baseline(),
    "resnet10t fully trained, 64 px": plain_baseline("resnet10t"),
    "convnext_atto fully trained, 64 px": plain_baseline("convnext_atto"),
}


def bench_capacity(patches: Path, fold: int, overrides: list[str], cache_dir: str, names: list[str] | None = None
                   ) -> list[dict]:
    from src.core.config import load_params
    from src.data.preprocessing.patch_set import load_patch_set
    from src.engine.fit import fit
    from src.engine.inference import predict
    from src.engine.metrics import competition_score
    from src.engine.pretraining import fold_backbone, with_backbone
    from src.engine.smoothing import smooth

    patch_set = load_patch_set(patches, "train")
    slides = patch_set.slides
    held_out = sorted(set(slides))[fold]
    val, train = np.flatnonzero(slides == held_out), np.flatnonzero(slides != held_out)
    rows = []
    for name in names or list(RECIPES):
        params = load_params("params.yaml", [*overrides, f"train.cache_dir={cache_dir}", *RECIPES[name]])
        start = time.perf_counter()
        params = with_backbone(params, fold_backbone(params, patch_set, train, log=lambda _: None))
        fitted = fit(params, patch_set, train, show_progress=False)
        pred = predict(fitted.model, patch_set, val, params.infer.tta, params.infer.batch_size, cache=fitted.cache)
        rows.append({"recipe": name, "held_out": held_out, "val": competition_score(pred, patch_set.abundance[val]),
                     "val_sigma25": competition_score(smooth(pred, patch_set.xy()[val], slides[val], 1.0, patch_set.pitches()),
                                                      patch_set.abundance[val]),
                     "seconds": time.perf_counter() - start})
        print(f"{name}: val {rows[-1]['val']:.4f} (sigma 25: {rows[-1]['val_sigma25']:.4f}), "
              f"{rows[-1]['seconds']:.0f} s", flush=True)
    return rows


def print_capacity(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"one fold (held out: {rows[0]['held_out']}): capacity and its cost", title_justify="left")
    for column in ("recipe", "val Spearman", "with sigma 25 px", "seconds"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["recipe"], f"{r['val']:.4f}", f"{r['val_sigma25']:.4f}", f"{r['seconds']:.0f}")
    Console(width=120).print(table)
