"""Slides of a layout file written out as labs hold Visium data, to test the import on data the
project makes itself: per slide a Space Ranger ``outs/spatial`` folder (``tissue_positions.csv`` with
its header, or the headerless ``tissue_positions_list.csv`` of Space Ranger 1.x on every other slide;
the scalefactors, ``tissue_hires_image.png`` and ``tissue_lowres_image.png``), a full-resolution scanner
file ``fullres_scale`` times finer than the layout (training slides: pyramidal TIFFs with JPEG tiles and
resolution tags; test slides: Aperio SVS), an ``.h5ad`` carrying ``obsm["spatial"]``, the scalefactors,
the hires image and cell2location-style abundances in ``obsm``, an abundance CSV, and one manifest per
route for ``python -m src.ingest``.

Every slide also lists spots off the tissue (``in_tissue`` 0), and the training slides' abundance
tables leave out a few in-tissue spots, as deconvolution results do when spots fail QC.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image

from src.data.slides.layout import open_h5, read_image_uint8, read_spots, slide_refs, target_names
from src.data.slides.visium import CELL2LOCATION_KEYS
from src.data.slides.wsi_write import write_image_pyramid
from src.data.spatial import COMPETITION_SPOT_PX, COMPETITION_UM_PER_PX, lattice_pitch

LOWRES_PER_HIRES = 0.25  # tissue_lowres_image.png against the hires one
OFF_TISSUE_SPOTS = 40  # listed per slide with in_tissue = 0
MISSING_ABUNDANCE = 0.02  # share of a training slide's in-tissue spots without abundances
CELL_TYPES = [
    "B cells", "Plasma cells", "CD4+ T cells", "CD8+ T cells", "Tregs", "NK cells", "Monocytes",
    "Macrophages M1", "Macrophages M2", "cDC1", "cDC2", "pDCs", "Mast cells", "Neutrophils",
    "Endothelial arterial", "Endothelial venous", "Endothelial lymphatic", "Pericytes", "Smooth muscle",
    "Fibroblasts", "Myofibroblasts", "iCAFs", "myCAFs", "Adipocytes", "Basal epithelial",
    "Luminal epithelial", "Secretory epithelial", "Myoepithelial", "Cycling epithelial", "Tumour cells",
    "Cycling tumour cells", "Schwann cells", "Erythrocytes", "Keratinocytes", "Melanocytes",
]


def barcode(i: int) -> str:
    """A Visium-like barcode: 16 bases from the spot's index, then the GEM well."""
    bases = "ACGT"
    return "".join(bases[(i >> (2 * k)) & 3] for k in range(16)) + "-1"


def export_visium(h5_path: Path, truth_path: Path, out: Path, fullres_scale: int = 4, seed: int = 0) -> dict:
    """Write every slide of ``h5_path`` under ``out``; returns the two manifests' paths."""
    rng = np.random.default_rng(seed)
    rows_sr, rows_ad = [], []
    with open_h5(h5_path) as h5, h5py.File(truth_path, "r") as truth:
        refs = slide_refs(h5)
        for number, ref in enumerate(refs):
            spots = read_spots(h5, ref)
            names = target_names(list(spots.columns)) if ref.split == "Train" else list(truth.attrs["target_names"])
            values = spots[names].to_numpy(np.float64) if ref.split == "Train" else truth[f"Test/{ref.name}/observed"][()]
            cell_types = CELL_TYPES[: len(names)] if len(names) <= len(CELL_TYPES) else [f"type {i + 1}" for i in range(len(names))]
            image = read_image_uint8(h5, ref)
            slide = f"{ref.split.lower()}_{ref.name}"
            folder = out / "spaceranger" / slide / "outs" / "spatial"
            folder.mkdir(parents=True, exist_ok=True)
            image_path = out / "images" / (f"{slide}.svs" if ref.split == "Test" else f"{slide}_fullres.tif")
            full = Image.fromarray(image).resize((image.shape[1] * fullres_scale, image.shape[0] * fullres_scale),
                                                 Image.Resampling.BICUBIC)
            write_image_pyramid(image_path, np.asarray(full), COMPETITION_UM_PER_PX / fullres_scale)
            del full
            pitch = lattice_pitch(spots["x"].to_numpy(), spots["y"].to_numpy())
            n = len(spots)
            codes = np.array([barcode(1000 * number + i) for i in range(n + OFF_TISSUE_SPOTS)])
            fx = (spots["x"].to_numpy() + 0.5) * fullres_scale - 0.5
            fy = (spots["y"].to_numpy() + 0.5) * fullres_scale - 0.5
            off_x, off_y = _off_tissue(rng, image.shape, fullres_scale)
            positions = pd.DataFrame({
                "barcode": codes, "in_tissue": np.r_[np.ones(n, int), np.zeros(OFF_TISSUE_SPOTS, int)],
                "array_row": np.r_[spots["y"].to_numpy() / (pitch * 0.866), off_y / (pitch * 0.866 * fullres_scale)
                                   ].round().astype(int),
                "array_col": np.r_[spots["x"].to_numpy() / (pitch / 2), off_x / (pitch / 2 * fullres_scale)
                                   ].round().astype(int),
                "pxl_row_in_fullres": np.r_[fy, off_y].round().astype(int),
                "pxl_col_in_fullres": np.r_[fx, off_x].round().astype(int)})
            if number % 2:
                positions.to_csv(folder / "tissue_positions_list.csv", header=False, index=False)
            else:
                positions.to_csv(folder / "tissue_positions.csv", index=False)
            factors = {"spot_diameter_fullres": COMPETITION_SPOT_PX * fullres_scale,
                       "fiducial_diameter_fullres": COMPETITION_SPOT_PX * fullres_scale * 1.6,
                       "tissue_hires_scalef": 1.0 / fullres_scale,
                       "tissue_lowres_scalef": LOWRES_PER_HIRES / fullres_scale}
            (folder / "scalefactors_json.json").write_text(json.dumps(factors, indent=2))
            Image.fromarray(image).save(folder / "tissue_hires_image.png")
            lowres = Image.fromarray(image)
            lowres.thumbnail((round(image.shape[1] * LOWRES_PER_HIRES), round(image.shape[0] * LOWRES_PER_HIRES)))
            lowres.save(folder / "tissue_lowres_image.png")
            table = pd.DataFrame(values, index=pd.Index(codes[:n], name="barcode"), columns=cell_types)
            if ref.split == "Train":
                table = table.drop(index=table.index[rng.random(n) < MISSING_ABUNDANCE])
            csv = out / "abundances" / f"{slide}.csv"
            csv.parent.mkdir(parents=True, exist_ok=True)
            table.to_csv(csv)
            h5ad = out / "h5ad" / f"{slide}.h5ad"
            listed = positions[positions["barcode"].isin(table.index) | (positions["in_tissue"] == 0)]
            _write_h5ad(h5ad, listed, table, factors, image, slide)
            common = {"slide": slide, "split": ref.split.lower(), "image": image_path.relative_to(out).as_posix()}
            rows_sr.append({**common, "spots": (out / "spaceranger" / slide / "outs").relative_to(out).as_posix(),
                            "abundances": csv.relative_to(out).as_posix(), "library_id": ""})
            rows_ad.append({**common, "spots": h5ad.relative_to(out).as_posix(),
                            "abundances": h5ad.relative_to(out).as_posix(), "library_id": slide})
    manifests = {"spaceranger": out / "manifest_spaceranger.csv", "h5ad": out / "manifest_h5ad.csv"}
    for key, rows in (("spaceranger", rows_sr), ("h5ad", rows_ad)):
        pd.DataFrame(rows, columns=["slide", "split", "spots", "image", "abundances", "library_id"]).to_csv(
            manifests[key], index=False)
    return manifests


def _off_tissue(rng, shape, scale) -> tuple[np.ndarray, np.ndarray]:
    """Listed spots off the tissue: along the slide's top and bottom edges, in full-resolution pixels."""
    height, width = shape[:2]
    x = rng.uniform(0, width - 1, OFF_TISSUE_SPOTS)
    y = np.where(np.arange(OFF_TISSUE_SPOTS) % 2, 3.0, height - 4.0)
    return ((x + 0.5) * scale - 0.5).round(), ((y + 0.5) * scale - 0.5).round()


def _write_h5ad(path: Path, positions: pd.DataFrame, table: pd.DataFrame, factors: dict, image: np.ndarray,
                library: str) -> None:
    import anndata

    path.parent.mkdir(parents=True, exist_ok=True)
    obs = pd.DataFrame({"in_tissue": positions["in_tissue"].to_numpy(),
                        "array_row": positions["array_row"].to_numpy(), "array_col": positions["array_col"].to_numpy()},
                       index=pd.Index(positions["barcode"].to_numpy(dtype=object), dtype=object))
    adata = anndata.AnnData(obs=obs, var=pd.DataFrame(index=pd.Index([], dtype=object)))
    adata.obsm["spatial"] = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    key = CELL2LOCATION_KEYS[0]
    prefix = key.replace("_cell", "cell", 1) + "_"
    abundance = table.reindex(adata.obs_names).fillna(0.0)  # off-tissue spots: estimated too, dropped on import
    abundance.columns = pd.Index([prefix + c for c in table.columns], dtype=object)
    abundance.index = abundance.index.astype(object)
    adata.obsm[key] = abundance
    adata.uns["spatial"] = {library: {"scalefactors": factors, "images": {"hires": image},
                                      "metadata": {"source": "simulated"}}}
    adata.write_h5ad(path)
