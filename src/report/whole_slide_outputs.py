"""What ``predict --wsi`` writes for one slide: the AnnData file, the table, the map and the GeoJSON.

Every file is written whole or not at all, and a cohort's slide gets a marker last, naming the
checkpoint that predicted it: a slide counts as done when its marker names the same checkpoint and all
its files exist, so a cohort run that stopped is rerun as it was started and skips those slides, and a
new model predicts them all again.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.core.files import atomic_path
from src.data.slides.prediction_files import (
    SlideSource,
    write_prediction_csv,
    write_prediction_geojson,
    write_prediction_h5ad,
)
from src.data.spatial import SPOT_DIAMETER_UM
from src.engine.whole_slide import SlidePrediction
from src.report.plots import spatial_map


@dataclass(frozen=True)
class SlideOutputs:
    """Where one slide's outputs go (None: not written)."""

    h5ad: Path | None = None
    table: Path | None = None
    maps: Path | None = None  # a PNG
    geojson: Path | None = None
    marker: Path | None = None  # a cohort's: written last, holds the checkpoint's digest

    def paths(self) -> list[Path]:
        return [p for p in (self.h5ad, self.table, self.maps, self.geojson) if p is not None]

    def done(self, model_digest: str) -> bool:
        return (self.marker is not None and self.marker.is_file() and self.marker.read_text() == model_digest
                and all(p.is_file() for p in self.paths()))


def write_slide_outputs(result: SlidePrediction, names: list[str], out: SlideOutputs, model_digest: str = "") -> None:
    plan, spots, pred = result.plan, result.patch_set.spots, result.pred
    thumbnail = plan.thumbnail
    if out.h5ad is not None:
        source = SlideSource(image=thumbnail.image, scale=thumbnail.scale,
                             spot_diameter=SPOT_DIAMETER_UM / thumbnail.um_per_px, library_id=plan.name,
                             description="the slide's thumbnail as scanned (not stain-normalized), resampled to "
                                         "the hires and lowres sizes")
        write_prediction_h5ad(out.h5ad, spots, pred, names, {plan.name: source})
    if out.table is not None:
        write_prediction_csv(out.table, spots, pred, names)
    if out.geojson is not None:
        write_prediction_geojson(out.geojson, spots, pred, names, SPOT_DIAMETER_UM / plan.pixel_size.um_per_px)
    if out.maps is not None:
        image, xy = _tissue_view(result)
        spatial_map(out.maps, xy, pred, names, None, plan.name, image)
    if out.marker is not None:
        with atomic_path(out.marker) as tmp:
            tmp.write_text(model_digest)


def _tissue_view(result: SlidePrediction) -> tuple[np.ndarray, np.ndarray]:
    """The thumbnail cut to the tissue's box, and the spots in its pixels."""
    plan, spots = result.plan, result.patch_set.spots
    thumbnail = plan.thumbnail
    xy = (spots[["x_fullres", "y_fullres"]].to_numpy(np.float64) + 0.5) * thumbnail.scale - 0.5
    top, left, height, width = plan.region
    to_thumb = thumbnail.scale / plan.scale  # thumbnail px per pipeline px
    r0, c0 = int(top * to_thumb), int(left * to_thumb)
    r1, c1 = int(np.ceil((top + height) * to_thumb)), int(np.ceil((left + width) * to_thumb))
    return thumbnail.image[r0:r1, c0:c1], xy - (c0, r0)
