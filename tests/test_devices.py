"""The GPU path's failure modes, exercised on a CPU: torchsort without its CUDA op, downsampled input."""
import numpy as np
import pytest
import torch

from src.core import devices
from src.core.errors import InputError
from src.data.preprocessing.patch_set import load_patch_set
from src.engine.fit import fit
from src.model.transforms import DownsamplingWarning, Preprocessing, build_transform
from src.search import study as search_study
from src.search.study import run_study
from tests.conftest import fast_params
from tests.test_tune import base_raw

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def train_set(tiny_patches):
    return load_patch_set(tiny_patches / "patches", "train")


@pytest.fixture
def cpu_only_torchsort(monkeypatch):
    """torchsort as a build without nvcc leaves it: the CUDA extension is missing."""
    monkeypatch.setattr(devices, "torchsort_cuda_error", lambda: "No module named 'torchsort.isotonic_cuda'")


def test_training_on_cuda_without_torchsorts_cuda_op_is_one_clear_error(train_set, cpu_only_torchsort):
    with pytest.raises(InputError, match=r"torchsort has no CUDA extension .* training runs on cuda: rebuild"):
        fit(fast_params(), train_set, np.arange(8), device=CUDA, show_progress=False)


def test_a_study_on_such_a_gpu_fails_before_any_trial(train_set, cpu_only_torchsort, monkeypatch, tmp_path):
    monkeypatch.setattr(search_study, "default_device", lambda: CUDA)
    with pytest.raises(InputError, match="torchsort has no CUDA extension"):
        run_study(base_raw(), train_set, 2, "t", f"sqlite:///{tmp_path}/s.db", artifact_dir=tmp_path / "a",
                  live=False)
    assert not (tmp_path / "a").exists()


def test_setup_check_fails_where_a_gpu_is_seen_and_torchsort_cannot_rank_on_it(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100")
    monkeypatch.setattr(devices, "torchsort_cuda_error", lambda: "No module named 'torchsort.isotonic_cuda'")
    with pytest.raises(SystemExit) as exit_info:
        devices.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: torch sees NVIDIA H100 but torchsort cannot rank on it")


def test_setup_check_passes_on_a_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    devices.main()
    assert "no CUDA device" in capsys.readouterr().out


def test_a_strongly_downsampled_context_is_reported():
    prep = Preprocessing(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=64)
    with pytest.warns(DownsamplingWarning, match="model.input_size = 64 shrinks the 400-px context 6.2x"):
        build_transform(prep, 400, None)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DownsamplingWarning)
        build_transform(prep, 96, None)  # 1.5x: a searched scale, not a surprise
        build_transform(Preprocessing(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=32), 96, None)  # the default, 3x
        build_transform(Preprocessing(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=224), 224, None)
