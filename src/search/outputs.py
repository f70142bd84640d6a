"""What stage ``tune`` leaves for the rest of the pipeline and for ``dvc exp show`` / ``dvc plots``.

``studies/best_params.yaml``  the best trial: study, trial number, CV score, the smoothing sigma its CV
                              chose and its searched values, and what is delivered (DVC shows it as
                              params columns)
``studies/ensemble.yaml``     what stage ``train`` delivers (``src.search.selection``): the best trial, or
                              the trials of the selected ensemble with their weights, sigmas and values
``metrics/tune.json``         the delivered choice's nested CV score (``cv_spearman``, the honest headline)
                              and map score with their floors; the upward-biased figures of the selection
                              under ``biased_upward``; trial counts, the study's name
``metrics/cv_per_type.csv``   the delivered choice's nested out-of-fold Spearman across spots, per cell type
``metrics/optimization_history.csv``  every complete trial's CV score, the best so far, and its map score
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
    nested = selection.nested
    metrics = {"cv_spearman": round(selection.cv, 6), "floor_spearman": best.user_attrs.get("floor_spearman"),
               "cv_map_spearman": _round(selection.cv_map), "map_floor_spearman": best.user_attrs.get("map_floor_spearman"),
               "delivered": delivered_label(selection), "delivered_members": len(selection.members)}
    if nested is not None:
        metrics.update(nested_best_trial_spearman=round(nested.single, 6),
                       nested_ensemble_spearman=round(nested.ensemble, 6))
    metrics["biased_upward"] = {"best_trial_cv_spearman": round(best.value, 6),
                                "ensemble_oof_spearman": round(selection.cv_ensemble, 6)}
    metrics.update(n_complete=counts["complete"], n_pruned=counts["pruned"], n_failed=counts["fail"],
                   best_trial=best.number, smoothing_sigma=best.user_attrs.get("smoothing_sigma"),
                   study=study.study_name)
    return metrics


def _round(value: float) -> float | None:
    return round(value, 6) if value == value else None  # nan (no OOF tables): null in JSON


def cv_per_type_table(selection: Selection, targets: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"cell_type": targets, "cv_spearman": [_round(float(v)) for v in selection.cv_per_type]})


def optimization_history(study) -> pd.DataFrame:
    """Complete trials in order: their CV Spearman, the best one so far (Optuna's optimization
    history, as a table DVC can plot and compare across experiments) and their map score."""
    complete = sorted((t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"),
                      key=lambda t: t.number)
    values = [round(t.value, 6) for t in complete]
    best = pd.Series(values, dtype=float).cummax()
    return pd.DataFrame({"trial": [t.number for t in complete], "cv_spearman": values,
                         "best_cv_spearman": best.round(6).tolist(),
                         "map_spearman": [t.user_attrs.get("map_spearman") for t in complete]})


def write_outputs(study, targets: list[str], out: StageOutputs, selection: Selection) -> None:
    with atomic_path(out.best_params) as tmp:
        tmp.write_text(yaml.safe_dump(best_params_record(study, selection), sort_keys=False))
    with atomic_path(out.delivery) as tmp:
        tmp.write_text(yaml.safe_dump(delivery_record(study, selection), sort_keys=False))
    with atomic_path(out.metrics) as tmp:
        tmp.write_text(json.dumps(tune_metrics(study, selection), indent=2) + "\n")
    write_csv(out.cv_per_type, cv_per_type_table(selection, targets))
    write_csv(out.history, optimization_history(study))
