"""DoGraph's weight objectives (docs/design.md section 2.4): closed forms, feasibility, an independent solver,
fallback, DPP and no recompilation (their settings are checked in tests/test_settings.py).

The reference objectives below are written from the documented formulas, independently of
the package's numpy code (the graph term through the Laplacian, not the edge list).
"""

from __future__ import annotations

import logging

import cvxpy as cp
import numpy as np
import pytest
from scipy.optimize import minimize

from dograph.method.objectives import (
    AlignmentObjective,
    Objective,
    ObjectiveInputs,
    RobustObjective,
    UncertaintyObjective,
    VarianceObjective,
    alignment_fixed_point,
    project_to_feasible,
)

CONVEX = (UncertaintyObjective, VarianceObjective, RobustObjective)
ALL = (*CONVEX, AlignmentObjective)


def make_inputs(seed: int, m: int, *, inactive: int = 0, dim: int = 8) -> ObjectiveInputs:
    """Random statistics whose mean gradients share a direction (so descent holds at the closed form)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=dim) * 3.0
    means = base + rng.normal(size=(m, dim)) * rng.uniform(0.3, 1.5, size=(m, 1))
    norms = np.linalg.norm(means, axis=1)
    adjacency = np.maximum(means @ means.T / np.outer(norms, norms), 0.0)
    np.fill_diagonal(adjacency, 0.0)
    counts = rng.uniform(1.0, 20.0, m)
    active = np.ones(m, dtype=bool)
    active[rng.choice(m, size=inactive, replace=False)] = False
    return ObjectiveInputs(counts=counts, means=means, variances=rng.uniform(0.1, 3.0, m),
                           losses=rng.uniform(2.0, 5.0, m), adjacency=adjacency,
                           mean_grad=counts[active] @ means[active] / counts[active].sum(), active=active)


def replace(inputs: ObjectiveInputs, **changes: np.ndarray) -> ObjectiveInputs:
    return ObjectiveInputs(**{**inputs.__dict__, **changes})


def reference_value(obj: Objective, x: ObjectiveInputs, w: np.ndarray, w_prev: np.ndarray) -> float:
    """The documented full objective, written independently of the package."""
    act = x.active
    n = act.sum()
    a = np.where(np.outer(act, act), x.adjacency, 0.0)
    lap = np.diag(a.sum(axis=1)) - a
    extra = obj.graph_weight * w @ lap @ w + obj.proximal_weight * np.sum((w - w_prev) ** 2)
    if isinstance(obj, UncertaintyObjective):
        s2 = np.maximum(x.variances / x.variances[act].mean(), obj.eps)
        return float(np.sum(s2[act] * w[act] ** 2) + extra)
    if isinstance(obj, VarianceObjective):
        norms = np.linalg.norm(x.means, axis=1)
        contribution = (norms / norms[act].mean() * w)[act]
        return float(n * np.var(contribution) + extra)
    if isinstance(obj, RobustObjective):
        wa = np.clip(w[act], 1e-300, None)
        centred = x.losses[act] - x.losses[act].mean()
        return float(2.0 / len(act) * (np.sum(wa * np.log(wa)) - obj.eta * centred @ wa) + extra)
    target = reference_fixed_point(x.means, act, obj.iterations)
    return float(np.sum((w - target) ** 2) + extra)


def reference_fixed_point(means: np.ndarray, active: np.ndarray, iterations: int) -> np.ndarray:
    w = active / active.sum()
    for _ in range(iterations):
        g = w @ means
        cos = means @ g / (np.linalg.norm(means, axis=1) * np.linalg.norm(g))
        score = np.where(active, np.maximum(cos, 0.0), 0.0)
        w = score / score.sum() if score.sum() > 0 else active / active.sum()
    return w


def descent(x: ObjectiveInputs, w: np.ndarray) -> float:
    return float((w @ x.means) @ x.mean_grad)


def slsqp(obj: Objective, x: ObjectiveInputs, w_prev: np.ndarray, start: np.ndarray) -> np.ndarray:
    """scipy SLSQP on the active clusters (inactive ones fixed at 0)."""
    act = x.active
    lower = obj.floor / act.sum()

    def full(v: np.ndarray) -> np.ndarray:
        w = np.zeros(len(act))
        w[act] = v
        return w

    constraints = [{"type": "eq", "fun": lambda v: v.sum() - 1.0}]
    if isinstance(obj, VarianceObjective):
        constraints.append({"type": "ineq", "fun": lambda v: descent(x, full(v))})
    res = minimize(lambda v: reference_value(obj, x, full(v), w_prev), start[act], method="SLSQP",
                   bounds=[(lower, 1.0)] * int(act.sum()), constraints=constraints,
                   options={"ftol": 1e-14, "maxiter": 1000})
    return full(res.x)


def closed_form_reference(obj: Objective, x: ObjectiveInputs) -> np.ndarray:
    act = x.active
    if isinstance(obj, UncertaintyObjective):
        score = 1.0 / x.variances
    elif isinstance(obj, VarianceObjective):
        score = 1.0 / np.linalg.norm(x.means, axis=1)
    else:
        score = np.exp(obj.eta * (x.losses - x.losses[act].max()))
    score = np.where(act, score, 0.0)
    return score / score.sum()


@pytest.mark.parametrize("cls", CONVEX)
@pytest.mark.parametrize(("m", "inactive"), [(1, 0), (3, 0), (11, 0), (11, 3)])
def test_cvxpy_matches_closed_form_without_extra_terms(cls: type[Objective], m: int, inactive: int) -> None:
    obj = cls(num_clusters=m, graph_weight=0.0, proximal_weight=0.0, floor=0.0)
    for seed in range(3):
        x = make_inputs(seed, m, inactive=inactive)
        expected = closed_form_reference(obj, x)
        if isinstance(obj, VarianceObjective):
            assert descent(x, expected) > 0  # the constraint is inactive at the closed form
        result = obj.solve(x, np.full(m, 1.0 / m))
        assert not result.fallback
        np.testing.assert_allclose(obj.closed_form(x), expected, atol=1e-12)
        np.testing.assert_allclose(result.weights, expected, atol=1e-4)


@pytest.mark.parametrize("solver", ["OSQP", "SCS"])
def test_other_qp_solvers_match_closed_form(solver: str) -> None:
    obj = UncertaintyObjective(num_clusters=11, graph_weight=0.0, proximal_weight=0.0, floor=0.0,
                               solver=solver)
    x = make_inputs(5, 11, inactive=2)
    np.testing.assert_allclose(obj.solve(x, np.full(11, 1 / 11)).weights,
                               closed_form_reference(obj, x), atol=1e-4)


def assert_feasible(obj: Objective, x: ObjectiveInputs, w: np.ndarray) -> None:
    assert abs(w.sum() - 1.0) <= 1e-6
    assert np.all(w[x.active] >= obj.floor / x.active.sum() - 1e-6)
    assert np.all(w[~x.active] == 0.0)


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize(("m", "inactive"), [(3, 0), (11, 0), (11, 4)])
def test_all_terms_on_feasible_optimal_and_agrees_with_slsqp(
        cls: type[Objective], m: int, inactive: int) -> None:
    obj = cls(num_clusters=m, graph_weight=0.3, proximal_weight=0.2, floor=0.3)
    for seed in range(3):
        x = make_inputs(100 + seed, m, inactive=inactive)
        w_prev = np.random.default_rng(seed).dirichlet(np.ones(m))
        result = obj.solve(x, w_prev, step=seed)
        assert not result.fallback and result.solve_seconds > 0
        assert_feasible(obj, x, result.weights)
        ours = reference_value(obj, x, result.weights, w_prev)
        assert result.value == pytest.approx(ours, abs=1e-9)
        projected = project_to_feasible(obj.closed_form(x), obj.floor / x.active.sum() * x.active, x.active)
        assert_feasible(obj, x, projected)
        assert ours <= reference_value(obj, x, projected, w_prev) + 1e-9
        scipy_w = slsqp(obj, x, w_prev, projected)
        assert ours == pytest.approx(reference_value(obj, x, scipy_w, w_prev), abs=1e-5)


def test_variance_descent_constraint_holds_when_active() -> None:
    means = np.array([[10.0, 0.0], [-1.0, 1.0], [-1.0, -1.0]])
    x = ObjectiveInputs(counts=np.ones(3), means=means, variances=np.ones(3), losses=np.ones(3),
                        adjacency=np.zeros((3, 3)), mean_grad=np.array([1.0, 0.0]),
                        active=np.ones(3, dtype=bool))
    obj = VarianceObjective(num_clusters=3, graph_weight=0.0, proximal_weight=0.1, floor=0.1)
    assert descent(x, obj.closed_form(x)) < 0  # the closed form would ascend
    result = obj.solve(x, np.full(3, 1 / 3))
    assert not result.fallback
    assert descent(x, result.weights) >= -1e-6
    assert descent(x, result.weights) <= 1e-3  # the constraint is active at the optimum
    scipy_w = slsqp(obj, x, np.full(3, 1 / 3), np.array([0.5, 0.25, 0.25]))
    assert result.value == pytest.approx(reference_value(obj, x, scipy_w, np.full(3, 1 / 3)), abs=1e-5)


def test_variance_infeasible_descent_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    x = make_inputs(0, 4)
    x = replace(x, mean_grad=-x.means.mean(axis=0) * 10.0)  # every cluster points uphill
    obj = VarianceObjective(num_clusters=4)
    with caplog.at_level(logging.WARNING, logger="dograph.method.objectives"):
        result = obj.solve(x, np.full(4, 0.25), step=3)
    assert result.fallback
    assert_feasible(obj, x, result.weights)
    assert "step 3" in caplog.text


def test_alignment_fixed_point_hand_example() -> None:
    means = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    active = np.ones(3, dtype=bool)
    # uniform -> g = (0, 1/3): cosines (0, 1, 0) -> w = e_2, which is a fixed point
    np.testing.assert_allclose(alignment_fixed_point(means, active, 10), [0.0, 1.0, 0.0])


def test_alignment_fixed_point_property() -> None:
    x = make_inputs(7, 11, inactive=2)
    w = alignment_fixed_point(x.means, x.active, iterations=200)
    g = w @ x.means
    cos = x.means @ g / (np.linalg.norm(x.means, axis=1) * np.linalg.norm(g))
    again = np.where(x.active, np.maximum(cos, 0.0), 0.0)
    np.testing.assert_allclose(w, again / again.sum(), atol=1e-8)
    assert np.all(w[~x.active] == 0.0)
    obj = AlignmentObjective(num_clusters=11, iterations=200, graph_weight=0.0, proximal_weight=0.0,
                             floor=0.0)
    np.testing.assert_allclose(obj.solve(x, np.full(11, 1 / 11)).weights, w, atol=1e-6)


@pytest.mark.parametrize("means", [[[1.0, 0.0], [-1.0, 0.0]],
                                   [[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]]])
def test_alignment_nonpositive_cosines_give_uniform(means: list[list[float]]) -> None:
    means_arr = np.array(means)
    m = len(means_arr)
    x = ObjectiveInputs(counts=np.ones(m), means=means_arr, variances=np.ones(m), losses=np.ones(m),
                        adjacency=np.zeros((m, m)), mean_grad=np.zeros(2), active=np.ones(m, dtype=bool))
    obj = AlignmentObjective(num_clusters=m, graph_weight=0.0, proximal_weight=0.0, floor=0.0)
    np.testing.assert_allclose(obj.closed_form(x), np.full(m, 1 / m))
    np.testing.assert_allclose(obj.solve(x, np.full(m, 1 / m)).weights, np.full(m, 1 / m), atol=1e-6)


@pytest.mark.parametrize("cls", ALL)
def test_solver_exception_falls_back_to_projected_closed_form(
        cls: type[Objective], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    obj = cls(num_clusters=11)
    x = make_inputs(1, 11, inactive=2)

    def broken(*args: object, **kwargs: object) -> None:
        raise cp.error.SolverError("solver exploded")

    monkeypatch.setattr(obj.problem, "solve", broken)
    with caplog.at_level(logging.WARNING, logger="dograph.method.objectives"):
        result = obj.solve(x, np.full(11, 1 / 11), step=42)
    assert result.fallback
    lower = obj.floor / x.active.sum() * x.active
    np.testing.assert_allclose(result.weights, project_to_feasible(obj.closed_form(x), lower, x.active))
    assert_feasible(obj, x, result.weights)
    assert "step 42" in caplog.text and "solver exploded" in caplog.text


@pytest.mark.parametrize("cls", ALL)
def test_programming_error_in_the_solve_propagates(cls: type[Objective], monkeypatch: pytest.MonkeyPatch) -> None:
    """Only solver and numerical errors fall back; a bug must not be hidden behind the closed form."""
    obj = cls(num_clusters=5)

    def buggy(*args: object, **kwargs: object) -> None:
        raise TypeError("unexpected keyword")

    monkeypatch.setattr(obj.problem, "solve", buggy)
    with pytest.raises(TypeError, match="unexpected keyword"):
        obj.solve(make_inputs(3, 5), np.full(5, 0.2))


@pytest.mark.parametrize("cls", ALL)
def test_nan_inputs_give_uniform_over_active(cls: type[Objective], caplog: pytest.LogCaptureFixture) -> None:
    x = make_inputs(2, 5, inactive=1)
    bad = x.means.copy()
    bad[np.flatnonzero(x.active)[0], 0] = np.nan
    x = replace(x, means=bad, variances=np.where(x.active, np.nan, 1.0), losses=np.full(5, np.inf))
    with caplog.at_level(logging.WARNING, logger="dograph.method.objectives"):
        result = cls(num_clusters=5).solve(x, np.full(5, 0.2), step=9)
    assert result.fallback and np.isnan(result.value)
    np.testing.assert_allclose(result.weights, x.active / x.active.sum())
    assert "step 9" in caplog.text


@pytest.mark.parametrize("cls", ALL)
def test_edge_cases(cls: type[Objective]) -> None:
    one = make_inputs(0, 1)
    result = cls(num_clusters=1).solve(one, np.ones(1))
    assert result.weights.tolist() == [1.0] and not result.fallback
    x = make_inputs(3, 6, inactive=5)
    result = cls(num_clusters=6).solve(x, np.full(6, 1 / 6))
    np.testing.assert_array_equal(result.weights, x.active.astype(float))
    # all-equal statistics -> uniform
    m = 5
    equal = ObjectiveInputs(counts=np.ones(m), means=np.tile([1.0, 2.0], (m, 1)), variances=np.ones(m),
                            losses=np.full(m, 3.0), adjacency=np.ones((m, m)) - np.eye(m),
                            mean_grad=np.array([1.0, 2.0]), active=np.ones(m, dtype=bool))
    result = cls(num_clusters=m).solve(equal, np.full(m, 1 / m))
    assert not result.fallback
    np.testing.assert_allclose(result.weights, np.full(m, 1 / m), atol=1e-6)


def test_zero_variance_is_finite_and_dominant() -> None:
    x = make_inputs(4, 6)
    x = replace(x, variances=np.array([0.0, 1.0, 1.0, 1.0, 1.0, 1.0]))
    for obj in (UncertaintyObjective(num_clusters=6),
                UncertaintyObjective(num_clusters=6, graph_weight=0.0, proximal_weight=0.0)):
        result = obj.solve(x, np.full(6, 1 / 6))
        assert not result.fallback and np.isfinite(result.value)
        assert_feasible(obj, x, result.weights)
        assert result.weights[0] == result.weights.max()
    assert result.weights[0] > 0.9  # without the regularisers: all but the floors
    zero = replace(x, variances=np.zeros(6))  # no scale at all: uniform closed form
    np.testing.assert_allclose(obj.closed_form(zero), np.full(6, 1 / 6))


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize(("graph", "prox"), [(0.1, 0.1), (0.0, 0.0)])
def test_problem_is_dpp_and_not_recompiled(cls: type[Objective], graph: float, prox: float,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    obj = cls(num_clusters=11, graph_weight=graph, proximal_weight=prox)
    assert obj.problem.is_dpp()
    assert not obj.solve(make_inputs(0, 11), np.full(11, 1 / 11)).fallback
    cache = obj.problem._cache
    program = cache.param_prog
    assert program is not None  # the parametrised program was cached (DPP fast path)

    def no_recompile(*args: object, **kwargs: object) -> None:
        raise AssertionError("the problem was recompiled")

    monkeypatch.setattr(cache.solving_chain, "apply", no_recompile)
    monkeypatch.setattr(obj.problem, "_construct_chain", no_recompile)
    for seed in range(1, 4):
        x = make_inputs(seed, 11, inactive=seed)
        result = obj.solve(x, np.full(11, 1 / 11))
        assert not result.fallback
        assert obj.problem._cache.param_prog is program


@pytest.mark.parametrize("name", ["uncertainty", "variance", "robust", "alignment"])
def test_yaml_instantiates(name: str) -> None:
    from conftest import compose_config
    from hydra.utils import instantiate

    from dograph.config import to_run_config

    cfg = to_run_config(compose_config([f"objective={name}"])).objective  # the composed node, checked
    assert "num_clusters" not in cfg
    obj = instantiate(cfg)(num_clusters=11)
    assert obj.name == name
    result = obj.solve(make_inputs(0, 11), np.full(11, 1 / 11))
    assert not result.fallback
