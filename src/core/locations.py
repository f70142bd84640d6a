"""Where state shared between runs lives: study storages, trial artifacts and the feature cache.

DVC runs queued experiments (``dvc exp run --queue`` then ``dvc queue start``, or ``--temp``) in
temporary copies of the repository under ``.dvc/tmp/exps/``. A copy holds only git- and DVC-tracked
files and is deleted afterwards, so a study database or feature cache at a relative, git-ignored path
would start empty in every copy and vanish with it. Relative locations of shared state therefore
resolve against ``DVC_ROOT``, which DVC sets in every stage it runs to the repository's own root (the
original one, also inside a temporary copy); outside DVC, against the working directory. Stage
outputs (metrics, best params, models) stay relative to the working directory: they belong to the
experiment.
"""
from __future__ import annotations

import os
from pathlib import Path


def shared_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd())


def shared_path(path: str | Path) -> Path:
    """``path`` itself when absolute, else under :func:`shared_root`."""
    path = Path(path)
    return path if path.is_absolute() else shared_root() / path


def shared_storage_url(url: str) -> str:
    """An Optuna storage URL whose file (SQLite database or journal) lies under :func:`shared_root`
    when it is given relative; server URLs stay as they are."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        database = url.removeprefix("sqlite:///")
        if database and database != ":memory:":
            return f"sqlite:///{shared_path(database)}"
    if url.startswith("journal:"):
        journal = url.removeprefix("journal:").removeprefix("//")
        if journal:
            return f"journal:{shared_path(journal)}"
    return url
