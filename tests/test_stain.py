import subprocess
import sys
import warnings
from unittest import mock

import numpy as np
import pytest
import spams
import staintools
from skimage import data as skdata

from src.core.errors import InputError
from src.data.preprocessing.stain import StainNormalizer, optical_density, positive_lasso_2, upper_percentile
from src.data.slides.layout import SlideRef, open_h5, read_image_uint8
from tests.conftest import ROOT, fast_params

STAINTOOLS_ITERATIONS = 1000  # staintools' own default (iter=-1) is "learn for one second"


def _staintools_pair(reference, source, method):
    """staintools' and our transform of ``source`` to the same fitted target. staintools' Vahadane
    learns its dictionaries for one second by default, so how far it gets depends on the machine's
    load; it gets a fixed iteration count here (its answer then matches converged runs)."""
    real = spams.trainDL

    def fixed_budget(*args, **kwargs):
        return real(*args, **{**kwargs, "iter": STAINTOOLS_ITERATIONS})

    with mock.patch.object(spams, "trainDL", fixed_budget):  # staintools only; ours keeps its own count
        theirs = staintools.StainNormalizer(method)
        theirs.fit(reference.copy())  # staintools writes into its input
        expected = theirs.transform(source.copy())
    ours = StainNormalizer(method)
    ours.stain_matrix_target = theirs.stain_matrix_target
    ours.max_conc_target = theirs.maxC_target.ravel()
    return expected, ours.transform(source)


def _agreement(a, b):
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return diff.mean(), np.percentile(diff, 99)


def test_closed_form_lasso_matches_spams():
    rng = np.random.default_rng(0)
    od = rng.uniform(0, 2.5, (5000, 3)).astype(np.float64)
    od[:500] *= 0.01  # near-background pixels exercise the one-stain and zero solutions
    matrix = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    expected = spams.lasso(X=np.asfortranarray(od.T), D=np.asfortranarray(matrix.T), mode=2,
                           lambda1=0.01, pos=True).toarray().T
    np.testing.assert_allclose(positive_lasso_2(od, matrix), expected, atol=1e-5)


def test_vahadane_fit_leaves_torch_thread_count_alone():
    # In a fresh process whose torch has started its OpenMP runtime, as in the pipeline: SPAMS then
    # shares that runtime, and a leak of its one thread would leave every later torch op on one thread.
    script = (
        "import torch; torch.get_num_threads(); torch.set_num_threads(3)\n"
        "from skimage import data\n"
        "from src.data.preprocessing.stain import vahadane_stain_matrix\n"
        "vahadane_stain_matrix(data.immunohistochemistry()[:128, :128].reshape(-1, 3))\n"
        "print(torch.get_num_threads())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.split()[-1] == "3", done.stdout + done.stderr


@pytest.mark.parametrize("q", [99.0, 95.0, 99.9])
def test_upper_percentile_is_numpy_percentile(q):
    values = np.random.default_rng(1).gamma(0.5, 1.0, 300_000).astype(np.float32)
    values[:100_000] = 0  # the background mass of a slide
    assert upper_percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-6)


@pytest.mark.parametrize("method", ["vahadane", "macenko"])
def test_agrees_with_staintools_on_real_tissue(method):
    ihc = skdata.immunohistochemistry()  # a real 512 x 512 tissue section
    reference = np.ascontiguousarray(ihc[:, :256])
    source = np.ascontiguousarray(ihc[:, 256:])
    mean, p99 = _agreement(*_staintools_pair(reference, source, method))
    assert mean <= 2 and p99 <= 8, (mean, p99)


@pytest.mark.parametrize("method", ["vahadane", "macenko"])
def test_agrees_with_staintools_on_simulated_slide(tiny_dataset, method):
    with open_h5(tiny_dataset[0]) as h5:
        reference = read_image_uint8(h5, SlideRef("Train", "S_1"))
        source = read_image_uint8(h5, SlideRef("Train", "S_2"))
    mean, p99 = _agreement(*_staintools_pair(reference, source, method))
    assert mean <= 2 and p99 <= 8, (mean, p99)


def test_normalization_moves_source_colours_towards_reference(tiny_dataset):
    with open_h5(tiny_dataset[0]) as h5:
        reference = read_image_uint8(h5, SlideRef("Train", "S_1"))
        source = read_image_uint8(h5, SlideRef("Train", "S_2"))
    normalizer = StainNormalizer("vahadane").fit(reference)
    before = normalizer.stain_matrix(source)
    after = normalizer.stain_matrix(normalizer.transform(source))
    target = normalizer.stain_matrix_target
    assert np.abs(after - target).sum() < np.abs(before - target).sum()


def test_background_and_blank_images_give_no_nan_and_stay_white(tiny_dataset):
    with open_h5(tiny_dataset[0]) as h5:
        reference = read_image_uint8(h5, SlideRef("Train", "S_1"))
    normalizer = StainNormalizer("vahadane").fit(reference)
    blank = np.full((64, 64, 3), 255, np.uint8)
    out = normalizer.transform(blank)
    assert out.dtype == np.uint8 and (out == 255).all()
    for value in (0, 90):  # one flat colour: no two stains to separate, returned unchanged
        flat = np.full((32, 32, 3), value, np.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert (normalizer.transform(flat) == flat).all()
    mixed = reference.copy()
    mixed[:, : reference.shape[1] // 2] = 250  # half background
    assert normalizer.transform(mixed)[:, :10].min() >= 240


def test_fit_on_a_slide_without_tissue_is_a_clear_error():
    with pytest.raises(InputError, match="no tissue with two separable stains"):
        StainNormalizer("vahadane").fit(np.full((50, 50, 3), 250, np.uint8))


def test_method_none_is_identity_and_unknown_method_is_an_error(tiny_dataset):
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert (StainNormalizer("none").fit(image).transform(image) == image).all()
    with pytest.raises(InputError, match="stain.method = 'reinhard': choose vahadane, macenko, none"):
        fast_params("stain.method=reinhard")


def test_luminosity_standardization_changes_output(tiny_dataset):
    with open_h5(tiny_dataset[0]) as h5:
        reference = read_image_uint8(h5, SlideRef("Train", "S_1"))
        source = (read_image_uint8(h5, SlideRef("Train", "S_2")) * 0.8).astype(np.uint8)  # darker
    plain = StainNormalizer("vahadane").fit(reference).transform(source)
    standardized = StainNormalizer("vahadane", standardize_luminosity=True).fit(reference).transform(source)
    assert np.abs(plain.astype(int) - standardized.astype(int)).mean() > 1


def test_state_round_trip_gives_identical_output(tiny_dataset):
    with open_h5(tiny_dataset[0]) as h5:
        reference = read_image_uint8(h5, SlideRef("Train", "S_1"))
        source = read_image_uint8(h5, SlideRef("Test", "S_3"))
    normalizer = StainNormalizer("vahadane", fit_pixels=5000, seed=4).fit(reference)
    rebuilt = StainNormalizer.from_dict(normalizer.to_dict())
    assert (rebuilt.transform(source) == normalizer.transform(source)).all()


def test_optical_density_follows_staintools_convention():
    rgb = np.array([[[0, 255, 128]]], np.uint8)
    od = optical_density(rgb)
    assert od[0, 0] == pytest.approx(-np.log(1 / 255), rel=1e-6)
    assert od[0, 1] == pytest.approx(1e-6)
