"""Stage ``evaluate``: predict the Test slide(s) with the trained checkpoint (TTA + smoothing).

Writes ``outputs/submission.csv`` (``ID,C1..C35``; ID = row of the test spot table),
``metrics/evaluate.json``, per-cell-type scores and two pictures. With a truth file (simulated data)
it also reports the test score, the floor (training mean profile), the ceiling (noise-free
expectation) and skill = (score - floor) / (ceiling - floor).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from src.checkpoint import load_checkpoint
from src.io_utils import write_csv, write_json
from src.data import PatchSet, load_patch_set
from src.errors import InputError, exit_on_input_error
from src.inference import predict_abundance
from src.metrics import competition_score, floor_score, per_type_spearman, skill
from src.report import per_type_bars, spatial_map


def read_truth(path: Path, spots: pd.DataFrame, split: str = "Test") -> tuple[np.ndarray, np.ndarray]:
    """(observed, noise-free expected) abundance of each row of ``spots`` from a truth file."""
    if not path.is_file():
        raise InputError(f"{path}: truth file not found (set data.truth to \"\" for data without one)")
    observed = expected = None
    with h5py.File(path, "r") as truth:
        for slide in spots["slide"].unique():
            key = f"{split}/{slide}"
            if key not in truth:
                raise InputError(f"{path}: no truth for slide {key}")
            rows = (spots["slide"] == slide).to_numpy()
            index = spots["spot"].to_numpy()[rows]
            slide_observed, slide_expected = truth[f"{key}/observed"][()], truth[f"{key}/expected"][()]
            if observed is None:
                observed = np.zeros((len(spots), slide_observed.shape[1]))
                expected = np.zeros_like(observed)
            observed[rows], expected[rows] = slide_observed[index], slide_expected[index]
    return observed, expected


def submission(pred: np.ndarray, names: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(pred, columns=names)
    frame.insert(0, "ID", np.arange(len(frame)))
    return frame


def evaluate(model_path: Path, patches: Path, truth_path: Path | None, cv_metrics: dict,
             out_submission: Path, out_metrics: Path, out_per_type: Path, plots: Path) -> dict:
    model, meta = load_checkpoint(model_path)
    train_set = load_patch_set(patches, "train")
    test_set: PatchSet = load_patch_set(patches, "test")
    if test_set.targets != meta["targets"]:
        raise InputError(f"{patches}: cell types differ from the checkpoint's {model_path}")
    pred = predict_abundance(model, meta, test_set)
    write_csv(out_submission, submission(pred, meta["targets"]))

    metrics = {"cv_spearman": cv_metrics.get("cv_spearman"),
               "cv_floor_spearman": cv_metrics.get("cv_floor_spearman"),
               "floor_spearman": cv_metrics.get("cv_floor_spearman")}
    per_type = pd.DataFrame({"cell_type": meta["targets"]})
    true = None
    if truth_path is not None:
        true, expected = read_truth(truth_path, test_set.spots)
        score = competition_score(pred, true)
        floor = floor_score(train_set.abundance, true)
        ceiling = competition_score(expected, true)
        metrics.update(test_spearman=score, floor_spearman=floor, ceiling_spearman=ceiling,
                       skill=skill(score, floor, ceiling))
        per_type["test_spearman"] = np.round(per_type_spearman(pred, true), 6)
    write_json(out_metrics, {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()})
    write_csv(out_per_type, per_type)

    plots.mkdir(parents=True, exist_ok=True)
    first = test_set.spots["slide"].iloc[0]
    rows = (test_set.spots["slide"] == first).to_numpy()
    spatial_map(plots / "spatial_map.png", test_set.xy()[rows], pred[rows], meta["targets"],
                None if true is None else true[rows], first)
    if "test_spearman" in per_type:
        per_type_bars(plots / "per_type_spearman.png", meta["targets"], per_type["test_spearman"].to_numpy(),
                      "test slide")
    return metrics


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    from src.config import load_params

    parser = argparse.ArgumentParser(prog="python -m src.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"))
    parser.add_argument("--patches", type=Path, default=Path("data/patches"))
    parser.add_argument("--tune-metrics", type=Path, default=Path("metrics/tune.json"),
                        help="the study's metrics (best CV score and its floor)")
    parser.add_argument("--submission", type=Path, default=Path("outputs/submission.csv"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/evaluate.json"))
    parser.add_argument("--per-type", type=Path, default=Path("metrics/per_type.csv"))
    parser.add_argument("--plots", type=Path, default=Path("plots"))
    parser.add_argument("--params", default="params.yaml", help="params file (reads data.truth)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    tune = json.loads(args.tune_metrics.read_text()) if args.tune_metrics.is_file() else {}
    cv = {"cv_spearman": tune.get("best_cv_spearman"), "cv_floor_spearman": tune.get("floor_spearman")}
    truth = Path(params.data.truth) if params.data.truth else None
    m = evaluate(args.model, args.patches, truth, cv, args.submission, args.metrics, args.per_type, args.plots)
    print("  ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)))


if __name__ == "__main__":
    main()
