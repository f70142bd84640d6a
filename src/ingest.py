"""Import Visium slides (Space Ranger ``outs/`` or ``.h5ad``, a full-resolution H&E image, a
deconvolution table) into the project's HDF5 layout, so every stage reads them as it reads the
competition's file.

``python -m src.ingest MANIFEST --out data/visium.h5 [--truth-out data/visium_truth.h5] [--resolution 2.115]
[--um-per-px U]``

The manifest is a CSV with one row per slide (``slide,split,spots,image,abundances,library_id,um_per_px``;
see ``src.data.slides.ingestion``). Only in-tissue spots with abundances are kept, joined on barcode; every
slide is resampled to ``--resolution`` µm/px (default the competition's scale: a 55 µm spot 26 px
across), from the pyramid level of its image that fits. The images' pixel size is read from each file;
``--um-per-px`` gives it for files that have none (the manifest's ``um_per_px`` column, per slide). Test slides with abundances go to ``--truth-out``, which
``data.truth`` can name so that ``evaluate`` scores them.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from src.core.errors import exit_on_input_error
from src.data.slides.ingestion import ingest
from src.data.spatial import COMPETITION_UM_PER_PX


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", type=Path, help="CSV: slide,split,spots,image,abundances,library_id")
    parser.add_argument("--out", type=Path, required=True, help="HDF5 file in the project's layout to write")
    parser.add_argument("--truth-out", type=Path, default=None,
                        help="truth file for the test slides' abundances (for data.truth)")
    parser.add_argument("--resolution", type=float, default=COMPETITION_UM_PER_PX, metavar="UM_PER_PX",
                        help=f"pixel size of the written slides (default {COMPETITION_UM_PER_PX:.4f}, the competition's)")
    parser.add_argument("--um-per-px", type=float, default=None,
                        help="pixel size of the full-resolution images whose files give none (the manifest's "
                             "um_per_px column sets it per slide)")
    parser.add_argument("--obsm-key", default="",
                        help="obsm key of .h5ad abundances (default: cell2location's q05, then means)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    slides = ingest(args.manifest, args.out, args.truth_out, args.resolution, args.um_per_px, args.obsm_key)
    n_spots = sum(len(s.x) for s in slides)
    types = next((len(s.abundances.columns) for s in slides if s.abundances is not None), 0)
    print(f"wrote {args.out}: {len(slides)} slides, {n_spots} spots, {types} cell types at {args.resolution:.3f} um/px"
          + (f", and {args.truth_out}" if args.truth_out else "") + f" in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
