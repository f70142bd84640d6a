"""Check a file in the competition HDF5 layout and print a summary; writes nothing.

``python -m src.validate PATH``: a bad file gets one line naming file, slide, field and value, exit 2.

``python -m src.validate --truth-record OUT`` (stage ``truth``) writes which truth file ``data.truth``
names and the MD5 of its content, so that stage ``evaluate``, which depends on the record, reruns when
the file is replaced. DVC has no optional dependencies (``data.truth`` may be ""), so the stage runs on
every ``dvc repro`` (in about a second) and ``dvc status`` lists it as always changed.
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from src.core.config import load_params
from src.core.errors import InputError, exit_on_input_error
from src.core.files import write_json
from src.data.slides.validation import SlideSummary, validate_file


def print_summary(path: Path, summaries: list[SlideSummary]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 100))
    table = Table(title=f"{path}: {len(summaries)} slides", title_justify="left")
    for column in ("slide", "split", "H x W", "dtype", "spots", "cell types", "min", "mean", "max", "zeros"):
        table.add_column(column, justify="left" if column in ("slide", "split") else "right")
    for s in summaries:
        is_train = s.ref.split == "Train"
        table.add_row(
            s.ref.name,
            s.ref.split,
            f"{s.height} x {s.width}",
            s.dtype,
            str(s.n_spots),
            str(len(s.targets)) if is_train else "-",
            f"{s.target_min:.2g}" if is_train else "-",
            f"{s.target_mean:.3f}" if is_train else "-",
            f"{s.target_max:.3f}" if is_train else "-",
            f"{s.zero_fraction:.1%}" if is_train else "-",
        )
    n_train = sum(s.n_spots for s in summaries if s.ref.split == "Train")
    n_test = sum(s.n_spots for s in summaries if s.ref.split == "Test")
    console.print(table)
    rounded = [s for s in summaries if s.coordinate_rounding > 0]
    if rounded:
        worst = max(s.coordinate_rounding for s in rounded)
        console.print(f"note: float spot coordinates on {', '.join(s.ref.name for s in rounded)} are rounded to "
                      f"whole pixels (largest change {worst:.2f} px)")
    note = "" if n_train else " (no Train slides: a file to predict with a trained model, not to train on)"
    console.print(f"ok: {n_train} training spots, {n_test} test spots{note}")


def write_truth_record(out: Path, truth: str) -> None:
    """``{"truth": path, "md5": content digest}`` (both "" without a truth file)."""
    digest = ""
    if truth:
        path = Path(truth)
        if not path.is_file():
            raise InputError(f"params: data.truth = {truth!r}: file not found")
        md5 = hashlib.md5()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                md5.update(block)
        digest = md5.hexdigest()
    write_json(out, {"truth": truth, "md5": digest})


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m src.validate",
        description="Check an HDF5 file in the competition layout and print a summary.",
    )
    parser.add_argument("path", type=Path, nargs="?", help="HDF5 file (images/{Train,Test}/S_k, spots/...)")
    parser.add_argument("--truth-record", type=Path, default=None, metavar="OUT",
                        help="write data.truth's path and content digest to OUT (JSON) instead")
    parser.add_argument("--params", default="params.yaml", help="params file (reads data.truth)")
    args = parser.parse_args(argv)
    if args.truth_record is not None:
        write_truth_record(args.truth_record, load_params(args.params).data.truth)
    elif args.path is None:
        parser.error("give the HDF5 file to check (or --truth-record OUT)")
    else:
        print_summary(args.path, validate_file(args.path, need_train=False))


if __name__ == "__main__":
    main()
