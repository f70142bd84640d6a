"""Benchmarks that print figures: ``python -m src.bench stain``.

``stain``: on a simulated 2000 x 2000 slide, staintools' ``StainNormalizer.transform`` against
:class:`src.stain.StainNormalizer` with the same fitted target, side by side in one run: seconds,
speed ratio and agreement (mean and 99th percentile of |difference| on the 0-255 scale).
"""
from __future__ import annotations

import argparse
import time
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

    cfg = SimulateConfig(seed=seed, n_train=2, n_test=0, size=size, pitch=25.0, n_types=35, max_offset=0)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    stain = sub.add_parser("stain", help="staintools vs our stain transform")
    stain.add_argument("--size", type=int, default=2000, help="slide edge in px (default 2000)")
    stain.add_argument("--repeats", type=int, default=3, help="timed runs per method (best kept)")
    args = parser.parse_args(argv)
    if args.what == "stain":
        print_stain(bench_stain(args.size, args.repeats), args.size)


if __name__ == "__main__":
    main()
