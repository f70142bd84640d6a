"""What stage ``train`` delivers from a study: the best trial, or an ensemble of trials selected on
their out-of-fold predictions (``src.engine.ensemble_selection``), whichever the nested CV scores higher,
and that nested CV's figures: the study's honest headline.

Each complete trial uploaded its OOF table (``trialN_oof.csv``, abundance scale, before smoothing);
here it is brought back to the trial's target space, smoothed with the sigma its CV chose (as the
trial was scored) and turned into log abundances, the scale the delivered prediction is made on.
``tune.ensemble_size`` rounds of greedy selection with replacement give the weights; the nested scores
decide between the ensemble and the best trial, so neither the winner's curse of the best CV nor the
selection's own fit to the OOF predictions is rewarded. The nested OOF predictions of the delivered
choice (each fold predicted by what was picked on the other folds) give ``cv_spearman``, the map score
and the per-type scores; the best trial's CV and the ensemble's OOF score are kept, named as the
upward-biased figures they are. ``tune.ensemble_size: 0`` delivers the best trial.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta

from src.data.preprocessing.patch_set import PatchSet
from src.engine.cross_validation import delivered_view
from src.engine.ensemble_selection import NestedScores, combine, greedy_selection, nested_scores
from src.engine.metrics import competition_score, map_per_type, types_mean
from src.model.targets import from_abundance_scale, rank_scale
from src.search.recipe import params_for_trial
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
    nested: NestedScores | None  # both procedures scored on folds they did not pick on (None: no OOF tables)
    candidates: int
    cv: float  # the delivered choice's nested CV score (the best trial's CV without OOF tables)
    cv_map: float  # its map score (nan without OOF tables)
    cv_per_type: np.ndarray  # its per-type map scores (T)


def oof_view(trial: optuna.trial.FrozenTrial, storage, store, patch_set: PatchSet, base_raw: dict
             ) -> tuple[np.ndarray, np.ndarray]:
    """(the trial's smoothed OOF predictions as log abundances, the fold of every spot)."""
    name = f"trial{trial.number}_oof.csv"
    metas = [m for m in get_all_artifact_meta(trial, storage=storage) if m.filename == name]
    if not metas:
        raise FileNotFoundError(f"trial {trial.number}: no {name} recorded")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        download_artifact(artifact_store=store, file_path=str(path), artifact_id=metas[-1].artifact_id)
        table = pd.read_csv(path)
    sigma = float(trial.user_attrs.get("smoothing_sigma", 0.0))
    params = params_for_trial(trial.params, sigma, base_raw, f"trial {trial.number}")
    values = from_abundance_scale(table[patch_set.targets].to_numpy(np.float64), params.loss.target_transform,
                                  rank_scale(patch_set.abundance))
    view = delivered_view(values, patch_set, params.loss, sigma, params.infer.smoothing_truncate)
    return view, table["fold"].to_numpy()


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
    """The delivered recipe(s) of ``study`` and their nested CV (see the module docstring); its trials'
    OOF tables are read from the artifact store in ``artifact_dir``."""
    store = FileSystemArtifactStore(str(artifact_dir))
    trials = candidates(study, budget)
    if not trials:
        raise ValueError("no complete trial to select from")
    best = trials[0]
    pairs, kept = [], []
    for t in trials:
        try:
            pairs.append(oof_view(t, storage, store, patch_set, base_raw))
            kept.append(t)
        except FileNotFoundError:  # uploaded to another artifact folder (another machine's worker)
            continue
    if not kept or kept[0].number != best.number:  # the best trial's predictions are elsewhere
        single, score = [_member(best, 1.0)], float(best.value)
        nan = np.full(len(patch_set.targets), np.nan)
        return Selection("single", single, single, best.number, score, score, None, len(trials), score, np.nan, nan)
    views, fold_of = [v for v, _ in pairs], pairs[0][1]
    scored = np.flatnonzero(fold_of >= 0)  # spots some fold validated (all, unless a buffer dropped some)
    truth, slides = patch_set.abundance[scored], patch_set.slides[scored]
    views = [v[scored] for v in views]
    rounds = rounds if len(kept) > 1 else 0
    weights = greedy_selection(views, truth, rounds) if rounds > 0 else np.eye(len(views))[0]
    ensemble = [_member(t, w) for t, w in zip(kept, weights) if w > 0]
    ensemble.sort(key=lambda m: -m.weight)
    cv_ensemble = competition_score(combine(views, weights), truth)
    nested = nested_scores(views, truth, fold_of[scored], rounds)
    take_ensemble = len(ensemble) > 1 and nested.ensemble > nested.single
    members = ensemble if take_ensemble else [_member(best, 1.0)]
    delivered_oof = nested.ensemble_oof if take_ensemble else nested.single_oof
    per_type = map_per_type(delivered_oof, truth, slides)
    return Selection("ensemble" if take_ensemble else "single", members, ensemble, best.number, float(best.value),
                     float(cv_ensemble), nested, len(trials), cv=competition_score(delivered_oof, truth),
                     cv_map=types_mean(per_type), cv_per_type=per_type)


def describe_selection(selection: Selection) -> str:
    """One line: what is delivered, why (the nested CV of both choices) and what it scores."""
    what = (f"the ensemble of {len(selection.members)} trials "
            + ", ".join(f"#{m.trial} x{m.weight:g}" for m in selection.members)
            if selection.delivered == "ensemble" else f"the best trial #{selection.best_trial}")
    if selection.nested is None:
        return (f"delivered: {what} (its OOF predictions lie in another artifact folder: CV {selection.cv:.4f} is "
                f"the best of {selection.candidates} complete trials, biased upward)")
    return (f"delivered: {what}: nested CV {selection.cv:.4f}, map {selection.cv_map:.4f} (nested CV of the best "
            f"trial {selection.nested.single:.4f}, of the ensemble {selection.nested.ensemble:.4f}; biased upward: "
            f"best trial's CV {selection.cv_best_trial:.4f}, ensemble OOF {selection.cv_ensemble:.4f}; over "
            f"{selection.candidates} complete trials)")
