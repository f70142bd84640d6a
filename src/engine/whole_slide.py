"""A checkpoint applied to an H&E whole-slide image: the spots the model was trained on laid over the
tissue, their patches cut while the slide streams past, predicted as ``predict --h5`` predicts (TTA,
smoothing, abundance scale). What is planned and cut: ``src.data.preprocessing.whole_slide``."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from src.core.errors import InputError
from src.data.preprocessing.patch_set import PatchSet
from src.data.preprocessing.stain import StainNormalizer
from src.data.preprocessing.whole_slide import WholeSlidePlan, cut_patches, plan_whole_slide
from src.engine.inference import predict_abundance, prediction_passes
from src.model.network import Ensemble, RecipeEnsemble, SpatialCellModel

LATTICE_FORMAT = 6  # the first checkpoint format that records its resolution and spot pitch

# (what is counted, its total) -> a callable advanced by a count: a progress bar, or nothing
Ticks = Callable[[str, int], Callable[[int], None]]


@dataclass
class SlidePrediction:
    plan: WholeSlidePlan
    patch_set: PatchSet  # its spots table: slide, spot, x, y (pipeline px of the region), x_fullres, ...
    pred: np.ndarray  # N x T abundances


def lattice_um(meta: dict, path: Path) -> tuple[float, float]:
    """(µm per pipeline px, spot pitch in µm) the checkpoint was trained at; one line for a checkpoint
    that does not record them."""
    if meta.get("format", 1) < LATTICE_FORMAT:
        raise InputError(f"{path}: checkpoint format {meta.get('format', 1)} does not record the resolution and "
                         "spot pitch it was trained at, which --wsi lays its spots by: retrain it with this version "
                         "(`dvc repro train`, or `python -m src.train`)")
    return float(meta["um_per_px"]), float(meta["pitch"]) * float(meta["um_per_px"])


def fused_positions(model: SpatialCellModel | Ensemble | RecipeEnsemble) -> list[str]:
    """The fusions of the recipes that fuse each spot's position with its image (none: position-free)."""
    recipes = model.models if isinstance(model, RecipeEnsemble) else [model]
    return [m.cfg.fusion for m in recipes if m.cfg.fusion != "none"]


def predict_whole_slide(model: SpatialCellModel | Ensemble | RecipeEnsemble, meta: dict, model_path: Path,
                        slide: Path, um_per_px: float | None = None, name: str | None = None,
                        spots_fullres: np.ndarray | None = None, region_from_tissue: bool | None = None,
                        device: torch.device | None = None,
                        ticks: Ticks | None = None, log=print) -> SlidePrediction:
    """Plan, cut and predict one slide; its patches live in a temporary folder only while predicted."""
    model_um, pitch_um = lattice_um(meta, model_path)
    plan = plan_whole_slide(slide, model_um, pitch_um, um_per_px, name, spots_fullres, region_from_tissue)
    top, left, height, width = plan.region
    log(f"{plan.name}: {plan.pixel_size.um_per_px:.4g} um/px ({plan.pixel_size.source}) -> {model_um:.4g} um/px; "
        f"tissue box {width} x {height} px at ({left}, {top}) of {plan.shape[1]} x {plan.shape[0]}; "
        f"{len(plan.spots)} spots at a {pitch_um:.0f}-um pitch" + "".join(f"; {n}" for n in plan.notes))
    if spots_fullres is None and fused_positions(model):
        log(f"note: {model_path} fuses each spot's position in the tissue's box with its image (fusion "
            f"{', '.join(sorted(set(fused_positions(model))))}); a position-free model maps sections no assay has seen "
            f"better: python -m src.train --ensemble studies/ensemble.yaml --fusion none --out models/model_he.pt")
    normalizer = StainNormalizer.from_dict(meta["stain"])
    n = len(plan.spots)
    with tempfile.TemporaryDirectory(prefix="wsi-patches-") as work:
        patch_set = cut_patches(plan, normalizer, meta["patch_size"], meta["targets"], Path(work), model_um,
                                ticks("patches cut", n) if ticks else None)
        try:
            pred = predict_abundance(model, meta, patch_set, device,
                                     ticks("spots predicted", n * prediction_passes(model)) if ticks else None)
        finally:
            patch_set.images.close()
    return SlidePrediction(plan, patch_set, pred)
