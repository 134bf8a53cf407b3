"""DoGE: domain reweighting with generalization estimation (Fan et al., 2023; docs/design.md section 3).

Official code: ``Olivia-fsm/DoGE``, ``src/trainer.py`` ``update_domain_weights_distributed``
(about L719-770; the path ``config/doge.json`` runs, ``compute_pertoken_losses: false``).
Re-derived here from the formulas (not copied); each constant names the file it comes from.

A **proxy** run (``DoGEProxyMixer``) learns the domain weights ``w``; its time average becomes
the **main** run's sampling mixture (``DoGEMixer``, a fixed mixture read from the stage). Each
proxy step, with ``g_d`` the gradient of domain d's mean loss over the global batch:

1. per-domain clipping, as ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)``
   after each domain's backward: ``c_d = min(1, max_grad_norm / (||g_d|| + 1e-6))`` (no clipping
   when ``max_grad_norm <= 0``), so the rows of the official ``flat_grad_mat`` are ``c_d g_d``;
2. scores from the *clipped* Gram ``Gc = diag(c) G diag(c)``:
   ``s_d = lr_t * sum_{e != d} Gc[d, e]`` (train domains = target domains: the row sum minus the
   diagonal), divided by ``mean_d ||c_d g_d|| + 1e-6`` (the mean norm of the clipped rows, stale and
   never-seen rows included, as ``train_mat.norm(dim=-1).mean()``), clipped to
   ``[lr_t * dw_min, lr_t * dw_max]``; ``lr_t`` is the learning rate of this step's update
   (``lr_scheduler.get_last_lr()``; ``StepSignals.lr`` here);
3. the mirror step ``w <- softmax(log w + s / mu)``, then ``w <- (1 - eps) w + eps / D``;
4. the proxy's update is ``sum_d w_d c_d g_d`` with the weights *after* this step's update
   (``add_model_grad_ls`` with ``self.train_dw`` just written), domains of the batch only: here the
   per-sample weights ``v_i = w_d c_d / n_d`` (they sum to ``sum_d w_d c_d <= 1``);
5. the running average adds ``w`` after every update; the initial weights are not a term
   (``avg_dw += dw_new; dw_update_steps += 1``).

Initial weights: uniform over the domains (``train_dw = ones / len(train_ids)``). The proxy *samples*
uniformly over the domains too: the data loader draws with the uniform ``train_dw`` of
``src/dataloader.py`` ``get_train_eval_datasets`` (``train_dw: null`` in ``config/doge.json``), a tensor
the trainer never updates (it reassigns its own ``train_dw``), so ``sampling_mixture`` is uniform.

**Gradients, not as the official code computes them.** The official code backpropagates once per
domain and keeps a ``D x P`` matrix of flattened gradients on the host. Here
(``mixer.gradients=exact``, the default) the trainer runs one capturing backward and forms the
``D x D`` Gram of the exact global per-domain mean-loss gradients from what it kept
(``dograph/step/capture.py`` ``GradientCapture.weighted_gram``: one parameter's ``[D, ...]`` stack at a
time, summed over ranks under DDP), then the update ``sum_i v_i g_i`` from the same kept tensors:
about one extra weight-gradient pass per step instead of ``D`` backward passes, and memory ``D`` x
the largest parameter instead of ``D x P``. Measured on the demo (gpt2_tiny, 16 x 128, 7 domains,
2 CPU cores): a proxy step 0.87 s against 0.60 s for a uniform step (x1.46; the Gram 0.24 s);
the official recipe (one forward, 7 backward passes, a flattened 7 x P matrix) x5.3 against
uniform in an interleaved benchmark. ``mixer.gradients=projected`` takes the Gram of the
per-domain means of the projected per-sample gradients instead (DoGraph's Kronecker projection,
``mixer.projection``): x1.15, approximate (relative Frobenius error of the Gram 0.36-0.58,
correlation of its off-diagonal entries 0.80-0.94 on a briefly trained small GPT-2:
``tests/test_doge.py``).

**Deviations (our choices).**

* A domain absent from the global batch: the official code keeps its last flattened gradient
  and scores it against the current gradients of the others. Storing ``D x P`` is what we avoid,
  so we keep the absent domain's last *Gram* entries instead (``<g_d^old, g_e^old>`` in place of
  ``<g_d^old, g_e^new>``); its weight still moves from them and it still counts in the mean norm
  (with its stale norm, exactly as officially), and it adds nothing to the update (as officially).
  A domain never seen has zero entries (the official zero-initialised row).
* ``g_d`` is the exact mean over the domain's sequences of the *global* batch (all ranks and
  micro-batches). The official code averages per-micro-batch domain means over the accumulation
  steps, and under DDP gathers losses without their graphs; with one micro-batch on one device
  the two agree.
* The weight arithmetic runs in float64 on the host (one device-to-host copy of the ``D x D`` Gram
  per step); the official code uses float32.

The shipped ``config/doge.json`` targets a held-out mixed domain (``tgt_domains: mix``), scoring
``lr_t * sum_e <g_d, g_mix>`` with the diagonal kept; this implementation scores against the
training domains themselves (the paper's universal-generalization setting; the branch
``set(train_ids) == set(tgt_ids)`` of the same function).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from baselines.fixed import StageMixtureMixer
from dograph.atomic import write_text_atomically
from dograph.distributed import DistContext, all_gather_cat
from dograph.errors import ConfigError
from dograph.mixer_history import DomainWeightHistory
from dograph.mixing import Mixer, MixerOutput, Signal, StepSignals
from dograph.reporting import markdown_table
from dograph.runs.pipeline import StageResult, StageSpec
from dograph.settings import Settings, require_number
from dograph.step.projection import KroneckerProjector

CLIP_EPS = 1e-6  # clip_grad_norm_'s coefficient max_norm / (total_norm + 1e-6), at most 1 (torch.nn.utils)
NORM_EPS = 1e-6  # scores / (avg_norm + 1e-6) (src/trainer.py update_domain_weights_distributed, about L745)
PROXY_KEYS = ("mu", "dw_min", "dw_max", "max_grad_norm", "eps", "gradients")  # the proxy's constants


@dataclass
class DoGEProjectionSettings(Settings):
    """``mixer.projection`` (gradients=projected): DoGraph's Kronecker projection; its seed is the proxy stage's."""

    key = "mixer.projection"
    rank: int  # r per side, as mixer=dograph
    out_dim: int | None  # k, as mixer=dograph (null keeps all L*r*r dimensions)
    include: list[str]  # Linear/Conv1D module-name patterns to project
    exclude: list[str]  # patterns left out (DoGE's gradients include the output head)
    dtype: Literal["float32", "bfloat16", "float16"]  # of the projection matrices


@dataclass
class DoGESettings(Settings):
    """``conf/mixer/doge.yaml`` (paper scale: ``conf/model_mixer/*_doge.yaml``); see the module doc."""

    _target_: str  # baselines.doge.DoGEMixer
    mixture_from: Literal["proxy"]  # the stage whose time-averaged weights the main run samples
    mu: float  # step size of the mirror step: softmax(log w + s / mu), finite and > 0
    dw_min: float  # scores >= lr_t * dw_min (finite, <= dw_max)
    dw_max: float  # scores <= lr_t * dw_max (finite)
    max_grad_norm: float  # clip_grad_norm_ of each domain's gradient (finite; <= 0: no clipping)
    eps: float  # smoothing w = (1 - eps) w + eps / D, in [0, 1]
    gradients: Literal["exact", "projected"]  # the domain Gram from exact gradients or projected per-sample ones
    projection: DoGEProjectionSettings  # read with gradients=projected only
    proxy: dict[str, Any]  # the proxy stage: a conf/model name, a conf/trainer preset, seed, any trainer.* field

    def check(self) -> None:
        require_number(self.mu, "mixer.mu", low=0, low_open=True)
        require_number(self.dw_min, "mixer.dw_min")
        require_number(self.dw_max, "mixer.dw_max")
        if self.dw_min > self.dw_max:
            raise ConfigError(f"mixer.dw_min={self.dw_min} must be <= mixer.dw_max={self.dw_max}")
        require_number(self.max_grad_norm, "mixer.max_grad_norm")
        require_number(self.eps, "mixer.eps", low=0, high=1)


# ---- the update, as pure functions ------------------------------------------------------------------


def clip_coefficients(norms: Tensor, max_grad_norm: float) -> Tensor:
    """``c_d = min(1, max_grad_norm / (||g_d|| + 1e-6))``: ``clip_grad_norm_`` of each domain's gradient."""
    if max_grad_norm <= 0:  # the official `if self.args.max_grad_norm > 0.0` (no clipping)
        return torch.ones_like(norms)
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def doge_scores(clipped_gram: Tensor, lr: float, dw_min: float, dw_max: float) -> Tensor:
    """``clip(lr (rowsum(Gc) - diag(Gc)) / (mean_d sqrt(Gc[d, d]) + 1e-6), lr dw_min, lr dw_max)``."""
    diagonal = clipped_gram.diagonal()
    raw = lr * (clipped_gram.sum(dim=1) - diagonal)
    scores = raw / (diagonal.clamp_min(0).sqrt().mean() + NORM_EPS)
    return scores.clamp(lr * dw_min, lr * dw_max)


def mirror_step(weights: Tensor, scores: Tensor, mu: float, eps: float) -> Tensor:
    """``(1 - eps) softmax(log w + s / mu) + eps / D``."""
    new = torch.softmax(weights.log() + scores / mu, dim=0)
    return (1 - eps) * new + eps / len(new)


@dataclass
class DoGEStep:
    weights: Tensor  # [D] after the update (these scale the model update)
    scores: Tensor  # [D] clipped scores
    clip: Tensor  # [D] clip coefficients c_d (0 for absent domains)
    norms: Tensor  # [D] unclipped ||g_d|| of this step (0 for absent domains)
    gram: Tensor  # [D, D] clipped Gram with stale entries of absent domains (the next step's state)


def doge_step(weights: Tensor, known_gram: Tensor, gram: Tensor, present: Tensor, lr: float, *, mu: float,
              dw_min: float, dw_max: float, max_grad_norm: float, eps: float) -> DoGEStep:
    """One DoGE weight update from this step's Gram ``gram`` of the unclipped per-domain gradients.

    ``known_gram``: the clipped Gram of earlier steps; the entries of a pair with an absent domain
    keep their last value (module doc). ``present``: [D] bool, domains of this global batch.
    """
    norms = torch.where(present, gram.diagonal().clamp_min(0).sqrt(), 0.0)
    clip = torch.where(present, clip_coefficients(norms, max_grad_norm), 0.0)
    both = present.unsqueeze(0) & present.unsqueeze(1)
    state = torch.where(both, gram * clip.unsqueeze(0) * clip.unsqueeze(1), known_gram)
    scores = doge_scores(state, lr, dw_min, dw_max)
    return DoGEStep(mirror_step(weights, scores, mu, eps), scores, clip, norms, state)


def sample_coefficients(step: DoGEStep, counts: Tensor) -> Tensor:
    """[D] weight of each sample of domain d: ``w_d c_d / n_d`` (0 for absent domains)."""
    present = counts > 0
    return torch.where(present, step.weights * step.clip / counts.clamp_min(1).to(step.weights.dtype), 0.0)


def projected_domain_gram(grad_proj: Tensor, domain: Tensor, num_domains: int) -> tuple[Tensor, Tensor]:
    """(Gram [D, D] float64 of the per-domain means of projected per-sample gradients [B, k], counts [D])."""
    counts = torch.bincount(domain.long(), minlength=num_domains)
    sums = torch.zeros(num_domains, grad_proj.shape[1], dtype=torch.float64, device=grad_proj.device)
    means = sums.index_add_(0, domain.long(), grad_proj.double()) / counts.clamp_min(1).double().unsqueeze(1)
    return means @ means.T, counts


# ---- the proxy ------------------------------------------------------------------------------------------


class DoGEProxyMixer(Mixer):
    """The DoGE proxy: learns ``w`` from the domain Gram each step and updates with ``sum_d w_d c_d g_d``.

    ``requires`` depends on ``gradients``: ``DOMAIN_GRAM`` (exact, from the one-backward capture) or
    ``GRAD_PROJ`` (projected; this mixer then owns the projector and gathers the projections).
    """

    name = "doge_proxy"  # the registered method name (dograph.mixing.MIXERS)
    reweights = True

    def __init__(self, *, mu: float = 0.01, dw_min: float = 0.0, dw_max: float = 5.0, max_grad_norm: float = 5.0,
                 eps: float = 0.0, gradients: str = "exact", projection: Mapping[str, Any] | None = None,
                 domains: Sequence[str] = (), natural_mixture: Sequence[float] = (),
                 dist: DistContext | None = None, seed: int = 0) -> None:
        self.mu, self.dw_min, self.dw_max = float(mu), float(dw_min), float(dw_max)
        self.max_grad_norm, self.eps = float(max_grad_norm), float(eps)
        if not domains:
            raise ConfigError("DoGE needs the dataset's domains")
        self.gradients, self.domains, self.dist = gradients, list(domains), dist or DistContext()
        self._projector: KroneckerProjector | None = None
        if gradients == "projected":
            node = {k: (list(v) if k in ("include", "exclude") else v) for k, v in dict(projection or {}).items()}
            self._projector = KroneckerProjector(**node, seed=seed)
            self.requires = frozenset({Signal.GRAD_PROJ, Signal.DOMAIN})
        else:
            self.requires = frozenset({Signal.DOMAIN_GRAM, Signal.DOMAIN})
        d = len(self.domains)
        self.weights = torch.full((d,), 1.0 / d, dtype=torch.float64)  # train_dw = ones / len(train_ids)
        self.gram = torch.zeros(d, d, dtype=torch.float64)  # clipped Gram known so far (stale for absent domains)
        self.weight_sum = torch.zeros(d, dtype=torch.float64)
        self.updates = 0
        self.history = DomainWeightHistory(self.domains, extra=[*(f"score_{n}" for n in self.domains),
                                                                *(f"grad_norm_{n}" for n in self.domains), "lr"])

    @property
    def projector(self) -> KroneckerProjector | None:
        return self._projector

    def sampling_mixture(self) -> Tensor:
        """Uniform over the domains (the official proxy's data loader; module doc)."""
        return torch.full((len(self.domains),), 1.0 / len(self.domains), dtype=torch.float64)

    def settings(self) -> dict[str, Any]:
        return {"mu": self.mu, "dw_min": self.dw_min, "dw_max": self.dw_max, "max_grad_norm": self.max_grad_norm,
                "eps": self.eps, "gradients": self.gradients}

    # ---- the step ----------------------------------------------------------------------------------
    def _gram(self, signals: StepSignals) -> tuple[Tensor, Tensor]:
        if self.gradients == "projected":
            if signals.grad_proj is None or signals.domain is None:
                raise RuntimeError("DoGEProxyMixer (projected) needs grad_proj and domain signals")
            g = all_gather_cat(self.dist, signals.grad_proj.float())
            domain = all_gather_cat(self.dist, signals.domain.to(g.device))
            return projected_domain_gram(g, domain, len(self.domains))
        if signals.domain_gram is None or signals.domain_counts is None:
            raise RuntimeError("DoGEProxyMixer needs the domain Gram (Signal.DOMAIN_GRAM) and domain counts")
        return signals.domain_gram, signals.domain_counts

    def weigh(self, signals: StepSignals) -> MixerOutput:
        if signals.domain is None:
            raise RuntimeError("DoGEProxyMixer.weigh needs domain labels (Signal.DOMAIN)")
        gram, counts = self._gram(signals)
        gram, counts = gram.detach().double().cpu(), counts.detach().cpu()  # the step's one host copy
        if not torch.isfinite(gram).all():
            return MixerOutput(skip_step=True, metrics={"mixer/nonfinite_gram": 1.0})
        step = doge_step(self.weights, self.gram, gram, counts > 0, signals.lr, mu=self.mu, dw_min=self.dw_min,
                         dw_max=self.dw_max, max_grad_norm=self.max_grad_norm, eps=self.eps)
        self.weights, self.gram = step.weights, step.gram
        self.weight_sum += step.weights  # the running average excludes the initial weights
        self.updates += 1
        self.history.record(signals.step, step.weights.tolist(), **self._extra(step, signals.lr))
        coefficient = sample_coefficients(step, counts).to(signals.domain.device)
        sample_weights = coefficient[signals.domain.long()].to(signals.loss.dtype)
        metrics: dict[str, Any] = {"mixer/nonfinite_gram": 0.0, "mixer/present_domains": float((counts > 0).sum())}
        metrics.update(self.history.metrics(step.weights.tolist()))
        for i, name in enumerate(self.domains):
            metrics[f"mixer/scores/{name}"] = float(step.scores[i])
            metrics[f"mixer/grad_norm/{name}"] = float(step.norms[i])
        return MixerOutput(sample_weights=sample_weights, metrics=metrics)

    def _extra(self, step: DoGEStep, lr: float) -> dict[str, float]:
        extra = {f"score_{n}": float(step.scores[i]) for i, n in enumerate(self.domains)}
        extra.update({f"grad_norm_{n}": float(step.norms[i]) for i, n in enumerate(self.domains)})
        extra["lr"] = float(lr)
        return extra

    # ---- results, state and reports -----------------------------------------------------------------
    def mixture(self) -> list[float]:
        """The time average of ``w`` over the proxy's updates (uniform before the first)."""
        if self.updates == 0:
            return [1.0 / len(self.domains)] * len(self.domains)
        return (self.weight_sum / self.updates).tolist()

    def outputs(self) -> dict[str, Any]:
        return {"mixture": dict(zip(self.domains, self.mixture(), strict=True)), "updates": self.updates,
                "last_weights": dict(zip(self.domains, self.weights.tolist(), strict=True))}

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.clone(), "gram": self.gram.clone(), "weight_sum": self.weight_sum.clone(),
                "updates": self.updates, "history": self.history.state_dict(), "domains": list(self.domains),
                "settings": self.settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["domains"]) != self.domains:
            raise ConfigError(f"cannot resume: the checkpoint's DoGE proxy is over the domains "
                              f"{list(state['domains'])}, this run's are {self.domains}")
        if state["settings"] != self.settings():
            raise ConfigError(f"cannot resume: the checkpoint's DoGE settings {state['settings']} differ from "
                              f"this run's {self.settings()}")
        self.weights, self.gram = state["weights"].clone(), state["gram"].clone()
        self.weight_sum, self.updates = state["weight_sum"].clone(), int(state["updates"])
        self.history.load_state_dict(state["history"])

    def save_artifacts(self, out_dir: Path) -> None:
        """``weights.csv`` (per step: weights, scores, gradient norms, lr) and ``mixture.json``."""
        self.history.save(out_dir)
        record = {**self.outputs(), "settings": self.settings(),
                  "note": "mixture = mean of the weights after each proxy update (initial weights excluded)"}
        write_text_atomically(out_dir / "mixture.json", json.dumps(record, indent=2))

    def summary(self) -> dict[str, Any]:
        title = (f"DoGE proxy ({self.gradients} gradients, mu {self.mu:g}, clip {self.max_grad_norm:g}): "
                 f"{self.updates} updates")
        rows = [[d, avg, last] for d, avg, last in zip(self.domains, self.mixture(), self.weights.tolist(),
                                                       strict=True)]
        return {title: markdown_table(["domain", "time-averaged weight (the output)", "last weight"], rows)}


# ---- the main run ------------------------------------------------------------------------------------------


class DoGEMixer(StageMixtureMixer):
    """The main run: samples the time-averaged weights of the ``proxy`` stage (``mixture_from``)."""

    name = "doge"  # registered name (dograph.mixing.MIXERS); its stage keys hash it: never change it
    settings_class = DoGESettings

    @classmethod
    def plan_stages(cls, node: dict[str, Any]) -> list[StageSpec]:
        proxy = node["proxy"]
        mixer = {"_target_": "baselines.doge.DoGEProxyMixer", **{k: node[k] for k in PROXY_KEYS if k in node}}
        if node.get("gradients", "exact") == "projected":  # the exact proxy's stage key ignores the projection
            mixer["projection"] = dict(node.get("projection") or {})
        return [StageSpec("proxy", mixer, dict(proxy))]

    def __init__(self, *, mixture_from: str = "proxy", stage_results: Mapping[str, StageResult] | None = None,
                 domains: Sequence[str] = (), **rest: Any) -> None:
        super().__init__(mixture_from=mixture_from, stage_results=stage_results, domains=domains, **rest)
