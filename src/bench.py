"""Benchmarks that print figures: ``python -m src.bench stain``, ``trial``, ``study``, ``data`` and ``search``.

``scale``: time, peak memory and disk of every stage at competition size, and how each grows with
the slide and patch size (``src.bench_scale``).

``study``: a whole seeded study as ``python -m src.tune`` processes, with and without the feature
cache, and the profile of a cached trial (``src.bench_study``).

``search``: hand-set vs tuned recipe on the test slide over several simulated data sets, and whether
the CV ranks recipes as the test slide does (``src.bench_search``).

``data``: the statistics the competition's data is known by (``src.data_statistics``), for the
simulated data params.yaml describes (with ``--set simulate.*`` overrides) or for a file (``--h5``).

``stain``: on a simulated 2000 x 2000 slide, staintools' ``StainNormalizer.transform`` against
:class:`src.stain.StainNormalizer` with the same fitted target, side by side in one run: seconds,
speed ratio and agreement (mean and 99th percentile of |difference| on the 0-255 scale).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from dataclasses import replace

import numpy as np


def _best_of(repeats: int, fn, *args):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - start)
    return min(times), result


def bench_stain(size: int = 2000, repeats: int = 3, seed: int = 0) -> dict:
    import staintools

    from src.config import SimulateConfig
    from src.stain import StainNormalizer
    from src.synthetic import simulate

    cfg = SimulateConfig(seed=seed, n_train=2, n_test=0, size=size, pitch=25.0, n_types=35,
                         tissue_extent=[1.0, 1.0], offsets=[[0, 0], [0, 0]])
    slides, _ = simulate(replace(cfg))
    reference, source = [(s.image * 255).round().astype(np.uint8) for _, _, s in slides]
    results = {}
    for method in ("vahadane", "macenko"):
        theirs = staintools.StainNormalizer(method)
        theirs.fit(reference.copy())  # staintools modifies its input in place
        ours = StainNormalizer(method)
        ours.stain_matrix_target = theirs.stain_matrix_target
        ours.max_conc_target = theirs.maxC_target.ravel()
        t_theirs, out_theirs = _best_of(repeats, lambda: theirs.transform(source.copy()))
        t_ours, out_ours = _best_of(repeats, ours.transform, source)
        diff = np.abs(out_theirs.astype(np.int16) - out_ours.astype(np.int16))
        results[method] = {
            "staintools_s": t_theirs, "ours_s": t_ours, "ratio": t_theirs / t_ours,
            "mean_abs_diff": float(diff.mean()), "p99_abs_diff": float(np.percentile(diff, 99)),
        }
    return results


def print_stain(results: dict, size: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"stain transform, simulated {size} x {size} slide (best of runs)")
    for column in ("method", "staintools s", "ours s", "speed-up", "mean |Δ|", "p99 |Δ|"):
        table.add_column(column, justify="right")
    for method, r in results.items():
        table.add_row(method, f"{r['staintools_s']:.3f}", f"{r['ours_s']:.3f}", f"{r['ratio']:.1f}x",
                      f"{r['mean_abs_diff']:.3f}", f"{r['p99_abs_diff']:.0f}")
    Console(width=100).print(table)


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
    from src.config import load_params
    from src.data import load_patch_set
    from src.splits import fold_count
    from src.train import cross_validate

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

    from src.config import apply_overrides, read_raw
    from src.data import load_patch_set
    from src.tune import run_study

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


def bench_data(overrides: list[str], h5: str | None) -> tuple[str, dict]:
    from src.data_statistics import abundance_statistics

    if h5:
        from src.slides import open_h5, read_spots, slide_refs, target_names

        with open_h5(h5) as f:
            train = {}
            for ref in (r for r in slide_refs(f) if r.split == "Train"):
                spots = read_spots(f, ref)
                train[ref.name] = spots[target_names(list(spots.columns))].to_numpy(np.float64)
        return h5, abundance_statistics(train)
    from src.config import load_params
    from src.synthetic import simulate

    cfg = load_params(overrides=overrides).simulate
    slides, _ = simulate(cfg)
    train = {name: s.observed for split, name, s in slides if split == "Train"}
    tests = [s for split, _, s in slides if split == "Test"]
    test = np.concatenate([s.observed for s in tests]) if tests else None
    expected = np.concatenate([s.expected for s in tests]) if tests else None
    label = f"simulated (seed {cfg.seed}, {cfg.n_train}+{cfg.n_test} slides of {cfg.size} px)"
    return label, abundance_statistics(train, test, expected)


def print_data(label: str, stats: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"abundance statistics: {label}", title_justify="left")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for key, value in stats.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:.3f}" for k, v in value.items())
        elif isinstance(value, tuple):
            value = " - ".join(f"{v:.3g}" for v in value)
        elif isinstance(value, float):
            value = f"{value:.4g}"
        table.add_row(key, str(value))
    Console(width=110).print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    stain = sub.add_parser("stain", help="staintools vs our stain transform")
    stain.add_argument("--size", type=int, default=2000, help="slide edge in px (default 2000)")
    stain.add_argument("--repeats", type=int, default=3, help="timed runs per method (best kept)")
    trial = sub.add_parser("trial", help="a trial cached vs uncached, and pruning vs not")
    trial.add_argument("--patches", default="data/patches", help="patch store (default data/patches)")
    trial.add_argument("--cache-dir", default="cache/bench", help="feature cache folder for the run")
    trial.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override the recipe, e.g. model.unfrozen_blocks=1 (repeatable)")
    trial.add_argument("--study-trials", type=int, default=12,
                       help="trials per study for the pruning figure (0 skips it)")
    trial.add_argument("--pruning-only", action="store_true", help="skip the cached/uncached trial figure")
    data = sub.add_parser("data", help="statistics of simulated data (params.yaml) or of a file")
    data.add_argument("--h5", default=None, help="a file in the competition layout (training slides)")
    data.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a simulate.* param, e.g. simulate.seed=3 (repeatable)")
    search = sub.add_parser("search", help="hand-set vs tuned recipe on the test slide, per simulate.seed")
    search.add_argument("--seeds", type=int, nargs="+", default=[12, 13, 14], help="simulate.seed values")
    search.add_argument("--trials", type=int, default=None, help="trials per study (default: tune.trials)")
    search.add_argument("--work", type=Path, default=Path("cache/bench-search"),
                        help="work folder (data, studies and caches per seed; reused when rerun)")
    search.add_argument("--replay", action="store_true",
                        help="run the studies without pruning and replay every pruner over them")
    search.add_argument("--params", type=Path, default=Path("params.yaml"))
    search.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for every seed (repeatable)")
    study = sub.add_parser("study", help="a whole study cached vs uncached, and a cached trial's profile")
    study.add_argument("--trials", type=int, default=3, help="trials per study (default 3)")
    study.add_argument("--patches", type=Path, default=Path("data/patches"), help="patch store (default data/patches)")
    study.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    study.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override the recipe or space (repeatable)")
    scale = sub.add_parser("scale", help="time, memory and disk of every stage at competition size")
    scale.add_argument("--scales", nargs="+", default=["1000x64", "2000x64", "2000x224"],
                       help="slide edge x patch edge in px, smallest first (default 1000x64 2000x64 2000x224)")
    scale.add_argument("--work", type=Path, default=Path("cache/bench-scale"), help="work folder (one per scale)")
    scale.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override params for every scale, e.g. train.epochs=1 (repeatable)")
    args = parser.parse_args(argv)
    if args.what == "scale":
        from src.bench_scale import bench_scale, print_scale

        scales = [tuple(int(v) for v in text.split("x")) for text in args.scales]
        print_scale(bench_scale(scales, args.work, args.set))
    elif args.what == "study":
        from src.bench_study import bench_study, print_study

        print_study(bench_study(args.trials, args.patches, args.set, args.work))
    elif args.what == "search":
        from src.bench_search import bench_search

        bench_search(args.seeds, args.params, args.set, args.work, args.trials, args.replay)
    elif args.what == "data":
        print_data(*bench_data(args.set, args.h5))
    elif args.what == "stain":
        print_stain(bench_stain(args.size, args.repeats), args.size)
    else:
        import shutil

        shutil.rmtree(args.cache_dir, ignore_errors=True)  # the first cached run builds it
        results = None if args.pruning_only else bench_trial(args.set, args.patches, args.cache_dir)
        pruning = bench_pruning(args.set, args.patches, args.cache_dir, args.study_trials) if args.study_trials else None
        print_trial(results, pruning)


if __name__ == "__main__":
    main()
