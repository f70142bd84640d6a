"""Predict cell-type abundances for every Test slide of a file in the project's layout (the
competition's file, or slides imported with ``python -m src.ingest``; the file needs no Train slides),
or for H&E whole-slide images that no spatial assay has seen (``--wsi``).

``python -m src.predict --model models/model.pt --h5 FILE --out submission.csv [--table preds.csv] [--h5ad preds.h5ad]``
``python -m src.predict --model models/model.pt --wsi SLIDE [--um-per-px U] --h5ad OUT.h5ad [--table OUT.csv] [--maps DIR] [--geojson OUT.geojson]``
``python -m src.predict --model models/model.pt --wsi cohort.csv --out-dir DIR [--outputs h5ad,table,maps,geojson] [--shard I/N]``

The checkpoint holds everything needed (weights, preprocessing, the reference stain, TTA and σ). Each
Test slide is stain-normalized to that reference, cropped around its spots and predicted. ``--out``:
one row per test spot, ``ID`` (row of the concatenated test spot tables), ``slide``, ``x``, ``y``, then
one column per cell type. ``--table``: the same with the spots' barcodes and source coordinates when
the file was imported. ``--h5ad``: an AnnData file with the predictions in ``obsm["predicted_abundance"]``
(and as ``X``), the coordinates in ``obsm["spatial"]`` and each slide's hires and lowres image with its
scalefactors under ``uns["spatial"]``, as squidpy and scanpy draw them. ``--maps DIR``: one spatial map
per slide (``DIR/<slide>.png``: the most variable predicted cell types on the tissue, with colour bars).
Every value is an abundance on the training table's scale, comparable across spots and slides.

``--wsi``: any image the readers take (SVS, NDPI, MRXS, SCN, pyramidal TIFF, ...). The tissue is found
on a thumbnail, the model's own spot lattice (hexagonal, its pitch and spot size in µm) is laid over
it, and each spot's patch is cut, stain-normalized to the model's reference and predicted while the
slide streams past (``src.engine.whole_slide``). ``obsm["spatial"]`` is in the slide's full-resolution
pixels; ``--geojson`` writes the spots as QuPath detections. A CSV manifest (``image`` column, optional
``name`` and ``um_per_px``; paths relative to the manifest) predicts a cohort into ``--out-dir``, one
set of files per slide: slides whose files exist are skipped, so a stopped run is rerun as it was
started, and ``--shard I/N`` takes every N-th slide from the I-th (0-based), one worker per shard.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from src.core.errors import InputError, exit_on_input_error
from src.core.files import write_csv
from src.data.preprocessing.patch_extraction import crop_test_slides
from src.data.preprocessing.patch_set import PatchSet
from src.data.preprocessing.stain import StainNormalizer
from src.data.slides.layout import open_h5, read_fullres, read_um_per_px, slide_refs
from src.data.slides.prediction_files import SlideSource, write_prediction_csv, write_prediction_h5ad
from src.data.spatial import SPOT_DIAMETER_UM
from src.engine.inference import predict_abundance
from src.model.checkpoint import load_checkpoint
from src.report.plots import spatial_map
from src.report.whole_slide_outputs import SlideOutputs

RESOLUTION_TOLERANCE = 0.01  # relative: a slide at another resolution shows the tissue at another size


def check_resolution(h5_path: Path, model_um_per_px: float) -> None:
    """The slides must be at the resolution the model was trained at (their patches cover the same tissue)."""
    if not h5_path.is_file():
        return  # crop_test_slides says so
    with open_h5(h5_path) as h5:
        um_per_px = read_um_per_px(h5)
    if abs(um_per_px / model_um_per_px - 1) > RESOLUTION_TOLERANCE:
        raise InputError(f"{h5_path}: slides at {um_per_px:g} um/px, but the model was trained at "
                         f"{model_um_per_px:g} um/px: import them again with `python -m src.ingest ... "
                         f"--resolution {model_um_per_px:g}`")


def predict_file(model_path: Path, h5_path: Path, out: Path, table: Path | None = None,
                 h5ad: Path | None = None, maps: Path | None = None, log=print) -> pd.DataFrame:
    for extra, suffix in ((table, ".csv"), (h5ad, ".h5ad")):
        if extra is not None and extra.suffix != suffix:
            raise InputError(f"{extra}: expected a {suffix} file name")
    model, meta = load_checkpoint(model_path)
    check_resolution(h5_path, meta["um_per_px"])
    patch_set = crop_test_slides(h5_path, StainNormalizer.from_dict(meta["stain"]), meta["patch_size"],
                                 meta["targets"], log)
    pred = predict_abundance(model, meta, patch_set)
    names = meta["targets"]
    spots = patch_set.spots
    frame = spots[["slide", "x", "y"]].copy()
    frame.insert(0, "ID", np.arange(len(frame)))
    frame = pd.concat([frame, pd.DataFrame(pred, columns=names)], axis=1)
    if h5ad is not None:
        write_prediction_h5ad(h5ad, spots, pred, names, _slide_sources(h5_path, patch_set))
    if table is not None:
        write_prediction_csv(table, spots, pred, names)
    if maps is not None:
        maps.mkdir(parents=True, exist_ok=True)
        for slide, rows in spots.groupby("slide", sort=False).indices.items():
            spatial_map(maps / f"{slide}.png", spots[["x", "y"]].to_numpy()[rows], pred[rows], names, None, slide,
                        patch_set.slide_image(slide))
    write_csv(out, frame)
    return frame


def _slide_sources(h5_path: Path, patch_set: PatchSet) -> dict[str, SlideSource]:
    """Each test slide's image (as predicted) and how its pixels relate to the source's."""
    with open_h5(h5_path) as h5:
        um_per_px = read_um_per_px(h5)
        out = {}
        for ref in (r for r in slide_refs(h5) if r.split == "Test"):
            attrs = (read_fullres(h5, ref) or (None, {}))[1]
            out[ref.name] = SlideSource(image=patch_set.slide_image(ref.name), scale=float(attrs.get("scale", 1.0)),
                                        spot_diameter=SPOT_DIAMETER_UM / um_per_px, library_id=attrs.get("library_id", ""),
                                        scalefactors=attrs.get("scalefactors", {}))
    return out


OUTPUT_KINDS = ("h5ad", "table", "maps", "geojson")


@dataclass(frozen=True)
class WholeSlideJob:
    image: Path
    name: str
    um_per_px: float | None
    outputs: SlideOutputs


def slide_name(path: Path) -> str:
    """A slide's name from its file: the name without its last suffix (``.ome.tif`` counts as one), so
    ``2023.05.01_A.svs`` is ``2023.05.01_A``."""
    name = path.name
    for compound in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(compound):
            return name[: -len(compound)]
    return Path(name).stem


def read_cohort(manifest: Path, out_dir: Path, kinds: list[str], um_per_px: float | None) -> list[WholeSlideJob]:
    """One job per manifest row (``image``, optional ``name`` and ``um_per_px``), every row's fields
    checked first; a missing image is that slide's failure, found when its turn comes."""
    try:
        table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{manifest}: not a CSV manifest ({str(err).splitlines()[0]})") from None
    if "image" not in table.columns:
        raise InputError(f"{manifest}: no 'image' column (columns: image, optional name and um_per_px)")
    suffix = {"h5ad": ".h5ad", "table": ".csv", "maps": ".png", "geojson": ".geojson"}
    jobs, seen = [], set()
    for row_number, row in enumerate(table.to_dict("records"), start=2):
        where = f"{manifest}: line {row_number}"
        if not row["image"]:
            raise InputError(f"{where}: no image")
        image = Path(row["image"]) if Path(row["image"]).is_absolute() else manifest.parent / row["image"]
        name = row.get("name") or slide_name(image)
        if "/" in name or name in (".", ".."):
            raise InputError(f"{where}: slide name {name!r}: a file name, without '/'")
        if name in seen:
            raise InputError(f"{where}: slide name {name!r} appears twice (give each row its own name)")
        seen.add(name)
        given = row.get("um_per_px", "")
        try:
            slide_um = float(given) if given else um_per_px
        except ValueError:
            raise InputError(f"{where}: um_per_px = {given!r} is not a number") from None
        jobs.append(WholeSlideJob(image, name, slide_um, SlideOutputs(
            **{kind: out_dir / f"{name}{suffix[kind]}" for kind in kinds}, marker=out_dir / f".{name}.done")))
    return jobs


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if count < 1 or not 0 <= index < count:
        raise InputError(f"--shard {text}: expected I/N with 0 <= I < N (e.g. 0/4 ... 3/4)")
    return index, count


def checkpoint_digest(path: Path) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def predict_slides(model_path: Path, jobs: list[WholeSlideJob], cohort: bool, log=print) -> list[str]:
    """Predict the jobs (a cohort's: those not done with this checkpoint); returns the failures' one-line
    errors. A cohort goes on past a bad slide, whatever stopped it: nothing of that slide is written."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from src.engine.whole_slide import predict_whole_slide
    from src.report.whole_slide_outputs import write_slide_outputs

    model, meta = load_checkpoint(model_path)
    digest = checkpoint_digest(model_path)
    todo = [job for job in jobs if not job.outputs.done(digest)]
    if len(todo) < len(jobs):
        log(f"{len(jobs) - len(todo)} of {len(jobs)} slides already done with this model: skipped")
    failures = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    for number, job in enumerate(todo, start=1):
        with Progress(*columns, transient=True) as bar:
            def ticks(what: str, total: int, name=job.name):
                task = bar.add_task(f"{name}: {what}", total=total)
                return lambda n: bar.advance(task, n)

            try:
                if not job.image.is_file():
                    raise InputError(f"{job.image}: slide not found")
                result = predict_whole_slide(model, meta, model_path, job.image, job.um_per_px, job.name,
                                             ticks=ticks, log=log)
                write_slide_outputs(result, meta["targets"], job.outputs, digest)
            except Exception as err:  # a cohort of a thousand slides does not stop at one
                if not cohort:
                    raise
                text = str(err).splitlines()[0] if str(err) else ""
                line = text if isinstance(err, InputError) else f"{job.image}: {type(err).__name__}: {text}"
                failures.append(line)
                log(f"error: {line}")
                continue
        written = ", ".join(str(p) for p in job.outputs.paths())
        log(f"[{number}/{len(todo)}] wrote {written}: {len(result.pred)} spots x {len(meta['targets'])} cell types")
    return failures


def _wsi_jobs(args) -> list[WholeSlideJob]:
    if args.wsi.suffix.lower() == ".csv":
        for option, value in (("--h5ad", args.h5ad), ("--table", args.table), ("--maps", args.maps),
                              ("--geojson", args.geojson)):
            if value is not None:
                raise InputError(f"{option}: a manifest writes every slide's files into --out-dir (choose them "
                                 "with --outputs)")
        if args.out_dir is None:
            raise InputError(f"{args.wsi}: a manifest writes one set of files per slide: give --out-dir DIR")
        kinds = [k.strip() for k in (args.outputs or "h5ad").split(",") if k.strip()]
        unknown = [k for k in kinds if k not in OUTPUT_KINDS]
        if unknown or not kinds:
            raise InputError(f"--outputs {args.outputs}: choose from {', '.join(OUTPUT_KINDS)}")
        index, count = parse_shard(args.shard)
        return read_cohort(args.wsi, args.out_dir, kinds, args.um_per_px)[index::count]
    for option, value in (("--out-dir", args.out_dir), ("--outputs", args.outputs), ("--shard", args.shard)):
        if value is not None:
            raise InputError(f"{option}: for a manifest of slides (--wsi cohort.csv); one slide writes --h5ad, "
                             "--table, --maps or --geojson")
    if not args.wsi.is_file():
        raise InputError(f"{args.wsi}: slide not found")
    name = slide_name(args.wsi)
    for given, suffix in ((args.h5ad, ".h5ad"), (args.table, ".csv"), (args.geojson, ".geojson")):
        if given is not None and given.suffix != suffix:
            raise InputError(f"{given}: expected a {suffix} file name")
    outputs = SlideOutputs(args.h5ad, args.table, args.maps / f"{name}.png" if args.maps else None, args.geojson)
    if not outputs.paths():
        raise InputError("--wsi: say what to write (--h5ad, --table, --maps or --geojson)")
    return [WholeSlideJob(args.wsi, name, args.um_per_px, outputs)]


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint written by stage train")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--h5", type=Path, help="HDF5 file in the project's layout (Test slides)")
    source.add_argument("--wsi", type=Path, help="an H&E whole-slide image, or a CSV manifest of them")
    parser.add_argument("--out", type=Path, default=None, help="--h5: submission CSV to write (ID, slide, x, y, "
                                                                "cell types)")
    parser.add_argument("--table", type=Path, default=None, help="CSV with barcodes and cell-type names to write")
    parser.add_argument("--h5ad", type=Path, default=None, help="AnnData file to write (predictions in obsm)")
    parser.add_argument("--maps", type=Path, default=None, help="folder for one spatial map per slide (PNG)")
    parser.add_argument("--geojson", type=Path, default=None, help="--wsi: the spots as QuPath detections")
    parser.add_argument("--um-per-px", type=float, default=None, help="--wsi: the slide's pixel size, for files "
                                                                      "that record none (overrides the file's)")
    parser.add_argument("--out-dir", type=Path, default=None, help="--wsi manifest: folder for every slide's files")
    parser.add_argument("--outputs", default=None, help="--wsi manifest: which files per slide (comma list of "
                                                          f"{', '.join(OUTPUT_KINDS)}; default h5ad)")
    parser.add_argument("--shard", default=None, help="--wsi manifest: I/N, this worker's share of the slides")
    args = parser.parse_args(argv)
    if args.wsi is not None:
        failures = predict_slides(args.model, _wsi_jobs(args), cohort=args.wsi.suffix.lower() == ".csv")
        if failures:
            raise InputError(f"{len(failures)} slides failed (their errors are above; nothing of them was "
                             "written): rerun the same command to retry them")
        return
    if args.out is None:
        parser.error("--h5 needs --out (the submission CSV)")
    frame = predict_file(args.model, args.h5, args.out, args.table, args.h5ad, args.maps)
    written = ", ".join(str(p) for p in (args.out, args.table, args.h5ad, args.maps) if p is not None)
    print(f"wrote {written}: {len(frame)} spots x {frame.shape[1] - 4} cell types")


if __name__ == "__main__":
    main()
