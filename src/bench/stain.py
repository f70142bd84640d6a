"""``python -m src.bench stain``: on a simulated 2000 x 2000 slide, staintools' ``StainNormalizer.transform``
against :class:`src.data.preprocessing.stain.StainNormalizer` with the same fitted target, side by side in one run:
seconds, speed ratio and agreement (mean and 99th percentile of |difference| on the 0-255 scale)."""
from __future__ import annotations

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

    from src.core.sections import SimulateConfig
    from src.data.preprocessing.stain import StainNormalizer
    from src.data.simulators.families import simulate_family

    cfg = SimulateConfig(seed=seed, n_train=2, n_test=0, size=size, pitch=25.0, n_types=35,
                         tissue_extent=[1.0, 1.0], offsets=[[0, 0], [0, 0]])
    slides, _ = simulate_family(replace(cfg))
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


