"""What stage ``tune`` leaves for the rest of the pipeline and for ``dvc exp show`` / ``dvc plots``.

``studies/best_params.yaml``  the best trial: study, trial number, CV score, the smoothing sigma its CV
                              chose and its searched values (stage ``train`` rebuilds its recipe from it;
                              DVC shows it as params columns)
``metrics/tune.json``         best CV score and its floor, trial counts, the study's name
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
from src.search.space import run_value


@dataclass(frozen=True)
class StageOutputs:
    best_params: Path
    metrics: Path
    cv_per_type: Path
    history: Path


def trial_counts(study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {state: sum(t.state.name.lower() == state for t in trials)
            for state in ("complete", "pruned", "fail", "running")}


def best_params_record(study) -> dict:
    best = study.best_trial
    return {"study": study.study_name, "trial": best.number, "cv_spearman": round(best.value, 6),
            "smoothing_sigma": best.user_attrs.get("smoothing_sigma"),
            "params": {name: run_value(value) for name, value in best.params.items()}}


def tune_metrics(study) -> dict:
    counts = trial_counts(study)
    best = study.best_trial
    return {"best_cv_spearman": round(best.value, 6), "floor_spearman": best.user_attrs.get("floor_spearman"),
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


def write_outputs(study, targets: list[str], out: StageOutputs) -> None:
    with atomic_path(out.best_params) as tmp:
        tmp.write_text(yaml.safe_dump(best_params_record(study), sort_keys=False))
    with atomic_path(out.metrics) as tmp:
        tmp.write_text(json.dumps(tune_metrics(study), indent=2) + "\n")
    write_csv(out.cv_per_type, cv_per_type_table(study, targets))
    write_csv(out.history, optimization_history(study))
