"""Stage ``normalize``: validate ``data.h5``, fit the reference stain once, normalize every slide.

Writes ``data/normalized/slides.h5`` (the same competition layout, images as uint8, spot tables
copied) and ``data/normalized/stain.json`` (the fitted reference; checkpoints carry it for predict).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from src.core.config import add_params_arguments, load_params
from src.core.errors import exit_on_input_error
from src.data.preprocessing.normalization import normalize_file


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.normalize", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/normalized"), help="output folder")
    add_params_arguments(parser, "stain.method=macenko")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.set)
    truth = Path(params.data.truth) if params.data.truth else None
    normalize_file(Path(params.data.h5), args.out, params.stain, truth)


if __name__ == "__main__":
    main()
