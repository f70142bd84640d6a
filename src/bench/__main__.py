"""Benchmarks that print figures: ``python -m src.bench stain``, ``trial``, ``study``, ``data``, ``search``,
``capacity``, ``scale``, ``import``, ``wsi``, ``coordinates`` and ``encoders`` (each described in its module:
``src.bench.stain``, ``trial``, ``study``, ``data``, ``search``, ``capacity``, ``scale``, ``wsi_import``,
``wsi_predict``, ``wsi_coordinates``, ``encoders``).
"""
from __future__ import annotations

import argparse
import typing
from pathlib import Path

from src.core.sections import SimulationFamily


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
    search = sub.add_parser("search", help="hand-set vs tuned recipe on the test slide, per data family and seed")
    families = list(typing.get_args(SimulationFamily))
    search.add_argument("--families", nargs="+", default=families, choices=families,
                        help="simulate.family values (default all)")
    search.add_argument("--seeds", type=int, nargs="+", default=[12, 13, 14], help="simulate.seed values")
    search.add_argument("--trials", type=int, default=None, help="trials per study (default: tune.trials)")
    search.add_argument("--work", type=Path, default=Path("cache/bench-search"),
                        help="work folder (data, studies and caches per seed; reused when rerun)")
    search.add_argument("--replay", action="store_true",
                        help="run the studies without pruning and replay every pruner over them")
    search.add_argument("--params", type=Path, default=Path("params.yaml"))
    search.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for every seed (repeatable)")
    search.add_argument("--report", action="store_true",
                        help="print the rows a finished run left in the work folder (result.json), running nothing")
    capacity = sub.add_parser("capacity", help="one CV fold per backbone recipe: score and time")
    capacity.add_argument("--patches", type=Path, default=Path("data/patches"), help="patch store (default data/patches)")
    capacity.add_argument("--fold", type=int, default=0, help="which training slide is held out (default 0)")
    capacity.add_argument("--cache-dir", default="cache/bench-capacity", help="feature cache and backbones folder")
    capacity.add_argument("--recipes", nargs="+", type=int, default=None, metavar="I",
                          help="which recipes of src.bench.capacity.RECIPES to run, by position (default all)")
    capacity.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override params for every recipe (repeatable)")
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
    wsi = sub.add_parser("import", help="time and peak memory of importing scanner slides of growing size")
    wsi.add_argument("--edges", nargs="+", type=int, default=[10000, 20000, 40000],
                     help="slide edges in px at 0.25 um/px (default 10000 20000 40000)")
    wsi.add_argument("--work", type=Path, default=Path("cache/bench-import"), help="work folder")
    encoders = sub.add_parser("encoders", help="embedding images/s, peak memory and cache bytes per spot of encoders")
    encoders.add_argument("--encoders", nargs="+", default=["resnet10t", "convnext_small", "uni"],
                          help="presets or timm names, at random weights (default resnet10t convnext_small uni)")
    encoders.add_argument("--batch", type=int, default=16, help="images a batch (default 16)")
    encoders.add_argument("--seconds", type=float, default=20.0, help="timed seconds an encoder (default 20)")
    encoders.add_argument("--input-size", type=int, default=32,
                          help="px for encoders without their own size (resnet10t: the pipeline's 32)")
    encoders.add_argument("--spots", type=int, default=0, help="project a first cache build for this many spots")
    predict = sub.add_parser("wsi", help="time, spots/s and peak memory of predicting H&E whole slides of growing size")
    predict.add_argument("--edges", nargs="+", type=int, default=[10000, 20000, 40000],
                         help="slide edges in px (default 10000 20000 40000)")
    predict.add_argument("--um-per-px", type=float, default=0.25, help="the slides' pixel size (default 0.25)")
    predict.add_argument("--model", type=Path, default=Path("models/model.pt"),
                         help="checkpoint (default models/model.pt)")
    predict.add_argument("--work", type=Path, default=None,
                         help="folder for the slides, removed after (default: a temporary one)")
    coordinates = sub.add_parser("coordinates", help="map metric of H&E-only predictions: fused coordinates or none")
    coordinates.add_argument("--slides", type=int, default=4, help="held-out slides (default 4)")
    coordinates.add_argument("--model", type=Path, default=Path("models/model.pt"), help="the delivered checkpoint")
    coordinates.add_argument("--best", type=Path, default=Path("studies/best_params.yaml"),
                             help="the study's best recipe, retrained with its fusion and with none")
    coordinates.add_argument("--ensemble", type=Path, default=Path("studies/ensemble.yaml"),
                             help="what the study delivers, retrained with fusion none")
    coordinates.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.what == "encoders":
        from src.bench.encoders import report, run

        report(run(args.encoders, args.batch, args.seconds, args.input_size), args.spots)
    elif args.what == "coordinates":
        from src.bench.wsi_coordinates import report, run

        report(*run(args.slides, args.model, args.best, args.ensemble, args.work))
    elif args.what == "import":
        from src.bench.wsi_import import report, run

        report(run(sorted(args.edges), args.work))
    elif args.what == "wsi":
        from src.bench.wsi_predict import report, run

        report(run(sorted(args.edges), args.model, args.um_per_px, args.work), args.model, args.um_per_px)
    elif args.what == "scale":
        from src.bench.scale import bench_scale, print_scale

        scales = [tuple(int(v) for v in text.split("x")) for text in args.scales]
        print_scale(bench_scale(scales, args.work, args.set))
    elif args.what == "capacity":
        from src.bench.capacity import RECIPES, bench_capacity, print_capacity

        names = [list(RECIPES)[i] for i in args.recipes] if args.recipes else None
        print_capacity(bench_capacity(args.patches, args.fold, args.set, args.cache_dir, names))
    elif args.what == "study":
        from src.bench.study import bench_study, print_study

        print_study(bench_study(args.trials, args.patches, args.set, args.work))
    elif args.what == "search":
        if args.report:
            from src.bench.search_results import print_stored_results

            print_stored_results(args.work, args.families, args.seeds)
        else:
            from src.bench.search import bench_search

            bench_search(args.families, args.seeds, args.params, args.set, args.work, args.trials, args.replay)
    elif args.what == "data":
        from src.bench.data import bench_data, print_data

        print_data(*bench_data(args.set, args.h5))
    elif args.what == "stain":
        from src.bench.stain import bench_stain, print_stain

        print_stain(bench_stain(args.size, args.repeats), args.size)
    else:
        import shutil

        from src.bench.trial import bench_pruning, bench_trial, print_trial

        shutil.rmtree(args.cache_dir, ignore_errors=True)  # the first cached run builds it
        results = None if args.pruning_only else bench_trial(args.set, args.patches, args.cache_dir)
        pruning = bench_pruning(args.set, args.patches, args.cache_dir, args.study_trials) if args.study_trials else None
        print_trial(results, pruning)


if __name__ == "__main__":
    main()
