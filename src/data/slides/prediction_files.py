"""Predictions where the field reads them: a CSV with barcodes and cell-type names, and an AnnData
``.h5ad`` laid out as Space Ranger data are read by scanpy and squidpy: predictions in
``obsm["predicted_abundance"]`` and as ``X``, the spots' coordinates in ``obsm["spatial"]`` (full-resolution
pixels of the source image), and per slide under ``uns["spatial"][library_id]`` a hires and a lowres
image of the tissue with the scalefactors that place the spots on them (``tissue_hires_scalef``,
``tissue_lowres_scalef``, ``spot_diameter_fullres``), so ``squidpy.pl.spatial_scatter`` and
``scanpy.pl.spatial`` draw the predictions over the tissue with their defaults. ``obs["library_id"]``
names each spot's slide for multi-slide plots; ``uns["predicted_abundance"]`` says what the values are."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from src.core.files import atomic_path, write_csv

OBSM_KEY = "predicted_abundance"
HIRES, LOWRES = 2000, 600  # longest side of Space Ranger's tissue_hires_image.png and tissue_lowres_image.png
SCALE = ("abundances on the scale of the training table (the deconvolution's units), comparable across spots "
         "and slides: the model's predictions mapped back from its target space, smoothed as the checkpoint says; "
         "an ensemble of recipes gives the weighted geometric mean of theirs")


@dataclass(frozen=True)
class SlideSource:
    """What a predicted slide's h5ad entry needs besides its spots."""

    image: np.ndarray | None  # the slide as the pipeline read it (H x W x 3 uint8), in pipeline pixels
    scale: float = 1.0  # pipeline pixels per source (full-resolution) pixel
    spot_diameter: float = 0.0  # a spot's diameter in pipeline pixels
    library_id: str = ""
    scalefactors: dict = field(default_factory=dict)  # the source's (Space Ranger / .h5ad), when imported
    description: str = "the slide as predicted (stain-normalized), resampled to the hires and lowres sizes"


def spatial_entry(source: SlideSource) -> dict:
    """``uns["spatial"][library_id]`` for one slide: hires and lowres images and their scalefactors."""
    factors = dict(source.scalefactors)
    factors.setdefault("spot_diameter_fullres", source.spot_diameter / source.scale)
    entry: dict = {"scalefactors": factors, "metadata": {"image": source.description}}
    if source.image is not None:
        images = {}
        for name, longest in (("hires", HIRES), ("lowres", LOWRES)):
            shrink = min(1.0, longest / max(source.image.shape[:2]))
            size = (max(1, round(source.image.shape[1] * shrink)), max(1, round(source.image.shape[0] * shrink)))
            images[name] = np.asarray(Image.fromarray(np.ascontiguousarray(source.image)).resize(size, Image.LANCZOS))
            factors[f"tissue_{name}_scalef"] = size[0] / source.image.shape[1] * source.scale
        entry["images"] = images
    return entry


def prediction_table(spots: pd.DataFrame, pred: np.ndarray, names: list[str]) -> pd.DataFrame:
    """One row per spot: barcode (imported slides), slide, x, y (pipeline pixels), x_fullres and
    y_fullres (the source's pixels, imported slides), then one column per cell type."""
    front = [c for c in ("barcode", "slide", "x", "y", "x_fullres", "y_fullres") if c in spots.columns]
    return pd.concat([spots[front].reset_index(drop=True), pd.DataFrame(pred, columns=names)], axis=1)


def write_prediction_csv(path: Path, spots: pd.DataFrame, pred: np.ndarray, names: list[str]) -> None:
    write_csv(path, prediction_table(spots, pred, names))


def write_prediction_h5ad(path: Path, spots: pd.DataFrame, pred: np.ndarray, names: list[str],
                          sources: dict[str, SlideSource]) -> None:
    """One AnnData over every slide of ``spots``; ``sources``: per slide, its image and scale."""
    import anndata

    if "barcode" in spots.columns:
        barcodes = spots["barcode"].astype(str)
        index = barcodes if barcodes.is_unique else barcodes + "-" + spots["slide"].astype(str)
    else:
        index = spots["slide"].astype(str) + "-" + spots["spot"].astype(str)
    index = pd.Index(index.to_numpy(dtype=object), dtype=object)
    slides = spots["slide"].to_numpy(dtype=object)
    libraries = {slide: sources[slide].library_id or slide for slide in pd.unique(slides)}
    library = np.array([libraries[s] for s in slides], dtype=object)
    obs = pd.DataFrame({"slide": pd.Categorical(slides, categories=pd.Index(list(libraries), dtype=object)),
                        "library_id": pd.Categorical(library, categories=pd.Index(list(libraries.values()),
                                                                                  dtype=object)),
                        "x": spots["x"].to_numpy(),
                        "y": spots["y"].to_numpy()}, index=index)
    if "barcode" in spots.columns:
        # object, not pandas' default string dtype: h5ad readers before anndata 0.11 cannot load the latter
        obs["barcode"] = pd.Series(spots["barcode"].to_numpy(dtype=object), index=index, dtype=object)
    var = pd.DataFrame(index=pd.Index(list(names), dtype=object))
    adata = anndata.AnnData(X=pred.astype(np.float32), obs=obs, var=var)
    full = {"x_fullres", "y_fullres"} <= set(spots.columns)
    adata.obsm["spatial"] = spots[["x_fullres", "y_fullres"] if full else ["x", "y"]].to_numpy(np.float64)
    adata.obsm[OBSM_KEY] = pd.DataFrame(pred, index=index, columns=pd.Index(list(names), dtype=object))
    adata.uns["spatial"] = {libraries[slide]: spatial_entry(sources[slide]) for slide in libraries}
    adata.uns["coordinates"] = "full-resolution pixels of the source image" if full else "pipeline pixels"
    adata.uns[OBSM_KEY] = {"scale": SCALE, "cell_types": list(names)}
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)


def write_prediction_geojson(path: Path, spots: pd.DataFrame, pred: np.ndarray, names: list[str],
                             diameter_fullres: float, vertices: int = 24) -> None:
    """The spots as a GeoJSON FeatureCollection in the slide's full-resolution pixels, as QuPath imports
    detections: each spot a polygon (its disc), ``properties.measurements`` its abundance per cell type,
    ``properties.classification`` the most abundant cell type."""
    import json

    angles = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    ring = np.column_stack([np.cos(angles), np.sin(angles)]) * diameter_fullres / 2
    features = []
    top = np.asarray(names, dtype=object)[np.argmax(pred, axis=1)] if len(pred) else []
    for i, (x, y) in enumerate(spots[["x_fullres", "y_fullres"]].to_numpy(np.float64)):
        polygon = np.round(ring + (x, y), 2).tolist()
        features.append({"type": "Feature", "id": str(spots["spot"].iat[i]),
                         "geometry": {"type": "Polygon", "coordinates": [polygon + polygon[:1]]},
                         "properties": {"objectType": "detection", "name": f"spot {spots['spot'].iat[i]}",
                                        "classification": {"name": str(top[i])},
                                        "measurements": {n: float(v) for n, v in zip(names, pred[i])}}})
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
