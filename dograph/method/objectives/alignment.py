"""The ``alignment`` objective (docs/design.md section 2.4): weight clusters by agreement with the update.

Fixed point ``w_k ∝ max(0, cos(mu_k, sum_j w_j mu_j))``, a few iterations from uniform
weights. It is not convex and is solved by iteration; the floor, mask, graph and proximal
terms then enter through a small projection QP (see :class:`AlignmentObjective`).
"""

from __future__ import annotations

from dataclasses import dataclass

import cvxpy as cp
import numpy as np

from dograph.method.objectives.base import (
    Objective,
    ObjectiveInputs,
    ObjectiveSettings,
    Stats,
    normalise_weights,
    uniform_over,
)
from dograph.settings import require, require_number


def alignment_fixed_point(means: np.ndarray, active: np.ndarray, iterations: int,
                          tol: float = 1e-10) -> np.ndarray:
    """Iterate ``w <- normalise(max(0, cos(mu_k, sum_j w_j mu_j)))`` from uniform over ``active``.

    Stops after ``iterations`` steps or when no weight moves by more than ``tol``. When the
    aggregate update is 0 or every cosine is <= 0 the weights are uniform over the active
    clusters (the rule of docs/design.md section 2.4, our reading). Zero-norm means have cosine 0.
    """
    means = np.asarray(means, np.float64)
    norms = np.linalg.norm(means, axis=1)
    unit = np.divide(means, norms[:, None], out=np.zeros_like(means), where=norms[:, None] > 0)
    w = uniform_over(active)
    for _ in range(iterations):
        update = w @ means
        length = np.linalg.norm(update)
        if not length > 0:
            return uniform_over(active)
        score = np.where(active, np.maximum(unit @ update / length, 0.0), 0.0)
        new = normalise_weights(score, active)  # all cosines <= 0 -> uniform
        done = np.max(np.abs(new - w)) <= tol
        w = new
        if done:
            break
    return w


@dataclass
class AlignmentSettings(ObjectiveSettings):
    """``conf/objective/alignment.yaml``: the shared keys and the fixed point's ``iterations`` and ``tol``."""

    iterations: int  # fixed-point iterations from uniform weights, >= 1
    tol: float  # stop iterating early when no weight moves more than this, >= 0

    def check(self) -> None:
        super().check()
        require(self.iterations >= 1, "objective.iterations", "must be >= 1", self.iterations)
        require_number(self.tol, "objective.tol", low=0)


class AlignmentObjective(Objective):
    """Alignment weights (docs/design.md section 2.4) made feasible by a projection QP (our choice).

    ``w_fp`` is the fixed point of :func:`alignment_fixed_point` (its closed form here); the
    solve then returns the minimiser of ``||w - w_fp||^2 + lambda_g w^T Lap w +
    tau ||w - w_prev||^2`` under the simplex, floor and mask constraints: the Euclidean
    projection of the fixed point, smoothed and damped like the convex objectives. The
    term ``||w - w_fp||^2`` has Hessian ``2 I``, so ``graph_weight`` and ``proximal_weight``
    keep the meaning they have elsewhere (see :mod:`.base`).
    """

    name = "alignment"
    settings_class = AlignmentSettings
    uses = ("means",)

    def __init__(self, *, num_clusters: int, iterations: int = 10, graph_weight: float = 0.1,
                 proximal_weight: float = 0.1, floor: float = 0.1, solver: str | None = None,
                 eps: float = 1e-4, tol: float = 1e-10) -> None:
        """``iterations`` (>= 1): fixed-point steps from uniform, default 10 (our choice for the
        paper's "a few": on clustered gradients it converges in 2-5); ``tol``: early stop
        when no weight moves more than this. Other arguments: see :class:`Objective`.
        """
        self.iterations, self.tol = int(iterations), float(tol)
        super().__init__(num_clusters=num_clusters, graph_weight=graph_weight,
                         proximal_weight=proximal_weight, floor=floor, solver=solver, eps=eps)

    def _main_term(self, w: cp.Variable) -> tuple[cp.Expression, list[cp.Constraint]]:
        self._target = cp.Parameter(self.num_clusters, name="fixed_point")
        return cp.sum_squares(w - self._target), []

    def _prepare(self, inputs: ObjectiveInputs, active: np.ndarray) -> Stats:
        return {"target": alignment_fixed_point(inputs.means, active, self.iterations, self.tol)}

    def _assign(self, stats: Stats) -> None:
        self._target.value = stats["target"]

    def _main_value(self, stats: Stats, w: np.ndarray) -> float:
        return float(np.sum((w - stats["target"]) ** 2))

    def _closed_form(self, stats: Stats) -> np.ndarray:
        return stats["target"]
