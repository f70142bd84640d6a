"""Shared fixtures: tiny simulated slides written in the competition layout."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from src.core.sections import SimulateConfig
from src.data.simulators.compartments import simulate, write_layout

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_OUTPUTS = ("dvc.lock", "metrics", "studies/best_params.yaml", "studies/ensemble.yaml", "outputs", "plots")


def _digests() -> dict[str, str]:
    import hashlib

    files = [p for name in PIPELINE_OUTPUTS for p in sorted((ROOT / name).rglob("*") if (ROOT / name).is_dir()
                                                            else [ROOT / name]) if p.is_file()]
    return {str(p.relative_to(ROOT)): hashlib.blake2b(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="session", autouse=True)
def the_suite_leaves_the_pipeline_outputs_alone():
    """No test may write into the checkout's own pipeline outputs (a stage run with its default paths)."""
    before = _digests()
    yield
    after = _digests()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the tests changed the checkout's pipeline outputs: {changed}"
TINY = SimulateConfig(seed=3, n_train=2, n_test=1, size=240, pitch=25.0, n_types=35, tissue_extent=[0.8, 1.1],
                      offsets=[[0, 0], [0, 0]])


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> tuple[Path, Path]:
    """(layout file, truth file) of 2 train + 1 test simulated slides of 240 x 240 px."""
    folder = tmp_path_factory.mktemp("tiny")
    slides, names = simulate(TINY)
    write_layout(slides, names, folder / "slides.h5", folder / "truth.h5", TINY.seed)
    return folder / "slides.h5", folder / "truth.h5"


@pytest.fixture
def tiny_copy(tiny_dataset, tmp_path) -> Path:
    """A private, writable copy of the tiny layout file."""
    path = tmp_path / "slides.h5"
    shutil.copy(tiny_dataset[0], path)
    return path


def read_layout(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file as {key: array}."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda key, obj: out.__setitem__(key, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def write_datasets(path: Path, datasets: dict[str, np.ndarray]) -> Path:
    with h5py.File(path, "w") as h5:
        for key, value in datasets.items():
            h5.create_dataset(key, data=value)
    return path


FAST = [  # shrink the project's recipe for tests: tiny backbone and input, one epoch
    "model.backbone=resnet10t", "model.input_size=32", "model.unfrozen_blocks=1", "model.hidden=64",
    "model.coord_dim=16", "train.epochs=1", "train.batch_size=16", "infer.batch_size=64",
    "infer.tta=[identity, hflip]", "cv.n_folds=2", "train.feature_cache=false", "model.context=1.0",
    "pretrain.epochs=0",  # tests/test_pretraining.py trains backbones, in its own cache folders
    # the space around that recipe: 32-px patches, one epoch
    "tune.space.model.context={choices: [1.0, 0.5]}", "tune.space.train.epochs={low: 1, high: 2}",
    # fine-tuning backbone blocks, which the default space leaves out (a trial trains the head only)
    "tune.space.model.unfrozen_blocks={low: 0, high: 1}",
    "tune.space.train.lr_backbone={low: 1.0e-5, high: 1.0e-3, log: true}",
]


def fast_params(*overrides: str):
    from src.core.config import load_params

    return load_params(ROOT / "params.yaml", [*FAST, *overrides])


@pytest.fixture(scope="session")
def tiny_patches(tiny_dataset, tmp_path_factory) -> Path:
    """Normalized 32 px patches of the tiny slides (stage outputs of normalize + patches)."""
    from src.core.sections import PatchesConfig, StainConfig
    from src.data.preprocessing.normalization import SLIDES_FILE, normalize_file
    from src.data.preprocessing.patch_extraction import extract_patches

    folder = tmp_path_factory.mktemp("stages")
    normalize_file(tiny_dataset[0], folder / "normalized", StainConfig("vahadane", "", True, 20_000, 0),
                   log=lambda _: None)
    extract_patches(folder / "normalized" / SLIDES_FILE, folder / "patches", PatchesConfig(32, "auto", 4.0, {}),
                    log=lambda _: None)
    return folder


def study_named(storage, name: str):
    """The one study ``name`` in a storage (URL or opened), whatever its hash suffix."""
    import optuna

    from src.search.storage import create_storage

    storage = create_storage(storage, 60) if isinstance(storage, str) else storage
    names = [n for n in optuna.get_all_study_names(storage) if n.startswith(f"{name}-")]
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=storage)


@pytest.fixture(scope="session")
def postgres_url():
    """URL of a real PostgreSQL server started for this test session (stopped at its end)."""
    from tests.postgres_server import LocalPostgres

    server = LocalPostgres()
    if not server.available:
        message = "PostgreSQL server binaries (initdb, pg_ctl) not found: `make test` installs them with apt-get"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    url = server.start()
    yield url
    server.stop()


def write_tiny_checkpoint(path: Path, stain: dict | None = None, *overrides: str, pitch: float = 0.0) -> Path:
    """An untrained checkpoint of the tests' tiny recipe at the competition's scale (35 types C1..C35,
    32-px patches, the competition's 25-px pitch unless ``pitch``): what predict needs, without training."""
    import torch

    from src.data.spatial import COMPETITION_PITCH_PX, COMPETITION_UM_PER_PX
    from src.model.checkpoint import save_checkpoint
    from src.model.network import SpatialCellModel
    from src.model.targets import rank_scale

    params = fast_params(*overrides)
    torch.manual_seed(0)
    model = SpatialCellModel(params.model, n_outputs=35).eval()
    stain = stain or {"method": "none", "standardize_luminosity": False, "fit_pixels": 100_000, "seed": 0}
    save_checkpoint(path, model, targets=[f"C{i}" for i in range(1, 36)], loss=params.loss, patch_size=32,
                    infer=params.infer, stain=stain, rank_scale=rank_scale(np.random.default_rng(0).random((50, 35))).tolist(),
                    um_per_px=COMPETITION_UM_PER_PX, pitch=pitch or COMPETITION_PITCH_PX)
    return path
