"""``python -m src.bench.gpu_check``: the GPU path at competition scale in one short run (README "GPU check").

Simulated competition-size data (6 + 1 slides of 2000 x 2000 px, about 8,300 training spots), patches
at 224 px, ``convnext_small`` fed its own 224 px, then a ViT-L/16 built as the ``uni`` preset (random
weights from a local file, frozen: pooled embeddings), bf16 autocast: the stages run through their own
command-line entry points, in this process, so the GPU's memory peak of each can be read. Prints per
stage the seconds, the GPU memory peak and images per second, then a projection for
``python -m src.tune --trials 100`` with each. ``deploy/gpu_check.sh`` (``make gpu-check``) installs the
project's remaining dependencies offline first. Without a CUDA device it says so and exits 1
(``--allow-cpu`` runs it anyway, for a smoke test at a small ``--size``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from src.bench.scale import scale_params

GOAL_MINUTES = 60  # a 100-trial study at competition scale on one H100


def _stage(rows: list[dict], name: str, fn, images: int = 0) -> None:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    rows.append({"stage": name, "seconds": seconds, "gpu_gb": peak, "images_per_s": images / seconds if images else 0})
    print(f"gpu-check: {name}: {seconds:.1f} s, GPU peak {peak:.1f} GiB"
          + (f", {images / seconds:.0f} images/s" if images else ""), flush=True)


def _trial_images(work: Path, study_name: str) -> list[tuple[float, int]]:
    """(seconds, training images) of each complete trial of a study in work/study.db."""
    import optuna

    from src.data.preprocessing.patch_set import load_patch_set

    n_train = len(load_patch_set(work / "patches", "train").spots)
    storage = f"sqlite:///{work}/study.db"
    names = [s for s in optuna.get_all_study_names(storage) if s.startswith(f"{study_name}-")]
    study = optuna.load_study(study_name=names[0], storage=storage)
    n_folds = len(study.trials[0].user_attrs.get("fold_spearman", [])) or 1
    out = []
    for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]):
        epochs_per_fold = t.user_attrs["epochs_run"] / n_folds
        out.append((t.user_attrs["seconds"], int(n_train * (n_folds - 1) * epochs_per_fold)))
    return out


def run_check(work: Path, trials: int, size: int, patch: int, overrides: list[str],
              vit_shrink: dict | None = None) -> list[dict]:
    from src import evaluate, normalize, patches, simulate, train, tune
    from src.bench import scale as bench_scale

    work = work.resolve()
    (work / "out").mkdir(parents=True, exist_ok=True)
    raw = scale_params(work, size, patch, overrides)
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    p = ["--params", str(params_file)]
    out, rows = work / "out", []

    def tune_args(name: str, n: int, *sets: str, params: list[str] = p) -> list[str]:
        return ["--trials", str(n), "--study", name, "--storage", f"sqlite:///{work}/study.db", "--patches",
                str(work / "patches"), "--best-out", str(out / f"{name}.yaml"), "--metrics", str(out / f"{name}.json"),
                "--cv-per-type", str(out / f"{name}.csv"), "--history", str(out / f"{name}-history.csv"),
                "--artifacts", str(work / "artifacts"), "--ensemble-out", str(out / f"{name}-ensemble.yaml"), *params,
                *[a for s in sets for a in ("--set", s)]]

    _stage(rows, "simulate", lambda: simulate.main(["--out", str(work / "sim.h5"), "--truth-out",
                                                     str(work / "truth.h5"), *p]))
    _stage(rows, "normalize", lambda: normalize.main(["--out", str(work / "normalized"), *p]))
    _stage(rows, "patches", lambda: patches.main(["--normalized", str(work / "normalized" / "slides.h5"),
                                                  "--out", str(work / "patches"), *p]))
    from src.data.preprocessing.patch_set import load_patch_set

    n_train = len(load_patch_set(work / "patches", "train").spots)
    _stage(rows, "feature cache build (8 dihedral variants; a cut per unfrozen count)",
           lambda: bench_scale.main(["cache", "--patches", str(work / "patches"), *p]), images=8 * n_train)
    _stage(rows, f"study, {trials} cached trials", lambda: tune.main(tune_args("gpu-check", trials)))
    cached = _trial_images(work, "gpu-check")
    rows[-1]["images_per_s"] = sum(i for _, i in cached) / sum(s for s, _ in cached)
    _stage(rows, "one uncached trial (hand-set recipe)",
           lambda: tune.main(tune_args("gpu-check-uncached", 1, "train.feature_cache=false")))
    uncached = _trial_images(work, "gpu-check-uncached")
    rows[-1]["images_per_s"] = sum(i for _, i in uncached) / sum(s for s, _ in uncached)
    _stage(rows, "train (the best recipe's fold models)",
           lambda: train.main(["--patches", str(work / "patches"), "--stain", str(work / "normalized" / "stain.json"),
                               "--out", str(work / "model.pt"), "--best", str(out / "gpu-check.yaml"), *p]))
    _stage(rows, "evaluate (TTA, smoothing)",
           lambda: evaluate.main(["--model", str(work / "model.pt"), "--patches", str(work / "patches"),
                                  "--tune-metrics", str(out / "gpu-check.json"), "--cv-per-type",
                                  str(out / "gpu-check.csv"), "--submission", str(out / "submission.csv"),
                                  "--metrics", str(out / "evaluate.json"), "--per-type", str(out / "per_type.csv"),
                                  "--plots", str(work / "plots"), *p]))
    # A pathology encoder's shape: ViT-L/16 as the uni preset builds it (LayerScale), random weights from a
    # local file, frozen (pooled embeddings cached), not trained per fold.
    vit_params = work / "params-vit-l.yaml"
    vit_params.write_text(yaml.safe_dump(scale_params(work, size, patch, [
        *overrides, "model.backbone=uni", f"model.weights={random_weights(work / 'vit-l-random', 'uni', vit_shrink)}",
        "model.unfrozen_blocks=0", "tune.space.model.unfrozen_blocks={low: 0, high: 0}"]), sort_keys=False))
    vit = ["--params", str(vit_params)]
    _stage(rows, "ViT-L/16 (uni preset, random weights): pooled feature cache (8 dihedral variants)",
           lambda: bench_scale.main(["cache", "--patches", str(work / "patches"), *vit]), images=8 * n_train)
    _stage(rows, f"ViT-L/16 study, {trials} cached trials", lambda: tune.main(tune_args("gpu-check-vit-l", trials,
                                                                                         params=vit)))
    vit_trials = _trial_images(work, "gpu-check-vit-l")
    rows[-1]["images_per_s"] = sum(i for _, i in vit_trials) / sum(s for s, _ in vit_trials)
    rows.append({"cached_trial_s": statistics.mean(s for s, _ in cached),
                 "uncached_trial_s": statistics.mean(s for s, _ in uncached),
                 "vit_trial_s": statistics.mean(s for s, _ in vit_trials), "n_train": n_train})
    return rows


def random_weights(folder: Path, preset: str, shrink: dict | None = None) -> Path:
    """A hub-style weights folder of ``preset``'s shape at random init (what a lab downloads), made
    smaller by ``shrink`` (architecture arguments, for a smoke test on a CPU)."""
    import json

    import timm
    from safetensors.torch import save_file

    from src.model.encoders import PRESETS, layer_args

    encoder = PRESETS[preset]
    args = {**encoder.args, **(shrink or {})}
    config = {"architecture": encoder.architecture, "model_args": args}
    if not (folder / "model.safetensors").is_file() or json.loads((folder / "config.json").read_text()) != config:
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = timm.create_model(encoder.architecture, pretrained=False, num_classes=0, **layer_args(args))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def print_report(rows: list[dict], device: str) -> None:
    from rich.console import Console
    from rich.table import Table

    summary, stages = rows[-1], rows[:-1]
    console = Console(width=120)
    table = Table(title=f"GPU check on {device}: {summary['n_train']} training spots")
    for column in ("stage", "seconds", "GPU peak GiB", "images/s"):
        table.add_column(column, justify="right")
    for r in stages:
        table.add_row(r["stage"], f"{r['seconds']:.1f}", f"{r['gpu_gb']:.1f}",
                      f"{r['images_per_s']:.0f}" if r["images_per_s"] else "")
    console.print(table)
    cache = next(r["seconds"] for r in stages if r["stage"].startswith("feature cache"))
    minutes = (cache + 100 * summary["cached_trial_s"]) / 60
    vit_cache = next(r["seconds"] for r in stages if r["stage"].startswith("ViT-L/16 (uni"))
    vit_minutes = (vit_cache + 100 * summary["vit_trial_s"]) / 60
    console.print(f"seconds per trial: cached {summary['cached_trial_s']:.1f}, uncached {summary['uncached_trial_s']:.1f} "
                  f"({summary['uncached_trial_s'] / summary['cached_trial_s']:.1f}x)")
    console.print(f"projection, python -m src.tune --trials 100 (no pruning): {minutes:.0f} min "
                  f"(goal: under {GOAL_MINUTES} min on one H100; the median pruner saves about a third)")
    console.print(f"projection, the same with model.backbone=uni (ViT-L/16, frozen, pooled embeddings): {vit_minutes:.0f} min "
                  f"({vit_cache / 60:.1f} min embedding, {summary['vit_trial_s']:.1f} s a trial)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu-check"), help="work folder")
    parser.add_argument("--trials", type=int, default=3, help="cached trials in the study (default 3)")
    parser.add_argument("--size", type=int, default=2000, help="slide edge in px (default 2000)")
    parser.add_argument("--patch", type=int, default=224, help="patch edge in px = backbone input (default 224)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a CUDA device (smoke test)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override params, e.g. train.epochs=2 (repeatable)")
    parser.add_argument("--vit-arg", action="append", default=[], metavar="KEY=INT",
                        help="shrink the ViT-L/16 for a smoke test, e.g. depth=1 (repeatable)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(f"gpu-check: torch {torch.__version__} sees no CUDA device on this machine: nothing to check "
              "(run it where a GPU is; --allow-cpu runs the same steps on the CPU)", file=sys.stderr)
        raise SystemExit(1)
    from src.core.devices import check_device, default_device
    from src.core.errors import InputError

    try:
        check_device(default_device())
    except InputError as err:
        print(f"gpu-check: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    overrides = ["model.backbone=convnext_small", "train.epochs=2", "tune.space.train.epochs={low: 2, high: 3}",
                 "tune.pruner=none", *args.set]
    shrink = {k: int(v) for k, v in (a.split("=", 1) for a in args.vit_arg)}
    rows = run_check(args.work, args.trials, args.size, args.patch, overrides, shrink)
    print_report(rows, torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")


if __name__ == "__main__":
    main()
