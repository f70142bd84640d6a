"""Predictions where the field reads them: a CSV with barcodes and cell-type names, and an AnnData
``.h5ad`` (predictions in ``obsm["predicted_abundance"]`` and as ``X``, the spots' coordinates in
``obsm["spatial"]``, each slide's scalefactors under ``uns["spatial"]``) that scanpy and squidpy load."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from src.core.files import atomic_path, write_csv

OBSM_KEY = "predicted_abundance"


def prediction_table(spots: pd.DataFrame, pred: np.ndarray, names: list[str]) -> pd.DataFrame:
    """One row per spot: barcode (imported slides), slide, x, y (pipeline pixels), x_fullres and
    y_fullres (the source's pixels, imported slides), then one column per cell type."""
    front = [c for c in ("barcode", "slide", "x", "y", "x_fullres", "y_fullres") if c in spots.columns]
    return pd.concat([spots[front].reset_index(drop=True), pd.DataFrame(pred, columns=names)], axis=1)


def write_prediction_csv(path: Path, spots: pd.DataFrame, pred: np.ndarray, names: list[str]) -> None:
    write_csv(path, prediction_table(spots, pred, names))


def write_prediction_h5ad(path: Path, spots: pd.DataFrame, pred: np.ndarray, names: list[str],
                          slide_meta: dict[str, dict]) -> None:
    """``slide_meta``: per slide, the source's scalefactors and library id (imported slides)."""
    import anndata

    if "barcode" in spots.columns:
        barcodes = spots["barcode"].astype(str)
        index = barcodes if barcodes.is_unique else barcodes + "-" + spots["slide"].astype(str)
    else:
        index = spots["slide"].astype(str) + "-" + spots["spot"].astype(str)
    index = pd.Index(index.to_numpy(dtype=object), dtype=object)
    slides = spots["slide"].to_numpy(dtype=object)
    obs = pd.DataFrame({"slide": pd.Categorical(slides, categories=pd.Index(pd.unique(slides), dtype=object)),
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
    adata.uns["spatial"] = {meta.get("library_id") or slide: {"scalefactors": meta.get("scalefactors", {})}
                            for slide, meta in slide_meta.items()}
    adata.uns["coordinates"] = "full-resolution pixels of the source image" if full else "pipeline pixels"
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
