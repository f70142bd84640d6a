"""Stage ``simulate``: the embedded default data set (``src.data.simulators.compartments``) in the competition layout.

``python -m src.simulate --out data/simulated.h5 --truth-out data/simulated_truth.h5 [--set simulate.seed=13]``

``--visium DIR`` writes the slides as labs hold Visium data (``src.data.simulators.visium_export``): Space Ranger
folders, full-resolution scanner files ``--fullres-scale`` times finer (JPEG-tiled pyramidal TIFFs, the
test slides as Aperio SVS), ``.h5ad`` files, abundance CSVs and a manifest per route for
``python -m src.ingest``. Its spots lie on Visium's lattice (``--geometry visium``: 100 µm apart, 55 µm
across, so 47.3 px apart at the simulator's 2.115 µm/px) unless ``--geometry competition`` keeps the
competition's 25 px; the tissue drawn is the same either way.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from src.core.config import add_params_arguments, load_params
from src.core.errors import InputError, exit_on_input_error
from src.data.simulators.compartments import write_layout
from src.data.simulators.families import simulate_family
from src.data.simulators.visium_export import export_visium
from src.data.spatial import COMPETITION_PITCH_PX, COMPETITION_UM_PER_PX, SPOT_PITCH_UM


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.simulate", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/simulated.h5"), help="HDF5 to write")
    parser.add_argument("--truth-out", type=Path, default=None,
                        help="truth file to write (observed and noise-free abundances; default: OUT's name + _truth)")
    parser.add_argument("--visium", type=Path, default=None,
                        help="also write the slides as Space Ranger folders, .h5ad files and abundance CSVs here")
    parser.add_argument("--fullres-scale", type=int, default=4,
                        help="full-resolution pixels per pixel of the layout in the --visium images (default 4)")
    parser.add_argument("--geometry", choices=("visium", "competition"), default=None,
                        help="spot lattice of a --visium export: visium (default; 100 um pitch) or competition (25 px)")
    add_params_arguments(parser, "simulate.size=600")
    args = parser.parse_args(argv)
    overrides = list(args.set)
    if args.geometry is not None and args.visium is None:
        raise InputError("--geometry: only for a --visium export")
    if args.visium is not None:
        if any(item.split("=", 1)[0].strip() == "simulate.pitch" for item in overrides):
            raise InputError("--set simulate.pitch: a --visium export sets the pitch by --geometry (visium or competition)")
        pitch = SPOT_PITCH_UM / COMPETITION_UM_PER_PX if args.geometry in (None, "visium") else COMPETITION_PITCH_PX
        overrides.append(f"simulate.pitch={pitch}")
    params = load_params(args.params, overrides)
    if args.truth_out is None:
        args.truth_out = args.out.with_name(f"{args.out.stem}_truth.h5")
    slides, names = simulate_family(params.simulate)
    write_layout(slides, names, args.out, args.truth_out, params.simulate.seed)
    n_spots = sum(len(s.x) for _, _, s in slides)
    print(f"wrote {args.out} ({len(slides)} slides, {n_spots} spots) and {args.truth_out}")
    if args.visium is not None:
        if args.fullres_scale < 1:
            raise InputError(f"--fullres-scale {args.fullres_scale}: expected 1 or more")
        manifests = export_visium(args.out, args.truth_out, args.visium, args.fullres_scale, params.simulate.seed)
        print(f"wrote {args.visium}: manifests {manifests['spaceranger'].name} and {manifests['h5ad'].name}")


if __name__ == "__main__":
    main()
