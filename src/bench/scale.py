"""``python -m src.bench scale``: the cost of every stage at competition size, and how it grows.

Each scale (slide edge x patch edge) runs the pipeline the way a user does, one stage command after
the other (``python -m src.simulate``, ``src.validate``, ``src.normalize``, ``src.patches``, the
feature cache build, ``src.tune --trials 1`` (one cached trial: the hand-set recipe's CV, process
start included), ``src.train`` (retrain) and ``src.evaluate``), with a params file written for the
scale. Every stage is timed and its peak resident memory (the process and its children, sampled) and
the disk its outputs take are measured. Competition size: 6 training and 1 test slide of 2000 x 2000
px, tissue radius 0.45-0.75 of the slide (about 8,300 training spots at a 25 px pitch).
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from src.core.config import apply_overrides, read_raw

COMPETITION = ["simulate.n_train=6", "simulate.n_test=1", "simulate.tissue_extent=[0.45, 0.75]"]
# The recipe of the scale runs: a small backbone fed the whole patch at its own size, frozen prefix cached.
RECIPE = ["model.backbone=convnext_atto", "model.context=1.0", "model.neighbour_radius=0",
          "tune.space.model.context={choices: [1.0]}", "tune.warm_start=0", "train.feature_cache=true"]


@dataclass
class StageCost:
    stage: str
    seconds: float
    peak_rss_mb: float
    disk_mb: float


def _tree_rss(process) -> int:
    import psutil

    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(command: list[str], log) -> tuple[float, float]:
    """Run ``command``; (seconds, peak resident MB of it and its children, sampled every 0.1 s)."""
    import psutil

    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    handle, peak = psutil.Process(child.pid), [0]

    def sample():
        while child.poll() is None:
            try:
                peak[0] = max(peak[0], _tree_rss(handle))
            except psutil.Error:
                return
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = child.communicate()[0]
    sampler.join()
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed (exit {child.returncode}):\n{output[-3000:]}")
    for line in output.splitlines()[-2:]:
        log(f"    {line}")
    return seconds, peak[0] / 2**20


def disk_mb(*paths: Path) -> float:
    total = 0
    for path in paths:
        files = [path] if path.is_file() else path.rglob("*") if path.exists() else []
        total += sum(f.stat().st_size for f in files if f.is_file())
    return total / 2**20


def stage_commands(work: Path) -> list[tuple[str, list[str], list[Path]]]:
    """(stage, command, outputs) of one scale's pipeline, every stage reading work/params.yaml."""
    py, params = sys.executable, ["--params", str(work / "params.yaml")]
    h5, truth, norm, patches = work / "sim.h5", work / "truth.h5", work / "normalized", work / "patches"
    out = work / "out"
    return [
        ("simulate", [py, "-m", "src.simulate", "--out", str(h5), "--truth-out", str(truth), *params], [h5, truth]),
        ("validate", [py, "-m", "src.validate", str(h5)], []),
        ("normalize", [py, "-m", "src.normalize", "--out", str(norm), *params], [norm]),
        ("patches", [py, "-m", "src.patches", "--normalized", str(norm / "slides.h5"), "--out", str(patches), *params],
         [patches]),
        ("feature cache build", [py, "-m", "src.bench.scale", "cache", "--patches", str(patches), *params],
         [work / "cache"]),
        ("one cached trial (tune --trials 1)",
         [py, "-m", "src.tune", "--trials", "1", "--study", "scale", "--storage", f"sqlite:///{work}/study.db",
          "--patches", str(patches), "--best-out", str(out / "best.yaml"), "--metrics", str(out / "tune.json"),
          "--cv-per-type", str(out / "cv_per_type.csv"), "--history", str(out / "history.csv"),
          "--artifacts", str(work / "artifacts"), "--ensemble-out", str(out / "ensemble.yaml"), *params],
         [work / "study.db"]),
        ("retrain (train.final=retrain)",
         [py, "-m", "src.train", "--patches", str(patches), "--stain", str(norm / "stain.json"), "--out",
          str(work / "model.pt"), "--best", str(out / "best.yaml"), *params, "--set", "train.final=retrain"],
         [work / "model.pt"]),
        ("evaluate", [py, "-m", "src.evaluate", "--model", str(work / "model.pt"), "--patches", str(patches),
                      "--tune-metrics", str(out / "tune.json"), "--cv-per-type", str(out / "cv_per_type.csv"),
                      "--submission", str(out / "submission.csv"), "--metrics", str(out / "evaluate.json"),
                      "--per-type", str(out / "per_type.csv"), "--plots", str(work / "plots"), *params],
         [out / "submission.csv"]),
    ]


def scale_params(work: Path, size: int, patch: int, overrides: list[str]) -> dict:
    raw = apply_overrides(read_raw("params.yaml"), [
        *COMPETITION, f"simulate.size={size}", f"patches.size={patch}", f"model.input_size={patch}", *RECIPE,
        f"data.h5={work / 'sim.h5'}", f"data.truth={work / 'truth.h5'}", f"train.cache_dir={work / 'cache'}",
        *overrides])
    return raw


def bench_scale(scales: list[tuple[int, int]], work_root: Path, overrides: list[str], log=print) -> dict:
    results = {}
    for size, patch in scales:
        work = (work_root / f"{size}px-{patch}").resolve()
        (work / "out").mkdir(parents=True, exist_ok=True)
        raw = scale_params(work, size, patch, overrides)
        (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        log(f"scale {size}^2 slides, {patch}-px patches: {work}")
        costs = []
        for stage, command, outputs in stage_commands(work):
            seconds, peak = run_measured(command, log)
            costs.append(StageCost(stage, seconds, peak, disk_mb(*outputs)))
            log(f"  {stage}: {seconds:.1f} s, peak RSS {peak:.0f} MB, disk {costs[-1].disk_mb:.0f} MB")
        import pandas as pd

        spots = pd.read_csv(work / "patches" / "train_spots.csv")
        results[(size, patch)] = {"costs": costs, "train_spots": len(spots), "epochs": raw["train"]["epochs"],
                                  "backbone": raw["model"]["backbone"]}
    return results


def print_scale(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    scales = list(results)
    table = Table(title="stage cost per scale (slide edge px / patch px): seconds | peak RSS MB | disk MB")
    table.add_column("stage")
    for size, patch in scales:
        r = results[(size, patch)]
        table.add_column(f"{size} / {patch} ({r['train_spots']} spots)", justify="right")
    base = scales[0]
    if len(scales) > 1:
        table.add_column(f"time x, {scales[-1][0]}/{scales[-1][1]} vs {base[0]}/{base[1]}", justify="right")
    for i, cost in enumerate(results[base]["costs"]):
        row = [cost.stage]
        for scale in scales:
            c = results[scale]["costs"][i]
            row.append(f"{c.seconds:.1f} | {c.peak_rss_mb:.0f} | {c.disk_mb:.0f}")
        if len(scales) > 1:
            row.append(f"{results[scales[-1]]['costs'][i].seconds / max(cost.seconds, 1e-9):.1f}x")
        table.add_row(*row)
    console.print(table)
    last = results[scales[-1]]
    console.print(f"recipe: {last['backbone']}, whole patch at its own size, {last['epochs']} epochs per fold, "
                  "leave-one-slide-out CV; the trial's time includes its process start")


def main(argv: list[str] | None = None) -> None:
    """Internal stage of the scale bench: ``python -m src.bench.scale cache --patches P --params F``."""
    import argparse

    from src.bench.study import prebuild_cache
    from src.core.config import load_params
    from src.data.preprocessing.patch_set import load_patch_set

    parser = argparse.ArgumentParser(prog="python -m src.bench.scale")
    parser.add_argument("what", choices=["cache"])
    parser.add_argument("--patches", type=Path, required=True)
    parser.add_argument("--params", type=Path, required=True)
    args = parser.parse_args(argv)
    seconds = prebuild_cache(load_params(args.params), load_patch_set(args.patches, "train"))
    print(f"feature cache ready in {seconds:.1f} s")


if __name__ == "__main__":
    main()
