"""``python -m src.bench study``: what the feature cache buys a whole study, and where a cached trial's
time goes.

1. The same seeded study (``--trials`` trials, the recipe and space of params.yaml) runs as a whole
   ``python -m src.tune`` process twice, side by side in one run: without the feature cache and with it
   (prebuilt, as every study after the first finds it). Wall time includes process start.
2. One cached trial (the hand-set recipe's CV) is profiled in this process: the share of each part.
"""
from __future__ import annotations

import cProfile
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from src.core.config import apply_overrides, params_from_dict, read_raw


def trial_parts() -> dict[str, list]:
    """Parts of a cached trial, by the functions that do each (they do not call one another)."""
    import torch

    from src.engine import cross_validation, fit, folds, inference
    from src.model import feature_cache, network

    return {
        "training steps": [fit.train_epoch],
        "OOF prediction (TTA)": [inference.predict],
        "scoring, sigma choice, pruner reports": [cross_validation.choose_sigma, cross_validation.cv_score,
                                                  cross_validation.instance_scores],
        "model creation": [network.SpatialCellModel.__init__],
        "feature cache lookup": [feature_cache.FeatureCaches.for_model],
        "optimizer set-up": [torch.optim.AdamW.__init__],
        "folds": [folds.make_folds],
    }


def _tune_command(work: Path, mode: str, trials: int, patches: Path, overrides: list[str]) -> list[str]:
    sets = [*overrides, f"train.feature_cache={'true' if mode == 'cached' else 'false'}",
            f"train.cache_dir={work / 'cache'}", "tune.warm_start=0"]
    out = work / mode
    return [sys.executable, "-m", "src.tune", "--trials", str(trials), "--study", f"bench-{mode}",
            "--storage", f"sqlite:///{out}/study.db", "--patches", str(patches), "--best-out", str(out / "best.yaml"),
            "--metrics", str(out / "tune.json"), "--cv-per-type", str(out / "per_type.csv"),
            "--history", str(out / "history.csv"), "--artifacts", str(out / "artifacts"),
            *[a for s in sets for a in ("--set", s)]]


def prebuild_cache(params, patch_set) -> float:
    """Build (or find) every feature cache a study of ``params`` may read, as every study after the
    first finds them: one per backbone, context and unfrozen block count of the space; seconds taken."""
    from dataclasses import replace
    from itertools import product

    from src.core.config import to_dict
    from src.core.devices import default_device
    from src.core.locations import shared_path
    from src.engine.batches import max_unfrozen, unfrozen_counts
    from src.engine.fit import seed_everything
    from src.model.feature_cache import FeatureCaches, needed_variants
    from src.model.network import SpatialCellModel
    from src.search.space import parse_space, values_of

    space, raw = parse_space(params.tune.space), to_dict(params)
    backbones, contexts = (sorted({getattr(params.model, field), *values_of(space, f"model.{field}", raw)})
                           for field in ("backbone", "context"))
    start = time.perf_counter()
    caches = FeatureCaches(shared_path(params.train.cache_dir), default_device(), log=lambda _: None)
    for backbone, context, unfrozen in product(backbones, contexts, unfrozen_counts(params)):
        trial = replace(params, model=replace(params.model, backbone=backbone, context=context,
                                              unfrozen_blocks=unfrozen))
        seed_everything(params.train.seed)  # the prefix weights every trial of the study starts from
        model = SpatialCellModel(trial.model, n_outputs=len(patch_set.targets))
        caches.for_model(model, patch_set, max_unfrozen(params), needed_variants(params.train.flips, params.infer.tta))
    return time.perf_counter() - start


def trial_costs(db: Path) -> list[dict]:
    """Number, unfrozen blocks, epochs run, state and seconds of each trial of the study in ``db``."""
    import optuna

    storage = f"sqlite:///{db}"
    (name,) = optuna.study.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    return [{"number": t.number, "unfrozen": t.params.get("model.unfrozen_blocks", "-"),
             "epochs": t.user_attrs.get("epochs_run", "-"), "state": t.state.name.lower(),
             "seconds": t.duration.total_seconds() if t.duration else float("nan")} for t in study.trials]


def process_start_seconds() -> float:
    """A fresh interpreter importing the study's code, as every ``python -m src.tune`` does."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import src.tune"], check=True)
    return time.perf_counter() - start


def profile_cached_trial(params, patch_set) -> tuple[float, dict[str, float]]:
    """Seconds of one cached trial (the recipe's CV) and seconds per part of it."""
    from src.engine.cross_validation import cross_validate

    cross_validate(params, patch_set, show_progress=False)  # warm: imports, cache mapped, descriptors memoized
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(cross_validate, params, patch_set, show_progress=False, sigmas=params.tune.sigma_grid)
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, ..., own time, cumulative time, ...)
    parts = {}
    for part, functions in trial_parts().items():
        codes = [(f.__code__.co_filename, f.__code__.co_firstlineno, f.__code__.co_name) for f in functions]
        parts[part] = sum(stats[c][3] for c in codes if c in stats)
    parts["other"] = max(0.0, total - sum(parts.values()))
    return total, parts


def bench_study(trials: int, patches: Path, overrides: list[str], work: Path | None = None) -> dict:
    from src.data.preprocessing.patch_set import load_patch_set

    raw = apply_overrides(read_raw("params.yaml"), overrides)
    patch_set = load_patch_set(patches, "train")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work or tmp).resolve()
        cached = params_from_dict(apply_overrides(raw, ["train.feature_cache=true", f"train.cache_dir={work / 'cache'}"]))
        out = {"cache_build_s": prebuild_cache(cached, patch_set), "process_start_s": process_start_seconds()}
        for mode in ("uncached", "cached"):
            start = time.perf_counter()
            subprocess.run(_tune_command(work, mode, trials, patches, overrides), check=True,
                           stdout=subprocess.DEVNULL)
            out[f"{mode}_s"] = time.perf_counter() - start
            out[f"{mode}_trials"] = trial_costs(work / mode / "study.db")
        out["trial_s"], out["parts"] = profile_cached_trial(cached, patch_set)
    out["trials"] = trials
    return out


def print_study(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=110)
    table = Table(title=f"a whole {r['trials']}-trial study (python -m src.tune, process start included, same seed)")
    for column in ("feature cache", "seconds", "per trial", "speed-up"):
        table.add_column(column, justify="right")
    for mode in ("uncached", "cached"):
        seconds = r[f"{mode}_s"]
        table.add_row(mode, f"{seconds:.1f}", f"{seconds / r['trials']:.1f}", f"{r['uncached_s'] / seconds:.1f}x")
    console.print(table)
    per_trial = Table(title="per trial (same seed: the same recipes in both studies)")
    for column in ("trial", "unfrozen blocks", "epochs run (uncached / cached)", "uncached s", "cached s", "speed-up"):
        per_trial.add_column(column, justify="right")
    for u, c in zip(r["uncached_trials"], r["cached_trials"]):
        per_trial.add_row(str(u["number"]), str(u["unfrozen"]), f"{u['epochs']} / {c['epochs']}", f"{u['seconds']:.1f}",
                          f"{c['seconds']:.1f}", f"{u['seconds'] / c['seconds']:.1f}x")
    console.print(per_trial)
    console.print(f"cache build (once per data, backbone and seed; not in the figures above): {r['cache_build_s']:.1f} s; "
                  f"process start (imports): {r['process_start_s']:.1f} s")
    parts = Table(title=f"one cached trial, profiled: {r['trial_s']:.1f} s")
    for column in ("part", "seconds", "share"):
        parts.add_column(column, justify="right")
    for name, seconds in sorted(r["parts"].items(), key=lambda kv: -kv[1]):
        parts.add_row(name, f"{seconds:.2f}", f"{100 * seconds / r['trial_s']:.0f}%")
    console.print(parts)
