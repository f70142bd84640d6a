"""Stage ``simulate``: the embedded default data set (``src.data.simulation``) in the competition layout.

``python -m src.simulate --out data/simulated.h5 --truth-out data/simulated_truth.h5 [--set simulate.seed=13]``
"""
from __future__ import annotations

import argparse
from pathlib import Path

from src.core.config import add_params_arguments, load_params
from src.core.errors import exit_on_input_error
from src.data.simulation import simulate, write_layout


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.simulate", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/simulated.h5"), help="HDF5 to write")
    parser.add_argument("--truth-out", type=Path, default=Path("data/simulated_truth.h5"),
                        help="truth file to write (observed and noise-free abundances)")
    add_params_arguments(parser, "simulate.size=600")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.set)
    slides, names = simulate(params.simulate)
    write_layout(slides, names, args.out, args.truth_out, params.simulate.seed)
    n_spots = sum(len(s.x) for _, _, s in slides)
    print(f"wrote {args.out} ({len(slides)} slides, {n_spots} spots) and {args.truth_out}")


if __name__ == "__main__":
    main()
