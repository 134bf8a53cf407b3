"""The ``robust`` objective (docs/design.md section 2.4): a softmax over cluster losses.

maximise ``sum_k w_k L_k + (1/eta) H(w)`` with ``H`` the entropy; closed form (no extra
terms) ``w = softmax(eta * L)``: clusters the model finds hard get more weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import cvxpy as cp
import numpy as np

from dograph.method.objectives.base import Objective, ObjectiveInputs, ObjectiveSettings, Stats
from dograph.settings import require_number

ConeSolver = Literal["CLARABEL", "SCS"]  # the entropy needs an exponential cone


@dataclass
class RobustSettings(ObjectiveSettings):
    """``conf/objective/robust.yaml``: the shared keys (solvers with an exponential cone) and ``eta``."""

    solver: ConeSolver  # the CVXPY solver (it must be installed)
    eta: float  # inverse temperature per nat of loss: softmax(eta * L), > 0

    def check(self) -> None:
        super().check()
        require_number(self.eta, "objective.eta", low=0, low_open=True)


class RobustObjective(Objective):
    """Entropy-regularised worst-case weighting of cluster losses (docs/design.md section 2.4).

    Solved as the minimisation of (our normalisation, see :mod:`.base`)
    ``f(w) = (2 / m) * (sum_k w_k log w_k - eta * sum_k w_k (L_k - Lbar))``, ``m`` the number
    of clusters and ``Lbar`` the active clusters' mean loss. This is ``-(2 / (m eta))`` times
    the paper's objective up to a constant, so the maximiser is the same, and its Hessian at
    uniform weights is ``2 I`` when all clusters are active (``2 n / m`` with ``n`` active:
    a constant ``2 / m``, not ``2 / n``, keeps the entropy coefficient a constant, since a
    Parameter times ``entr(...)`` would not be DPP; our choice). Losses stay in nats, so
    ``eta`` is an inverse temperature per nat. CVXPY writes ``-(2/m) sum(entr(w + z))`` with a
    Parameter ``z`` = 1 on inactive clusters, 0 on active ones (exponential cone: CLARABEL
    by default, or SCS): ``z`` keeps an inactive cluster's cone constraint (``w_k = 0``) off
    the cone's boundary, where the interior-point solver otherwise stalls short of its
    tolerance (our choice; ``entr(1) = 0`` so the value is unchanged).
    """

    name = "robust"
    settings_class = RobustSettings
    supported_solvers = get_args(ConeSolver)
    uses = ("losses",)

    def __init__(self, *, num_clusters: int, eta: float = 1.0, graph_weight: float = 0.1,
                 proximal_weight: float = 0.1, floor: float = 0.1, solver: str | None = None,
                 eps: float = 1e-4) -> None:
        """``eta`` (> 0): inverse temperature of ``softmax(eta * L)``, per nat of loss. Default 1.0
        (our choice: a cluster 1 nat harder gets e times the weight; the paper gives none).
        Other arguments: see :class:`Objective`.
        """
        self.eta = float(eta)
        super().__init__(num_clusters=num_clusters, graph_weight=graph_weight,
                         proximal_weight=proximal_weight, floor=floor, solver=solver, eps=eps)

    def _main_term(self, w: cp.Variable) -> tuple[cp.Expression, list[cp.Constraint]]:
        self._linear = cp.Parameter(self.num_clusters, name="scaled_loss")
        self._inactive = cp.Parameter(self.num_clusters, nonneg=True, name="inactive")
        entropy = cp.sum(cp.entr(w + self._inactive))  # entr(0 + 1) = 0 off the boundary
        return -(self._linear @ w) - (2.0 / self.num_clusters) * entropy, []

    def _prepare(self, inputs: ObjectiveInputs, active: np.ndarray) -> Stats:
        losses = np.asarray(inputs.losses, np.float64)
        centred = np.where(active, losses - losses[active].mean(), 0.0)
        return {"losses": centred}

    def _assign(self, stats: Stats) -> None:
        self._linear.value = (2.0 / self.num_clusters) * self.eta * stats["losses"]
        self._inactive.value = (~stats["active"]).astype(np.float64)

    def _main_value(self, stats: Stats, w: np.ndarray) -> float:
        positive = w > 0
        neg_entropy = float(np.sum(w[positive] * np.log(w[positive])))
        return 2.0 / self.num_clusters * (neg_entropy - self.eta * float(stats["losses"] @ w))

    def _closed_form(self, stats: Stats) -> np.ndarray:
        active = stats["active"]
        logits = np.where(active, self.eta * stats["losses"], -np.inf)
        return np.exp(logits - logits.max())
