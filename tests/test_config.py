import re

import numpy as np
import pytest
import torch
import yaml

from src.core.config import load_params, params_from_dict, read_raw
from src.core.errors import InputError
from tests.conftest import ROOT


def raw_params() -> dict:
    return read_raw(ROOT / "params.yaml")


def test_project_params_load_into_typed_sections():
    params = load_params(ROOT / "params.yaml")
    assert params.stain.method in ("vahadane", "macenko", "none")
    assert isinstance(params.simulate.pitch, float)
    assert isinstance(params.patches.offsets, dict)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["stain"].update(colour="blue"), "unknown key stain.colour"),
    (lambda r: r.update(extra={}), "unknown key extra"),
    (lambda r: r["stain"].pop("method"), "missing key stain.method"),
    (lambda r: r.pop("patches"), "missing key patches"),
    (lambda r: r["patches"].update(size="big"), "patches.size must be an integer, got 'big'"),
    (lambda r: r["stain"].update(luminosity_standardize="yes"), "stain.luminosity_standardize must be true or false"),
    (lambda r: r["simulate"].update(pitch=[1]), "simulate.pitch must be a number"),
    (lambda r: r["patches"].update(offsets={"S_1": ["a", 1]}), "patches.offsets.S_1[0] must be an integer"),
])
def test_bad_params_name_the_key(mutate, message):
    raw = raw_params()
    mutate(raw)
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        params_from_dict(raw)


def test_overrides_parse_yaml_values_and_reject_unknown_keys(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw_params()))
    params = load_params(path, ["stain.method=macenko", "patches.size=32", "patches.offsets.S_1=[3, -4]"])
    assert params.stain.method == "macenko"
    assert params.patches.size == 32
    assert params.patches.offsets == {"S_1": [3, -4]}
    with pytest.raises(InputError, match="unknown key stain.colour"):
        load_params(path, ["stain.colour=blue"])
    with pytest.raises(InputError, match="expected key=value"):
        load_params(path, ["stain.method"])


def test_missing_or_broken_params_file(tmp_path):
    with pytest.raises(InputError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(InputError, match="not valid YAML"):
        load_params(bad)


# One bad value per checked field: each is refused when params are read, naming key and value.
BAD_VALUES = [
    ("stain.method=reinhard", "stain.method = 'reinhard': choose vahadane, macenko, none"),
    ("patches.registration=manual", "patches.registration = 'manual': choose auto, none"),
    ("model.fusion=sum", "model.fusion = 'sum': choose product, concat, film, gated, none"),
    ("loss.target_transform=sqrt", "loss.target_transform = 'sqrt': choose log, log1p, rank, raw"),
    ("train.final=best", "train.final = 'best': choose ensemble, retrain"),
    ("cv.scheme=random", "cv.scheme = 'random': choose blocks, leave_one_slide_out"),
    ("infer.tta=[identity, spin]", "infer.tta[1] = 'spin': choose identity, hflip, vflip"),
    ("tune.pruner=asha", "tune.pruner = 'asha': choose wilcoxon, median, hyperband, none"),
    ("infer.tta=[]", "infer.tta = []: expected at least 1 value"),
    ("loss.alpha=1.5", "loss.alpha = 1.5: must be <= 1"),
    ("loss.regularization=0.0", "loss.regularization = 0.0: must be > 0"),
    ("loss.log_epsilon=0.0", "loss.log_epsilon = 0.0: must be > 0"),
    ("patches.size=4", "patches.size = 4: must be >= 8"),
    ("patches.max_shift=-1", "patches.max_shift = -1: must be >= 0"),
    ("patches.offsets.S_1=[3]", "patches.offsets.S_1 = [3]: expected at least 2 values"),
    ("patches.offsets.S_1=[3, 4, 5]", "patches.offsets.S_1 = [3, 4, 5]: expected at most 2 values"),
    ("patches.size=32.0", "patches.size must be an integer, got 32.0"),
    ("stain.luminosity_standardize=1", "stain.luminosity_standardize must be true or false, got 1"),
    ("loss.alpha='0.5'", "loss.alpha must be a number, got '0.5'"),
    ("train.epochs=0", "train.epochs = 0: must be >= 1"),
    ("train.batch_size=1", "train.batch_size = 1: must be >= 2"),
    ("train.lr_head=0.0", "train.lr_head = 0.0: must be > 0"),
    ("cv.n_folds=1", "cv.n_folds = 1: must be >= 2"),
    ("model.dropout=0.99", "model.dropout = 0.99: must be <= 0.95"),
    ("model.context=0", "model.context = 0: must be >= 0.05"),
    ("model.context=64", "model.context = 64: must be <= 1"),
    ("tune.sigma_grid=[-1.0]", "tune.sigma_grid[0] = -1.0: must be >= 0"),
    ("simulate.offsets=[]", "simulate.offsets lists 0 shifts for simulate.n_train = 4"),
    ("train.color_jitter=0.2", "train.feature_cache fixes the backbone input"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES)
def test_every_checked_field_refuses_a_bad_value_when_params_are_read(override, message):
    with pytest.raises(InputError, match="^params: " + re.escape(message)):
        load_params(ROOT / "params.yaml", [override])


def test_sections_check_their_fields_however_they_are_made():
    """Made in code, by dataclasses.replace, or read from params.yaml: the same checks (in code a bad
    value is a bug, so pydantic's own error; from params.yaml one line)."""
    import dataclasses

    from pydantic import ValidationError

    from src.core.sections import LossConfig

    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        LossConfig(-0.1, 0.1, "log", 1e-10)
    loss = LossConfig(0.5, 0.1, "log", 1e-10)
    with pytest.raises(ValidationError, match="target_transform"):
        dataclasses.replace(loss, target_transform="sqrt")
    assert dataclasses.asdict(dataclasses.replace(loss, alpha=1)) == {"alpha": 1.0, "regularization": 0.1,
                                                                      "target_transform": "log", "log_epsilon": 1e-10}


def test_the_names_a_field_accepts_are_the_names_its_module_acts_on():
    """Each registry is keyed by the names its params.yaml field allows: nothing to choose that does nothing."""
    import typing

    from src.core import sections as config
    from src.data.preprocessing.stain import METHODS
    from src.model.fusion import FUSIONS
    from src.model.targets import TARGET_TRANSFORMS, transform_targets
    from src.model.transforms import DIHEDRAL, dihedral
    from src.search.pruning import PRUNERS

    assert set(FUSIONS) == set(typing.get_args(config.FusionName))
    assert set(METHODS) == set(typing.get_args(config.StainMethod))
    assert set(PRUNERS) == set(typing.get_args(config.PrunerName))
    assert set(TARGET_TRANSFORMS) == set(typing.get_args(config.TargetTransform))
    image = torch.arange(16.0).reshape(1, 4, 4)
    assert len({tuple(dihedral(image, name).flatten().tolist()) for name in DIHEDRAL}) == 8
    for kind in TARGET_TRANSFORMS:
        assert np.isfinite(transform_targets(np.array([[1e-9, 2.0, 0.5]]), kind, 1e-10)).all()


@pytest.mark.parametrize("entry, args", [
    ("src.tune", ["--trials", "2"]),
    ("src.train", []),
    ("src.normalize", ["--out", "{tmp}/normalized"]),
    ("src.patches", ["--out", "{tmp}/patches"]),
    ("src.simulate", ["--out", "{tmp}/s.h5", "--truth-out", "{tmp}/t.h5"]),
])
def test_a_bad_value_stops_each_stage_before_it_reads_or_writes_anything(entry, args, tmp_path, capsys):
    import importlib

    main = importlib.import_module(entry).main
    args = [a.format(tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--params", str(ROOT / "params.yaml"), "--set", "infer.tta=[spin]", "--set", "stain.method=x"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: params: "), err
    assert list(tmp_path.iterdir()) == []


def test_the_tune_command_refuses_a_bad_tta_within_seconds_and_writes_nothing(tmp_path):
    """As a user runs it: one line, exit 2, no study, no outputs."""
    import shutil
    import subprocess
    import sys
    import time

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "src.tune", "--trials", "2", "--set", "infer.tta=[spin]",
                          "--best-out", str(tmp_path / "best.yaml"), "--metrics", str(tmp_path / "tune.json"),
                          "--storage", f"sqlite:///{tmp_path}/study.db"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == ["error: params: infer.tta[0] = 'spin': choose identity, hflip, vflip, "
                                               "rot90, rot180, rot270, transpose, antitranspose"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
    print(f"refused in {seconds:.1f} s")


@pytest.mark.parametrize("override, message", [
    ("model.pretrained=true", "params: model.pretrained = true: the weights of resnet10t could not be fetched from "
                              "the hub"),
    ("model.weights={weights}", "the weights do not fit resnet10t: keys 2 missing (first: conv1.0.weight, "),
])
def test_weights_that_cannot_be_had_or_do_not_fit_stop_the_study_before_any_trial(override, message, tiny_patches,
                                                                                    tmp_path):
    """No hub (offline), or a state dict of another network: one line, exit 2, no study, nothing written."""
    import os
    import subprocess
    import sys

    import timm

    weights = tmp_path / "other.pt"
    state = timm.create_model("resnet10t", num_classes=0).state_dict()
    state.pop("conv1.0.weight"), state.pop("conv1.1.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, weights)
    from tests.conftest import FAST
    sets = [a for o in FAST + [override.format(weights=weights)] for a in ("--set", o)]
    run = subprocess.run([sys.executable, "-m", "src.tune", "--trials", "1", "--patches", str(tiny_patches / "patches"),
                          "--best-out", str(tmp_path / "best.yaml"), "--metrics", str(tmp_path / "tune.json"),
                          "--ensemble-out", str(tmp_path / "ensemble.yaml"), "--cv-per-type", str(tmp_path / "cv.csv"),
                          "--history", str(tmp_path / "history.csv"), "--artifacts", str(tmp_path / "artifacts"),
                          "--storage", f"sqlite:///{tmp_path}/study.db", *sets],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pt"]


@pytest.mark.parametrize("mutate", [
    lambda r: r["stain"].update(method="reinhard"),
    lambda r: r["stain"].update(colour="blue"),
    lambda r: r["patches"].update(size="big"),
    lambda r: r["loss"].update(alpha=1.5),
    lambda r: r["infer"].update(tta=[]),
    lambda r: r["patches"].update(offsets={"S_1": [3]}),
    lambda r: r["train"].pop("epochs"),
])
def test_the_published_schema_is_current_and_refuses_what_the_loader_refuses(mutate):
    """params.schema.json is what editors check params.yaml with: written from the sections (`make
    schema`), it accepts the project's params and refuses a bad value as loading does."""
    import json

    import jsonschema

    from src.core.config import json_schema

    committed = json.loads((ROOT / "params.schema.json").read_text())
    assert committed == json_schema(), "params.schema.json is stale: run `make schema`"
    assert (ROOT / "params.yaml").read_text().startswith("# yaml-language-server: $schema=params.schema.json")
    jsonschema.validate(raw_params(), committed)
    raw = raw_params()
    mutate(raw)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(raw, committed)
    with pytest.raises(InputError):
        params_from_dict(raw)
