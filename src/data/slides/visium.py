"""Visium slides as labs hold them: Space Ranger ``outs/`` folders or AnnData ``.h5ad`` files for the
spots, and deconvolution results (a CSV of barcodes x cell types, or an ``.h5ad`` ``obsm`` key such as
cell2location's) for the abundances.

Everything here reads; ``src.data.slides.ingestion`` joins, resamples and writes the project's layout.
Coordinates are full-resolution pixels, ``x`` the column and ``y`` the row, as Space Ranger and
scanpy/squidpy use them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from src.core.errors import InputError
from src.data.spatial import SPOT_DIAMETER_UM, lattice_pitch

POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
CELL2LOCATION_KEYS = ("q05_cell_abundance_w_sf", "means_cell_abundance_w_sf")
PITCH_PER_DIAMETER = (0.8, 3.0)  # nearest spot centres, in spot diameters (Visium: 100 / 55 = 1.8)


@dataclass
class SpotTable:
    """The in-tissue spots of one slide in full-resolution pixels, and the slide's pixel size."""

    source: Path
    barcodes: np.ndarray  # str
    x: np.ndarray  # float, full-resolution column
    y: np.ndarray  # float, full-resolution row
    all_barcodes: np.ndarray  # every spot the source lists, in and out of tissue
    spot_diameter_fullres: float | None  # Space Ranger's estimate; None where the scalefactors lack it
    scalefactors: dict
    hires_size: tuple[int, int] | None = None  # (width, height) of the hires image the source holds
    pitch: float = float("nan")  # median distance between neighbouring spot centres, full-resolution px

    @property
    def n_listed(self) -> int:
        return len(self.all_barcodes)

    @property
    def um_per_px(self) -> float | None:
        """The full-resolution pixel size Space Ranger's spot diameter implies (a 55 µm spot)."""
        return SPOT_DIAMETER_UM / self.spot_diameter_fullres if self.spot_diameter_fullres else None

    @property
    def fullres_size_from_hires(self) -> tuple[float, float] | None:
        """The full-resolution image's (width, height) that the hires image and its scale factor imply."""
        scale = self.scalefactors.get("tissue_hires_scalef")
        if self.hires_size is None or not isinstance(scale, float) or not scale > 0:
            return None
        return self.hires_size[0] / scale, self.hires_size[1] / scale


def read_spaceranger(folder: Path) -> SpotTable:
    """``outs/`` (or its ``spatial/`` folder, or the run folder above it) of Space Ranger 1.x or 2.x+."""
    spatial = _spatial_folder(folder)
    header = spatial / "tissue_positions.csv"
    legacy = spatial / "tissue_positions_list.csv"
    if header.is_file():
        table = pd.read_csv(header)
        missing = [c for c in POSITION_COLUMNS if c not in table.columns]
        if missing:
            raise InputError(f"{header}: column '{missing[0]}' missing (expected {', '.join(POSITION_COLUMNS)})")
        where = header
    elif legacy.is_file():
        table = pd.read_csv(legacy, header=None)
        if table.shape[1] != len(POSITION_COLUMNS):
            raise InputError(f"{legacy}: {table.shape[1]} columns, expected {len(POSITION_COLUMNS)} "
                             f"({', '.join(POSITION_COLUMNS)})")
        table.columns = POSITION_COLUMNS
        where = legacy
    else:
        raise InputError(f"{spatial}: neither tissue_positions.csv nor tissue_positions_list.csv")
    for column in POSITION_COLUMNS[1:]:
        if not pd.api.types.is_numeric_dtype(table[column]):
            raise InputError(f"{where}: column '{column}' is not numeric")
    scalefactors = read_scalefactors(spatial / "scalefactors_json.json")
    listed = table["barcode"].astype(str).to_numpy()
    table = table[table["in_tissue"] == 1]
    return _spot_table(where, table["barcode"].astype(str).to_numpy(), table["pxl_col_in_fullres"].to_numpy(),
                       table["pxl_row_in_fullres"].to_numpy(), listed, scalefactors,
                       _png_size(spatial / "tissue_hires_image.png"))


def _png_size(path: Path) -> tuple[int, int] | None:
    """Width and height from the image's header (nothing decoded); None when there is no such image."""
    from PIL import Image

    if not path.is_file():
        return None
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as err:
        raise InputError(f"{path}: not a readable image ({err})") from None


def _spatial_folder(folder: Path) -> Path:
    for candidate in (folder / "outs" / "spatial", folder / "spatial", folder):
        if (candidate / "scalefactors_json.json").is_file() or any(candidate.glob("tissue_positions*.csv")):
            return candidate
    if not folder.exists():
        raise InputError(f"{folder}: Space Ranger folder not found")
    raise InputError(f"{folder}: not a Space Ranger outs/ folder (no spatial/tissue_positions.csv)")


def read_scalefactors(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: scalefactors file not found")
    try:
        factors = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not JSON ({err.msg}, line {err.lineno})") from None
    return _checked_scalefactors(path, factors)


def _checked_scalefactors(where, factors) -> dict:
    if not isinstance(factors, dict):
        raise InputError(f"{where}: scalefactors are not a mapping of names to numbers")
    for key in ("spot_diameter_fullres", "tissue_hires_scalef", "tissue_lowres_scalef"):
        value = factors.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not np.isfinite(value) or value <= 0):
            raise InputError(f"{where}: scalefactors {key} = {value!r} (expected a positive number)")
    return {k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in factors.items()}


def read_h5ad_spots(path: Path, library_id: str = "") -> SpotTable:
    """Spots of an AnnData file: ``obsm["spatial"]`` (full-resolution x, y), ``obs["in_tissue"]`` when
    present, and ``uns["spatial"][library_id]`` (scalefactors, hires image) when present."""
    adata = read_h5ad(path)
    if "spatial" not in adata.obsm:
        raise InputError(f"{path}: no obsm['spatial'] (the spots' full-resolution pixel coordinates)")
    coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise InputError(f"{path}: obsm['spatial'] has shape {coords.shape} (expected spots x 2)")
    libraries = adata.uns.get("spatial", {})
    factors, images = {}, {}  # without uns["spatial"], the pixel size comes from the image or the manifest
    if isinstance(libraries, dict) and libraries:
        if not library_id:
            if len(libraries) > 1:
                raise InputError(f"{path}: uns['spatial'] holds libraries {', '.join(libraries)}; name one as library_id")
            library_id = next(iter(libraries))
        if library_id not in libraries:
            raise InputError(f"{path}: uns['spatial'] has no library '{library_id}' ({', '.join(libraries)})")
        library = libraries[library_id] if isinstance(libraries[library_id], dict) else {}
        factors = _checked_scalefactors(f"{path}: uns['spatial']['{library_id}']", dict(library.get("scalefactors") or {}))
        images = library.get("images") or {}
    elif library_id:
        raise InputError(f"{path}: no uns['spatial'] to find library '{library_id}' in")
    keep = np.ones(len(coords), bool)
    if "in_tissue" in adata.obs:
        keep = adata.obs["in_tissue"].to_numpy() == 1
    barcodes = adata.obs_names.to_numpy().astype(str)
    hires = np.asarray(images["hires"]) if isinstance(images, dict) and "hires" in images else None
    hires_size = (int(hires.shape[1]), int(hires.shape[0])) if hires is not None and hires.ndim >= 2 else None
    return _spot_table(path, barcodes[keep], coords[keep, 0], coords[keep, 1], barcodes, factors, hires_size)


def _spot_table(where, barcodes, x, y, listed, factors, hires_size=None) -> SpotTable:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(barcodes) == 0:
        raise InputError(f"{where}: no in-tissue spots")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InputError(f"{where}: spot {int(np.argmin(np.isfinite(x) & np.isfinite(y)))} has a non-finite coordinate")
    duplicated = pd.Index(barcodes).duplicated()
    if duplicated.any():
        raise InputError(f"{where}: barcode {barcodes[np.argmax(duplicated)]} appears twice")
    table = SpotTable(Path(where), barcodes, x, y, listed, factors.get("spot_diameter_fullres"), factors,
                      hires_size, lattice_pitch(x, y))
    _check_pitch(where, table)
    return table


def _check_pitch(where, table: SpotTable) -> None:
    """The spot diameter must fit the spacing of the spots: a diameter given in the pixels of another
    image (hires, lowres) is the usual mistake, and would resample the slide by its scale factor."""
    if len(table.x) < 3 or table.spot_diameter_fullres is None:
        return
    pitch = table.pitch
    ratio = pitch / table.spot_diameter_fullres
    low, high = PITCH_PER_DIAMETER
    if not low <= ratio <= high:
        raise InputError(f"{where}: spot_diameter_fullres = {table.spot_diameter_fullres:g} px does not fit spots "
                         f"{pitch:.1f} px apart ({ratio:.2f} diameters; expected {low}-{high}): scalefactors of "
                         "another image, or coordinates that are not full-resolution pixels?")


def read_h5ad(path: Path):
    import anndata

    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return anndata.read_h5ad(path)
    except (OSError, KeyError, ValueError) as err:
        raise InputError(f"{path}: not a readable .h5ad file ({str(err).splitlines()[0][:120]})") from None


def read_abundances(path: Path, obsm_key: str = "") -> pd.DataFrame:
    """Barcodes x cell types: a CSV (first column the barcodes, one column per cell type) or an
    ``.h5ad`` ``obsm`` key (default: cell2location's ``q05_cell_abundance_w_sf``, then its means)."""
    if path.suffix == ".h5ad":
        frame = _obsm_abundances(path, obsm_key)
    else:
        if not path.is_file():
            raise InputError(f"{path}: abundance table not found")
        try:
            frame = pd.read_csv(path, index_col=0)
        except (pd.errors.ParserError, UnicodeDecodeError) as err:
            raise InputError(f"{path}: not a CSV table ({str(err).splitlines()[0][:120]})") from None
    if frame.shape[1] == 0:
        raise InputError(f"{path}: no cell-type columns after the barcode column")
    frame.index = frame.index.astype(str)
    frame.columns = [str(c) for c in frame.columns]
    for column in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[column]):
            bad = pd.to_numeric(frame[column], errors="coerce").isna()
            raise InputError(f"{path}: cell type '{column}' of barcode {frame.index[np.argmax(bad)]} is "
                             f"{frame[column].to_numpy()[np.argmax(bad)]!r}, not a number")
    values = frame.to_numpy(np.float64)
    for bad, what in ((~np.isfinite(values), "not finite"), (values < 0, "negative")):
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise InputError(f"{path}: cell type '{frame.columns[col]}' of barcode {frame.index[row]} is "
                             f"{values[row, col]:g} ({what})")
    duplicated = frame.index.duplicated()
    if duplicated.any():
        raise InputError(f"{path}: barcode {frame.index[np.argmax(duplicated)]} appears twice")
    return frame.astype(np.float64)


def _obsm_abundances(path: Path, obsm_key: str) -> pd.DataFrame:
    adata = read_h5ad(path)
    keys = [obsm_key] if obsm_key else [k for k in CELL2LOCATION_KEYS if k in adata.obsm]
    if not keys or keys[0] not in adata.obsm:
        wanted = obsm_key or " or ".join(CELL2LOCATION_KEYS)
        raise InputError(f"{path}: no obsm['{wanted}'] (obsm holds {', '.join(adata.obsm) or 'nothing'})")
    key = keys[0]
    value = adata.obsm[key]
    if isinstance(value, pd.DataFrame):
        frame = value.copy()
    else:
        names = adata.uns.get("mod", {}).get("factor_names") if isinstance(adata.uns.get("mod"), dict) else None
        if names is None or len(names) != np.asarray(value).shape[1]:
            raise InputError(f"{path}: obsm['{key}'] is an array without cell-type names (no uns['mod']['factor_names'])")
        frame = pd.DataFrame(np.asarray(value), index=adata.obs_names, columns=list(names))
    prefix = key.replace("_cell", "cell", 1) + "_"  # cell2location names columns q05cell_abundance_w_sf_<type>
    if all(str(c).startswith(prefix) for c in frame.columns):
        frame.columns = [str(c)[len(prefix):] for c in frame.columns]
    frame.index = adata.obs_names.astype(str)
    return frame
