"""Stage ``tune``: an Optuna study over the recipe, scored by spatial-CV Spearman.

``python -m src.tune --trials N [--study NAME] [--storage URL] [--timeout S] [--set key=value ...]``

The search space is ``tune.space`` in params.yaml; ``src.search.space.suggest`` turns a trial into a
full config. The hand-set params.yaml recipe is the first trial, so the search never starts worse than
it; a new study then runs the best recipes of earlier studies of the same name
(``src.search.warm_start``). Each trial scores its out-of-fold predictions with every smoothing sigma
of ``tune.sigma_grid`` and keeps the best, reports each CV fold to the pruner (``src.search.pruning``),
records fold scores, per-type scores, its sigma, epochs, wall time and the floor, and uploads a per-type
bar chart and its OOF table as artifacts (``src.search.objective``). ``--trials`` is the study's target of
finished (complete + pruned) trials: rerunning after an interruption runs only the missing ones. The
stored study name is ``NAME-<hash>`` of the recipe, the training data and the trial code
(``src.search.identity``): changing any of them starts a fresh study. Under ``dvc exp run`` the study
records the experiment's name (user attribute ``dvc_experiments``; each trial: ``dvc_experiment``).
Relative storage, artifact and cache paths lie under the repository root, so queued experiments share
them (``src.core.locations``). Writes the outputs of ``src.search.outputs``: best params (with the
sigma), metrics (naming the study), per-type CV and optimization history.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from src.core.config import apply_overrides, params_from_dict, read_raw
from src.core.errors import InputError, exit_on_input_error
from src.core.locations import shared_path, shared_storage_url
from src.data.preprocessing.patch_set import load_patch_set
from src.search.display import print_summary
from src.search.objective import INTERRUPT
from src.search.outputs import StageOutputs, trial_counts, write_outputs
from src.search.selection import describe_selection, select
from src.search.space import parse_space
from src.search.storage import create_storage, fail_running_trials
from src.search.study import ARTIFACT_DIR, DEFAULT_STORAGE, STUDIES_DIR, load_existing_study, run_study


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.tune", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog="Resume: rerun the same command; finished trials are kept, interrupted ones rerun.")
    parser.add_argument("--trials", type=int, default=None,
                        help="target number of finished (complete + pruned) trials in the study; "
                             "default: tune.trials")
    parser.add_argument("--study", default=None, help="study name (default: tune.study)")
    parser.add_argument("--storage", default=None,
                        help="Optuna storage URL: sqlite:///..., postgresql://user@host/db, journal:PATH "
                             f"(default: tune.storage, else {DEFAULT_STORAGE})")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds after which no new trial starts (default: tune.timeout_s; 0 = none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one param for this study, e.g. train.epochs=2 (repeatable)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--patches", type=Path, default=Path("data/patches"), help="patch store")
    parser.add_argument("--best-out", type=Path, default=STUDIES_DIR / "best_params.yaml")
    parser.add_argument("--ensemble-out", type=Path, default=STUDIES_DIR / "ensemble.yaml",
                        help="what stage train delivers: the best trial or the selected ensemble of trials")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/tune.json"))
    parser.add_argument("--cv-per-type", type=Path, default=Path("metrics/cv_per_type.csv"),
                        help="the delivered model's nested out-of-fold Spearman across spots per cell type (CSV)")
    parser.add_argument("--history", type=Path, default=Path("metrics/optimization_history.csv"),
                        help="value and best value so far of every complete trial (CSV)")
    parser.add_argument("--artifacts", type=Path, default=ARTIFACT_DIR,
                        help="artifact store folder (trial pictures and OOF tables); relative storage and "
                             "artifact paths lie under the repository root (DVC_ROOT), also in queued experiments")
    parser.add_argument("--fail-trial", type=int, action="append", default=[], metavar="N",
                        help="mark RUNNING trial N (left by a worker that died without a heartbeat, e.g. "
                             "on journal storage) FAIL, queue its retry and exit (repeatable)")
    return parser


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    base_raw = apply_overrides(read_raw(args.params), args.set)
    params = params_from_dict(base_raw)
    parse_space(params.tune.space)  # a bad space fails here, before any data is read
    n_trials = params.tune.trials if args.trials is None else args.trials
    if n_trials < 1:
        raise InputError(f"--trials {n_trials}: must be at least 1")
    study_name = args.study or params.tune.study
    storage = shared_storage_url(args.storage or params.tune.storage or DEFAULT_STORAGE)
    timeout = params.tune.timeout_s if args.timeout is None else args.timeout
    patch_set = load_patch_set(args.patches, "train")
    if args.fail_trial:
        fail_running_trials(*load_existing_study(base_raw, patch_set, study_name, storage), args.fail_trial)
        return
    INTERRUPT.install()
    try:
        study = run_study(base_raw, patch_set, n_trials, study_name, storage, timeout, shared_path(args.artifacts))
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are kept in the study; rerun the same command to resume")
        raise SystemExit(130) from None
    print_summary(study)
    if trial_counts(study)["complete"] == 0:
        reasons = [t.user_attrs["fail_reason"] for t in study.trials if "fail_reason" in t.user_attrs]
        raise InputError(f"study {study_name!r}: no trial completed, so there is no best recipe"
                         + (f" (the last failure: {reasons[-1]})" if reasons else ""))
    selection = select(study, create_storage(storage, params.tune.heartbeat_s),
                       shared_path(args.artifacts), patch_set, base_raw,
                       params.tune.ensemble_size)
    print(describe_selection(selection))
    write_outputs(study, patch_set.targets, StageOutputs(args.best_out, args.metrics, args.cv_per_type, args.history,
                                                         args.ensemble_out), selection)


if __name__ == "__main__":
    main()
