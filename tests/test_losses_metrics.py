import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy.stats import spearmanr

from src.core.sections import LossConfig
from src.engine.metrics import (
    competition_score,
    floor_score,
    map_per_type,
    map_score,
    position_floor,
    skill,
    spot_spearman,
)
from src.engine.smoothing import smooth, smooth_slide
from src.model.losses import AbundanceLoss, soft_spearman
from src.model.targets import (
    ABUNDANCE_FLOOR,
    from_abundance_scale,
    rank_scale,
    target_ranks,
    to_abundance_scale,
    transform_targets,
)

RNG = np.random.default_rng(0)


def test_soft_spearman_approaches_scipy_as_regularization_vanishes():
    pred = RNG.normal(size=(16, 35))
    true = RNG.gamma(0.7, size=(16, 35))
    true[:, :5] = 0  # ties, as real zero abundances give
    exact = np.mean([spearmanr(p, t).statistic for p, t in zip(pred, true)])
    ranks = torch.from_numpy(target_ranks(true))
    gaps = [abs(float(soft_spearman(torch.from_numpy(pred), ranks, reg)) - exact) for reg in (10.0, 1.0, 0.01, 1e-4)]
    assert gaps[-1] < 1e-4
    assert gaps[0] > gaps[-1] and all(b <= a + 1e-9 for a, b in zip(gaps, gaps[1:]))


def test_soft_spearman_is_per_spot_not_flattened():
    # Two spots with opposite orderings: per spot each is perfectly ranked; flattening would mix them.
    pred = torch.tensor([[1.0, 2.0, 3.0], [30.0, 20.0, 10.0]])
    ranks = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    assert float(soft_spearman(pred, ranks, 1e-3)) == pytest.approx(1.0, abs=1e-3)


def test_loss_has_no_nan_for_constant_rows_and_zero_targets():
    loss_fn = AbundanceLoss(LossConfig(alpha=0.85, regularization=0.1, target_transform="log1p", log_epsilon=1e-10))
    pred = torch.zeros(4, 35, requires_grad=True)
    targets = torch.zeros(4, 35)
    ranks = torch.from_numpy(target_ranks(np.zeros((4, 35))))
    loss = loss_fn(pred, targets, ranks)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


def test_alpha_blends_the_two_terms():
    pred = torch.randn(8, 35)
    true = np.abs(RNG.normal(size=(8, 35)))
    targets, ranks = torch.from_numpy(np.log1p(true)).float(), torch.from_numpy(target_ranks(true))
    values = [float(AbundanceLoss(LossConfig(a, 0.1, "log1p", 1e-10))(pred, targets, ranks)) for a in (0.0, 0.5, 1.0)]
    mse = float(torch.nn.functional.mse_loss(pred, targets))
    assert values[0] == pytest.approx(mse, rel=1e-5)
    assert values[1] == pytest.approx((values[0] + values[2]) / 2, rel=1e-5)
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        LossConfig(1.5, 0.1, "log1p", 1e-10)  # a section checks its bounds however it is made


def test_target_transforms_keep_the_within_spot_order_and_never_log_zero():
    abundance = np.array([[0.0, 2.0, 8.76, 0.5], [3.0, 0.0, 0.0, 1.0]])
    outputs = {kind: transform_targets(abundance, kind, 1e-10) for kind in ("log", "log1p", "rank", "raw")}
    assert all(np.isfinite(v).all() for v in outputs.values())
    np.testing.assert_allclose(outputs["log1p"], np.log1p(abundance))
    np.testing.assert_allclose(outputs["rank"][1], [4, 1.5, 1.5, 3] / np.float64(4))
    scale = rank_scale(abundance)
    for kind, values in outputs.items():
        assert competition_score(to_abundance_scale(values, kind, 1e-10, scale), abundance) == pytest.approx(1.0)
    np.testing.assert_allclose(to_abundance_scale(outputs["log"], "log", 1e-10, scale), abundance, atol=1e-9)
    for kind, values in outputs.items():  # the OOF tables are saved on the abundance scale and read back
        back = from_abundance_scale(to_abundance_scale(values, kind, 1e-10, scale), kind, scale)
        np.testing.assert_allclose(back, values, atol=1e-9)
    assert not np.allclose(outputs["log1p"], outputs["raw"])
    with pytest.raises(ValueError, match="log targets need epsilon > 0"):
        transform_targets(abundance, "log", 0.0)


def test_every_target_space_comes_back_as_abundances_that_compare_across_spots():
    """What predict writes as an abundance: for every target transform, values on the scale of the
    training table, in the same order within each spot and across the spots of each cell type."""
    abundance = RNG.lognormal(mean=np.linspace(-6, 1, 12), sigma=1.5, size=(300, 12))
    scale = rank_scale(abundance)
    assert (np.diff(scale) > 0).all()
    for kind in ("log", "log1p", "rank", "raw"):
        predictions = transform_targets(abundance, kind, 1e-6) + RNG.normal(0, 1e-9, abundance.shape)
        values = to_abundance_scale(predictions, kind, 1e-6, scale)
        assert (values >= ABUNDANCE_FLOOR).all()
        within = competition_score(values, abundance)
        across = map_score(values, abundance, np.zeros(len(values)))
        assert within > 0.999, (kind, within)
        if kind != "rank":  # a within-spot rank is not an abundance: what it maps is its own order
            assert across > 0.99, (kind, across)
        # magnitudes: the typical value of each cell type within a factor of 30 of the table's
        ratio = np.exp(np.abs(np.median(np.log(values), 0) - np.median(np.log(abundance), 0)))
        assert (ratio < 30).all(), (kind, ratio.max())
    # a predicted rank beyond the trained range still orders (linear extrapolation, no clamp)
    beyond = to_abundance_scale(np.array([[1.2, 1.1, -0.1, -0.2] + [0.5] * 8]), "rank", 0.0, scale)[0]
    assert beyond[0] > beyond[1] > beyond[4] > beyond[2] > beyond[3]


def test_log_targets_keep_apart_what_log1p_flattens():
    """Strictly positive abundances spanning ten decades: log1p maps everything below ~0.01 to almost
    the same value, so an MSE on it cannot see the order of small abundances; log(x + eps) can."""
    small = np.array([[1e-9, 1e-7, 1e-5, 1e-3]])
    spread = {kind: np.ptp(transform_targets(small, kind, 1e-10)) for kind in ("log", "log1p")}
    assert spread["log1p"] < 1e-3 < 10 < spread["log"]
    # Back on the abundance scale the order survives, also below log(epsilon) of a large epsilon.
    predictions = np.log(np.array([[1e-4, 1e-5, 1e-6, 0.5]]))
    values = to_abundance_scale(predictions, "log", 1e-2, np.zeros(4))
    assert competition_score(values, np.array([[4.0, 3.0, 2.0, 5.0]])) == 1.0


def test_competition_score_floor_and_skill():
    true = RNG.gamma(0.7, size=(50, 35)) * np.linspace(3, 0.1, 35)
    assert competition_score(true, true) == pytest.approx(1.0)
    expected = np.mean([spearmanr(p, t).statistic for p, t in zip(true[::-1], true)])
    assert competition_score(true[::-1], true) == pytest.approx(expected)
    constant = np.ones_like(true)
    assert (spot_spearman(constant, true) == 0).all()  # ranks nothing: counts as 0, never NaN
    floor = floor_score(true, true)
    assert 0.3 < floor < 1.0
    assert skill(0.9, 0.7, 0.95) == pytest.approx(0.8)



def test_map_score_reads_each_cell_type_across_the_spots_of_each_slide():
    true = RNG.gamma(0.7, size=(80, 6)) * np.linspace(3, 0.1, 6)
    slides = np.repeat(["S_1", "S_2"], 40)
    assert map_score(true, true, slides) == pytest.approx(1.0)
    per_type = map_per_type(true + RNG.normal(0, 0.01, true.shape), true, slides)
    assert per_type.shape == (6,) and (per_type > 0.9).all()
    # within-spot ranks keep each spot's order but map nothing a pathologist could read
    ranks = target_ranks(true)
    assert competition_score(ranks, true) == pytest.approx(1.0) and map_score(ranks, true, slides) < 0.9
    # the mean profile maps nothing (0), a cell type constant in truth on every slide is left out
    profile = np.tile(true.mean(0), (80, 1))
    assert map_score(profile, true, slides) == 0.0
    flat = true.copy()
    flat[:, 0] = 1.0
    assert np.isnan(map_per_type(flat, flat, slides)[0]) and map_score(flat, flat, slides) == pytest.approx(1.0)
    # a slide-wide offset (a slide effect) changes no map score: each slide is read on its own
    shifted = true * np.where(slides == "S_1", 10.0, 0.1)[:, None]
    assert map_score(shifted, true, slides) == pytest.approx(1.0)


def test_the_position_floor_maps_what_position_alone_tells():
    coords = RNG.uniform(size=(400, 2))
    gradient = np.exp(np.column_stack([5 * coords[:, 0], -5 * coords[:, 1], RNG.normal(size=400)]))
    train, test = np.arange(300), np.arange(300, 400)
    floor = position_floor(coords[train], gradient[train], coords[test])
    per_type = map_per_type(floor, gradient[test], np.zeros(100))
    assert per_type[0] > 0.9 and per_type[1] > 0.9 and abs(per_type[2]) < 0.3


def test_smoothing_matches_a_hand_computation_and_sigma_zero_is_identity():
    xy = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 20.0], [500.0, 500.0]])
    values = np.array([[1.0, 0.0], [3.0, 1.0], [5.0, 2.0], [7.0, 3.0]])
    sigma = 10.0
    out = smooth_slide(values, xy, sigma, truncate=3.0)
    w = lambda d: np.exp(-(d**2) / (2 * sigma**2))  # noqa: E731
    d12 = np.hypot(10, 20)
    expected0 = (values[0] + w(10) * values[1] + w(20) * values[2]) / (1 + w(10) + w(20))
    expected1 = (w(10) * values[0] + values[1] + w(d12) * values[2]) / (w(10) + 1 + w(d12))
    np.testing.assert_allclose(out[0], expected0)
    np.testing.assert_allclose(out[1], expected1)
    np.testing.assert_allclose(out[3], values[3])  # no neighbour within 3 sigma: unchanged
    np.testing.assert_array_equal(smooth_slide(values, xy, 0.0), values)
    # A constant field stays constant at edges (normalized kernel; the seed's grid filter shrank it).
    np.testing.assert_allclose(smooth_slide(np.ones((4, 2)), xy, 50.0), 1.0)


def test_smoothing_never_mixes_slides():
    xy = np.array([[0.0, 0.0], [5.0, 0.0]])
    values = np.array([[0.0], [10.0]])
    out = smooth(values, xy, np.array(["S_1", "S_2"]), sigma=1.0, pitches={"S_1": 25.0, "S_2": 25.0})
    np.testing.assert_array_equal(out, values)
