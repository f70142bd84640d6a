"""Stage ``evaluate``: predict the Test slide(s) with the trained checkpoint (TTA + smoothing).

Writes ``outputs/submission.csv`` (``ID`` = row of the test spot table, then one column per cell type),
``metrics/evaluate.json`` (the study's CV score and floor), per-cell-type scores and two pictures
(the prediction map of the first test slide and per-type bars). Without a truth file (the competition's
data) the per-type figures are the best trial's out-of-fold ones. With one it also reports the test
score and the floor (training mean profile), per type too; a simulated truth file adds the ceiling
(noise-free expectation) and skill = (score - floor) / (ceiling - floor).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from src.core.config import load_params
from src.core.errors import InputError, exit_on_input_error
from src.core.files import write_csv, write_json
from src.data.patch_set import PatchSet, load_patch_set
from src.data.truth import read_truth
from src.engine.inference import predict_abundance
from src.engine.metrics import competition_score, floor_score, per_type_spearman, skill
from src.model.checkpoint import load_checkpoint
from src.report.plots import per_type_bars, spatial_map


def read_cv_per_type(path: Path) -> pd.Series:
    """The best trial's out-of-fold Spearman per cell type (written by the tune stage)."""
    if not path.is_file():
        raise InputError(f"{path}: not found (run `python -m src.tune` or `dvc repro tune` first)")
    table = pd.read_csv(path)
    if not {"cell_type", "cv_spearman"} <= set(table.columns):
        raise InputError(f"{path}: expected columns cell_type, cv_spearman")
    return table.set_index("cell_type")["cv_spearman"]


def submission(pred: np.ndarray, names: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(pred, columns=names)
    frame.insert(0, "ID", np.arange(len(frame)))
    return frame


def evaluate(model_path: Path, patches: Path, truth_path: Path | None, cv_metrics: dict,
             cv_per_type: pd.Series, out_submission: Path, out_metrics: Path, out_per_type: Path,
             plots: Path) -> dict:
    """Predict the test slides and write every declared output; test scores only with a truth file.

    Without one (real data), the metrics are the study's CV figures, and the per-type table and chart
    hold the best trial's out-of-fold scores."""
    model, meta = load_checkpoint(model_path)
    test_set: PatchSet = load_patch_set(patches, "test")
    if test_set.targets != meta["targets"]:
        raise InputError(f"{patches}: cell types differ from the checkpoint's {model_path}")
    if list(cv_per_type.index) != meta["targets"]:
        raise InputError(f"per-type CV scores name other cell types than the checkpoint {model_path} "
                         "(rerun the tune stage)")
    cv_per_type = cv_per_type.to_numpy(np.float64)
    true = expected = None
    if truth_path is not None:  # read (and checked) before anything is written
        true, expected = read_truth(truth_path, test_set.spots, meta["targets"])
        train_set = load_patch_set(patches, "train")  # for the floor
    pred = predict_abundance(model, meta, test_set)

    metrics = {"cv_spearman": cv_metrics.get("cv_spearman"),
               "cv_floor_spearman": cv_metrics.get("cv_floor_spearman"),
               "n_test_spots": len(test_set.spots)}
    per_type = pd.DataFrame({"cell_type": meta["targets"], "cv_spearman": np.round(cv_per_type, 6)})
    series = {"out-of-fold CV": cv_per_type}
    if true is not None:
        score = competition_score(pred, true)
        floor = floor_score(train_set.abundance, true)
        metrics.update(test_spearman=score, floor_spearman=floor)
        if expected is not None:  # simulated data: the noise ceiling and the skill between the two
            ceiling = competition_score(expected, true)
            metrics.update(ceiling_spearman=ceiling, skill=skill(score, floor, ceiling))
        per_type["test_spearman"] = np.round(per_type_spearman(pred, true), 6)
        series["test slide"] = per_type["test_spearman"].to_numpy()

    first = test_set.spots["slide"].iloc[0]
    rows = (test_set.spots["slide"] == first).to_numpy()
    spatial_map(plots / "spatial_map.png", test_set.xy()[rows], pred[rows], meta["targets"],
                None if true is None else true[rows], first)
    per_type_bars(plots / "per_type_spearman.png", meta["targets"], series)
    write_csv(out_per_type, per_type)
    write_json(out_metrics, {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()})
    write_csv(out_submission, submission(pred, meta["targets"]))
    return metrics


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"))
    parser.add_argument("--patches", type=Path, default=Path("data/patches"))
    parser.add_argument("--tune-metrics", type=Path, default=Path("metrics/tune.json"),
                        help="the study's metrics (best CV score and its floor)")
    parser.add_argument("--cv-per-type", type=Path, default=Path("metrics/cv_per_type.csv"),
                        help="the best trial's out-of-fold Spearman per cell type (tune stage)")
    parser.add_argument("--submission", type=Path, default=Path("outputs/submission.csv"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/evaluate.json"))
    parser.add_argument("--per-type", type=Path, default=Path("metrics/per_type.csv"))
    parser.add_argument("--plots", type=Path, default=Path("plots"))
    parser.add_argument("--params", default="params.yaml", help="params file (reads data.truth)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if not args.tune_metrics.is_file():
        raise InputError(f"{args.tune_metrics}: not found (run `python -m src.tune` or `dvc repro tune` first)")
    tune = json.loads(args.tune_metrics.read_text())
    cv = {"cv_spearman": tune.get("delivered_cv_spearman", tune.get("best_cv_spearman")),
          "cv_floor_spearman": tune.get("floor_spearman")}
    truth = Path(params.data.truth) if params.data.truth else None
    m = evaluate(args.model, args.patches, truth, cv, read_cv_per_type(args.cv_per_type),
                 args.submission, args.metrics, args.per_type, args.plots)
    print("  ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)))


if __name__ == "__main__":
    main()
