"""``python -m src.bench trial``: one trial (spatial CV of one recipe) uncached and cached, side by
side in one process, and the same seeded study with the median pruner and without."""
from __future__ import annotations

import time
from pathlib import Path


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self):
        import threading

        import psutil

        self.process, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.start = self.process.memory_info().rss

        def sample():
            while not self.stop.is_set():
                self.peak = max(self.peak, self.process.memory_info().rss)
                self.stop.wait(0.05)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak_mb = max(self.peak, self.process.memory_info().rss) / 2**20


def bench_trial(overrides: list[str], patches: str, cache_dir: str) -> dict:
    """One trial (spatial CV of one recipe) uncached and cached, in this process, side by side."""
    from src.core.config import load_params
    from src.data.preprocessing.patch_set import load_patch_set
    from src.engine.cross_validation import cross_validate
    from src.engine.folds import fold_count

    patch_set = load_patch_set(patches, "train")
    n = len(patch_set.spots)
    results = {}
    for label, cached in (("uncached", False), ("cached (cache built)", True), ("cached", True)):
        extra = [f"train.feature_cache={str(cached).lower()}", f"train.cache_dir={cache_dir}"]
        if cached:
            extra.append("train.color_jitter=0.0")
        params = load_params(overrides=[*overrides, *extra])
        with PeakRSS() as memory:
            start = time.perf_counter()
            result = cross_validate(params, patch_set, show_progress=False)
            seconds = time.perf_counter() - start
        folds = fold_count(params.cv, patch_set.spots["slide"].to_numpy())
        results[label] = {
            "seconds": seconds, "cv": result.score, "peak_mb": memory.peak_mb,
            "train_patches_per_s": sum(result.epochs_run) * n * (folds - 1) / folds / seconds,
            "epochs": sum(result.epochs_run),
        }
    return results


def bench_pruning(overrides: list[str], patches: str, cache_dir: str, trials: int) -> dict:
    """The same seeded study with the median pruner and without: epochs trained and best value."""
    import tempfile

    from src.core.config import apply_overrides, read_raw
    from src.data.preprocessing.patch_set import load_patch_set
    from src.search.study import run_study

    patch_set = load_patch_set(patches, "train")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pruner in ("median", "none"):
            raw = apply_overrides(read_raw("params.yaml"), [*overrides, "train.feature_cache=true",
                                  "train.color_jitter=0.0", f"train.cache_dir={cache_dir}", f"tune.pruner={pruner}"])
            start = time.perf_counter()
            study = run_study(raw, patch_set, trials, f"bench-{pruner}", f"sqlite:///{tmp}/bench.db",
                              artifact_dir=Path(tmp) / "artifacts", live=False)
            out[pruner] = {"epochs": sum(t.user_attrs.get("epochs_run", 0) for t in study.trials),
                           "best": study.best_value, "seconds": time.perf_counter() - start,
                           "pruned": sum(t.state.name == "PRUNED" for t in study.trials)}
    return out


def print_trial(results: dict, pruning: dict | None) -> None:
    from rich.console import Console

    console = Console(width=110)
    if results:
        _print_trial_table(console, results)
    if pruning:
        _print_pruning_table(console, pruning)


def _print_trial_table(console, results: dict) -> None:
    from rich.table import Table

    table = Table(title="one trial (spatial CV of one recipe), same process, same data")
    for column in ("path", "seconds", "CV spearman", "train patches/s", "peak RSS MB", "vs uncached"):
        table.add_column(column, justify="right")
    base = results["uncached"]["seconds"]
    for label, r in results.items():
        table.add_row(label, f"{r['seconds']:.1f}", f"{r['cv']:.4f}", f"{r['train_patches_per_s']:.0f}",
                      f"{r['peak_mb']:.0f}", f"{base / r['seconds']:.1f}x")
    console.print(table)
    delta = abs(results["cached"]["cv"] - results["uncached"]["cv"])
    console.print(f"|delta CV spearman| cached vs uncached: {delta:.4f}")


def _print_pruning_table(console, pruning: dict) -> None:
    from rich.table import Table

    table = Table(title="study with and without the median pruner (same seed and trials, cached)")
    for column in ("pruner", "epochs trained", "pruned trials", "best CV", "seconds"):
        table.add_column(column, justify="right")
    for name, r in pruning.items():
        table.add_row(name, str(r["epochs"]), str(r["pruned"]), f"{r['best']:.4f}", f"{r['seconds']:.0f}")
    console.print(table)
    ratio = pruning["median"]["epochs"] / max(1, pruning["none"]["epochs"])
    console.print(f"epochs with pruning / without: {ratio:.2f}; best value difference "
                  f"{pruning['median']['best'] - pruning['none']['best']:+.4f}")


