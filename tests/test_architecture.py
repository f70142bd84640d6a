"""The shape of the house: imports one way (import-linter's contracts in pyproject.toml), small
modules, no forward reassigned, Optuna's public API only."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

LINT = Path(sys.executable).with_name("lint-imports")
SOURCES = sorted((ROOT / "src").rglob("*.py"))


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, timeout=300)


def test_imports_keep_the_layers_and_optuna_stays_in_the_search():
    run = _lint(ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "broken" not in run.stdout.lower().split("contracts:")[-1].replace("0 broken", "")


def test_every_module_of_src_lies_in_a_layer():
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    top = {f"src.{p.stem}" for p in (ROOT / "src").glob("*.py") if p.stem != "__init__"}
    top |= {f"src.{p.name}" for p in (ROOT / "src").iterdir() if (p / "__init__.py").is_file()}
    assert top <= named, f"outside the layers contract: {sorted(top - named)}"


def test_every_data_module_lies_in_a_room():
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    rooms = next(c for c in contracts if c["name"].startswith("data rooms"))["layers"]
    named = {name.strip() for layer in rooms for name in layer.split("|")}
    data = ROOT / "src" / "data"
    found = {f"src.data.{p.stem}" for p in data.glob("*.py") if p.stem != "__init__"}
    found |= {f"src.data.{p.name}" for p in data.iterdir() if (p / "__init__.py").is_file()}
    assert found == named, f"data modules outside the rooms contract: {sorted(found ^ named)}"


@pytest.mark.parametrize("module, line, contract", [
    ("src/data/slides/layout.py", "from src.model import network  # noqa", "src.data is not allowed to import src.model"),
    ("src/data/slides/ingestion.py", "from src.data.preprocessing import stain  # noqa",
     "src.data.slides is not allowed to import src.data.preprocessing"),
    ("src/data/preprocessing/patch_set.py", "import torch  # noqa", "src.data.preprocessing.patch_set -> torch"),
    ("src/engine/metrics.py", "import optuna  # noqa", "src.engine.metrics -> optuna"),
    ("src/model/targets.py", "from src.model import losses  # noqa", "No cycles are allowed in src.model"),
])
def test_the_contracts_catch_an_import_against_them(tmp_path, module, line, contract):
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    if "cycles" in contract:  # and losses imports targets back
        (tmp_path / "src/model/losses.py").write_text((tmp_path / "src/model/losses.py").read_text()
                                                      + "\nfrom src.model import targets  # noqa\n")
    path = tmp_path / module
    path.write_text(path.read_text() + "\n" + line + "\n")
    run = _lint(tmp_path)
    assert run.returncode != 0
    assert "BROKEN" in run.stdout and contract in run.stdout, run.stdout[-2000:]


def test_modules_stay_small():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in SOURCES}
    assert max(sizes.values()) <= 400, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_no_module_reassigns_a_forward_or_reads_optuna_internals():
    offending = []
    for path in SOURCES:
        text = path.read_text()
        if re.search(r"\.forward\s*=(?!=)", text):
            offending.append(f"{path.name}: forward assigned")
        if re.search(r"\._(storage|trial_id|study_id)\b", text):
            offending.append(f"{path.name}: private Optuna attribute")
        if "matplotlib.use(" in text or "import matplotlib.pyplot" in text:
            offending.append(f"{path.name}: global matplotlib state")
    assert not offending, offending


def test_the_lock_holds_only_the_stages_dvc_yaml_defines():
    import yaml
    defined = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    locked = set(yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"])
    assert locked <= defined, f"stale stages in dvc.lock: {sorted(locked - defined)}"
