import pytest
import yaml

from src.config import load_params, params_from_dict, read_raw
from src.errors import InputError
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
