"""What stage ``train`` delivers from a study: the best trial, or an ensemble of trials selected on
their out-of-fold predictions (``src.engine.ensemble_selection``), whichever the nested CV scores higher.

Each complete trial uploaded its OOF table (``trialN_oof.csv``, abundance scale, before smoothing);
here it is brought back to the trial's target space, smoothed with the sigma its CV chose (as the
trial was scored) and turned into within-spot ranks. ``tune.ensemble_size`` rounds of greedy selection
with replacement give the weights; the nested scores decide between the ensemble and the best trial,
so neither the winner's curse of the best CV nor the selection's own fit to the OOF predictions is
rewarded. ``tune.ensemble_size: 0`` delivers the best trial.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta

from src.data.patch_set import PatchSet
from src.engine.ensemble_selection import NestedScores, combine, greedy_selection, nested_scores, rank_view
from src.engine.metrics import competition_score
from src.engine.smoothing import smooth
from src.model.targets import from_abundance_scale
from src.search.space import run_value


@dataclass(frozen=True)
class Member:
    trial: int
    weight: float
    cv_spearman: float
    smoothing_sigma: float
    params: dict


@dataclass(frozen=True)
class Selection:
    delivered: str  # "ensemble" or "single"
    members: list[Member]  # what is delivered (one member, weight 1, for "single")
    ensemble: list[Member]  # the selected ensemble, delivered or not
    best_trial: int  # number of the best-CV trial
    cv_best_trial: float  # the best trial's CV score (the maximum of noisy scores: biased upward)
    cv_ensemble: float  # the selected ensemble's OOF score (selected on these predictions: biased upward)
    nested: NestedScores  # both procedures scored on folds they did not pick on
    candidates: int


def trial_recipe_value(trial: optuna.trial.FrozenTrial, name: str, base_raw: dict):
    section, key = name.split(".", 1)
    return trial.params.get(name, base_raw[section][key])


def oof_view(trial: optuna.trial.FrozenTrial, storage, store, patch_set: PatchSet, base_raw: dict
             ) -> tuple[np.ndarray, np.ndarray]:
    """(the trial's smoothed OOF predictions as within-spot ranks, the fold of every spot)."""
    name = f"trial{trial.number}_oof.csv"
    metas = [m for m in get_all_artifact_meta(trial, storage=storage) if m.filename == name]
    if not metas:
        raise FileNotFoundError(f"trial {trial.number}: no {name} recorded")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        download_artifact(artifact_store=store, file_path=str(path), artifact_id=metas[-1].artifact_id)
        table = pd.read_csv(path)
    values = table[patch_set.targets].to_numpy(np.float64)
    values = from_abundance_scale(values, trial_recipe_value(trial, "loss.target_transform", base_raw))
    sigma = float(trial.user_attrs.get("smoothing_sigma", 0.0))
    smoothed = smooth(values, patch_set.xy(), patch_set.slides, sigma, float(base_raw["infer"]["smoothing_truncate"]))
    return rank_view(smoothed), table["fold"].to_numpy()


def candidates(study: optuna.Study, budget: int | None = None) -> list[optuna.trial.FrozenTrial]:
    """Complete trials, best CV first; with ``budget``, only those among the first ``budget`` finished."""
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")]
    finished.sort(key=lambda t: t.number)
    if budget is not None:
        finished = finished[:budget]
    return sorted((t for t in finished if t.state.name == "COMPLETE"), key=lambda t: (-t.value, t.number))


def _member(trial: optuna.trial.FrozenTrial, weight: float) -> Member:
    return Member(trial=trial.number, weight=round(float(weight), 6), cv_spearman=round(float(trial.value), 6),
                  smoothing_sigma=float(trial.user_attrs.get("smoothing_sigma", 0.0)),
                  params={k: run_value(v) for k, v in trial.params.items()})


def select(study: optuna.Study, storage, artifact_dir: Path, patch_set: PatchSet, base_raw: dict, rounds: int,
           budget: int | None = None) -> Selection:
    """The delivered recipe(s) of ``study`` (see the module docstring); its trials' OOF tables are read
    from the artifact store in ``artifact_dir``."""
    store = FileSystemArtifactStore(str(artifact_dir))
    trials = candidates(study, budget)
    if not trials:
        raise ValueError("no complete trial to select from")
    best = trials[0]
    pairs, kept = [], []
    for t in trials if rounds > 0 else []:
        try:
            pairs.append(oof_view(t, storage, store, patch_set, base_raw))
            kept.append(t)
        except FileNotFoundError:  # uploaded to another artifact folder (another machine's worker)
            continue
    if len(kept) < 2 or kept[0].number != best.number:  # nothing to select from: the best trial
        single, score = [_member(best, 1.0)], float(best.value)
        return Selection("single", single, single, best.number, score, score, NestedScores(score, score),
                         len(trials))
    trials = kept
    views, fold_of = [v for v, _ in pairs], pairs[0][1]
    scored = np.flatnonzero(fold_of >= 0)  # spots some fold validated (all, unless a buffer dropped some)
    truth = patch_set.abundance
    weights = greedy_selection(views, truth, rounds, scored)
    ensemble = [_member(t, w) for t, w in zip(trials, weights) if w > 0]
    ensemble.sort(key=lambda m: -m.weight)
    cv_ensemble = competition_score(combine([v[scored] for v in views], weights), truth[scored])
    nested = nested_scores([v[scored] for v in views], truth[scored], fold_of[scored], rounds)
    take_ensemble = len(ensemble) > 1 and nested.ensemble > nested.single
    members = ensemble if take_ensemble else [_member(best, 1.0)]
    return Selection("ensemble" if take_ensemble else "single", members, ensemble, best.number, float(best.value),
                     float(cv_ensemble), nested, len(trials))


def describe_selection(selection: Selection) -> str:
    """One line: what is delivered and why (the nested CV of both choices)."""
    what = (f"the ensemble of {len(selection.members)} trials "
            + ", ".join(f"#{m.trial} x{m.weight:g}" for m in selection.members)
            if selection.delivered == "ensemble" else f"the best trial #{selection.best_trial}")
    return (f"delivered: {what} (nested CV: best trial {selection.nested.single:.4f}, ensemble "
            f"{selection.nested.ensemble:.4f}; best trial's CV {selection.cv_best_trial:.4f}, ensemble OOF "
            f"{selection.cv_ensemble:.4f}, over {selection.candidates} complete trials)")
