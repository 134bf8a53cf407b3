"""Dynamic loss-based sample reweighting (Sow et al., ICLR 2025; docs/design.md section 3).

Official code: ``sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025`` (built on the DoGE code).
Re-derived here from the formulas (not copied); each constant names the file it comes from.

Each optimizer step, on every rank:

1. the per-sample mean-token losses ``l`` of the whole global batch are gathered over the
   ranks in rank order (``src/trainer.py``, ``training_step``, about L1180-1230);
2. min-max normalised to ``h`` in ``[-delta, delta]`` (``src/trainer.py`` about L121-140):
   ``h = 2 delta l / (l_max - l_min) - delta (l_max + l_min) / (l_max - l_min)``, the
   denominator at least 1e-6 (L124-125), so equal losses give ``h = 0`` and uniform weights;
3. a strategy ``f(h)``: ``mid`` ``1 - h^2 / delta^2`` (favours middle losses), ``upper``
   ``0.5 h + 0.5 delta`` and ``linupper`` ``min(h + delta, delta)`` (favour high losses),
   ``extremes`` ``|h|`` (favours both ends);
4. ``g = exp((f - max f) / kl_reg)``, normalised over the global batch: a softmax with
   temperature ``kl_reg`` (the KL-regularised weights of the paper);
5. each rank takes its slice by *global* rank: rank ``r`` applies rows ``[r b, (r + 1) b)``
   of the gathered vector (the README snippet and a fork index by local rank, a multi-node
   bug not copied here);
6. during the first ``burn_in`` steps the plain mean is used (``MixerOutput(sample_weights=None)``;
   ``burnout_steps`` = 1000 in ``config/methods/ours_nodr*.json`` and as the argument default in
   ``src/trainer.py``).

Defaults (``conf/mixer/loss_based.yaml``, ``conf/model_mixer/*_loss_based.yaml``): ``mid`` with
``kl_reg`` 1.0 at 124M (``config/methods/ours_nodr.json``); ``extremes`` with 0.4 at 210M
(``ours_nodr_210m.json``) and 294M (``ours_nodr_684m.json``).

Our contract: the weights sum to 1 over the global batch and the update is
``sum_i v_i grad l_i``. The official loss ``sum(device_weights * len_norms * losses) *
world_size * len(device_weights)``, where ``len_norms`` is normalised per device (1 / B_local
for equal-length sequences, as here), is ``world_size * sum_{i in device} v_i l_i``; DDP
averages it over the ranks, giving ``sum_i v_i l_i`` over the global batch: exactly ours.

Every rank computes the same weights from the same gathered losses (a deterministic
computation on identical inputs), so nothing is broadcast. Costs per step: one all-gather of
``[b, 2]`` floats (losses and domain ids, one collective); no host synchronisation. Rank 0
additionally forms the weight mass per human domain (``mixer/weights/<domain>``) and the
loss range as device tensors; the trainer averages them at its log interval. The history
(``mixer/weights.csv``) keeps those per-step device tensors and copies them to the host in
one transfer when it is checkpointed or saved (``state_dict``, ``save_artifacts``), or every
``MAX_PENDING`` = 1024 steps, whichever comes first.

A non-finite loss gives non-finite weights (checking would cost a host synchronisation
per step); the plain mean would give a non-finite gradient just the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from dograph.distributed import DistContext, all_gather_cat
from dograph.errors import ConfigError
from dograph.mixer_history import DomainWeightHistory
from dograph.mixing import Mixer, MixerOutput, Signal, StepSignals
from dograph.reporting import markdown_table
from dograph.settings import Settings, require

MIN_SPAN = 1e-6  # floor of l_max - l_min (src/trainer.py L124-125): equal losses -> uniform weights
MAX_PENDING = 1024  # our choice: history rows kept on the device before one host copy (bounds their memory)


def _mid(h: Tensor, delta: float) -> Tensor:
    return 1.0 - h * h / (delta * delta)


def _upper(h: Tensor, delta: float) -> Tensor:
    return 0.5 * h + 0.5 * delta


def _linupper(h: Tensor, delta: float) -> Tensor:
    return (h + delta).clamp_max(delta)


def _extremes(h: Tensor, delta: float) -> Tensor:
    return h.abs()


Strategy = Literal["mid", "upper", "linupper", "extremes"]  # f(h), step 3 of the module doc
STRATEGIES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "mid": _mid, "upper": _upper, "linupper": _linupper, "extremes": _extremes}  # one per Strategy (tested)


@dataclass
class LossBasedSettings(Settings):
    """``conf/mixer/loss_based.yaml`` (per model: ``conf/model_mixer/*_loss_based.yaml``); see the module doc."""

    _target_: str  # baselines.loss_based.LossBasedMixer
    strategy: Strategy  # f(h): mid favours middle losses, upper and linupper high ones, extremes both ends
    kl_reg: float  # softmax temperature (> 0): smaller concentrates the weights
    burn_in: int  # steps of plain mean before reweighting (>= 0)
    delta: float  # h in [-delta, delta] (> 0)

    def check(self) -> None:
        require(self.kl_reg > 0, "mixer.kl_reg", "must be > 0", self.kl_reg)
        require(self.burn_in >= 0, "mixer.burn_in", "must be >= 0", self.burn_in)
        require(self.delta > 0, "mixer.delta", "must be > 0", self.delta)


def normalised_losses(loss: Tensor, delta: float = 1.0) -> Tensor:
    """``h`` in ``[-delta, delta]``: min-max normalised losses (``src/trainer.py`` about L121-140).

    Written as ``delta (2 l - (l_max + l_min)) / max(l_max - l_min, 1e-6)``, the same value as
    the paper's two terms but without their cancellation: equal losses give exactly 0.
    """
    l_min, l_max = loss.min(), loss.max()
    span = (l_max - l_min).clamp_min(MIN_SPAN)
    return delta * (2.0 * loss - (l_max + l_min)) / span


def loss_based_weights(loss: Tensor, strategy: str, kl_reg: float, delta: float = 1.0) -> Tensor:
    """[B] weights of the global batch's per-sample losses ``loss`` [B]; they sum to 1.

    ``softmax(f(h) / kl_reg)``, computed as ``exp((f - max f) / kl_reg)`` normalised.
    """
    f = STRATEGIES[strategy](normalised_losses(loss, delta), delta)
    g = torch.exp((f - f.max()) / kl_reg)
    return g / g.sum()


class LossBasedMixer(Mixer):
    """Per-sample weights from each sample's loss within the global batch (Sow et al., 2025).

    ``DOMAIN`` labels are read only to log the weight mass per human domain; the weights
    themselves depend on the losses alone. ``natural_mixture`` and ``seed`` are accepted and
    unused (the method keeps the sampling mixture and draws nothing).
    """

    name = "loss_based"  # the registered method name (dograph.mixing.MIXERS)
    settings_class = LossBasedSettings
    requires = frozenset({Signal.DOMAIN})
    reweights = True

    def __init__(self, *, strategy: str = "mid", kl_reg: float = 1.0, burn_in: int = 1000, delta: float = 1.0,
                 domains: Sequence[str] = (), natural_mixture: Sequence[float] = (),
                 dist: DistContext | None = None, seed: int = 0) -> None:
        self.strategy, self.kl_reg, self.burn_in, self.delta = strategy, float(kl_reg), burn_in, float(delta)
        self.domains = list(domains)
        self.dist = dist or DistContext()
        self.history = DomainWeightHistory(self.domains, extra=["reweighted", "loss_min", "loss_max"])
        self._pending_steps: list[int] = []
        self._pending_rows: list[Tensor] = []  # per step [D + 3] device tensors, copied to the host lazily

    # ---- the step ------------------------------------------------------------------------
    def weigh(self, signals: StepSignals) -> MixerOutput:
        if signals.domain is None:
            raise RuntimeError("LossBasedMixer.weigh needs domain labels (Signal.DOMAIN)")
        b = signals.loss.shape[0]
        local = torch.stack([signals.loss.detach().float(), signals.domain.to(signals.loss.device).float()], dim=1)
        gathered = all_gather_cat(self.dist, local)  # [B, 2], rank order (one collective)
        loss, domain = gathered[:, 0], gathered[:, 1].long()
        reweighted = signals.step >= self.burn_in
        if reweighted:
            weights = loss_based_weights(loss, self.strategy, self.kl_reg, self.delta)
        else:  # burn-in: the plain mean (official burnout_steps)
            weights = torch.full_like(loss, 1.0 / len(loss))
        metrics = self._observe(signals.step, weights, loss, domain, reweighted) if self.dist.is_main else {}
        if not reweighted:
            return MixerOutput(sample_weights=None, metrics=metrics)
        rank = self.dist.rank  # the global rank: rows of this rank in the gathered batch
        return MixerOutput(sample_weights=weights[rank * b:(rank + 1) * b].to(signals.loss.dtype), metrics=metrics)

    def _observe(self, step: int, weights: Tensor, loss: Tensor, domain: Tensor, reweighted: bool) -> dict[str, Any]:
        """Rank 0: per-domain weight mass and loss range as device tensors; the history row stays on the device."""
        mass = torch.zeros(len(self.domains), device=weights.device).index_add_(0, domain, weights.float())
        l_min, l_max = loss.min(), loss.max()
        flag = torch.full((1,), float(reweighted), device=weights.device)
        self._pending_steps.append(int(step))
        self._pending_rows.append(torch.cat([mass, flag, l_min.view(1), l_max.view(1)]))
        if len(self._pending_rows) >= MAX_PENDING:
            self._sync_history()
        # the keys DomainWeightHistory.metrics names, kept as tensors (its float() would synchronise)
        metrics: dict[str, Any] = {f"mixer/weights/{d}": mass[i] for i, d in enumerate(self.domains)}
        metrics.update({"mixer/burn_in": 0.0 if reweighted else 1.0, "mixer/loss_range": l_max - l_min})
        return metrics

    def _sync_history(self) -> None:
        """Move the pending per-step rows into the history: one device-to-host copy for all of them."""
        if not self._pending_rows:
            return
        rows = torch.stack(self._pending_rows).cpu().double().tolist()
        d = len(self.domains)
        for step, row in zip(self._pending_steps, rows, strict=True):
            self.history.record(step, row[:d], reweighted=row[d], loss_min=row[d + 1], loss_max=row[d + 2])
        self._pending_steps, self._pending_rows = [], []

    # ---- state and reports -----------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "kl_reg": self.kl_reg, "burn_in": self.burn_in, "delta": self.delta}

    def state_dict(self) -> dict[str, Any]:
        """The history (the mixer is otherwise stateless) and, for the record, the settings and domains."""
        self._sync_history()
        return {"history": self.history.state_dict(), "domains": list(self.domains), "settings": self.settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["domains"]) != self.domains:
            raise ConfigError(f"cannot resume: the checkpoint's loss_based history is over the domains "
                              f"{list(state['domains'])}, this run's are {self.domains}")
        self._pending_steps, self._pending_rows = [], []
        self.history.load_state_dict(state["history"])

    def save_artifacts(self, out_dir: Path) -> None:
        """``weights.csv``: step, weight mass per human domain, reweighted flag, loss min and max."""
        self._sync_history()
        self.history.save(out_dir)

    def summary(self) -> dict[str, Any]:
        self._sync_history()
        title = f"Loss-based reweighting ({self.strategy}, kl_reg {self.kl_reg:g}, burn-in {self.burn_in} steps)"
        d = len(self.domains)
        rows = [r for r in self.history.rows if r[d] > 0.5]
        if not rows:
            return {title: "still in burn-in: every step used the plain mean"}
        mean = [sum(r[i] for r in rows) / len(rows) for i in range(d)]
        table = markdown_table(["", *self.domains], [["mean weight mass", *mean]])
        return {title: f"{len(rows)} reweighted steps\n{table}"}
