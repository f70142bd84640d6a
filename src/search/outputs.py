"""What stage ``tune`` leaves for the rest of the pipeline and for ``dvc exp show`` / ``dvc plots``.

``studies/best_params.yaml``  the best trial: study, trial number, CV score, the smoothing sigma its CV
                              chose and its searched values, and what is delivered (DVC shows it as
                              params columns)
``studies/ensemble.yaml``     what stage ``train`` delivers (``src.search.selection``): the best trial, or
                              the trials of the selected ensemble with their weights, sigmas and values
``metrics/tune.json``         best CV score and its floor, the delivered choice with its CV and nested CV
                              scores, trial counts, the study's name
``metrics/cv_per_type.csv``   the best trial's out-of-fold Spearman per cell type
``metrics/optimization_history.csv``  every complete trial's CV score and the best so far
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from src.core.files import atomic_path, write_csv
from src.search.selection import Selection
from src.search.space import run_value


@dataclass(frozen=True)
class StageOutputs:
    best_params: Path
    metrics: Path
    cv_per_type: Path
    history: Path
    delivery: Path


def trial_counts(study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {state: sum(t.state.name.lower() == state for t in trials)
            for state in ("complete", "pruned", "fail", "running")}


def delivered_label(selection: Selection) -> str:
    """``best trial 7`` or ``ensemble of trials 7 (0.65), 3 (0.25), 11 (0.1)``: one params column."""
    if selection.delivered == "single":
        return f"best trial {selection.members[0].trial}"
    return "ensemble of trials " + ", ".join(f"{m.trial} ({m.weight:g})" for m in selection.members)


def best_params_record(study, selection: Selection) -> dict:
    best = study.best_trial
    return {"study": study.study_name, "trial": best.number, "cv_spearman": round(best.value, 6),
            "smoothing_sigma": best.user_attrs.get("smoothing_sigma"),
            "params": {name: run_value(value) for name, value in best.params.items()},
            "delivered": delivered_label(selection)}


def delivery_record(study, selection: Selection) -> dict:
    return {"study": study.study_name, "delivered": selection.delivered,
            "members": [{"trial": m.trial, "weight": m.weight, "cv_spearman": m.cv_spearman,
                         "smoothing_sigma": m.smoothing_sigma, "params": m.params} for m in selection.members]}


def tune_metrics(study, selection: Selection) -> dict:
    counts = trial_counts(study)
    best = study.best_trial
    delivered_cv = selection.cv_ensemble if selection.delivered == "ensemble" else selection.cv_best_trial
    nested = selection.nested.ensemble if selection.delivered == "ensemble" else selection.nested.single
    return {"best_cv_spearman": round(best.value, 6), "floor_spearman": best.user_attrs.get("floor_spearman"),
            "delivered": delivered_label(selection), "delivered_members": len(selection.members),
            "delivered_cv_spearman": round(delivered_cv, 6), "nested_cv_spearman": round(nested, 6),
            "nested_best_trial_spearman": round(selection.nested.single, 6),
            "nested_ensemble_spearman": round(selection.nested.ensemble, 6),
            "ensemble_oof_spearman": round(selection.cv_ensemble, 6),
            "n_complete": counts["complete"], "n_pruned": counts["pruned"], "n_failed": counts["fail"],
            "best_trial": best.number, "smoothing_sigma": best.user_attrs.get("smoothing_sigma"),
            "study": study.study_name}


def cv_per_type_table(study, targets: list[str]) -> pd.DataFrame:
    scores = study.best_trial.user_attrs.get("per_type_spearman", {})
    return pd.DataFrame({"cell_type": targets, "cv_spearman": [scores.get(t, float("nan")) for t in targets]})


def optimization_history(study) -> pd.DataFrame:
    """Complete trials in order: their CV Spearman and the best one so far (Optuna's optimization
    history, as a table DVC can plot and compare across experiments)."""
    complete = sorted((t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"),
                      key=lambda t: t.number)
    values = [round(t.value, 6) for t in complete]
    best = pd.Series(values, dtype=float).cummax()
    return pd.DataFrame({"trial": [t.number for t in complete], "cv_spearman": values,
                         "best_cv_spearman": best.round(6).tolist()})


def write_outputs(study, targets: list[str], out: StageOutputs, selection: Selection) -> None:
    with atomic_path(out.best_params) as tmp:
        tmp.write_text(yaml.safe_dump(best_params_record(study, selection), sort_keys=False))
    with atomic_path(out.delivery) as tmp:
        tmp.write_text(yaml.safe_dump(delivery_record(study, selection), sort_keys=False))
    with atomic_path(out.metrics) as tmp:
        tmp.write_text(json.dumps(tune_metrics(study, selection), indent=2) + "\n")
    write_csv(out.cv_per_type, cv_per_type_table(study, targets))
    write_csv(out.history, optimization_history(study))
