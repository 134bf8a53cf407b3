"""What per-sample loss weights cost and what they do to the mixture (docs/design.md section 2.6).

For a step whose global batch of B samples is weighted by ``v`` (``sum_i v_i = 1``):

* the effective sample size ``ESS = (sum_i v_i)^2 / (B * sum_i v_i^2)`` (Kish's, as a
  fraction of B; ``1 / (B sum v_i^2)`` when the weights sum to 1): 1 when every sample
  weighs the same, 1/B when one sample carries everything; the gradient noise of the
  weighted mean is that of a plain mean over ``ESS * B`` samples;
* the effective mixture over human domains, ``sum_{i: h_i = d} v_i / sum_i v_i``, next to
  the sampled one, ``#{i: h_i = d} / B``: how far the reweighting moved the human-domain
  mixture. (Weights may sum to less than 1 when a method clips per-domain gradients.)

Each step contributes one small device tensor (no host synchronisation); a log interval
sums them over ranks in one reduction (:func:`global_window`), and :class:`WeightSummary`
keeps the run's averages for the final summary. Steps on which the mixer used the plain
mean (``mixer=uniform``, DoGraph's warm-up) are not counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from dograph.distributed import DistContext, all_reduce_sum


def step_weight_stats(weights: Tensor, domain: Tensor, num_domains: int) -> Tensor:
    """[2 + 2D] of this rank's share of one step: ``sum v_i``, ``sum v_i^2``, weight mass and count per domain."""
    v = weights.detach().float()
    index = domain.to(v.device).long()
    mass = torch.zeros(num_domains, device=v.device).index_add_(0, index, v)
    count = torch.zeros(num_domains, device=v.device).index_add_(0, index, torch.ones_like(v))
    return torch.cat([v.sum().view(1), (v * v).sum().view(1), mass, count])


@dataclass
class WeightSummary:
    """Run-level sums over reweighted steps (checkpointed with the trainer state)."""

    steps: int = 0
    ess_sum: float = 0.0
    ess_min: float = 1.0
    effective_sum: list[float] = field(default_factory=list)
    sampled_sum: list[float] = field(default_factory=list)

    def add(self, ess: Tensor, effective: Tensor, sampled: Tensor) -> None:
        """Fold per-step ``ess`` [S], ``effective`` and ``sampled`` [S, D] (host tensors) in."""
        if not len(ess):
            return
        d = effective.shape[1]
        self.effective_sum = self.effective_sum or [0.0] * d
        self.sampled_sum = self.sampled_sum or [0.0] * d
        self.steps += len(ess)
        self.ess_sum += float(ess.double().sum())
        self.ess_min = min(self.ess_min, float(ess.min()))
        self.effective_sum = [a + float(b) for a, b in zip(self.effective_sum, effective.double().sum(0), strict=True)]
        self.sampled_sum = [a + float(b) for a, b in zip(self.sampled_sum, sampled.double().sum(0), strict=True)]

    @property
    def mean_ess(self) -> float:
        return self.ess_sum / self.steps if self.steps else 1.0

    def mean_mixtures(self) -> tuple[list[float], list[float]]:
        """(sampled, effective) mixtures over human domains, averaged over the reweighted steps."""
        n = max(self.steps, 1)
        return [s / n for s in self.sampled_sum], [e / n for e in self.effective_sum]

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> WeightSummary:
        return cls(**state) if state else cls()


def global_window(dist: DistContext, losses: list[Tensor], stats: list[Tensor], global_batch: int,
                  summary: WeightSummary) -> dict[str, Any]:
    """Window metrics over all ranks from one all-reduce: mean ``train/loss``, ESS and mixtures.

    ``losses``: one 0-d tensor per step (this rank's mean sample loss; ranks hold equal
    shares, so the global mean is the mean over ranks); ``stats``: one
    :func:`step_weight_stats` per reweighted step. Updates ``summary``.
    """
    if not losses:
        return {}
    device = losses[0].device
    parts = [torch.stack([x.float() for x in losses])]
    if stats:
        parts.append(torch.stack([s.to(device) for s in stats]).flatten())
    flat = all_reduce_sum(dist, torch.cat(parts)).double().cpu()
    out: dict[str, Any] = {"train/loss": float(flat[:len(losses)].mean() / dist.world_size)}
    if stats:
        table = flat[len(losses):].view(len(stats), -1)
        d = (table.shape[1] - 2) // 2
        total = table[:, :1]
        ess = total[:, 0] ** 2 / (global_batch * table[:, 1])
        effective, sampled = table[:, 2:2 + d] / total, table[:, 2 + d:] / global_batch
        summary.add(ess, effective, sampled)
        out.update({"train/ess": float(ess.mean()), "train/ess_min": float(ess.min()),
                    "train/effective_mixture": effective.mean(0).tolist(),
                    "train/sampled_mixture": sampled.mean(0).tolist()})
    return out
