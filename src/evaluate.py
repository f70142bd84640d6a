"""Stage ``evaluate``: predict the Test slide(s) with the trained checkpoint (TTA + smoothing).

Writes ``outputs/submission.csv`` (``ID`` = row of the test spot table, then one column per cell type,
abundances), ``metrics/evaluate.json``, per-cell-type scores and pictures: the per-type bars and a map
per test slide (``plots/maps/<slide>.png``, on its tissue). The metrics always hold the study's nested CV
of the delivered model, per spot (``cv_spearman``) and per map (``cv_map_spearman``), with their floors.
With a truth file they add the test slides' scores: the competition score and its floor (training
mean profile), the map score and its floor (the spots' positions alone), per type too; a simulated
truth file adds the ceilings (noise-free expectation) and skill = (score - floor) / (ceiling - floor).
A file without Test slides gets the CV figures only, an empty submission and no map, and says so.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from src.core.config import load_params
from src.core.errors import InputError, exit_on_input_error
from src.core.files import atomic_path, write_csv, write_json
from src.data.preprocessing.patch_set import PatchSet, has_split, load_patch_set
from src.data.slides.truth import read_truth
from src.engine.inference import predict_abundance
from src.engine.metrics import competition_score, floor_score, map_per_type, map_score, position_floor, skill
from src.model.checkpoint import load_checkpoint
from src.report.plots import per_type_bars, spatial_map

CV_KEYS = {"cv_spearman": "cv_spearman", "cv_floor_spearman": "floor_spearman",
           "cv_map_spearman": "cv_map_spearman", "cv_map_floor_spearman": "map_floor_spearman"}  # <- tune.json


def read_cv_per_type(path: Path) -> pd.Series:
    """The delivered model's nested out-of-fold Spearman per cell type (written by the tune stage)."""
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


def test_scores(pred: np.ndarray, test_set: PatchSet, train_set: PatchSet, true: np.ndarray,
                expected: np.ndarray | None) -> dict:
    """The test slides' competition and map scores with their floors (and ceilings, with an expectation)."""
    slides = test_set.slides
    positions = position_floor(train_set.coords(), train_set.abundance, test_set.coords())
    scores = {"test_spearman": competition_score(pred, true), "floor_spearman": floor_score(train_set.abundance, true),
              "map_spearman": map_score(pred, true, slides), "map_floor_spearman": map_score(positions, true, slides)}
    if expected is not None:  # simulated data: the noise ceilings and the skill between floor and ceiling
        scores.update(ceiling_spearman=competition_score(expected, true),
                      map_ceiling_spearman=map_score(expected, true, slides))
        scores["skill"] = skill(scores["test_spearman"], scores["floor_spearman"], scores["ceiling_spearman"])
    return scores


def evaluate(model_path: Path, patches: Path, truth_path: Path | None, cv_metrics: dict,
             cv_per_type: pd.Series, out_submission: Path, out_metrics: Path, out_per_type: Path,
             plots: Path, log=print) -> dict:
    """Predict the test slides and write every declared output; test scores only with a truth file."""
    model, meta = load_checkpoint(model_path)
    targets = meta["targets"]
    if list(cv_per_type.index) != targets:
        raise InputError(f"per-type CV scores name other cell types than the checkpoint {model_path} "
                         "(rerun the tune stage)")
    metrics = {key: cv_metrics.get(source) for key, source in CV_KEYS.items()}
    per_type = pd.DataFrame({"cell_type": targets, "cv_spearman": cv_per_type.to_numpy(np.float64)})
    series = {"out-of-fold CV (nested)": per_type["cv_spearman"].to_numpy()}
    pred, maps = np.zeros((0, len(targets))), {}
    if not has_split(patches, "test"):
        if truth_path is not None:
            raise InputError(f"{truth_path}: a truth file, but {patches} holds no Test slide to score")
        log(f"{patches}: no Test slide: the figures are the study's CV, the submission lists no spot and no map "
            "is drawn (predict slides later with `python -m src.predict`)")
        metrics["n_test_spots"] = 0
    else:
        test_set = load_patch_set(patches, "test")
        if test_set.targets != targets:
            raise InputError(f"{patches}: cell types differ from the checkpoint's {model_path}")
        true = expected = None
        if truth_path is not None:  # read (and checked) before anything is written
            true, expected = read_truth(truth_path, test_set.spots, targets)
        pred = predict_abundance(model, meta, test_set)
        metrics["n_test_spots"] = len(test_set.spots)
        if true is not None:
            metrics.update(test_scores(pred, test_set, load_patch_set(patches, "train"), true, expected))
            per_type["test_spearman"] = map_per_type(pred, true, test_set.slides)
            series["test slides"] = per_type["test_spearman"].to_numpy()
        for slide, rows in test_set.spots.groupby("slide", sort=False).indices.items():
            maps[slide] = (test_set.xy()[rows], pred[rows], None if true is None else true[rows],
                           test_set.slide_image(slide))

    with atomic_path(plots / "maps") as folder:
        folder.mkdir()
        for slide, (xy, values, truth, image) in maps.items():
            spatial_map(folder / f"{slide}.png", xy, values, targets, truth, slide, image)
    per_type_bars(plots / "per_type_spearman.png", targets, series)
    write_csv(out_per_type, per_type.round(6))
    write_json(out_metrics, {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()})
    write_csv(out_submission, submission(pred, targets))
    return metrics


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"))
    parser.add_argument("--patches", type=Path, default=Path("data/patches"))
    parser.add_argument("--tune-metrics", type=Path, default=Path("metrics/tune.json"),
                        help="the study's metrics (the delivered model's nested CV and their floors)")
    parser.add_argument("--cv-per-type", type=Path, default=Path("metrics/cv_per_type.csv"),
                        help="the delivered model's nested out-of-fold Spearman per cell type (tune stage)")
    parser.add_argument("--submission", type=Path, default=Path("outputs/submission.csv"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/evaluate.json"))
    parser.add_argument("--per-type", type=Path, default=Path("metrics/per_type.csv"))
    parser.add_argument("--plots", type=Path, default=Path("plots"))
    parser.add_argument("--params", default="params.yaml", help="params file (reads data.truth)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if not args.tune_metrics.is_file():
        raise InputError(f"{args.tune_metrics}: not found (run `python -m src.tune` or `dvc repro tune` first)")
    truth = Path(params.data.truth) if params.data.truth else None
    m = evaluate(args.model, args.patches, truth, json.loads(args.tune_metrics.read_text()),
                 read_cv_per_type(args.cv_per_type), args.submission, args.metrics, args.per_type, args.plots)
    print("  ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)))


if __name__ == "__main__":
    main()
