"""Stage ``cv``: region-blocked spatial cross-validation of the recipe in params.yaml.

Writes the out-of-fold predictions of every training spot, ``metrics/cv.json`` (score, floor, fold
scores) and the per-cell-type scores.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from src.config import load_params
from src.data import load_patch_set
from src.errors import exit_on_input_error
from src.io_utils import atomic_path
from src.losses import to_abundance_scale
from src.train import CVResult, cross_validate


def cv_metrics(result: CVResult) -> dict:
    return {
        "cv_spearman": result.score,
        "cv_floor_spearman": result.floor,
        "fold_spearman": result.fold_scores,
        "n_folds": len(result.fold_scores),
        "epochs_run": result.epochs_run,
        "buffer_dropped": result.dropped,
        "seconds": round(result.seconds, 1),
    }


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.cv", description=__doc__.split("\n")[0])
    parser.add_argument("--patches", type=Path, default=Path("data/patches"), help="patch store")
    parser.add_argument("--oof", type=Path, default=Path("outputs/oof.csv"), help="OOF predictions")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/cv.json"))
    parser.add_argument("--per-type", type=Path, default=Path("metrics/cv_per_type.csv"))
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one param, e.g. cv.n_folds=5 (repeatable)")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.set)
    patch_set = load_patch_set(args.patches, "train")
    result = cross_validate(params, patch_set)
    oof = to_abundance_scale(result.oof, params.loss.target_transform)
    table = patch_set.spots[["slide", "spot", "x", "y"]].assign(fold=result.fold_of)
    write_csv(args.oof, pd.concat([table, pd.DataFrame(oof, columns=patch_set.targets)], axis=1))
    write_csv(args.per_type, pd.DataFrame({"cell_type": patch_set.targets,
                                           "cv_spearman": np.round(result.per_type, 6)}))
    write_json(args.metrics, cv_metrics(result))
    print(f"cv spearman {result.score:.4f} (folds {', '.join(f'{s:.4f}' for s in result.fold_scores)}); "
          f"floor {result.floor:.4f}")


if __name__ == "__main__":
    main()
