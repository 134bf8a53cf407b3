"""The ``variance`` objective (docs/design.md sections 2.4, 2.5).

minimise the variance over the solved clusters of ``w_k ||mu_k||`` subject to the descent
constraint ``<u, mu_bar> >= 0`` for the update actually applied, ``u = sum_k w_k gbar_k``
(``gbar_k``: the batch's mean projected gradient of cluster k; ``mu_bar``: the batch's mean
projected gradient); closed form (constraint inactive, no extra terms) ``w_k ∝ 1 / ||mu_k||``:
every cluster then contributes an update of equal norm.
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
    normalise_by_active_mean,
)


@dataclass
class VarianceSettings(ObjectiveSettings):
    """``conf/objective/variance.yaml``: the shared keys and ``eps``."""

    eps: float  # relative floor of ||mu_k|| / mean ||mu||, in (0, 1): a zero-norm cluster stays finite

    def check(self) -> None:
        super().check()
        self.check_eps(self.eps)


class VarianceObjective(Objective):
    """Equalise the clusters' contributions ``w_k ||mu_k||`` under a descent constraint (docs/design.md section 2.4).

    Normalisation (our choice, see :mod:`.base`): ``a_k = ||mu_k|| / mean_active ||mu||``
    (EMA means) floored at ``eps``, and the term is the *sum* of squared deviations
    ``sum_{k active} (a_k w_k - mean_active(a w))^2`` (n_active times the variance), whose
    Hessian at equal norms is ``2 I`` on the simplex's tangent space. In CVXPY the mean is
    an auxiliary variable ``t`` (minimising over ``t`` gives the mean), which keeps the
    problem DPP without a Parameter times a parametrised expression (docs/design.md section 6).

    The constraint protects the applied update (docs/design.md section 2.5): it is built from the batch's
    per-cluster means ``gbar_k`` (``ObjectiveInputs.batch_means``), scaled to
    ``sum_k w_k d_k >= 0`` with ``d_k = <gbar_k, mu_bar> / (mean_active ||gbar|| * ||mu_bar||)``
    (0 when ``mu_bar = 0``), so it holds exactly when ``<u, mu_bar> >= 0``. The batch-count
    proportions ``p_k = n_k / B`` always satisfy it (``sum_k p_k gbar_k = mu_bar``), so a
    solver answer within tolerance of it, or a fallback that breaks it, is moved toward ``p``
    just far enough to satisfy it (``_repair``; our choice: the descent guarantee takes
    precedence over the floor).
    """

    name = "variance"
    settings_class = VarianceSettings
    uses = ("means", "mean_grad", "batch_means")

    def _main_term(self, w: cp.Variable) -> tuple[cp.Expression, list[cp.Constraint]]:
        m = self.num_clusters
        self._norms = cp.Parameter(m, nonneg=True, name="mu_norm")
        self._descent = cp.Parameter(m, name="descent")
        self._mean = cp.Variable(name="mean_contribution")
        deviation = cp.multiply(self._norms, w) - cp.multiply(self._upper, self._mean)
        return cp.sum_squares(deviation), [self._descent @ w >= 0]

    def _prepare(self, inputs: ObjectiveInputs, active: np.ndarray) -> Stats:
        means = np.asarray(inputs.means, np.float64)
        batch = means if inputs.batch_means is None else np.asarray(inputs.batch_means, np.float64)
        counts = inputs.counts if inputs.batch_counts is None else inputs.batch_counts
        mean_grad = np.asarray(inputs.mean_grad, np.float64)
        batch_norms = np.linalg.norm(batch, axis=1)
        scale = batch_norms[active].mean() * np.linalg.norm(mean_grad)
        descent = batch @ mean_grad / scale if scale > 0 else np.zeros(len(batch_norms))
        proportions = np.where(active, np.maximum(np.asarray(counts, np.float64), 0.0), 0.0)
        total = proportions.sum()
        return {"norms": normalise_by_active_mean(np.linalg.norm(means, axis=1), active, self.eps),
                "descent": np.where(active, descent, 0.0),
                "proportions": proportions / total if total > 0 else active / active.sum()}

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

    def _repair(self, stats: Stats, w: np.ndarray) -> np.ndarray:
        """Mix ``w`` toward the batch proportions ``p`` just enough that ``sum_k w_k d_k >= 0``."""
        d, p = stats["descent"], stats["proportions"]
        at_w, at_p = float(d @ w), float(d @ p)
        if at_w >= 0.0 or at_p <= at_w:
            return w
        t = min(1.0, -at_w / (at_p - at_w))
        mixed = (1.0 - t) * w + t * p
        return mixed if float(d @ mixed) >= 0.0 else p
