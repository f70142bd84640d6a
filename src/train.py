"""Stage ``train``: the delivered model, written as a self-describing checkpoint: params.yaml's
recipe, a study's best trial (``--best``), or what the study delivers (``--ensemble``: its best
trial or the ensemble of trials selected on their out-of-fold predictions, each member built as
``train.final`` says, weighted as selected). Members the study already trained are taken from the model
store, and each member built here is stored as soon as it is (``src.engine.model_store``).

``python -m src.train --ensemble studies/ensemble.yaml --patches data/patches --out models/model.pt``
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

import numpy as np

from src.core.config import add_params_arguments, apply_overrides, load_params, read_raw
from src.core.errors import InputError, exit_on_input_error
from src.core.sections import FusionName
from src.data.preprocessing.patch_set import load_patch_set
from src.engine.final_model import final_model
from src.model.checkpoint import save_checkpoint, save_recipes
from src.model.targets import rank_scale
from src.search.recipe import params_for_best, params_for_delivery


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.train", description=__doc__.split("\n")[0])
    parser.add_argument("--patches", type=Path, default=Path("data/patches"), help="patch store")
    parser.add_argument("--stain", type=Path, default=Path("data/normalized/stain.json"),
                        help="fitted stain reference (stored in the checkpoint for predict)")
    parser.add_argument("--out", type=Path, default=Path("models/model.pt"), help="checkpoint to write")
    parser.add_argument("--best", type=Path, default=None,
                        help="best_params.yaml of a study: retrain its best trial (else params.yaml as is)")
    parser.add_argument("--ensemble", type=Path, default=None,
                        help="ensemble.yaml of a study: what it delivers (its best trial or selected ensemble)")
    parser.add_argument("--fusion", choices=typing.get_args(FusionName), default=None,
                        help="train every delivered recipe with this fusion instead of its own (none: a position-free "
                             "model, what maps H&E-only slides best)")
    add_params_arguments(parser, "train.epochs=2")
    args = parser.parse_args(argv)
    if args.best is not None and args.ensemble is not None:
        raise InputError("--best and --ensemble: give one")
    base_raw = apply_overrides(read_raw(args.params), args.set)
    if args.ensemble is not None:
        members = params_for_delivery(args.ensemble, base_raw)
    elif args.best is not None:
        members = [(params_for_best(args.best, base_raw), 1.0, "best trial")]
    else:
        members = [(load_params(args.params, args.set), 1.0, "params.yaml")]
    if args.fusion is not None:
        members = [(dataclasses.replace(params, model=dataclasses.replace(params.model, fusion=args.fusion)), weight,
                    f"{name}, fusion {args.fusion}") for params, weight, name in members]
    patch_set = load_patch_set(args.patches, "train")
    if not args.stain.is_file():
        raise InputError(f"{args.stain}: not found (run `dvc repro normalize` first)")
    stain = json.loads(args.stain.read_text())
    built = []
    for params, weight, name in members:
        model, epochs = final_model(params, patch_set)
        kind = f"ensemble of {len(epochs)} fold models" if params.train.final == "ensemble" else "retrained model"
        print(f"{name}: {kind}, epochs {epochs}, smoothing sigma {params.infer.smoothing_sigma:g} spot pitches, weight {weight:g}")
        built.append((model, params.loss, params.infer, weight))
    shared = {"targets": patch_set.targets, "patch_size": patch_set.patch_size, "stain": stain,
              "rank_scale": rank_scale(patch_set.abundance).tolist(), "data_digest": patch_set.digest(),
              "um_per_px": patch_set.um_per_px, "pitch": float(np.median(list(patch_set.pitches().values())))}
    if len(built) == 1:
        model, loss, infer, _ = built[0]
        save_checkpoint(args.out, model, loss=loss, infer=infer, **shared)
    else:
        save_recipes(args.out, built, **shared)
    print(f"wrote {args.out}: {len(built)} recipe{'s' if len(built) > 1 else ''}")


if __name__ == "__main__":
    main()
