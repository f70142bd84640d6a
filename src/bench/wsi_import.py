"""``python -m src.bench import``: what importing a scanner's slide costs as the slide grows.

For each slide edge (default 10,000, 20,000 and 40,000 px at 0.25 µm/px, a 40x scan) a JPEG-tiled
pyramidal TIFF (levels 1, 1/4, 1/16, as scanners write them) is written tile by tile with a Visium
lattice of spots (100 µm apart) over its middle, a Space Ranger folder and an abundance table; then
``python -m src.ingest`` imports it at the pipeline's 2.115 µm/px in its own process. Printed per
slide: the file's size, the decoded slide's size, the level read, the seconds and the import's peak
resident memory (sampled), which stays near the interpreter's own plus the written image: the slide
is read in bands of one level, never whole.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from src.bench.scale import run_measured
from src.data.simulators.visium_export import barcode
from src.data.slides.wsi_write import procedural_tiles, write_pyramidal_tiff
from src.data.spatial import SPOT_DIAMETER_UM, SPOT_PITCH_UM

UM_PER_PX = 0.25
DOWNSAMPLES = (1, 4, 16)
N_TYPES = 5


GRAIN = np.random.default_rng(0).normal(0, 12, (256, 256, 1))  # texture, so JPEG tiles are scanner-sized


def tissue_pixel(downsample: float):
    """An H&E-like pattern as a function of level-0 position, so every level shows the same tissue."""
    def pixel(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        y, x = rows * downsample / 400.0, cols * downsample / 400.0  # a period of about a spot pitch
        r = 205 + 35 * np.sin(x * 1.3) * np.cos(y * 0.9)
        g = 140 + 45 * np.cos(x * 0.7 + y * 1.1)
        b = 200 + 30 * np.sin(y * 1.7)
        return (np.stack([r, g, b], axis=2) + GRAIN).clip(0, 255).astype(np.uint8)
    return pixel


def write_slide(folder: Path, edge: int) -> Path:
    """The slide, its Space Ranger folder, abundances and a manifest; returns the manifest."""
    image = folder / f"slide_{edge}.tif"
    levels = [(edge // d, edge // d, procedural_tiles(edge // d, edge // d, tissue_pixel(d))) for d in DOWNSAMPLES]
    write_pyramidal_tiff(image, levels, UM_PER_PX)
    pitch = SPOT_PITCH_UM / UM_PER_PX
    rows = np.arange(edge * 0.2, edge * 0.8, pitch * np.sqrt(3) / 2)
    xy = np.array([(x + (i % 2) * pitch / 2, y) for i, y in enumerate(rows)
                   for x in np.arange(edge * 0.2, edge * 0.8, pitch)])
    codes = [barcode(i) for i in range(len(xy))]
    spatial = folder / "outs" / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"barcode": codes, "in_tissue": 1, "array_row": 0, "array_col": 0,
                  "pxl_row_in_fullres": xy[:, 1].round().astype(int),
                  "pxl_col_in_fullres": xy[:, 0].round().astype(int)}).to_csv(spatial / "tissue_positions.csv",
                                                                                index=False)
    (spatial / "scalefactors_json.json").write_text(json.dumps({"spot_diameter_fullres": SPOT_DIAMETER_UM / UM_PER_PX}))
    rng = np.random.default_rng(0)
    pd.DataFrame(rng.gamma(1.0, 1.0, (len(codes), N_TYPES)), index=pd.Index(codes, name="barcode"),
                 columns=[f"type {i + 1}" for i in range(N_TYPES)]).to_csv(folder / "abundances.csv")
    manifest = folder / "manifest.csv"
    pd.DataFrame([{"slide": "S", "split": "train", "spots": "outs", "image": image.name,
                   "abundances": "abundances.csv"}]).to_csv(manifest, index=False)
    return manifest


def run(edges: list[int], work: Path, log=print) -> list[dict]:
    rows = []
    for edge in edges:
        folder = work / f"edge_{edge}"
        folder.mkdir(parents=True, exist_ok=True)
        log(f"writing a {edge} x {edge} px slide at {UM_PER_PX} um/px ...")
        manifest = write_slide(folder, edge)
        image = folder / f"slide_{edge}.tif"
        seconds, peak = run_measured([sys.executable, "-m", "src.ingest", str(manifest), "--out",
                                      str(folder / "imported.h5")], log)
        rows.append({"edge": edge, "file_mb": image.stat().st_size / 2**20, "decoded_mb": edge * edge * 3 / 2**20,
                     "seconds": seconds, "peak_mb": peak})
        log(f"{edge} x {edge} px: file {rows[-1]['file_mb']:.0f} MB, decoded {rows[-1]['decoded_mb']:.0f} MB; "
            f"import {seconds:.1f} s, peak memory {peak:.0f} MB")
        image.unlink()  # the next, larger slide needs the disk more
    return rows


def report(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Importing a JPEG-tiled pyramidal TIFF at {UM_PER_PX} um/px (python -m src.ingest)")
    for column in ("slide edge (px)", "file (MB)", "decoded slide (MB)", "import (s)", "peak memory (MB)"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['edge']:,}", f"{r['file_mb']:.0f}", f"{r['decoded_mb']:,.0f}", f"{r['seconds']:.1f}",
                      f"{r['peak_mb']:.0f}")
    Console().print(table)
