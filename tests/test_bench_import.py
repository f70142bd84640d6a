"""The import benchmark writes a scanner slide and imports it through the real command."""
import h5py
import pytest

from src.bench.wsi_import import run


@pytest.mark.slow
def test_the_import_benchmark_measures_a_real_import(tmp_path):
    rows = run([2048], tmp_path, log=lambda _: None)
    assert rows[0]["edge"] == 2048 and rows[0]["peak_mb"] > 50 and rows[0]["seconds"] > 0
    with h5py.File(tmp_path / "edge_2048" / "imported.h5") as h5:
        image = h5["images/Train/S"]
        assert image.shape[:2] == (242, 242)  # 2048 px at 0.25 um/px -> 2.115 um/px
        assert h5["fullres/Train/S"].attrs["pitch"] == pytest.approx(47.3, abs=0.5)
