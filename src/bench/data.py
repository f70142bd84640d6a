"""``python -m src.bench data``: the statistics the competition's data is known by
(``src.report.data_statistics``), for the simulated data params.yaml describes (with ``--set simulate.*``
overrides) or for a file (``--h5``)."""
from __future__ import annotations

import numpy as np


def bench_data(overrides: list[str], h5: str | None) -> tuple[str, dict]:
    from src.report.data_statistics import abundance_statistics

    if h5:
        from src.data.slides.layout import open_h5, read_spots, slide_refs, target_names

        with open_h5(h5) as f:
            train = {}
            for ref in (r for r in slide_refs(f) if r.split == "Train"):
                spots = read_spots(f, ref)
                train[ref.name] = spots[target_names(list(spots.columns))].to_numpy(np.float64)
        return h5, abundance_statistics(train)
    from src.core.config import load_params
    from src.data.simulators.families import simulate_family

    cfg = load_params(overrides=overrides).simulate
    slides, _ = simulate_family(cfg)
    train = {name: s.observed for split, name, s in slides if split == "Train"}
    tests = [s for split, _, s in slides if split == "Test"]
    test = np.concatenate([s.observed for s in tests]) if tests else None
    expected = np.concatenate([s.expected for s in tests]) if tests else None
    label = f"simulated (seed {cfg.seed}, {cfg.n_train}+{cfg.n_test} slides of {cfg.size} px)"
    return label, abundance_statistics(train, test, expected)


def print_data(label: str, stats: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"abundance statistics: {label}", title_justify="left")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for key, value in stats.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:.3f}" for k, v in value.items())
        elif isinstance(value, tuple):
            value = " - ".join(f"{v:.3g}" for v in value)
        elif isinstance(value, float):
            value = f"{value:.4g}"
        table.add_row(key, str(value))
    Console(width=110).print(table)


