"""The model stage ``train`` delivers for a recipe: the CV's fold models as an ensemble, or one model
retrained on every training spot (``train.final``)."""
from __future__ import annotations

import numpy as np

from src.core.sections import Params
from src.data.preprocessing.patch_set import PatchSet
from src.engine.cross_validation import cross_validate
from src.engine.fit import fit
from src.engine.model_store import load_models, save_models
from src.engine.pretraining import fold_backbone, with_backbone
from src.model.network import Ensemble, SpatialCellModel


def final_model(params: Params, patch_set: PatchSet, log=print) -> tuple[SpatialCellModel | Ensemble, list[int]]:
    """The delivered model and the epochs each of its members trained.

    ``train.final: ensemble``: the fold models of the recipe's CV, the very models the CV scored,
    averaged: taken from the model store where the study (or an earlier run) left them, else the CV is
    run again (its score printed as a check). ``retrain``: one model on every training spot (its
    backbone pretrained on all of them), with the fold models' epoch count (its schedule is not
    validated by the CV). What is built is stored at once (``src.engine.model_store``)."""
    stored = load_models(params, patch_set)
    if stored is not None:
        models, epochs = stored
        log(f"{len(models)} {'fold models' if params.train.final == 'ensemble' else 'model'} from the model store")
        return (Ensemble(models) if params.train.final == "ensemble" else models[0]), epochs
    if params.train.final == "ensemble":
        result = cross_validate(params, patch_set, keep_models=True)
        log(f"fold models: CV spearman {result.score:.4f} (sigma {result.sigma:g} spot pitches), "
            f"floor {result.floor:.4f}")
        models, epochs = result.models, result.epochs_run
    else:  # retrain
        rows = np.arange(len(patch_set.spots))
        fitted = fit(with_backbone(params, fold_backbone(params, patch_set, rows, log=log)), patch_set, rows)
        models, epochs = [fitted.model], [fitted.epochs_run]
    save_models(params, patch_set, models, epochs)
    return (Ensemble(models) if params.train.final == "ensemble" else models[0]), epochs
