"""Stage ``train``: the delivered model of the recipe (params.yaml's, or a study's best trial with
``--best``), written as a self-describing checkpoint.

``python -m src.train --best studies/best_params.yaml --patches data/patches --out models/model.pt``
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from src.core.config import add_params_arguments, apply_overrides, load_params, read_raw
from src.core.errors import InputError, exit_on_input_error
from src.data.patch_set import load_patch_set
from src.engine.final_model import final_model
from src.model.checkpoint import save_checkpoint
from src.search.recipe import params_for_best


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.train", description=__doc__.split("\n")[0])
    parser.add_argument("--patches", type=Path, default=Path("data/patches"), help="patch store")
    parser.add_argument("--stain", type=Path, default=Path("data/normalized/stain.json"),
                        help="fitted stain reference (stored in the checkpoint for predict)")
    parser.add_argument("--out", type=Path, default=Path("models/model.pt"), help="checkpoint to write")
    parser.add_argument("--best", type=Path, default=None,
                        help="best_params.yaml of a study: retrain its best trial (else params.yaml as is)")
    add_params_arguments(parser, "train.epochs=2")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.set)
    if args.best is not None:
        params = params_for_best(args.best, apply_overrides(read_raw(args.params), args.set))
    patch_set = load_patch_set(args.patches, "train")
    if not args.stain.is_file():
        raise InputError(f"{args.stain}: not found (run `dvc repro normalize` first)")
    stain = json.loads(args.stain.read_text())
    model, epochs = final_model(params, patch_set)
    save_checkpoint(args.out, model, targets=patch_set.targets, loss=params.loss, patch_size=patch_set.patch_size,
                    infer=params.infer, stain=stain, data_digest=patch_set.digest())
    kind = f"ensemble of {len(epochs)} fold models" if params.train.final == "ensemble" else "retrained model"
    print(f"wrote {args.out}: {kind}, epochs {epochs}, smoothing sigma {params.infer.smoothing_sigma:g} px")


if __name__ == "__main__":
    main()
