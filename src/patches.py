"""Stage ``patches``: register each training slide, then store a patch around every spot.

``python -m src.patches --normalized data/normalized/slides.h5 --out data/patches`` (layout: ``src.data.preprocessing.patch_store``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from src.core.config import add_params_arguments, load_params
from src.core.errors import exit_on_input_error
from src.data.preprocessing.normalization import SLIDES_FILE
from src.data.preprocessing.patch_extraction import extract_patches


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.patches", description=__doc__.split("\n")[0])
    parser.add_argument("--normalized", type=Path, default=Path("data/normalized") / SLIDES_FILE,
                        help="normalized slides (output of the normalize stage)")
    parser.add_argument("--out", type=Path, default=Path("data/patches"), help="output folder")
    add_params_arguments(parser, "patches.size=128")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.set)
    extract_patches(args.normalized, args.out, params.patches)


if __name__ == "__main__":
    main()
