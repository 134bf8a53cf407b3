"""RegMix math: the official proxy-mixture sampler, the LightGBM fit, the top-k search, the target and checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from baselines.regmix import (
    MAX_STRENGTH,
    MIN_STRENGTH,
    MINIMUM,
    NUM_STRENGTHS,
    check_mixture_table,
    check_proxy_count,
    check_settings,
    choose_mixture,
    deduplicate,
    fit_regressor,
    regression_target,
    strength_grid,
    synthesize_mixtures,
)
from dograph.errors import ConfigError, DataError

# SlimPajama-6B byte shares (docs/design.md section 1.2): one large domain, several small ones
SHARES = np.array([0.541, 0.287, 0.042, 0.037, 0.034, 0.031, 0.028])
D = len(SHARES)
A = np.array([1.0, 0.8, 0.6, 0.5, 0.7, 0.9, 0.4])
B = np.array([3.0, 5.0, 8.0, 6.0, 4.0, 7.0, 9.0])


def synthetic_loss(mixtures: np.ndarray, rng: np.random.Generator, noise: float = 0.005) -> np.ndarray:
    """``sum_j a_j exp(-b_j r_j)`` + noise: more of a domain lowers the loss, with diminishing returns."""
    return (A * np.exp(-B * mixtures)).sum(axis=1) + rng.normal(0.0, noise, len(mixtures))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---- the sampler ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixtures() -> np.ndarray:
    return synthesize_mixtures(SHARES, 512, seed=0)


def test_sampler_rows_are_rounded_mixtures(mixtures: np.ndarray) -> None:
    assert mixtures.shape == (512, D)
    assert np.all(mixtures >= 0)
    steps = mixtures / MINIMUM
    assert np.allclose(steps, np.round(steps), atol=1e-6)  # multiples of 2e-4
    nonzero = mixtures[mixtures > 0]
    assert nonzero.min() >= MINIMUM - 1e-12  # weights below 2e-4 were zeroed before rounding
    deviation = np.abs(mixtures.sum(axis=1) - 1)
    assert deviation.max() <= D * MINIMUM / 2 + 1e-12  # rounding only, as officially
    assert deviation.max() > 1e-12  # and no renormalisation after rounding (the official rows)


def test_sampler_rows_are_distinct_and_deterministic(mixtures: np.ndarray) -> None:
    distance = np.abs(mixtures[:, None, :] - mixtures[None, :, :]).sum(axis=2)
    np.fill_diagonal(distance, np.inf)
    assert distance.min() > 1e-5
    assert np.array_equal(mixtures, synthesize_mixtures(SHARES, 512, seed=0))
    assert not np.array_equal(mixtures, synthesize_mixtures(SHARES, 512, seed=1))


def test_sampler_respects_the_usage_cap() -> None:
    shares = np.array([0.6, 0.3, 0.098, 0.002])  # the last domain's cap: min(15 * 0.002, 1) = 0.03
    prior = shares / shares.sum()
    cap = np.minimum(prior * 15, 1.0)
    capped = synthesize_mixtures(shares, 256, seed=3)
    # the cap holds on the raw draw; zeroing + renormalising, then rounding, can move a weight a little
    slack = cap / (1 - len(shares) * MINIMUM) + MINIMUM / 2
    assert np.all(capped <= slack + 1e-12)
    free = synthesize_mixtures(shares, 256, seed=3, maximum_usage=None)
    assert (free[:, 3] > 0.1).any()  # the tempered prior (0.002 ** 0.5) does reach far beyond the cap


def test_sampler_strengths_span_the_official_range() -> None:
    grid = strength_grid()
    assert len(grid) == NUM_STRENGTHS == 15
    assert grid[0] == pytest.approx(MIN_STRENGTH) and grid[-1] == pytest.approx(MAX_STRENGTH)
    assert np.allclose(np.diff(np.log(grid)), np.log(grid[1] / grid[0]))  # log-spaced

    def entropy(rows: np.ndarray) -> float:
        p = np.where(rows > 0, rows, 1.0)
        return float(-(rows * np.log(p)).sum(axis=1).mean())

    both = synthesize_mixtures(SHARES, 256, seed=5)
    weakest = synthesize_mixtures(SHARES, 256, seed=5, min_strength=0.1, max_strength=0.1)
    strongest = synthesize_mixtures(SHARES, 256, seed=5, min_strength=5.0, max_strength=5.0)
    assert entropy(weakest) < entropy(both) < entropy(strongest)
    peak = both.max(axis=1)
    assert (peak > 0.95).mean() > 0.1 and (peak < 0.6).mean() > 0.1  # concentrated and spread rows alike


def test_sampler_zero_share_domain_stays_zero_and_bad_input_errors() -> None:
    rows = synthesize_mixtures([0.5, 0.0, 0.3, 0.2], 64, seed=0)
    assert np.all(rows[:, 1] == 0) and np.all(np.abs(rows.sum(axis=1) - 1) <= 4 * MINIMUM / 2 + 1e-12)
    with pytest.raises(ConfigError) as error:
        synthesize_mixtures([1.0], 2, seed=0)  # one domain: a single distinct mixture
    assert "only 1 distinct mixtures" in one_line(error)
    for bad in ([0.5, -0.1, 0.6], [0.0, 0.0], [np.nan, 1.0]):
        with pytest.raises(ConfigError) as error:
            synthesize_mixtures(bad, 4, seed=0)
        one_line(error)


def test_deduplicate_drops_near_copies() -> None:
    rows = np.array([[0.5, 0.5], [0.2, 0.8], [0.5 + 1e-7, 0.5 - 1e-7], [0.2, 0.8]])
    kept = deduplicate(rows)
    assert kept.shape == (2, 2)
    assert {tuple(np.round(r, 6)) for r in kept} == {(0.5, 0.5), (0.2, 0.8)}


# ---- the regressor ------------------------------------------------------------------------------------------


def test_regressor_recovers_a_known_response() -> None:
    rng = np.random.default_rng(1)
    x = synthesize_mixtures(SHARES, 200, seed=11)
    fit = fit_regressor(x, synthetic_loss(x, rng))
    quality = fit.quality
    assert quality.spearman >= 0.9  # the acceptance bar
    assert quality.r2 > 0.8
    assert len(quality.held_out_rows) == 50 and quality.fit_rows == 150
    assert quality.min_child_samples == 20  # the official value once there are 80 fitting rows
    assert fit.regressor.n_estimators == quality.best_iteration  # refit on all rows with that many trees
    assert quality.train_residuals.shape == (200,)
    json.dumps(quality.summary())
    again = fit_regressor(x, synthetic_loss(x, np.random.default_rng(1)))
    assert np.array_equal(fit.regressor.predict(x), again.regressor.predict(x))


def test_regressor_runs_on_sixteen_proxies() -> None:
    x = synthesize_mixtures(SHARES, 16, seed=2)
    fit = fit_regressor(x, synthetic_loss(x, np.random.default_rng(2)))
    quality = fit.quality
    assert np.isfinite(quality.spearman) and np.isfinite(quality.r2)
    assert len(quality.held_out_rows) == 4 and quality.fit_rows == 12 and quality.min_child_samples == 3
    assert np.all(np.isfinite(fit.regressor.predict(x)))
    kept = fit_regressor(x, synthetic_loss(x, np.random.default_rng(2)), refit=False)
    assert kept.quality.train_residuals.shape == (12,)
    assert kept.regressor.best_iteration_ == kept.quality.best_iteration


def test_regressor_needs_enough_rows() -> None:
    x = synthesize_mixtures(SHARES, 3, seed=0)
    with pytest.raises(DataError) as error:
        fit_regressor(x, np.ones(3))
    assert "at least 4 proxies" in one_line(error)


# ---- the search ---------------------------------------------------------------------------------------------


class Quadratic:
    """An exact predictor ``||r - target||^2`` that records what it was asked."""

    def __init__(self, target: np.ndarray) -> None:
        self.target, self.calls = target, []

    def predict(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(x)
        return ((x - self.target) ** 2).sum(axis=1)


def test_top_k_average_of_the_simulation() -> None:
    shares, target = np.array([0.5, 0.3, 0.0, 0.2]), np.array([0.2, 0.5, 0.0, 0.3])
    predictor = Quadratic(target)
    choice = choose_mixture(predictor, shares, samples=50_000, top_k=64, seed=0)
    draws = predictor.calls[0]
    assert draws.shape == (50_000, 4) and np.all(draws[:, 2] == 0)
    assert np.allclose(draws.mean(axis=0), shares, atol=0.01)  # Dirichlet(untempered shares) has mean = shares
    predictions = ((draws - target) ** 2).sum(axis=1)
    assert np.allclose(choice.top_k_predictions, np.sort(predictions)[:64])
    assert np.all(choice.mixture >= 0) and choice.mixture.sum() == pytest.approx(1.0)
    assert np.abs(choice.mixture - target).sum() < 0.05
    assert choice.predicted_loss == pytest.approx(float(((choice.mixture - target) ** 2).sum()))


def test_search_with_the_fitted_regressor_lands_near_the_minimiser() -> None:
    shares, target = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.5, 0.3])
    x = synthesize_mixtures(shares, 200, seed=4)
    y = ((x - target) ** 2).sum(axis=1) + np.random.default_rng(4).normal(0, 0.002, len(x))
    fit = fit_regressor(x, y)
    choice = choose_mixture(fit.regressor, shares, samples=20_000, top_k=128, seed=0)
    assert np.all(choice.mixture >= 0) and choice.mixture.sum() == pytest.approx(1.0)
    assert np.abs(choice.mixture - target).sum() < 0.1
    natural = fit.regressor.predict(shares[None, :])[0]
    assert choice.predicted_loss < natural
    assert np.all(np.diff(choice.top_k_predictions) >= 0)
    with pytest.raises(ConfigError):
        choose_mixture(fit.regressor, shares, samples=10, top_k=11)


# ---- the target and the checks ----------------------------------------------------------------------------


def test_regression_target_average_and_domain() -> None:
    domains = ["web", "code", "books"]
    losses = np.array([[3.0, 2.0, 4.0], [2.5, 1.5, 3.5]])
    average = regression_target(losses, "average", domains, [2.0, 1.0, 1.0])
    assert np.allclose(average, [0.5 * 3 + 0.25 * 2 + 0.25 * 4, 0.5 * 2.5 + 0.25 * 1.5 + 0.25 * 3.5])
    assert np.array_equal(regression_target(losses, "code", domains, [1, 1, 1]), [2.0, 1.5])
    with pytest.raises(ConfigError) as error:
        regression_target(losses, "wiki", domains, [1, 1, 1])
    assert "web, code, books" in one_line(error)
    broken = losses.copy()
    broken[1, 2] = np.nan
    with pytest.raises(DataError) as error:
        regression_target(broken, "average", domains, [1, 1, 1])
    assert one_line(error).startswith("mixture table row 1 has NaN losses (books)")
    assert np.array_equal(regression_target(broken, "web", domains, [1, 1, 1]), [3.0, 2.5])  # books unused


def test_checks_are_one_line() -> None:
    with pytest.raises(DataError) as error:
        check_proxy_count(3, 16, 8)
    assert one_line(error) == "only 3 of 16 proxies succeeded; the fit needs at least 8 (mixer.min_proxies)"
    check_proxy_count(8, 16, 8)
    check_settings(proxies=16, min_proxies=8)
    for bad in ({"proxies": 3, "min_proxies": 3}, {"proxies": 16, "min_proxies": 20},
                {"proxies": 16, "min_proxies": 8, "held_out": 1.0}, {"proxies": 16, "min_proxies": 8, "top_k": 0}):
        with pytest.raises(ConfigError) as error:
            check_settings(**bad)
        one_line(error)
    domains = ["a", "b"]
    check_mixture_table(np.array([[0.5, 0.5], [0.9998, 0.0]]), np.ones((2, 2)), domains)
    with pytest.raises(DataError) as error:
        check_mixture_table(np.array([[0.5, 0.4]]), np.ones((1, 2)), domains)
    assert one_line(error).startswith("mixture table row 0 is not a mixture")
    with pytest.raises(DataError) as error:
        check_mixture_table(np.ones((2, 3)) / 3, np.ones((2, 3)), domains)
    one_line(error)
