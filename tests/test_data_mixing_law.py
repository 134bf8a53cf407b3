"""Data Mixing Laws: the law, its fit (recovery, quality, held-out rows), the optimum, the design and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from baselines.data_mixing_law import (
    PAPER_STARTS,
    START_LOG_C,
    START_LOG_K,
    START_T_HIGH,
    START_T_REPEATS,
    MixingLawParams,
    _huber_sum_and_grad,
    design_mixtures,
    fit_mixing_law,
    official_starts,
    optimal_mixture,
    overall_loss,
    predict,
)
from dograph.errors import ConfigError, DataError


def random_law(num_targets: int, num_domains: int, seed: int) -> MixingLawParams:
    rng = np.random.default_rng(seed)
    return MixingLawParams(np.log(rng.uniform(1.5, 3.0, num_targets)), np.log(rng.uniform(0.3, 1.5, num_targets)),
                           rng.uniform(-3.0, 1.0, (num_targets, num_domains)))


def simplex_grid(step: float) -> np.ndarray:
    """All mixtures of 3 domains on a grid of ``step``."""
    m = round(1 / step)
    return np.array([(i, j, m - i - j) for i in range(m + 1) for j in range(m + 1 - i)], dtype=np.float64) / m


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


# ---- the law -------------------------------------------------------------------------------------------------------


def test_law_is_the_official_form_and_normalisation_keeps_it() -> None:
    params = random_law(3, 4, seed=0)
    mixtures = design_mixtures(4, 10, seed=1)
    expected = np.stack([np.exp(params.official_vector(i)[0])
                         + np.exp(params.official_vector(i)[1] + mixtures @ params.official_vector(i)[2:])
                         for i in range(3)], axis=1)
    np.testing.assert_allclose(predict(params, mixtures), expected, rtol=1e-12)
    shifted = MixingLawParams(params.log_c, params.log_k - 0.7, params.t + 0.7)  # the same law on the simplex
    np.testing.assert_allclose(predict(shifted, mixtures), expected, rtol=1e-12)
    norm = shifted.normalised()
    np.testing.assert_allclose(norm.t.mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(norm.t, params.normalised().t, atol=1e-12)
    np.testing.assert_allclose(norm.log_k, params.normalised().log_k, atol=1e-12)
    again = MixingLawParams.from_dict(norm.to_dict())
    np.testing.assert_array_equal(again.t, norm.t)
    np.testing.assert_array_equal(MixingLawParams.from_official([norm.official_vector(i) for i in range(3)]).t, norm.t)
    assert predict(params, mixtures[0]).shape == (3,)


def test_overall_loss_is_the_share_weighted_sum() -> None:
    params = random_law(3, 4, seed=2)
    mixtures = design_mixtures(4, 6, seed=0)
    shares = np.array([2.0, 1.0, 1.0])  # normalised to (0.5, 0.25, 0.25)
    expected = predict(params, mixtures) @ np.array([0.5, 0.25, 0.25])
    np.testing.assert_allclose(overall_loss(params, mixtures, shares), expected, rtol=1e-12)
    assert overall_loss(params, mixtures[1], shares) == pytest.approx(expected[1], rel=1e-12)
    with pytest.raises(ConfigError) as error:
        overall_loss(params, mixtures, [1.0, 1.0])
    one_line(error)


def test_huber_gradient_equals_autograd_of_the_official_objective() -> None:
    rng = np.random.default_rng(0)
    x = torch.tensor(design_mixtures(4, 12, seed=3))
    p = torch.tensor(np.concatenate([[0.8, -0.5], rng.uniform(-1, 1, 4)]), requires_grad=True)
    with torch.no_grad():
        law = torch.exp(p[0]) + torch.exp(p[1] + x @ p[2:])
    y = law + torch.tensor(rng.normal(0, 0.02, 12))  # residuals on both sides of delta
    delta = 0.01
    loss = torch.nn.functional.huber_loss(torch.exp(p[0]) + torch.exp(p[1] + x @ p[2:]), y, delta=delta,
                                          reduction="sum")
    loss.backward()
    ours, grad = _huber_sum_and_grad(p.detach(), x, y, delta)
    assert float(ours) == pytest.approx(loss.item(), rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), p.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_official_starts_follow_the_notebook_generator() -> None:
    starts = official_starts(5, PAPER_STARTS, np.random.default_rng(0))
    assert starts.shape == (6000, 7)
    pairs, counts = np.unique(starts[:, :2], axis=0, return_counts=True)
    assert len(pairs) == len(START_LOG_C) * len(START_LOG_K) and (counts == START_T_REPEATS).all()
    assert starts[:, 0].min() == pytest.approx(-2.0) and starts[:, 0].max() == pytest.approx(1.5)
    assert starts[:, 1].min() == pytest.approx(-10.0) and starts[:, 1].max() == pytest.approx(1.0)
    assert (starts[:, 2:] >= 0).all() and (starts[:, 2:] < START_T_HIGH).all()
    np.testing.assert_array_equal(official_starts(5, 40, np.random.default_rng(3)),
                                  official_starts(5, 40, np.random.default_rng(3)))


# ---- the fit -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_domains", "rows"), [(3, 20), (4, 25)])
def test_fit_recovers_a_noiseless_law(num_domains: int, rows: int) -> None:
    truth = random_law(3, num_domains, seed=num_domains)
    mixtures = design_mixtures(num_domains, rows, seed=0)
    losses = predict(truth, mixtures)
    fit = fit_mixing_law(mixtures, losses, seed=0)
    assert np.abs(predict(fit.params, mixtures) / losses - 1).max() < 1e-3
    expected = truth.normalised()
    np.testing.assert_allclose(fit.params.t.mean(axis=1), 0.0, atol=1e-12)  # reported normalised
    np.testing.assert_allclose(fit.params.c, expected.c, rtol=1e-3)
    np.testing.assert_allclose(fit.params.log_k, expected.log_k, atol=1e-2)
    np.testing.assert_allclose(fit.params.t, expected.t, atol=1e-2)
    assert (fit.quality.r2 > 0.9999).all() and fit.quality.overall_r2 > 0.9999
    assert fit.quality.held_out is None
    again = fit_mixing_law(mixtures, losses, seed=0)
    np.testing.assert_array_equal(again.params.t, fit.params.t)  # deterministic


def test_held_out_rows_stay_out_of_the_fit_and_are_scored() -> None:
    truth = random_law(2, 3, seed=7)
    mixtures = design_mixtures(3, 18, seed=2)
    rng = np.random.default_rng(0)
    losses = predict(truth, mixtures) + rng.normal(0, 0.005, (18, 2))
    kwargs = {"starts": 2, "scan_starts": 2, "seed": 0, "weights": [0.7, 0.3]}
    fit = fit_mixing_law(mixtures, losses, held_out=5, **kwargs)
    alone = fit_mixing_law(mixtures[:13], losses[:13], **kwargs)
    np.testing.assert_array_equal(fit.params.t, alone.params.t)
    held = fit.quality.held_out
    assert held is not None and held.rows == (13, 14, 15, 16, 17)
    assert held.overall_r2 is not None and held.overall_spearman is not None and held.overall_rmse < 0.02
    assert fit.quality.rmse.shape == (2,) and (fit.quality.rmse < 0.01).all()
    few = fit_mixing_law(mixtures, losses, held_out=[0, 5], **kwargs).quality.held_out
    assert few is not None and few.rows == (0, 5) and few.overall_r2 is None and few.overall_spearman is None
    selected = fit_mixing_law(mixtures, losses, held_out=5, select_on_held_out=True, **kwargs)
    assert selected.quality.held_out is not None
    with pytest.raises(ConfigError) as error:
        fit_mixing_law(mixtures, losses, select_on_held_out=True, **kwargs)
    one_line(error)


def test_nan_losses_are_a_one_line_error() -> None:
    mixtures = design_mixtures(3, 10, seed=0)
    losses = predict(random_law(2, 3, seed=0), mixtures)
    losses[4, 1] = np.nan
    with pytest.raises(DataError) as error:
        fit_mixing_law(mixtures, losses)
    assert "row 4" in one_line(error)


def test_too_few_or_degenerate_mixtures_are_one_line_errors() -> None:
    params = random_law(2, 4, seed=0)
    mixtures = design_mixtures(4, 12, seed=0)
    with pytest.raises(DataError) as error:  # D + 2 = 6 needed
        fit_mixing_law(mixtures[:5], predict(params, mixtures[:5]))
    assert "at least 6" in one_line(error)
    with pytest.raises(DataError) as error:  # held-out rows leave too few
        fit_mixing_law(mixtures[:8], predict(params, mixtures[:8]), held_out=3)
    one_line(error)
    flat = mixtures.copy()
    flat[:, 2:] = flat[:, 2:].sum(axis=1, keepdims=True) / 2  # domains 2 and 3 always equal: rank 3
    with pytest.raises(DataError) as error:
        fit_mixing_law(flat, predict(params, flat))
    assert "span only 3 of 4" in one_line(error)
    with pytest.raises(DataError) as error:
        fit_mixing_law(mixtures * 2, predict(params, mixtures))
    one_line(error)
    with pytest.raises(DataError) as error:
        fit_mixing_law(mixtures, predict(params, mixtures)[:-1])
    one_line(error)
    with pytest.raises(DataError) as error:
        fit_mixing_law(mixtures, -predict(params, mixtures))
    one_line(error)


# ---- the optimum ---------------------------------------------------------------------------------------------------


def interior_law() -> MixingLawParams:
    """Each validation domain gains mostly from its own training domain: the optimum is inside the simplex."""
    t = np.array([[-3.0, -0.5, 0.0], [-0.3, -2.5, -0.2], [0.0, -0.4, -2.0]])
    return MixingLawParams(np.log([2.0, 2.5, 1.8]), np.log([1.0, 0.8, 1.2]), t)


@pytest.mark.parametrize("caps", [None, (0.5, 0.6, 0.3)])
@pytest.mark.parametrize("law", ["interior", "random"])
def test_optimum_matches_a_brute_force_grid(law: str, caps: tuple[float, ...] | None) -> None:
    params = interior_law() if law == "interior" else random_law(4, 3, seed=11)
    weights = np.full(params.num_targets, 1.0 / params.num_targets) if law == "interior" else [0.4, 0.3, 0.2, 0.1]
    grid = simplex_grid(0.01)
    if caps is not None:
        grid = grid[(grid <= np.array(caps) + 1e-12).all(axis=1)]
    values = overall_loss(params, grid, weights)
    best = int(np.argmin(values))
    mixture, value = optimal_mixture(params, weights, max_weight=caps, seed=0)
    assert mixture.shape == (3,) and (mixture >= 0).all() and mixture.sum() == pytest.approx(1.0, abs=1e-12)
    if caps is not None:
        assert (mixture <= np.array(caps) + 1e-9).all()
    assert value == pytest.approx(overall_loss(params, mixture, weights), abs=1e-12)
    assert value <= values[best] + 1e-12  # never worse than the grid
    assert values[best] - value < 1e-4
    assert np.abs(mixture - grid[best]).max() <= 0.01 + 1e-9
    if law == "interior" and caps is None:
        assert (mixture > 0.05).all()


def test_infeasible_caps_are_a_one_line_error() -> None:
    with pytest.raises(ConfigError) as error:
        optimal_mixture(interior_law(), [1, 1, 1], max_weight=0.3)
    assert "sum to 0.9" in one_line(error)


# ---- the design ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_domains", "count"), [(2, 12), (3, 25), (7, 16), (22, 40)])
def test_design_is_valid_distinct_and_deterministic(num_domains: int, count: int) -> None:
    natural = np.arange(1, num_domains + 1, dtype=np.float64)
    rows = design_mixtures(num_domains, count, seed=5, natural=natural)
    assert rows.shape == (count, num_domains)
    assert (rows >= 0).all() and np.allclose(rows.sum(axis=1), 1.0, atol=1e-12)
    gaps = np.linalg.norm(rows[:, None, :] - rows[None, :, :], axis=2) + np.eye(count)
    assert gaps.min() > 1e-9  # distinct
    np.testing.assert_allclose(rows[0], natural / natural.sum())
    np.testing.assert_allclose(rows[1], np.full(num_domains, 1.0 / num_domains))
    np.testing.assert_array_equal(rows, design_mixtures(num_domains, count, seed=5, natural=natural))
    assert not np.array_equal(rows, design_mixtures(num_domains, count, seed=6, natural=natural))
    emphasis = rows[2:2 + num_domains]  # half the mass on each domain once
    np.testing.assert_array_equal(np.sort(np.argmax(emphasis - natural / natural.sum(), axis=1)),
                                  np.arange(num_domains))


def test_design_without_natural_and_small_counts() -> None:
    rows = design_mixtures(4, 3, seed=0)
    np.testing.assert_allclose(rows[0], 0.25)
    assert rows.shape == (3, 4) and rows[1:].max() == pytest.approx(0.625)
    with pytest.raises(ConfigError) as error:
        design_mixtures(1, 3)
    one_line(error)
    with pytest.raises(ConfigError) as error:
        design_mixtures(3, 4, natural=[1.0, -1.0, 1.0])
    one_line(error)
