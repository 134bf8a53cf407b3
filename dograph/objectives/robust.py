"""The ``robust`` objective (DESIGN 2.4): a softmax over cluster losses.

maximise ``sum_k w_k L_k + (1/eta) H(w)`` with ``H`` the entropy; closed form (no extra
terms) ``w = softmax(eta * L)``: clusters the model finds hard get more weight.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np

from dograph.objectives.base import Objective, ObjectiveInputs, Stats, as_float


class RobustObjective(Objective):
    """Entropy-regularised worst-case weighting of cluster losses (DESIGN 2.4).

    Solved as the minimisation of (our normalisation, see :mod:`.base`)
    ``f(w) = (2 / n) * (sum_k w_k log w_k - eta * sum_k w_k (L_k - Lbar))``, ``n`` the number
    of active clusters and ``Lbar`` their mean loss. This is ``-(2 / (n eta))`` times the
    paper's objective up to a constant, so the maximiser is the same, and its Hessian at
    uniform weights is ``2 I``. Losses stay in nats, so ``eta`` is an inverse temperature
    per nat. CVXPY writes ``-p * sum(entr(w))`` with a nonneg Parameter ``p = 2 / n``
    (exponential cone: CLARABEL by default, or SCS).
    """

    name = "robust"
    supported_solvers = ("CLARABEL", "SCS")
    uses = ("losses",)

    def __init__(self, *, num_clusters: int, eta: float = 1.0, graph_weight: float = 0.1,
                 proximal_weight: float = 0.1, floor: float = 0.1, solver: str | None = None,
                 eps: float = 1e-4) -> None:
        """``eta`` (> 0): inverse temperature of ``softmax(eta * L)``, per nat of loss. Default 1.0
        (our choice: a cluster 1 nat harder gets e times the weight; the paper gives none).
        Other arguments: see :class:`Objective`.
        """
        self.eta = as_float(eta, "eta", low_open=True)
        super().__init__(num_clusters=num_clusters, graph_weight=graph_weight,
                         proximal_weight=proximal_weight, floor=floor, solver=solver, eps=eps)

    def _main_term(self, w: cp.Variable) -> tuple[cp.Expression, list[cp.Constraint]]:
        self._linear = cp.Parameter(self.num_clusters, name="scaled_loss")
        self._entropy_weight = cp.Parameter(nonneg=True, name="entropy_weight")
        return -(self._linear @ w) - self._entropy_weight * cp.sum(cp.entr(w)), []

    def _prepare(self, inputs: ObjectiveInputs, active: np.ndarray) -> Stats:
        losses = np.asarray(inputs.losses, np.float64)
        centred = np.where(active, losses - losses[active].mean(), 0.0)
        return {"losses": centred, "scale": np.array(2.0 / active.sum())}

    def _assign(self, stats: Stats) -> None:
        self._linear.value = stats["scale"] * self.eta * stats["losses"]
        self._entropy_weight.value = float(stats["scale"])

    def _main_value(self, stats: Stats, w: np.ndarray) -> float:
        positive = w > 0
        neg_entropy = float(np.sum(w[positive] * np.log(w[positive])))
        return float(stats["scale"]) * (neg_entropy - self.eta * float(stats["losses"] @ w))

    def _closed_form(self, stats: Stats) -> np.ndarray:
        active = stats["active"]
        logits = np.where(active, self.eta * stats["losses"], -np.inf)
        return np.exp(logits - logits.max())
