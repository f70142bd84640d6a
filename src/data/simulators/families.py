"""The simulated data families, by ``simulate.family``: ``compartments`` (the embedded default,
``src/data/simulators/compartments.py``) and ``cells`` (``src/data/simulators/cells.py``), built on different
assumptions so that what is chosen on one can be scored on the other."""
from __future__ import annotations

from src.core.sections import SimulateConfig
from src.data.simulators.cells import simulate_cells
from src.data.simulators.compartments import SimulatedSlide, simulate


def simulate_family(cfg: SimulateConfig) -> tuple[list[tuple[str, str, SimulatedSlide]], list[str]]:
    """All slides of ``cfg``'s family as (split, name, slide), plus the cell-type names."""
    return simulate_cells(cfg) if cfg.family == "cells" else simulate(cfg)
