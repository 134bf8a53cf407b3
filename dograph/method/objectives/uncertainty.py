"""The ``uncertainty`` objective, DoGraph's default (docs/design.md section 2.4).

minimise ``sum_k s2_k w_k^2`` (+ graph and proximal terms, see :mod:`.base`), with
``s2_k`` the EMA intra-cluster gradient variance; closed form ``w_k ∝ 1 / s2_k``.
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
class UncertaintySettings(ObjectiveSettings):
    """``conf/objective/uncertainty.yaml``: the shared keys and ``eps``."""

    eps: float  # relative floor of s2_k / mean(s2), in (0, 1): a zero-variance cluster stays finite

    def check(self) -> None:
        super().check()
        self.check_eps(self.eps)


class UncertaintyObjective(Objective):
    """Down-weight clusters whose gradients are noisy: ``min sum_k s2_k w_k^2`` (docs/design.md section 2.4).

    ``s2`` is divided by its mean over active clusters and floored at ``eps`` (so a
    zero-variance cluster gets a finite weight; our choice). The term is then
    ``sum_k s2n_k w_k^2``, whose Hessian at equal variances is ``2 I`` (see :mod:`.base`);
    the minimiser is unchanged by the normalisation.
    """

    name = "uncertainty"
    settings_class = UncertaintySettings
    uses = ("variances",)

    def _main_term(self, w: cp.Variable) -> tuple[cp.Expression, list[cp.Constraint]]:
        self._sqrt_s2 = cp.Parameter(self.num_clusters, nonneg=True, name="sqrt_s2")
        return cp.sum_squares(cp.multiply(self._sqrt_s2, w)), []

    def _prepare(self, inputs: ObjectiveInputs, active: np.ndarray) -> Stats:
        return {"s2": normalise_by_active_mean(np.asarray(inputs.variances, np.float64), active, self.eps)}

    def _assign(self, stats: Stats) -> None:
        self._sqrt_s2.value = np.sqrt(stats["s2"])

    def _main_value(self, stats: Stats, w: np.ndarray) -> float:
        return float(np.sum(stats["s2"] * w**2))

    def _closed_form(self, stats: Stats) -> np.ndarray:
        s2, active = stats["s2"], stats["active"]
        return np.where(active, 1.0 / np.where(active, s2, 1.0), 0.0)
