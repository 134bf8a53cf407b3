"""Shared machinery of DoGraph's cluster-weight objectives (docs/design.md sections 2.3, 2.4, 5, 6).

Every objective solves, over w in R^m,

    minimise  f(w) + lambda_g * w^T Lap w + tau * ||w - w_prev||^2
    s.t.      sum_k w_k = 1,  w_k >= w_min on active clusters,  w_k = 0 on inactive ones,

where ``f`` is the objective's own term (docs/design.md section 2.4), ``Lap = D - A`` the graph Laplacian
of the caller's adjacency ``A`` (docs/design.md section 2.3) and ``w_min = floor / n_active``.

Conventions (our choices, all documented where used):

* **Scale.** Each ``f`` is written in normalised statistics (``s2``, ``||mu||`` divided by
  their mean over active clusters; losses centred) and scaled so that its Hessian at
  equal statistics and uniform weights is ``2 I`` on the simplex's tangent space. The
  graph term's Hessian is ``2 lambda_g Lap`` and the proximal term's ``2 tau I``, so
  ``graph_weight`` and ``proximal_weight`` are curvatures *relative to the objective's
  own*, with the same meaning for every objective, dataset and gradient scale. The
  closed forms of docs/design.md section 2.4 are unchanged by this scaling (for ``robust`` the losses
  stay in nats so that ``softmax(eta * L)`` keeps its meaning; only the overall factor
  and a constant shift change, which leave the minimiser unchanged; its factor uses m,
  not the active count, to stay DPP, see :class:`RobustObjective`).
* **Defaults** ``graph_weight = proximal_weight = 0.1``: each regulariser has a tenth of
  the objective's curvature, so it smooths and damps the weights without overriding
  the objective (our choice; the paper gives no values).
* **Floor.** ``w_min = floor / n_active``, counting *active* clusters so that the floors
  always sum to ``floor < 1`` and the problem stays feasible however many clusters have
  statistics (our choice; docs/design.md section 2.3 writes ``0.1 / m`` with every cluster active).
* **Graph edges** touching an inactive cluster are dropped: an inactive cluster's weight
  is forced to 0 and must not drag its neighbours down (our choice).
* **Compilation.** The CVXPY problem is built once per instance with ``cp.Parameter``
  values and is DPP (docs/design.md section 6): the graph term is ``sum_squares(multiply(sqrt_a, E @ w))``
  with a constant edge-incidence matrix ``E`` over all pairs ``k < l`` and a Parameter
  ``sqrt_a = sqrt(lambda_g * A_kl)``; the mask enters through Parameter bounds. A step
  sets parameter values and re-solves from CVXPY's cached parametrised program.
* **Solver.** CLARABEL by default for every objective (our choice): at m = 11 it is as
  fast as OSQP through CVXPY (the solve is dominated by CVXPY's per-call overhead, about
  1 ms) and, being interior-point, reaches tight tolerances (1e-9 here) in a few more
  iterations, where OSQP and SCS are first-order methods. ``solver`` selects another
  supported one.
* **Failures**: a solver error, a non-optimal status or a non-finite or infeasible answer
  (``NUMERICAL_ERRORS``) falls back to the closed form projected onto the feasible set
  (``fallback=True``, a warning through :mod:`logging` naming the step); non-finite
  statistics fall back to uniform weights over the active clusters. Any other exception
  is a bug and propagates.
* **Active clusters** are the ones the caller solves for: DoGraph passes the clusters
  present in the step's global batch (docs/design.md section 2.5), so absent ones get weight 0.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar, Literal, get_args

import cvxpy as cp
import numpy as np

from dograph.settings import Settings, require, require_number

logger = logging.getLogger(__name__)

Stats = dict[str, np.ndarray]  # an objective's normalised statistics for one step

FEASIBILITY_TOL = 1e-4  # largest bound/sum violation accepted from a solver before cleaning
_OK_STATUSES = (cp.OPTIMAL, cp.OPTIMAL_INACCURATE)
# Tight tolerances (the problems are tiny, so this is cheap). On the entropy cone CLARABEL's
# defaults (1e-8) leave up to 3e-5 in w, 1e-9 about 8e-6; at 1e-10 it often stops "almost solved".
_SOLVER_OPTIONS = MappingProxyType({
    "CLARABEL": MappingProxyType({"tol_gap_abs": 1e-9, "tol_gap_rel": 1e-9, "tol_feas": 1e-9}),
    "OSQP": MappingProxyType({"eps_abs": 1e-8, "eps_rel": 1e-8, "polish": True, "max_iter": 20000}),
    "SCS": MappingProxyType({"eps_abs": 1e-8, "eps_rel": 1e-8, "max_iters": 20000}),
})


@dataclass(frozen=True)
class ObjectiveInputs:
    """Per-cluster EMA statistics of one step (docs/design.md section 2.3); numpy float64 on the host."""

    counts: np.ndarray  # [m] EMA count n_k (>= 0)
    means: np.ndarray  # [m, k] EMA projected mean gradient mu_k
    variances: np.ndarray  # [m] EMA intra-cluster variance s2_k = mean ||g_i - mu_k||^2
    losses: np.ndarray  # [m] EMA mean loss L_k (nats)
    adjacency: np.ndarray  # [m, m] A_kl = max(0, cos(mu_k, mu_l)), zero diagonal
    mean_grad: np.ndarray  # [k] mu_bar, the count-weighted mean gradient of the batch
    active: np.ndarray  # [m] bool: the clusters solved for (present in the batch); others get weight 0
    batch_means: np.ndarray | None = None  # [m, k] the batch's per-cluster mean gradients (None: ``means``)
    batch_counts: np.ndarray | None = None  # [m] the batch's cluster sizes (None: ``counts``)


@dataclass(frozen=True)
class ObjectiveResult:
    """Weights of one solve and how they were obtained."""

    weights: np.ndarray  # [m] >= 0, sums to 1, 0 on inactive clusters
    value: float  # full objective (normalised units, incl. graph/proximal terms) at weights
    fallback: bool  # True when the closed form / uniform was used instead of the solver
    solve_seconds: float


class SolverFailure(RuntimeError):
    """The solver returned no usable answer (status, non-finite or infeasible values)."""


# What a solve may legitimately raise on hard numbers; anything else (a programming error) propagates.
NUMERICAL_ERRORS = (SolverFailure, cp.error.SolverError, ArithmeticError, np.linalg.LinAlgError)


QPSolver = Literal["CLARABEL", "OSQP", "SCS"]  # the solvers of the quadratic objectives (objective.solver)


@dataclass
class ObjectiveSettings(Settings):
    """The keys every ``conf/objective/*.yaml`` shares (docs/design.md section 2.4; see the module doc).

    Each objective's settings class adds its own keys and, where it needs another cone, its solvers.
    """

    key = "objective"
    _target_: str  # the objective's class, built by the mixer with num_clusters=m
    _partial_: bool  # true: the mixer completes the object
    graph_weight: float  # lambda_g of lambda_g * w^T Lap w, relative to the objective's curvature (>= 0)
    proximal_weight: float  # tau of tau * ||w - w_prev||^2, relative to the objective's curvature (>= 0)
    floor: float  # w_k >= floor / (number of active clusters), in [0, 1)
    solver: QPSolver  # the CVXPY solver (it must be installed)

    def check(self) -> None:
        require_number(self.graph_weight, "objective.graph_weight", low=0)
        require_number(self.proximal_weight, "objective.proximal_weight", low=0)
        require_number(self.floor, "objective.floor", low=0, high=1, high_open=True)
        require(self.solver in cp.installed_solvers(), "objective.solver", "is not installed", self.solver)

    @staticmethod
    def check_eps(eps: float) -> None:
        """``eps``, the relative floor of normalised statistics: in (0, 1)."""
        require_number(eps, "objective.eps", low=0, high=1, low_open=True, high_open=True)


def edge_incidence(m: int) -> np.ndarray:
    """Constant [m(m-1)/2, m] incidence matrix, row (k, l), k < l, equal to e_k - e_l."""
    pairs = list(itertools.combinations(range(m), 2))
    e = np.zeros((len(pairs), m))
    for row, (k, l) in enumerate(pairs):
        e[row, k], e[row, l] = 1.0, -1.0
    return e


def normalise_by_active_mean(x: np.ndarray, active: np.ndarray, eps: float) -> np.ndarray:
    """``x / mean_active(x)`` floored at ``eps``, 0 on inactive clusters.

    All-zero (or non-positive) statistics give 1 on every active cluster, i.e. "all
    equal" (our choice: a statistic with no scale carries no preference).
    """
    x = np.where(active, np.maximum(x, 0.0), 0.0)
    scale = x[active].mean() if active.any() else 0.0
    if not scale > 0:
        return active.astype(np.float64)
    return np.where(active, np.maximum(x / scale, eps), 0.0)


def uniform_over(active: np.ndarray) -> np.ndarray:
    """Uniform weights over the active clusters."""
    return active / active.sum()


def normalise_weights(score: np.ndarray, active: np.ndarray) -> np.ndarray:
    """``score / sum(score)`` on active clusters; uniform when that is not a valid simplex point."""
    score = np.where(active, score, 0.0)
    total = score.sum()
    if not (np.isfinite(total) and total > 0 and np.all(score >= 0)):
        return uniform_over(active)
    return score / total


def project_to_feasible(v: np.ndarray, lower: np.ndarray, active: np.ndarray) -> np.ndarray:
    """Euclidean projection of ``v`` onto ``{w : sum w = 1, w >= lower, w = 0 off active}``.

    With ``u = w - lower`` this is the projection onto the simplex scaled to
    ``1 - sum(lower)`` (sort-based algorithm of Held et al. / Duchi et al.).
    """
    idx = np.flatnonzero(active)
    budget = 1.0 - lower[idx].sum()
    u = np.nan_to_num(v[idx] - lower[idx], nan=0.0, posinf=0.0, neginf=0.0)
    s = np.sort(u)[::-1]
    cumulative = np.cumsum(s) - budget
    ranks = np.arange(1, len(s) + 1)
    rho = np.flatnonzero(s - cumulative / ranks > 0)[-1]
    theta = cumulative[rho] / (rho + 1)
    w = np.zeros_like(v, dtype=np.float64)
    w[idx] = lower[idx] + np.maximum(u - theta, 0.0)
    return w


class Objective(ABC):
    """DoGraph's cluster-weight problem (docs/design.md section 2.4): objective term + graph + proximal.

    Subclasses supply the objective's own term as a DPP CVXPY expression
    (:meth:`_main_term`), its normalised statistics (:meth:`_prepare`, :meth:`_assign`),
    its value in numpy (:meth:`_main_value`) and its closed form (:meth:`_closed_form`).
    The floor, mask, graph and proximal terms, the solve and the fallback live here.
    """

    name: ClassVar[str] = "objective"
    settings_class: ClassVar[type[ObjectiveSettings]]  # the schema of conf/objective/<name>.yaml (checked there)
    supported_solvers: ClassVar[tuple[str, ...]] = get_args(QPSolver)  # the first is the default
    uses: ClassVar[tuple[str, ...]] = ()  # ObjectiveInputs fields the objective term reads

    def __init__(self, *, num_clusters: int, graph_weight: float = 0.1, proximal_weight: float = 0.1,
                 floor: float = 0.1, solver: str | None = None, eps: float = 1e-4) -> None:
        """Build the parametrised CVXPY problem once (the settings are checked by :class:`ObjectiveSettings`).

        ``eps``: relative floor of normalised statistics (``s2_k``, ``||mu_k||`` divided by
        their active mean), so a zero-variance cluster gets a finite weight 1/eps times an
        average one and the QP's condition number stays <= 1/eps (our choice).
        """
        self.num_clusters = num_clusters
        self.graph_weight, self.proximal_weight = float(graph_weight), float(proximal_weight)
        self.floor, self.eps = float(floor), float(eps)
        self.solver = self.supported_solvers[0] if solver is None else str(solver).upper()
        self._solver_options = dict(_SOLVER_OPTIONS.get(self.solver, {}))
        self._incidence = edge_incidence(self.num_clusters)
        self._pair_rows, self._pair_cols = np.triu_indices(self.num_clusters, 1)  # E's row order
        self._problem = self._build_problem()

    @property
    def problem(self) -> cp.Problem:
        """The parametrised CVXPY problem (built once; DPP)."""
        return self._problem

    def _build_problem(self) -> cp.Problem:
        """Objective term + graph + proximal terms under simplex, floor and mask constraints."""
        m = self.num_clusters
        self._w = cp.Variable(m, name="w")
        self._lower = cp.Parameter(m, nonneg=True, name="lower")
        self._upper = cp.Parameter(m, nonneg=True, name="upper")
        self._sqrt_a: cp.Parameter | None = None
        self._w_prev: cp.Parameter | None = None
        main, constraints = self._main_term(self._w)
        objective = main
        if self.graph_weight > 0 and m > 1:
            self._sqrt_a = cp.Parameter(self._incidence.shape[0], nonneg=True, name="sqrt_a")
            objective = objective + cp.sum_squares(cp.multiply(self._sqrt_a, self._incidence @ self._w))
        if self.proximal_weight > 0:
            self._w_prev = cp.Parameter(m, name="w_prev")
            objective = objective + self.proximal_weight * cp.sum_squares(self._w - self._w_prev)
        constraints = [*constraints, cp.sum(self._w) == 1, self._w >= self._lower, self._w <= self._upper]
        return cp.Problem(cp.Minimize(objective), constraints)

    # ---- hooks implemented by each objective -------------------------------------------------

    @abstractmethod
    def _main_term(self, w: cp.Variable) -> tuple[cp.Expression, list[cp.Constraint]]:
        """The objective's own term of w (DPP, in Parameters it owns) and extra constraints."""

    @abstractmethod
    def _prepare(self, inputs: ObjectiveInputs, active: np.ndarray) -> Stats:
        """Normalised statistics of one step (finite inputs, >= 2 or 1 active clusters)."""

    @abstractmethod
    def _assign(self, stats: Stats) -> None:
        """Set the objective's own Parameter values from ``stats``."""

    @abstractmethod
    def _main_value(self, stats: Stats, w: np.ndarray) -> float:
        """The objective's own term at ``w``, in numpy (same normalisation as the problem)."""

    @abstractmethod
    def _closed_form(self, stats: Stats) -> np.ndarray:
        """The closed form of docs/design.md section 2.4 on the active clusters (no floor, graph or proximal term)."""

    def _violation(self, stats: Stats, w: np.ndarray) -> float:
        """How much ``w`` violates the objective's extra constraints (0 when none)."""
        return 0.0

    def _repair(self, stats: Stats, w: np.ndarray) -> np.ndarray:
        """Make ``w`` satisfy the constraints that protect the applied update (identity by default)."""
        return w

    # ---- public API ------------------------------------------------------------------------

    def closed_form(self, inputs: ObjectiveInputs) -> np.ndarray:
        """Closed-form weights (docs/design.md section 2.4) over the active clusters; uniform on bad inputs."""
        active = self._active_mask(inputs)
        if not active.any():
            return np.full(self.num_clusters, 1.0 / self.num_clusters)
        if not self._finite(inputs, active):
            return uniform_over(active)
        return normalise_weights(self._closed_form(self._stats(inputs, active)), active)

    def value(self, inputs: ObjectiveInputs, weights: np.ndarray, w_prev: np.ndarray) -> float:
        """The full objective (normalised units, incl. graph and proximal terms) at ``weights``."""
        active = self._active_mask(inputs)
        if not active.any() or not self._finite(inputs, active):
            return math.nan
        w_prev = self._clean_prev(w_prev, active)
        return self._full_value(self._stats(inputs, active), np.asarray(weights, np.float64), w_prev)

    def solve(self, inputs: ObjectiveInputs, w_prev: np.ndarray, *, step: int = -1) -> ObjectiveResult:
        """Weights on the simplex for one step; never raises on a numerical failure.

        Shape mismatches (a caller bug) raise ``ValueError``. No active cluster: uniform over
        all clusters, ``fallback=True`` (our choice: no weighting is possible). Non-finite
        statistics: uniform over the active clusters, ``value=nan``, ``fallback=True``.
        """
        start = time.perf_counter()
        active = self._active_mask(inputs)
        if not active.any() or not self._finite(inputs, active):
            logger.warning("objective %s at step %d: %s; using uniform weights", self.name, step,
                           "non-finite statistics" if active.any() else "no active cluster")
            m = self.num_clusters
            weights = uniform_over(active) if active.any() else np.full(m, 1.0 / m)
            return ObjectiveResult(weights, math.nan, True, time.perf_counter() - start)
        stats = self._stats(inputs, active)
        w_prev = self._clean_prev(w_prev, active)
        if active.sum() == 1:
            weights, fallback = active.astype(np.float64), False
        else:
            weights, fallback = self._solve_or_fallback(stats, w_prev, step)
        weights = self._repair(stats, weights)
        value = self._full_value(stats, weights, w_prev)
        return ObjectiveResult(weights, value, fallback, time.perf_counter() - start)

    # ---- internals -------------------------------------------------------------------------

    def _active_mask(self, inputs: ObjectiveInputs) -> np.ndarray:
        active = np.asarray(inputs.active, dtype=bool).reshape(-1)
        m = self.num_clusters
        shapes_ok = (active.shape == (m,) and np.shape(inputs.counts) == (m,)
                     and np.shape(inputs.variances) == (m,) and np.shape(inputs.losses) == (m,)
                     and np.shape(inputs.adjacency) == (m, m) and np.ndim(inputs.means) == 2
                     and np.shape(inputs.means)[0] == m
                     and np.shape(inputs.mean_grad) == np.shape(inputs.means)[1:])
        if not shapes_ok:
            raise ValueError(f"objective {self.name}: inputs do not match num_clusters={m} "
                             f"(active {active.shape}, means {np.shape(inputs.means)})")
        return active

    def _finite(self, inputs: ObjectiveInputs, active: np.ndarray) -> bool:
        """Are the statistics this objective reads finite on the active clusters?"""
        arrays = [np.asarray(getattr(inputs, f))[active] for f in self.uses
                  if f != "mean_grad" and getattr(inputs, f) is not None]
        if "mean_grad" in self.uses:
            arrays.append(np.asarray(inputs.mean_grad))
        if self.graph_weight > 0:
            arrays.append(np.asarray(inputs.adjacency)[np.ix_(active, active)])
        return all(np.all(np.isfinite(a)) for a in arrays)

    def _stats(self, inputs: ObjectiveInputs, active: np.ndarray) -> Stats:
        stats = self._prepare(inputs, active)
        stats["active"] = active
        stats["lower"] = np.where(active, self.floor / active.sum(), 0.0)
        stats["edges"] = self._edge_weights(inputs, active)
        return stats

    def _edge_weights(self, inputs: ObjectiveInputs, active: np.ndarray) -> np.ndarray:
        """A_kl for pairs k < l (E's rows), symmetrised, clipped at 0, 0 unless both active."""
        if self.graph_weight == 0:
            return np.zeros(len(self._pair_rows))
        a = np.asarray(inputs.adjacency, dtype=np.float64)
        r, c = self._pair_rows, self._pair_cols
        edges = np.maximum(0.5 * (a[r, c] + a[c, r]), 0.0)
        return np.where(active[r] & active[c], edges, 0.0)

    def _clean_prev(self, w_prev: np.ndarray | None, active: np.ndarray) -> np.ndarray:
        """``w_prev`` as given; uniform over active clusters when missing or invalid (our choice)."""
        w = None if w_prev is None else np.asarray(w_prev, dtype=np.float64).reshape(-1)
        if w is None or w.shape != (self.num_clusters,) or not np.all(np.isfinite(w)):
            return uniform_over(active)
        return w

    def _full_value(self, stats: Stats, w: np.ndarray, w_prev: np.ndarray) -> float:
        graph = self.graph_weight * float(stats["edges"] @ (self._incidence @ w) ** 2)
        proximal = self.proximal_weight * float(np.sum((w - w_prev) ** 2))
        return self._main_value(stats, w) + graph + proximal

    def _solve_or_fallback(self, stats: Stats, w_prev: np.ndarray, step: int) -> tuple[np.ndarray, bool]:
        try:
            return self._solve_cvxpy(stats, w_prev), False
        except NUMERICAL_ERRORS as exc:  # docs/design.md section 2.4: a solver or numerical failure falls back
            logger.warning("objective %s at step %d: solver %s failed (%s: %s); using the projected "
                           "closed form", self.name, step, self.solver, type(exc).__name__, exc)
        closed = normalise_weights(self._closed_form(stats), stats["active"])
        return project_to_feasible(closed, stats["lower"], stats["active"]), True

    def _solve_cvxpy(self, stats: Stats, w_prev: np.ndarray) -> np.ndarray:
        self._lower.value = stats["lower"]
        self._upper.value = stats["active"].astype(np.float64)
        if self._sqrt_a is not None:
            self._sqrt_a.value = np.sqrt(self.graph_weight * stats["edges"])
        if self._w_prev is not None:
            self._w_prev.value = w_prev
        self._assign(stats)
        # no warm start: a solve depends only on its inputs, so a resumed run repeats it exactly
        self._problem.solve(solver=self.solver, warm_start=False, **self._solver_options)
        w = self._w.value
        if self._problem.status not in _OK_STATUSES or w is None or not np.all(np.isfinite(w)):
            raise SolverFailure(f"status {self._problem.status}")
        return self._clean(stats, np.asarray(w, dtype=np.float64))

    def _clean(self, stats: Stats, w: np.ndarray) -> np.ndarray:
        """Check feasibility within FEASIBILITY_TOL, then snap to the bounds and renormalise."""
        active, lower = stats["active"], stats["lower"]
        violation = max(abs(w.sum() - 1.0), float(np.max(lower - w)),
                        float(np.max(np.abs(w[~active]), initial=0.0)), self._violation(stats, w))
        if violation > FEASIBILITY_TOL:
            raise SolverFailure(f"infeasible answer (violation {violation:.2e})")
        w = np.where(active, np.maximum(w, lower), 0.0)
        return w / w.sum()
