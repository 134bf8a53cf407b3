"""DoReMi (Xie et al., 2023): a reference, a Group-DRO proxy, then the main run (docs/design.md section 3).

Official code: ``sangmichaelxie/doremi``. Re-derived here from its formulas (not copied); every
constant names the file it comes from. A pipeline of three runs (``dograph.runs.pipeline``):

1. **reference** (``UniformMixer``): a model trained on the corpus's natural mixture (the
   official reference is a baseline run on the Pile's own mixture, ``--domain_config_path``
   of ``scripts/runs/run_pile_baseline120M.sh``; the 120M proxy script loads
   ``pile_baseline_50kvocab_nopack`` as its reference, ``scripts/runs/run_pile_doremi120M.sh``).
2. **proxy** (:class:`DoReMiProxyMixer`): a model trained with online Group DRO over the human
   domains against the frozen reference (``doremi/trainer.py``, ``update_domain_weights`` with
   ``doremi_optimizer=doremiv1``, and ``training_step``).
3. **main** (:class:`DoReMiMixer`): samples the proxy's time-averaged domain weights for the
   whole run (a fixed mixture, no work in the step).

The proxy's step ``t``, on every rank (``D`` domains, ``B`` sequences of ``T`` tokens):

* the reference's per-token losses on the step's tokens (a frozen copy loaded from the
  reference stage's ``hf/`` export, eval mode, no gradient; run under the proxy's precision,
  as the official reference runs inside the proxy's forward, ``doremi/models.py``);
* excess ``e = max(l_proxy - l_ref, 0)`` per token; per domain the sum of ``e`` and the token
  and sequence counts, summed over ranks (one all-reduce of a ``[3, D]`` tensor);
* score ``s_d`` = mean of ``e`` over the domain's tokens of the global batch; a domain with no
  sequence in the batch keeps its previous score (``update_domain_weights``); scores start at
  ``log(vocabulary size)`` (``doremi/train.py``, the ``perdomain_scores`` buffer, about L272-274);
* ``log w <- log w + eta s``, normalised by its logsumexp, then ``w <- (1 - eps) w + eps / D``
  (``update_domain_weights``). The log is taken of the *smoothed* ``w`` each step, as there;
* the running average of ``w``: the initial weights count as one term (``avg_domain_weights``
  starts as a copy of them with ``update_counter`` 1, ``doremi/train.py`` about L272-274, and
  ``write_weights`` in ``doremi/trainer.py`` averages every update in). It is the output mixture.

**Which weights the step's loss uses.** ``training_step`` updates the weights from the step's
excess losses *before* it forms the loss (it reads them back with ``read_weights`` afterwards),
so step ``t``'s loss uses the weights *after* step ``t``'s update; so do we. (With gradient
accumulation the official update happens on the window's last micro-batch, so its earlier
micro-batches use the previous weights, and under DDP the other ranks read the buffer DDP
broadcast from rank 0 at the forward, also the previous weights; here the whole step, every
micro-batch and every rank, uses the same updated weights.)

**The proxy's loss** (``training_step``, ``doremiv1``): per-domain weights ``c = w / p``
renormalised to sum 1, where ``p`` is the proxy's *sampling* mixture (importance correction,
"if doing non-uniform sampling, normalize by inverse sampling weight"); every token of a
sequence of domain ``d`` weighs ``c_d``; the loss is ``sum(c l_token) / normalizer`` with
``normalizer`` the sum of the token weights over all ranks divided by the world size (clipped
at 1e-10), and DDP averages over ranks. Its gradient is therefore
``sum_{i,t} c_{d(i)} grad l_{i,t} / sum_{j,t} c_{d(j)}`` over the global batch. Our sequences
have equal length ``T`` and no padding, so with ``l_i`` the mean token loss of sequence ``i``
this is ``sum_i v_i grad l_i`` with ``v_i = c_{d(i)} / sum_j c_{d(j)}``: our per-sample weights,
summing to 1 over the global batch (the ``MixerOutput`` contract). With gradient accumulation the
official code normalises each micro-batch separately and divides by the number of
micro-batches; we normalise over the whole step (equal when every micro-batch has the same
domain mass, e.g. without accumulation). The reference's loss is a constant for the proxy (the
official loss has no reference term).

**The proxy's sampling mixture** (``mixer.proxy_mixture``). The official proxy samples its
batches from the domain config's ``train_domain_weights`` and starts its weights from the same
vector (``doremi/train.py``: ``train_domain_weights`` buffer = that config, normalised). The
shipped 120M proxy run uses ``configs/pile_uniform.json`` (every domain 1/22,
``scripts/runs/run_pile_doremi120M.sh``; its earlier version used ``configs/uniform.json``):
``proxy_mixture: equal``. ``natural`` samples the corpus's natural mixture instead
(then the importance correction ``w / p`` matters); either way the initial weights are that
sampling mixture.

Vocabulary: the reference and the proxy must share the tokenizer (the excess loss compares
the two models token by token). :meth:`DoReMiMixer.plan_stages` refuses two stages whose
tokenizers differ (by name, resolved as the pipeline does) before anything is trained, and the
proxy mixer refuses, on its first step, token ids outside the reference's embedding table.

Costs per proxy step: one reference forward (no grad) of the rank's sequences, in chunks of
``mixer.reference_batch_size`` (bounds the ``[n, T, V]`` logits); one all-reduce of ``3 D``
floats; no host synchronisation (metrics and history rows stay on the device until the log
interval / the checkpoint; the first step reads the largest token id once).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from baselines.fixed import StageMixtureMixer
from dograph.atomic import write_text_atomically
from dograph.config import load_group_option
from dograph.distributed import DistContext, all_reduce_sum
from dograph.errors import ConfigError, DataError
from dograph.mixer_history import DomainWeightHistory
from dograph.mixing import Mixer, MixerOutput, Signal, StepSignals
from dograph.models import per_token_loss
from dograph.reporting import markdown_table
from dograph.runs.pipeline import StageResult, StageSpec
from dograph.settings import Settings, require, require_number

REFERENCE, PROXY = "reference", "proxy"  # the stage names (mixer.reference.*, mixer.proxy.*)
PRECISIONS = ("auto", "fp32", "bf16")  # trainer.precision's choices (the reference runs under the proxy's)
MIN_NORMALIZER = 1e-10  # floor of the loss normaliser (doremi/trainer.py training_step, clip min=1e-10)
MAX_PENDING = 1024  # our choice: history rows kept on the device before one host copy (bounds their memory)


# ---- the update, as pure functions ------------------------------------------------------------------------


def initial_scores(num_domains: int, vocab_size: int) -> Tensor:
    """``log(vocabulary size)`` for every domain (doremi/train.py, the ``perdomain_scores`` buffer)."""
    return torch.full((num_domains,), math.log(vocab_size), dtype=torch.float64)


def domain_scores(scores: Tensor, excess_sum: Tensor, token_count: Tensor, present: Tensor) -> Tensor:
    """Per-domain mean clipped excess loss; a domain absent from the batch keeps its score.

    ``excess_sum`` [D]: the sum over the domain's tokens of ``max(l - l_ref, 0)``;
    ``token_count`` [D] its tokens; ``present`` [D] bool: at least one sequence of the domain.
    """
    return torch.where(present, excess_sum / token_count.clamp_min(1), scores)


def doremi_update(weights: Tensor, scores: Tensor, eta: float, eps: float) -> Tensor:
    """One exponentiated-gradient step of Group DRO with smoothing (``update_domain_weights``).

    ``log w + eta s`` normalised by its logsumexp, then ``(1 - eps) w + eps / D``.
    """
    logits = weights.log() + eta * scores
    new = (logits - torch.logsumexp(logits, dim=0)).exp()
    return (1.0 - eps) * new + eps / len(new)


def loss_domain_weights(weights: Tensor, sampling: Tensor) -> Tensor:
    """``c = (w / p) / sum(w / p)``: the importance-corrected per-domain loss weights (``training_step``)."""
    corrected = weights / sampling
    return corrected / corrected.sum()


def sample_weights(domain: Tensor, domain_weights: Tensor, domain_counts: Tensor) -> Tensor:
    """``v_i = c_{d(i)} / sum_j c_{d(j)}`` over the global batch (``domain_counts`` [D] sequences per domain).

    The official per-token normaliser, for sequences of equal length (see the module doc).
    """
    normalizer = (domain_weights * domain_counts).sum().clamp_min(MIN_NORMALIZER)
    return domain_weights[domain] / normalizer


# ---- settings ----------------------------------------------------------------------------------------------


@dataclass
class DoReMiSettings(Settings):
    """``conf/mixer/doremi.yaml``: the method's constants (for the proxy) and its two stages; see the module doc."""

    _target_: str  # baselines.doremi.DoReMiMixer
    mixture_from: Literal["proxy"]  # the main run samples the proxy stage's time-averaged weights
    eta: float  # step size of the domain weights (reweight_eta), finite and > 0
    eps: float  # smoothing w <- (1 - eps) w + eps / k (reweight_eps), in [0, 1]
    proxy_mixture: Literal["equal", "natural"]  # what the proxy samples: 1/k per domain, or the natural mixture
    reference_batch_size: int  # sequences per reference forward in the proxy's step (>= 1)
    reference: dict[str, Any]  # the reference stage: a conf/model name, a conf/trainer preset, seed, trainer.*
    proxy: dict[str, Any]  # the proxy stage, as reference (the two must share a tokenizer)

    def check(self) -> None:
        require_number(self.eta, "mixer.eta", low=0, low_open=True)
        require_number(self.eps, "mixer.eps", low=0, high=1)
        require(self.reference_batch_size >= 1, "mixer.reference_batch_size", "must be >= 1",
                self.reference_batch_size)


def _stage_tokenizer(settings: Mapping[str, Any]) -> str | None:
    """A stage's tokenizer, as ``dograph.runs.pipeline.stage_config`` resolves it (None: the main run's)."""
    if settings.get("tokenizer"):
        return str(settings["tokenizer"])
    model = load_group_option("model", settings.get("model", "gpt2_tiny"))
    return model.get("tokenizer")


def _stage_precision(settings: Mapping[str, Any]) -> str:
    """The stage's ``trainer.precision`` (its own setting, else its trainer preset's, else the default)."""
    if "precision" in settings:
        return str(settings["precision"])
    return str(load_group_option("trainer", settings.get("trainer", "default")).get("precision", "auto"))


# ---- the proxy ---------------------------------------------------------------------------------------------


class DoReMiProxyMixer(Mixer):
    """Online Group DRO over human domains against a frozen reference (the proxy stage of DoReMi).

    Receives ``stage_results={"reference": StageResult}`` and loads the reference from its
    ``hf/`` export. See the module doc for the update, the loss weights and the order.
    """

    name = "doremi_proxy"  # the registered method name (dograph.mixing.MIXERS)
    requires = frozenset({Signal.DOMAIN, Signal.TOKEN_LOSS})
    reweights = True

    def __init__(self, *, eta: float = 1.0, eps: float = 1e-3, proxy_mixture: str = "equal",
                 reference_batch_size: int = 16, precision: str = "auto",
                 stage_results: Mapping[str, StageResult] | None = None, domains: Sequence[str] = (),
                 natural_mixture: Sequence[float] = (), dist: DistContext | None = None, seed: int = 0) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
        results = dict(stage_results or {})
        if REFERENCE not in results:
            raise ConfigError("the DoReMi proxy needs the result of the reference stage (stage_results['reference'])")
        self.eta, self.eps, self.proxy_mixture = float(eta), float(eps), proxy_mixture
        self.reference_batch_size, self.precision = reference_batch_size, precision
        self.domains = list(domains)
        self.dist = dist or DistContext()
        k = len(self.domains)
        if proxy_mixture == "equal":
            sampling = torch.full((k,), 1.0 / k, dtype=torch.float64)
        else:
            sampling = torch.as_tensor(list(natural_mixture), dtype=torch.float64)
            if sampling.shape != (k,) or not (sampling > 0).all():
                raise ConfigError(f"mixer.proxy_mixture=natural needs a positive natural share for each of the "
                                  f"{k} domains (got {list(natural_mixture)})")
            sampling = sampling / sampling.sum()
        self.reference_dir = Path(results[REFERENCE].run_dir) / "hf"
        self.reference = self._load_reference(self.reference_dir)
        self.vocab_size = int(self.reference.config.vocab_size)
        self._vocab_checked = False
        device = self.dist.device
        self.sampling = sampling.to(device)
        self._sampling_host = sampling.clone()
        self.initial = sampling.clone().to(device)  # doremi/train.py: the weights start as the sampling mixture
        self.weights = self.initial.clone()
        self.scores = initial_scores(k, self.vocab_size).to(device)
        self.weight_sum = self.initial.clone()  # the running average counts the initial weights once
        self.weight_terms = 1
        self.history = DomainWeightHistory(self.domains, extra=[*(f"score:{d}" for d in self.domains),
                                                                *(f"average:{d}" for d in self.domains)])
        self._pending_steps: list[int] = []
        self._pending_rows: list[Tensor] = []  # per step [3 D] device rows, copied to the host lazily

    def _load_reference(self, path: Path) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        if not (path / "config.json").is_file():
            raise DataError(f"the DoReMi reference model {path} is missing (no config.json): delete the reference "
                            f"stage directory {path.parent} to train it again")
        model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa", dtype=torch.float32)
        model.to(self.dist.device).eval()
        model.requires_grad_(False)
        return model

    # ---- the step --------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        device = self.dist.device.type
        bf16 = self.precision == "bf16" or (self.precision == "auto" and device == "cuda")
        return torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    @torch.no_grad()
    def reference_token_loss(self, input_ids: Tensor, targets: Tensor) -> Tensor:
        """[b, T] per-token losses of the frozen reference (float32), ``reference_batch_size`` sequences at a time."""
        if not self._vocab_checked:
            largest = int(torch.maximum(input_ids.max(), targets.max()))  # one host sync, on the first step only
            if largest >= self.vocab_size:
                raise ConfigError(f"the DoReMi reference ({self.reference_dir}) has a vocabulary of {self.vocab_size} "
                                  f"but the proxy's data has token id {largest}: the two stages must share the "
                                  "tokenizer (mixer.reference.tokenizer / mixer.proxy.tokenizer)")
            self._vocab_checked = True
        parts = []
        with self._autocast():
            for start in range(0, len(input_ids), self.reference_batch_size):
                end = start + self.reference_batch_size
                parts.append(per_token_loss(self.reference, input_ids[start:end], targets[start:end]).float())
        return torch.cat(parts)

    def weigh(self, signals: StepSignals) -> MixerOutput:
        if signals.domain is None or signals.token_loss is None or signals.targets is None:
            raise RuntimeError("DoReMiProxyMixer.weigh needs domains and per-token losses (Signal.DOMAIN, TOKEN_LOSS)")
        k = len(self.domains)
        reference = self.reference_token_loss(signals.input_ids, signals.targets)
        excess = (signals.token_loss.float() - reference).clamp_min(0)  # [b, T], clipped per token
        domain = signals.domain.to(excess.device)
        per_sample = torch.stack([excess.double().sum(dim=1),
                                  torch.full_like(domain, excess.shape[1], dtype=torch.float64),
                                  torch.ones_like(domain, dtype=torch.float64)], dim=1)  # [b, 3]
        # per-domain sums as a matmul with the one-hot labels (deterministic, unlike index_add_ on CUDA)
        stats = F.one_hot(domain, k).to(torch.float64).T @ per_sample  # [D, 3]
        stats = all_reduce_sum(self.dist, stats.T.contiguous())  # [3, D]: excess sums, tokens, sequences
        self.scores = domain_scores(self.scores, stats[0], stats[1], stats[2] > 0)
        self.weights = doremi_update(self.weights, self.scores, self.eta, self.eps)
        self.weight_sum = self.weight_sum + self.weights
        self.weight_terms += 1
        c = loss_domain_weights(self.weights, self.sampling)  # the updated weights (module doc: the order)
        v = sample_weights(domain, c, stats[2])
        self._record(signals.step)
        metrics = self._metrics() if self.dist.is_main else {}
        return MixerOutput(sample_weights=v.to(signals.loss.dtype), metrics=metrics)

    def _metrics(self) -> dict[str, Any]:
        average = self.weight_sum / self.weight_terms
        metrics: dict[str, Any] = {f"mixer/weights/{d}": self.weights[i] for i, d in enumerate(self.domains)}
        metrics.update({f"mixer/scores/{d}": self.scores[i] for i, d in enumerate(self.domains)})
        metrics.update({f"mixer/avg_weights/{d}": average[i] for i, d in enumerate(self.domains)})
        return metrics

    def _record(self, step: int) -> None:
        self._pending_steps.append(int(step))
        self._pending_rows.append(torch.cat([self.weights, self.scores, self.weight_sum / self.weight_terms]))
        if len(self._pending_rows) >= MAX_PENDING:
            self._sync_history()

    def _sync_history(self) -> None:
        """Move the pending rows into the history: one device-to-host copy for all of them."""
        if not self._pending_rows:
            return
        rows = torch.stack(self._pending_rows).cpu().tolist()
        k = len(self.domains)
        names = self.history.extra
        for step, row in zip(self._pending_steps, rows, strict=True):
            self.history.record(step, row[:k], **dict(zip(names, row[k:], strict=True)))
        self._pending_steps, self._pending_rows = [], []

    # ---- the sampler -------------------------------------------------------------------------------------
    def sampling_mixture(self) -> Tensor:
        """The proxy's fixed sampling mixture (``proxy_mixture``); the DRO weights only weigh the loss."""
        return self._sampling_host  # a host copy: asked after every step, never a device sync

    # ---- state, outputs and reports ----------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {"eta": self.eta, "eps": self.eps, "proxy_mixture": self.proxy_mixture,
                "reference_batch_size": self.reference_batch_size, "precision": self.precision}

    def state_dict(self) -> dict[str, Any]:
        self._sync_history()
        return {"weights": self.weights.cpu(), "scores": self.scores.cpu(), "weight_sum": self.weight_sum.cpu(),
                "weight_terms": self.weight_terms, "initial": self.initial.cpu(), "sampling": self.sampling.cpu(),
                "history": self.history.state_dict(), "domains": list(self.domains), "settings": self.settings(),
                "vocab_size": self.vocab_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["domains"]) != self.domains:
            raise ConfigError(f"cannot resume: the checkpoint's DoReMi weights are over the domains "
                              f"{list(state['domains'])}, this run's are {self.domains}")
        device = self.dist.device
        for name in ("weights", "scores", "weight_sum", "initial", "sampling"):
            setattr(self, name, state[name].to(device=device, dtype=torch.float64))
        self._sampling_host = state["sampling"].to(dtype=torch.float64).cpu().clone()
        self.weight_terms = int(state["weight_terms"])
        self._pending_steps, self._pending_rows = [], []
        self.history.load_state_dict(state["history"])

    def _named(self, values: Tensor) -> dict[str, float]:
        return dict(zip(self.domains, values.cpu().tolist(), strict=True))

    def outputs(self) -> dict[str, Any]:
        """``mixture``: the time-averaged weights (the main run's mixture); ``final``, ``initial`` for the record."""
        return {"mixture": self._named(self.weight_sum / self.weight_terms), "final": self._named(self.weights),
                "initial": self._named(self.initial), "updates": self.weight_terms - 1}

    def save_artifacts(self, out_dir: Path) -> None:
        """``weights.csv`` (step, w per domain, score:<d>, average:<d>) and ``mixture.json`` (outputs + settings)."""
        self._sync_history()
        self.history.save(out_dir)
        record = {**self.outputs(), "settings": self.settings(), "reference": str(self.reference_dir)}
        write_text_atomically(out_dir / "mixture.json", json.dumps(record, indent=2))

    def summary(self) -> dict[str, Any]:
        out = self.outputs()
        rows = [[d, out["initial"][d], out["final"][d], out["mixture"][d]] for d in self.domains]
        title = (f"DoReMi proxy domain weights ({out['updates']} updates, eta {self.eta:g}, eps {self.eps:g}; "
                 "the average is the main run's mixture)")
        return {title: markdown_table(["domain", "initial", "final", "average"], rows)}


# ---- the method (main run) ---------------------------------------------------------------------------------


class DoReMiMixer(StageMixtureMixer):
    """The main run of DoReMi: samples the proxy's time-averaged weights (``mixture_from: proxy``).

    ``plan_stages`` declares the reference and the proxy; the method constants (``eta``,
    ``eps``, ``proxy_mixture``, ``reference_batch_size``) go to the proxy's mixer and are
    accepted and unused here.
    """

    name = "doremi"  # registered name (dograph.mixing.MIXERS); its stage keys hash it: never change it
    settings_class = DoReMiSettings

    def __init__(self, *, mixture_from: str = PROXY, stage_results: Mapping[str, StageResult] | None = None,
                 domains: Sequence[str] = (), eta: float = 1.0, eps: float = 1e-3, proxy_mixture: str = "equal",
                 reference_batch_size: int = 16, **runtime: Any) -> None:
        super().__init__(mixture_from=mixture_from, stage_results=stage_results, domains=domains, **runtime)

    @classmethod
    def plan_stages(cls, node: dict[str, Any]) -> list[StageSpec]:
        eta, eps = node.get("eta", 1.0), node.get("eps", 1e-3)
        proxy_mixture, chunk = node.get("proxy_mixture", "equal"), node.get("reference_batch_size", 16)
        reference, proxy = dict(node[REFERENCE]), dict(node[PROXY])
        tokenizers = _stage_tokenizer(reference), _stage_tokenizer(proxy)
        if None not in tokenizers and tokenizers[0] != tokenizers[1]:
            raise ConfigError(f"mixer.reference trains with the {tokenizers[0]} tokenizer and mixer.proxy with "
                              f"{tokenizers[1]}: DoReMi compares their per-token losses, so they must share one "
                              "(set mixer.reference.tokenizer / mixer.proxy.tokenizer)")
        proxy_mixer = {"_target_": f"{__name__}.DoReMiProxyMixer", "eta": eta, "eps": eps,
                       "proxy_mixture": proxy_mixture, "reference_batch_size": chunk,
                       "precision": _stage_precision(proxy)}
        return [StageSpec(REFERENCE, {"_target_": "baselines.uniform.UniformMixer"}, reference),
                StageSpec(PROXY, proxy_mixer, proxy, needs=(REFERENCE,))]
