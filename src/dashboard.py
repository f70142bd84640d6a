"""Review the studies in optuna-dashboard: ``python -m src.dashboard [--storage URL] [--port 8080]``
(``make dashboard``), with the trials' artifacts (per-type bars, out-of-fold tables).

The storage is ``tune.storage`` (default ``sqlite:///studies/studies.db``). A fresh clone's ``dvc repro``
trains from the recipe committed with the code (stage ``tune``'s outputs are in git, so DVC skips the
stage) and runs no study: with no study stored this says in one line how to run one, and creates no
empty database on the way.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from src.core.config import add_params_arguments, load_params
from src.core.errors import InputError, exit_on_input_error
from src.core.locations import shared_path, shared_storage_url
from src.search.storage import create_storage, is_journal
from src.search.study import ARTIFACT_DIR, DEFAULT_STORAGE

NO_STUDY = ("holds no study yet: a fresh clone's `dvc repro` trains from the committed recipe and runs none. "
            "Run one with `dvc repro -f tune` (the default study, a few minutes on a CPU) or `python -m src.tune`")


def stored_file(url: str) -> Path | None:
    """The file behind a SQLite or journal URL (None for a server)."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    if is_journal(url):
        return Path(url.removeprefix("journal:").removeprefix("//"))
    return None


def open_studies(url: str, heartbeat_s: int):
    """The storage at ``url`` with at least one study in it, else a one-line error (nothing created)."""
    path = stored_file(url)
    if path is not None and not path.is_file():
        raise InputError(f"{path}: {NO_STUDY}")
    storage = create_storage(url, heartbeat_s)
    if not storage.get_all_studies():
        raise InputError(f"{path or url}: {NO_STUDY}")
    return storage


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", default=None, help=f"Optuna storage URL (default: tune.storage, else "
                                                        f"{DEFAULT_STORAGE})")
    parser.add_argument("--artifacts", type=Path, default=ARTIFACT_DIR, help="the trials' artifact folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    add_params_arguments(parser, "tune.storage=journal:studies/journal.log")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.set)
    url = shared_storage_url(args.storage or params.tune.storage or DEFAULT_STORAGE)
    storage = open_studies(url, params.tune.heartbeat_s)
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import run_server

    artifacts = shared_path(args.artifacts)
    artifacts.mkdir(parents=True, exist_ok=True)
    print(f"optuna-dashboard on http://{args.host}:{args.port} over {url} (Ctrl-C stops it)")
    run_server(storage, host=args.host, port=args.port, artifact_store=FileSystemArtifactStore(str(artifacts)))


if __name__ == "__main__":
    main()
