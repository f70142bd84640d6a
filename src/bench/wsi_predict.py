"""``python -m src.bench wsi``: what predicting an H&E whole-slide image costs as the slide grows, and
how much of that is the model.

For each slide edge (default 10,000, 20,000 and 40,000 px at 0.25 µm/px, a 40x scan) a JPEG-tiled
pyramidal TIFF is written tile by tile as ``python -m src.bench import`` writes its slides (the same
H&E-like pattern and levels), here on an elliptic section with glass around it, so tissue detection
and the lattice have something to find and to leave out. Then, in a process of its own per slide (so
peak memory does not accumulate), the checkpoint (default ``models/model.pt``) predicts it through
``src.engine.whole_slide.predict_whole_slide``, the path ``predict --wsi`` takes, timed whole and by
stage from the hooks it calls between its stages: plan (thumbnail, tissue, hexagonal lattice), cut
(the slide read twice in bands: the stain sample, then each spot's patch stain-normalized and written
to disk) and predict (``predict_abundance``: every recipe, TTA, smoothing).

Printed per slide: the spots, the seconds of each stage, spots per second of the whole path beside
spots per second of the prediction alone on the same spots, the share of the time spent outside the
model (reading, stain and cropping), and the process's peak resident memory (sampled, as the import
benchmark samples it): the slide is streamed in bands, so what grows is per spot, not per pixel.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from src.bench.scale import run_measured
from src.bench.wsi_import import DOWNSAMPLES, GRAIN, UM_PER_PX, tissue_pixel
from src.data.slides.wsi_write import procedural_tiles, write_pyramidal_tiff

SECTION = (0.42, 0.34)  # the tissue's semi-axes (x, y) as shares of the edge: about 45% of the slide
GLASS = 250  # the glass's grey level: too faint to be tissue (summed optical density about 0.06)
STAGES = ("planned", "patches cut", "spots predicted")  # what predict_whole_slide reports, in order


def section_pixel(edge: int, downsample: float):
    """The import benchmark's H&E pattern inside an ellipse centred on the slide, glass outside."""
    tissue = tissue_pixel(downsample)

    def pixel(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        x = (cols * downsample - edge / 2) / (SECTION[0] * edge)
        y = (rows * downsample - edge / 2) / (SECTION[1] * edge)
        glass = (GLASS + GRAIN / 4).clip(0, 255)
        return np.where((x**2 + y**2 <= 1)[..., None], tissue(rows, cols), glass).astype(np.uint8)
    return pixel


def write_slide(path: Path, edge: int, um_per_px: float) -> None:
    levels = [(edge // d, edge // d, procedural_tiles(edge // d, edge // d, section_pixel(edge, d)))
              for d in DOWNSAMPLES]
    write_pyramidal_tiff(path, levels, um_per_px)


def measure(slide: Path, model_path: Path, um_per_px: float) -> dict:
    """Predict ``slide`` as ``predict --wsi`` does; the seconds of each stage, from the moments
    ``predict_whole_slide`` logs its plan and asks for its cutting and predicting progress bars."""
    from src.core.devices import default_device
    from src.engine.whole_slide import predict_whole_slide
    from src.model.checkpoint import load_checkpoint

    model, meta = load_checkpoint(model_path)
    marks: dict[str, float] = {}

    def log(line: str) -> None:
        marks.setdefault("planned", time.perf_counter())
        print(line, flush=True)

    def ticks(what: str, total: int):
        marks[what] = time.perf_counter()
        return lambda n: None

    start = time.perf_counter()
    result = predict_whole_slide(model, meta, model_path, slide, um_per_px, log=log, ticks=ticks)
    end = time.perf_counter()
    if tuple(marks) != STAGES:
        raise RuntimeError(f"predict_whole_slide reported {list(marks)}, not {list(STAGES)}: its stages changed, "
                           "so the benchmark's timing of them must too")
    planned, _, predicting = (marks[s] for s in STAGES)
    return {"spots": len(result.pred), "plan_s": planned - start, "cut_s": predicting - planned,
            "predict_s": end - predicting, "total_s": end - start, "device": default_device().type,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run(edges: list[int], model: Path, um_per_px: float = UM_PER_PX, work: Path | None = None, log=print
        ) -> list[dict]:
    """One row per slide edge; the slides are written under ``work`` (a temporary folder when None)
    and removed once measured."""
    rows = []
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-wsi-", dir=work) as folder:
        for edge in edges:
            slide, out = Path(folder) / f"slide_{edge}.tif", Path(folder) / f"slide_{edge}.json"
            log(f"writing a {edge} x {edge} px slide at {um_per_px} um/px ...")
            write_slide(slide, edge, um_per_px)
            file_mb = slide.stat().st_size / 2**20
            seconds, peak = run_measured([sys.executable, "-m", "src.bench.wsi_predict", str(slide), "--model",
                                          str(model), "--um-per-px", str(um_per_px), "--out", str(out)], log)
            row = {"edge": edge, "file_mb": file_mb, "process_s": seconds, "peak_mb": peak,
                   **json.loads(out.read_text())}
            rows.append(row)
            log(f"{edge} x {edge} px ({file_mb:.0f} MB file): {row['spots']:,} spots in {row['total_s']:.1f} s "
                f"(process {seconds:.1f} s), peak memory {peak:.0f} MB sampled, {row['maxrss_mb']:.0f} MB max RSS")
            slide.unlink()  # the next, larger slide needs the disk more
    return rows


def report(rows: list[dict], model: Path, um_per_px: float = UM_PER_PX) -> None:
    from rich.console import Console
    from rich.table import Table

    devices = ", ".join(sorted({r["device"] for r in rows}))
    table = Table(title=f"Predicting an H&E whole slide at {um_per_px} um/px with {model} ({devices})")
    for column in ("slide edge (px)", "level 0 (Mpx)", "spots", "plan (s)", "cut (s)", "predict (s)", "total (s)",
                   "spots/s whole path", "spots/s model only", "outside the model (%)", "peak memory (MB)"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['edge']:,}", f"{r['edge'] ** 2 / 1e6:,.0f}", f"{r['spots']:,}", f"{r['plan_s']:.1f}",
                      f"{r['cut_s']:.1f}", f"{r['predict_s']:.1f}", f"{r['total_s']:.1f}",
                      f"{r['spots'] / r['total_s']:,.1f}", f"{r['spots'] / r['predict_s']:,.1f}",
                      f"{100 * (1 - r['predict_s'] / r['total_s']):.0f}", f"{r['peak_mb']:.0f}")
    console = Console()
    console.print(table)
    console.print("plan: thumbnail, tissue, lattice; cut: the slide read twice in bands (stain sample, then "
                  "patches stain-normalized and written); predict: every recipe, TTA, smoothing")
    if len(rows) > 1:
        small, large = min(rows, key=lambda r: r["edge"]), max(rows, key=lambda r: r["edge"])
        grown = large["peak_mb"] - small["peak_mb"]
        console.print(f"peak memory {large['edge']:,} px / {small['edge']:,} px: {large['peak_mb'] / small['peak_mb']:.2f}x "
                      f"for {large['edge'] ** 2 / small['edge'] ** 2:.0f}x the pixels and "
                      f"{large['spots'] / small['spots']:.1f}x the spots: {grown:+.0f} MB, "
                      f"{1024 * grown / max(1, large['spots'] - small['spots']):.1f} KB per added spot (the bands and "
                      "the thumbnail are bounded; what grows is per spot: the model's neighbourhood inputs, predictions)")


def main(argv: list[str] | None = None) -> None:
    """The child process of one slide: ``python -m src.bench.wsi_predict SLIDE --model M --out JSON``."""
    parser = argparse.ArgumentParser(prog="python -m src.bench.wsi_predict")
    parser.add_argument("slide", type=Path)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--um-per-px", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.write_text(json.dumps(measure(args.slide, args.model, args.um_per_px)))


if __name__ == "__main__":
    main()
