"""``python -m src.bench coordinates``: on sections no spatial assay has seen, do the spot coordinates
the model fuses help or hurt its maps?

A model fuses each spot's position relative to its slide (``x / W, y / H``). Over an H&E-only slide
``predict --wsi`` measures it relative to the tissue's bounding box (what a Visium capture area
frames); on a section of another shape and size that may mean little. This bench simulates slides
the delivered model never saw (the embedded default's own world, its test slide and the next ones the
simulator draws after it, written as scanner files with Space Ranger's spot tables) and scores, per
model, the map metric (per cell type, the Spearman
across a slide's spots, mean over types) and the spot metric of

- the spot path: coordinates relative to the whole image, as ``ingest`` + ``predict --h5`` give them;
- the H&E-only path at the same spots: coordinates relative to the tissue's box, as ``--wsi`` gives them;

for the study's best recipe retrained as tuned (its fusion) and with ``model.fusion: none``, and for
the delivered checkpoint and what ``train --ensemble studies/ensemble.yaml --fusion none`` delivers
(the README's position-free model). All train on the pipeline's own patches (``data/patches``).

    python -m src.bench coordinates [--slides 4] [--model models/model.pt] [--best studies/best_params.yaml]
        [--ensemble studies/ensemble.yaml]
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml


@dataclass
class HeldOutSlide:
    image: Path
    name: str
    fullres: np.ndarray  # N x 2 level-0 px
    truth: np.ndarray  # N x T abundances


def held_out_slides(work: Path, n_slides: int, log=print) -> list[HeldOutSlide]:
    """The default data's test slide and the ones after it: the simulator draws its slides one after
    the other from the same cell types, so with more test slides the training slides stay the
    pipeline's and every test slide is one no model here was trained on."""
    from src import simulate
    from src.data.slides.visium import read_spaceranger

    folder = work / "held_out"
    simulate.main(["--out", str(folder / "sim.h5"), "--truth-out", str(folder / "truth.h5"), "--visium",
                   str(folder / "visium"), "--geometry", "competition", "--set", f"simulate.n_test={n_slides}"])
    manifest = pd.read_csv(folder / "visium" / "manifest_spaceranger.csv")
    slides = []
    for row in manifest[manifest["split"] == "test"].to_dict("records"):
        spots = read_spaceranger(folder / "visium" / row["spots"])
        table = pd.read_csv(folder / "visium" / row["abundances"]).set_index("barcode")
        keep = np.isin(spots.barcodes, table.index)
        slides.append(HeldOutSlide(folder / "visium" / row["image"], row["slide"],
                                   np.column_stack([spots.x[keep], spots.y[keep]]),
                                   table.loc[spots.barcodes[keep]].to_numpy(np.float64)))
    log(f"simulated {len(slides)} held-out slides")
    return slides


def train_recipe(kind: str, recipe: Path, fusion: str | None, out: Path) -> Path:
    """``train --best`` or ``--ensemble`` (``kind``) on the pipeline's patches, with ``fusion`` when given."""
    from src import train

    train.main([f"--{kind}", str(recipe), "--out", str(out), *(["--fusion", fusion] if fusion else [])])
    return out


def score(model_path: Path, slides: list[HeldOutSlide], from_tissue: bool) -> tuple[float, float]:
    """(map metric, spot metric) over the slides, each predicted at its spot table's positions."""
    from src.engine.metrics import competition_score, map_score
    from src.engine.whole_slide import predict_whole_slide
    from src.model.checkpoint import load_checkpoint

    model, meta = load_checkpoint(model_path)
    preds, truths, names = [], [], []
    for slide in slides:
        result = predict_whole_slide(model, meta, model_path, slide.image, name=slide.name,
                                     spots_fullres=slide.fullres, region_from_tissue=from_tissue, log=lambda _: None)
        preds.append(result.pred)
        truths.append(slide.truth)
        names.append(np.full(len(slide.truth), slide.name))
    pred, true, slide_of = np.concatenate(preds), np.concatenate(truths), np.concatenate(names)
    return map_score(pred, true, slide_of), competition_score(pred, true)


def run(n_slides: int, model: Path, best: Path, ensemble: Path, work: Path | None = None
        ) -> tuple[str, list[tuple[str, str, float, float]]]:
    """(title, rows of model, coordinates, map metric, spot metric)."""
    with tempfile.TemporaryDirectory(prefix="bench-coordinates-") as temporary:
        work = work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        slides = held_out_slides(work, n_slides)
        tuned = yaml.safe_load(best.read_text())["params"].get("model.fusion", "product")
        models = {f"best recipe, fusion {tuned}": train_recipe("best", best, None, work / "tuned.pt"),
                  "best recipe, fusion none": train_recipe("best", best, "none", work / "none.pt"),
                  "delivered checkpoint": model,
                  "delivered, --fusion none": train_recipe("ensemble", ensemble, "none", work / "delivered_none.pt")}
        rows = []
        for label, path in models.items():
            for from_tissue, where in ((False, "whole image (spot path)"), (True, "tissue box (--wsi)")):
                rows.append((label, where, *score(path, slides, from_tissue)))
    title = f"{len(slides)} held-out slides ({sum(len(s.truth) for s in slides)} spots) of the embedded default's world"
    return title, rows


def report(title: str, rows: list[tuple[str, str, float, float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("model", "coordinates", "map Spearman", "spot Spearman"):
        table.add_column(column, justify="right" if "Spearman" in column else "left")
    for label, where, map_metric, spot_metric in rows:
        table.add_row(label, where, f"{map_metric:.4f}", f"{spot_metric:.4f}")
    Console(width=120).print(table)
