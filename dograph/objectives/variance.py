"""The ``variance`` objective (DESIGN 2.4).

minimise the variance over active clusters of ``w_k ||mu_k||`` subject to the descent
constraint ``<sum_k w_k mu_k, mu_bar> >= 0``; closed form (constraint inactive, no extra
terms) ``w_k ∝ 1 / ||mu_k||``: every cluster then contributes an update of equal norm.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np

from dograph.objectives.base import Objective, ObjectiveInputs, Stats, normalise_by_active_mean


class VarianceObjective(Objective):
    """Equalise the clusters' contributions ``w_k ||mu_k||`` under a descent constraint (DESIGN 2.4).

    Normalisation (our choice, see :mod:`.base`): ``a_k = ||mu_k|| / mean_active ||mu||``
    floored at ``eps``, and the term is the *sum* of squared deviations
    ``sum_{k active} (a_k w_k - mean_active(a w))^2`` (n_active times the variance), whose
    Hessian at equal norms is ``2 I`` on the simplex's tangent space. In CVXPY the mean is
    an auxiliary variable ``t`` (minimising over ``t`` gives the mean), which keeps the
    problem DPP without a Parameter times a parametrised expression (DESIGN 6).
    The constraint is scaled to ``sum_k w_k d_k >= 0`` with
    ``d_k = <mu_k, mu_bar> / (mean_active ||mu|| * ||mu_bar||)`` (0 when ``mu_bar = 0``).
    If the floor makes it infeasible, the solver reports so and the projected closed form is
    used (``fallback=True``); that fallback does not enforce the constraint (our choice).
    """

    name = "variance"
    uses = ("means", "mean_grad")

    def _main_term(self, w: cp.Variable) -> tuple[cp.Expression, list[cp.Constraint]]:
        m = self.num_clusters
        self._norms = cp.Parameter(m, nonneg=True, name="mu_norm")
        self._descent = cp.Parameter(m, name="descent")
        self._mean = cp.Variable(name="mean_contribution")
        deviation = cp.multiply(self._norms, w) - cp.multiply(self._upper, self._mean)
        return cp.sum_squares(deviation), [self._descent @ w >= 0]

    def _prepare(self, inputs: ObjectiveInputs, active: np.ndarray) -> Stats:
        means = np.asarray(inputs.means, np.float64)
        mean_grad = np.asarray(inputs.mean_grad, np.float64)
        raw = np.linalg.norm(means, axis=1)
        scale = raw[active].mean() * np.linalg.norm(mean_grad)
        descent = means @ mean_grad / scale if scale > 0 else np.zeros(len(raw))
        return {"norms": normalise_by_active_mean(raw, active, self.eps),
                "descent": np.where(active, descent, 0.0)}

    def _assign(self, stats: Stats) -> None:
        self._norms.value = stats["norms"]
        self._descent.value = stats["descent"]

    def _main_value(self, stats: Stats, w: np.ndarray) -> float:
        active = stats["active"]
        contribution = (stats["norms"] * w)[active]
        return float(np.sum((contribution - contribution.mean()) ** 2))

    def _closed_form(self, stats: Stats) -> np.ndarray:
        norms, active = stats["norms"], stats["active"]
        return np.where(active, 1.0 / np.where(active, norms, 1.0), 0.0)

    def _violation(self, stats: Stats, w: np.ndarray) -> float:
        return max(0.0, -float(stats["descent"] @ w))
