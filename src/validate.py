"""Check a file in the competition HDF5 layout and print a summary; writes nothing.

``python -m src.validate PATH``: a bad file gets one line naming file, slide, field and value, exit 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from src.core.errors import exit_on_input_error
from src.data.validation import SlideSummary, validate_file


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


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m src.validate",
        description="Check an HDF5 file in the competition layout and print a summary.",
    )
    parser.add_argument("path", type=Path, help="HDF5 file (images/{Train,Test}/S_k, spots/...)")
    args = parser.parse_args(argv)
    print_summary(args.path, validate_file(args.path, need_train=False))


if __name__ == "__main__":
    main()
