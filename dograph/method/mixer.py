"""DoGraph: weights over model-centric domains found in projected gradient space (docs/design.md section 2).

Each step (on rank 0, with the global batch gathered from every rank):

1. the batch's projected per-sample gradients enter a FIFO buffer (2.2);
2. every ``recluster_every`` steps K-means refreshes the m centroids (warm-started, ids
   kept by Hungarian matching; a re-seeded cluster (empty, or its region gone) starts afresh);
   until the buffer first fills, the plain mean is used (warm-up);
3. samples go to their nearest centroid (with the refreshed centroids on a refresh step);
   per-cluster EMA statistics and the cosine graph are updated (2.3);
4. the objective gives weights ``w`` over the clusters *present in the global batch*, from
   their EMA statistics (absent clusters get 0 that step, 2.4, 2.5);
5. per-sample loss weights ``v_i = w_c(i) / (n_c(i) * sum_{present k} w_k)`` (2.5; the paper's
   update, ``mixer.sample_weights=cluster_mean``; ``tilt`` and ``shrink`` are our variants) are
   broadcast, so every rank applies the same weights.

Host synchronisation, per rank and step: one. Rank 0 copies the statistics, the
finiteness flag and the assignments to the host for the solve in one transfer; under DDP
the other ranks read the broadcast skip flag (rank 0 already knows it). K-means refreshes
add their own every ``recluster_every`` steps. A non-finite projected gradient or loss
skips the step (its statistics are rolled back and nothing enters the buffer) and is logged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from dograph.distributed import DistContext, all_gather_cat, broadcast
from dograph.errors import ConfigError
from dograph.method.buffer import ProjectionBuffer
from dograph.method.clustering import ClusterRefresh, KMeansClusterer
from dograph.method.graph import ClusterStatistics, cluster_domain_agreement, cosine_adjacency
from dograph.method.objectives import Objective, ObjectiveInputs
from dograph.mixer_history import MixerHistory
from dograph.mixing import Mixer, MixerOutput, Signal, StepSignals
from dograph.reporting import markdown_table
from dograph.settings import Settings, require, require_number
from dograph.step.projection import KroneckerProjector
from dograph.step.timing import StepTimer

log = logging.getLogger(__name__)


SampleWeightRule = Literal["cluster_mean", "tilt", "shrink"]  # mixer.sample_weights (docs/design.md section 2.5)
SAMPLE_WEIGHT_RULES: tuple[str, ...] = get_args(SampleWeightRule)


def per_sample_weights(cluster_weights: Tensor, assign: Tensor, num_clusters: int, rule: str = "cluster_mean",
                       shrink: float = 0.0) -> Tensor:
    """Per-sample loss weights from cluster weights; they sum to 1 over the batch (docs/design.md section 2.5).

    - ``cluster_mean`` (the paper's update ``sum_k w_k gbar_k``): ``v_i = w_c(i) / (n_c(i) * sum_{k present} w_k)``;
    - ``tilt`` (ours): the cluster weight as a per-sample multiplier, ``v_i = w_c(i) / sum_j w_c(j)``, so equal
      cluster weights give the plain mean ``1 / B`` whatever the cluster sizes;
    - ``shrink`` (ours): ``v_i = shrink / B + (1 - shrink) * cluster_mean_i``, ``shrink`` in [0, 1] (0: the
      paper's update, 1: the plain mean).

    When the present clusters carry no finite positive mass the plain mean ``1 / B`` is
    returned instead (no host synchronisation; :class:`DoGraphMixer` checks the mass on the
    host first and logs the fallback).
    """
    counts = torch.bincount(assign, minlength=num_clusters).to(cluster_weights.dtype)
    present_mass = (cluster_weights * (counts > 0)).sum()
    plain = torch.full_like(cluster_weights[assign], 1.0 / len(assign))
    if rule == "tilt":  # scaled by the largest present weight first, so equal weights give exactly 1 / B
        scaled = cluster_weights / (cluster_weights * (counts > 0)).max()
        weights = scaled[assign] / scaled[assign].sum()
    elif rule in ("cluster_mean", "shrink"):
        weights = cluster_weights[assign] / (counts[assign] * present_mass)
        if rule == "shrink":
            weights = shrink * plain + (1.0 - shrink) * weights
    else:  # the mixer checks its rule once when built; this is for direct callers
        raise ValueError(f"unknown sample-weight rule {rule!r} (one of {', '.join(SAMPLE_WEIGHT_RULES)})")
    usable = torch.isfinite(present_mass) & (present_mass > 0)  # the tilt's mass is then finite and positive too
    return torch.where(usable, weights, plain)


def present_mass_is_usable(cluster_weights: np.ndarray, sizes: np.ndarray) -> bool:
    """Host check before the weights reach a backward: finite weights and a positive present mass."""
    present = sizes > 0
    mass = float(np.sum(cluster_weights[present]))
    return bool(np.all(np.isfinite(cluster_weights[present]))) and math.isfinite(mass) and mass > 0


_WEIGHTS, _SKIP, _PLAIN = 0.0, 1.0, 2.0  # what rank 0 decided, broadcast with the weights


@dataclass
class KroneckerSettings(Settings):
    """``mixer.projection``: the Kronecker projection of per-sample gradients (docs/design.md section 2.1)."""

    key = "mixer.projection"
    _target_: str  # dograph.step.projection.KroneckerProjector, built by instantiate
    rank: int  # r per side: r*r dimensions per projected layer
    out_dim: int | None  # k, the final dense compression; null keeps all L*r*r dimensions
    include: list[str]  # Linear/Conv1D module-name patterns to project (fnmatch)
    exclude: list[str]  # patterns left out (after include)
    dtype: Literal["float32", "bfloat16", "float16"]  # of the projection matrices
    seed: int  # of the Gaussian matrices: fixed for the run, identical on every rank and after resume


@dataclass
class DoGraphSettings(Settings):
    """``conf/mixer/dograph.yaml`` (docs/design.md section 2): the values, and where each comes from, are there."""

    _target_: str  # dograph.method.mixer.DoGraphMixer
    num_clusters: int  # m, the model-centric domains (the root key m)
    objective: Any  # the selected objective node (conf/objective/*), typed by its own settings class
    projection: KroneckerSettings  # docs/design.md section 2.1
    buffer_size: int  # N, the FIFO of projected gradients K-means runs on (>= m)
    recluster_every: int | None  # steps between K-means refreshes; null: one pass over the buffer (N / B)
    cluster_on: Literal["direction", "raw"]  # K-means on unit-norm projected gradients, or on the raw ones
    ema_beta: float  # EMA of the per-cluster statistics, in [0, 1) (docs/design.md section 2.3)
    kmeans_iterations: int  # Lloyd iterations per restart at the first clustering
    kmeans_warm_iterations: int  # iterations of a warm-started refresh
    kmeans_restarts: int  # k-means++ restarts at the first clustering
    max_consecutive_fallbacks: int  # log an error after this many solver fallbacks in a row (>= 1)
    sample_weights: SampleWeightRule  # cluster weights -> sample weights (2.5; paper: first)
    shrink: float | None  # with sample_weights=shrink (only): the plain mean's share in [0, 1]

    def check(self) -> None:
        require(self.buffer_size >= 1, "mixer.buffer_size", "must be >= 1", self.buffer_size)
        if self.num_clusters > self.buffer_size:
            raise ConfigError(f"m={self.num_clusters} is larger than mixer.buffer_size={self.buffer_size}: K-means "
                              "needs at least m buffered gradients (lower m or raise mixer.buffer_size)")
        require(self.recluster_every is None or self.recluster_every >= 1, "mixer.recluster_every",
                "must be >= 1 or null", self.recluster_every)
        require(0.0 <= self.ema_beta < 1.0, "mixer.ema_beta", "must be in [0, 1)", self.ema_beta)
        if self.sample_weights == "shrink":
            if self.shrink is None:
                raise ConfigError("mixer.sample_weights=shrink needs mixer.shrink, the plain mean's share in [0, 1]")
            require_number(self.shrink, "mixer.shrink", low=0.0, high=1.0)
        elif self.shrink is not None:
            raise ConfigError(f"mixer.shrink={self.shrink} applies only to mixer.sample_weights=shrink (got "
                              f"mixer.sample_weights={self.sample_weights})")
        require(self.max_consecutive_fallbacks >= 1, "mixer.max_consecutive_fallbacks", "must be >= 1",
                self.max_consecutive_fallbacks)


class DoGraphMixer(Mixer):
    """Model-centric domains as graph nodes, weighted by an auxiliary objective.

    ``DOMAIN`` labels are read only for diagnostics (the cluster-vs-domain table).
    ``max_consecutive_fallbacks``: after this many steps in a row on which the objective's
    solver failed and its projected closed form was used, the run logs an error (again at
    every further multiple) and the final summary says so (our choice of default: 10).
    """

    name = "dograph"  # the registered method name (dograph.mixing.MIXERS)
    settings_class = DoGraphSettings  # conf/mixer/dograph.yaml's schema; checked there, not here
    requires = frozenset({Signal.GRAD_PROJ, Signal.DOMAIN})

    def __init__(self, *, num_clusters: int, objective: Callable[..., Objective], projection: KroneckerProjector,
                 buffer_size: int = 4096, recluster_every: int | None = None, ema_beta: float = 0.9,
                 kmeans_iterations: int = 3, kmeans_warm_iterations: int = 1, kmeans_restarts: int = 3,
                 cluster_on: str = "direction", max_consecutive_fallbacks: int = 10,
                 sample_weights: SampleWeightRule = "cluster_mean", shrink: float | None = None,
                 domains: Sequence[str] = (), natural_mixture: Sequence[float] = (),
                 dist: DistContext | None = None, seed: int = 0) -> None:
        self.cluster_on = cluster_on
        if sample_weights not in SAMPLE_WEIGHT_RULES:  # once here, not in every step's weighting
            raise ConfigError(f"mixer.sample_weights must be one of {', '.join(SAMPLE_WEIGHT_RULES)} "
                              f"(got {sample_weights!r})")
        self.sample_weights, self.shrink = sample_weights, shrink or 0.0
        self.m, self.buffer_size, self.recluster_every = num_clusters, buffer_size, recluster_every
        self.ema_beta, self.domains = ema_beta, list(domains)
        self.max_consecutive_fallbacks = max_consecutive_fallbacks
        self.dist = dist or DistContext()
        self.objective = objective(num_clusters=num_clusters)
        self._projector = projection
        self.clusterer = KMeansClusterer(num_clusters, niter=kmeans_iterations, niter_warm=kmeans_warm_iterations,
                                         nredo_first=kmeans_restarts, seed=seed)
        self.buffer: ProjectionBuffer | None = None
        self.stats: ClusterStatistics | None = None
        self.w_last = np.full(num_clusters, 1.0 / num_clusters)  # each cluster's weight when last solved for
        self.last_weights = np.full(num_clusters, 1.0 / num_clusters)  # the last step's weights (0: absent)
        self.fallbacks = {"streak": 0, "longest": 0, "total": 0}
        self.last_refresh_step = -1
        self.history = MixerHistory()
        self._announced_warmup = False

    @property
    def projector(self) -> KroneckerProjector:
        return self._projector

    def settings(self) -> dict[str, Any]:
        """The settings the mixer's state depends on; a resume must match them."""
        p = self._projector
        return {"m": self.m, "cluster_on": self.cluster_on, "ema_beta": self.ema_beta,
                "buffer_size": self.buffer_size, "projection.rank": p.rank, "projection.out_dim": p.out_dim,
                "projection.include": list(p.include), "projection.exclude": list(p.exclude)}

    # ---- the step ------------------------------------------------------------------------
    def weigh(self, signals: StepSignals) -> MixerOutput:
        if signals.grad_proj is None:
            raise RuntimeError("DoGraphMixer.weigh needs projected gradients (Signal.GRAD_PROJ)")
        g = all_gather_cat(self.dist, signals.grad_proj.float())  # [B, k]
        loss = all_gather_cat(self.dist, signals.loss.float())
        domain = None if signals.domain is None else all_gather_cat(self.dist, signals.domain)
        if self.dist.is_main:
            weights, decision, metrics = self._weigh_global(signals.step, g, loss, domain)
        else:
            weights, decision, metrics = None, _WEIGHTS, {}
        if self.dist.enabled:
            body = weights if weights is not None else torch.zeros_like(loss)
            packed = broadcast(self.dist, torch.cat([body, torch.tensor([decision], device=body.device)]))
            weights = packed[:-1]
            if not self.dist.is_main:  # this rank's one host synchronisation (rank 0 knows already)
                decision = float(packed[-1].item())
        if decision == _SKIP:
            return MixerOutput(sample_weights=None, skip_step=True, metrics=metrics)
        if decision == _PLAIN:
            return MixerOutput(sample_weights=None, metrics=metrics)
        b = signals.loss.shape[0]
        return MixerOutput(sample_weights=weights[self.dist.rank * b:(self.dist.rank + 1) * b], metrics=metrics)

    def _ensure_state(self, g: Tensor) -> None:
        if self.buffer is None:
            self.buffer = ProjectionBuffer(self.buffer_size, g.shape[1], device=g.device)
            self.stats = ClusterStatistics(self.m, g.shape[1], beta=self.ema_beta, device=g.device)
        if self.buffer.device != g.device:  # restored from a checkpoint on the CPU
            self.buffer.to(g.device)
            self.stats.to(g.device)
        if self.recluster_every is None:  # our choice (docs/design.md section 2.2): one pass over the buffer
            self.recluster_every = max(1, self.buffer_size // g.shape[0])

    def _assign_and_update(self, g: Tensor, loss: Tensor, domain: Tensor | None, finite: Tensor,
                           timer: StepTimer) -> tuple[Tensor, dict[str, Any]]:
        """Nearest centroids, statistics update (timed on the device), then the one host copy."""
        with timer.measure():
            assign = self.clusterer.assign(self._cluster_space(torch.nan_to_num(g)))
            self.stats.update(torch.nan_to_num(g), assign, torch.nan_to_num(loss))
        return assign, self._to_host(finite, g, assign, domain)

    def _weigh_global(self, step: int, g: Tensor, loss: Tensor, domain: Tensor | None
                      ) -> tuple[Tensor | None, float, dict[str, Any]]:
        self._ensure_state(g)
        timer = StepTimer(g.device)
        fitted = self.clusterer.centroids is not None
        finite = torch.isfinite(g).all() & torch.isfinite(loss).all()
        if fitted:
            saved = self.stats.state_dict()
            assign, host = self._assign_and_update(g, loss, domain, finite, timer)  # the step's host sync
            ok = bool(host["finite"])
        else:
            ok = bool(finite.item())
        if not ok:
            if fitted:
                self.stats.load_state_dict(saved)
            log.warning("DoGraph: non-finite projected gradient or loss at step %d: step skipped", step)
            return None, _SKIP, {"mixer/skipped_nonfinite": 1.0}
        self.buffer.push(g, domain)
        metrics: dict[str, Any] = {"mixer/buffer_fill": len(self.buffer) / self.buffer_size}
        refresh, refresh_metrics = self._maybe_refresh(step)
        metrics.update(refresh_metrics)
        if not fitted:
            self._announce_warmup(g.shape[0])
            metrics["mixer/warmup"] = 1.0
            return None, _PLAIN, metrics
        if refresh is not None:  # assign this batch with the refreshed centroids (docs/design.md section 2.5)
            self.stats.load_state_dict(saved)
            self._forget_clusters(refresh.reseeded)
            assign, host = self._assign_and_update(g, loss, domain, finite, timer)
        return self._solve(step, assign, host, timer, metrics)

    def _solve(self, step: int, assign: Tensor, host: dict[str, Any], timer: StepTimer,
               metrics: dict[str, Any]) -> tuple[Tensor | None, float, dict[str, Any]]:
        """Weights over the clusters present in the batch (docs/design.md 2.4, 2.5), then per-sample weights."""
        present = host["sizes"] > 0
        result = self.objective.solve(self._objective_inputs(host), self._previous_weights(present), step=step)
        self._count_fallback(step, result.fallback)
        weights = result.weights
        self.last_weights = weights
        self.history.record_step(step, weights, host["sizes"], result.value, result.fallback,
                                 host["assign"], host["domain"])
        metrics.update({"mixer/warmup": 0.0, "mixer/weights": weights.tolist(),
                        "mixer/cluster_sizes": host["sizes"].tolist(), "mixer/objective_value": result.value,
                        "mixer/fallback": float(result.fallback), "mixer/time_solve_s": result.solve_seconds,
                        "mixer/time_cluster_s": timer, "mixer/present_clusters": float(present.sum())})
        if not present_mass_is_usable(weights, host["sizes"]):
            log.warning("DoGraph: the cluster weights of step %d give the present clusters no finite positive "
                        "mass: this step uses the plain mean (1/B)", step)
            metrics["mixer/plain_mean_fallback"] = 1.0
            return None, _PLAIN, metrics
        self.w_last = np.where(present, weights, self.w_last)
        w = torch.as_tensor(weights, dtype=torch.float32).to(assign.device, non_blocking=True)
        return per_sample_weights(w, assign, self.m, self.sample_weights, self.shrink), _WEIGHTS, metrics

    def _previous_weights(self, present: np.ndarray) -> np.ndarray:
        """``w_prev`` of the proximal term: each present cluster's last weight, renormalised over them (our choice)."""
        w = np.where(present, self.w_last, 0.0)
        total = w.sum()
        return w / total if total > 0 else present / present.sum()

    def _count_fallback(self, step: int, fallback: bool) -> None:
        f = self.fallbacks
        f["streak"] = f["streak"] + 1 if fallback else 0
        f["total"] += int(fallback)
        f["longest"] = max(f["longest"], f["streak"])
        if fallback and f["streak"] % self.max_consecutive_fallbacks == 0:
            log.error("DoGraph: the %s solver has failed %d steps in a row (up to step %d): the weights are its "
                      "projected closed form, not the objective's solution. Check objective.solver and the "
                      "statistics (see mixer/fallback in metrics.jsonl)", self.objective.name, f["streak"], step)

    def _to_host(self, finite: Tensor, g: Tensor, assign: Tensor, domain: Tensor | None) -> dict[str, Any]:
        """Everything the solve and the history need, in one device-to-host copy."""
        s, m, k = self.stats, self.m, g.shape[1]
        labels = domain if domain is not None else torch.full_like(assign, -1)
        parts = [finite.float().view(1), s.counts, s.variances, s.variance_known.float(), s.losses,
                 s.batch_counts.float(), s.means.flatten(), s.batch_means.flatten(), g.mean(0),
                 cosine_adjacency(s.means, s.active).flatten(), assign.float(), labels.float()]
        flat = torch.cat([p.float().reshape(-1) for p in parts]).cpu().double().numpy()
        sizes = [1, m, m, m, m, m, m * k, m * k, k, m * m, len(assign), len(assign)]
        names = ["finite", "counts", "variances", "variance_known", "losses", "sizes", "means", "batch_means",
                 "mean_grad", "adjacency", "assign", "domain"]
        out = dict(zip(names, np.split(flat, np.cumsum(sizes)[:-1]), strict=True))
        out["finite"], out["variance_known"] = out["finite"][0] > 0.5, out["variance_known"] > 0.5
        for key in ("means", "batch_means"):
            out[key] = out[key].reshape(m, k)
        out["adjacency"] = out["adjacency"].reshape(m, m)
        for key in ("sizes", "assign", "domain"):
            out[key] = out[key].astype(np.int64)
        return out

    @staticmethod
    def _objective_inputs(host: dict[str, Any]) -> ObjectiveInputs:
        """The solve's inputs: EMA statistics of the clusters present in the batch (docs/design.md section 2.5).

        A present cluster never seen with two samples gets the mean variance of the present
        clusters that have one, or 1 if none has (our choice: no evidence, no preference).
        """
        present = host["sizes"] > 0
        known = host["variance_known"] & present
        fill = host["variances"][known].mean() if known.any() else 1.0
        variances = np.where(known, host["variances"], fill)
        return ObjectiveInputs(counts=host["counts"], means=host["means"], variances=variances,
                               losses=host["losses"], adjacency=host["adjacency"], mean_grad=host["mean_grad"],
                               active=present, batch_means=host["batch_means"], batch_counts=host["sizes"])

    def _announce_warmup(self, batch: int) -> None:
        if not self._announced_warmup:
            steps = -(-self.buffer_size // batch)
            log.info("DoGraph warm-up: plain mean until the buffer holds %d projected gradients (%d steps)",
                     self.buffer_size, steps)
            self._announced_warmup = True

    # ---- K-means refreshes ---------------------------------------------------------------------
    def _cluster_space(self, g: Tensor) -> Tensor:
        """What K-means sees: the projected gradients, or their directions (``cluster_on=direction``)."""
        if self.cluster_on == "raw":
            return g
        return g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def _forget_clusters(self, ids: tuple[int, ...]) -> None:
        """Re-seeded ids are new domains: fresh statistics, and ``w_last`` the mean of the others' (2.2).

        The mean of the kept ids' ``w_last`` (1/m when every id is re-seeded) is neutral
        after the proximal term's renormalisation: it pulls the new cluster neither toward
        the old region's weight nor below its peers (our choice; 1/m would be low when a
        batch holds fewer than m clusters).
        """
        if not ids:
            return
        self.stats.reset_clusters(ids)
        kept = np.ones(self.m, dtype=bool)
        kept[list(ids)] = False
        self.w_last[list(ids)] = self.w_last[kept].mean() if kept.any() else 1.0 / self.m

    def _maybe_refresh(self, step: int) -> tuple[ClusterRefresh | None, dict[str, Any]]:
        due = self.clusterer.centroids is None or step - self.last_refresh_step >= self.recluster_every
        if not (self.buffer.is_full and due):
            return None, {}
        data = self.buffer.data()
        data = self._cluster_space(data)
        refresh = self.clusterer.fit(data)
        if self.last_refresh_step < 0:
            log.info("DoGraph: first clustering at step %d (%d points, m=%d, %s): weights from the next step on",
                     step, refresh.num_points, self.m, refresh.backend)
        self.last_refresh_step = step
        agreement = cluster_domain_agreement(self.clusterer.assign(data), self.buffer.labels(), self.m,
                                             max(1, len(self.domains)))
        record = {"step": step, "drift": refresh.drift, "seconds": refresh.seconds, "backend": refresh.backend,
                  "kmeans_objective": refresh.objective, "empty_clusters": refresh.empty_clusters,
                  "reseeded": list(refresh.reseeded), "vanished": list(refresh.vanished),
                  "ari": agreement.ari, "nmi": agreement.nmi, "contingency": agreement.table.tolist()}
        self.history.refreshes.append(record)
        return refresh, {"mixer/refresh/step": float(step), "mixer/refresh/drift": refresh.drift,
                         "mixer/refresh/ari": agreement.ari, "mixer/refresh/nmi": agreement.nmi,
                         "mixer/refresh/contingency": record["contingency"], "mixer/time_kmeans_s": refresh.seconds}

    # ---- state and reports -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"buffer": None if self.buffer is None else self.buffer.state_dict(),
                "stats": None if self.stats is None else self.stats.state_dict(),
                "clusterer": self.clusterer.state_dict(), "w_last": self.w_last.copy(),
                "last_weights": self.last_weights.copy(), "fallbacks": dict(self.fallbacks),
                "last_refresh_step": self.last_refresh_step, "recluster_every": self.recluster_every,
                "history": self.history.state_dict(), "projector_seed": self._projector.seed,
                "settings": self.settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_settings(state)
        if state["buffer"] is not None:
            dim = state["buffer"]["data"].shape[1]
            self.buffer = ProjectionBuffer(self.buffer_size, dim)
            self.buffer.load_state_dict(state["buffer"])
            self.stats = ClusterStatistics(self.m, dim, beta=self.ema_beta)
            self.stats.load_state_dict(state["stats"])
        self.clusterer.load_state_dict(state["clusterer"])
        self.w_last = np.asarray(state["w_last"], dtype=np.float64)
        self.last_weights = np.asarray(state["last_weights"], dtype=np.float64)
        self.fallbacks = dict(state["fallbacks"])
        self.last_refresh_step, self.recluster_every = state["last_refresh_step"], state["recluster_every"]
        self.history.load_state_dict(state["history"])

    def _check_settings(self, state: dict[str, Any]) -> None:
        """Refuse, in one line, a checkpoint whose mixer state was built under other settings."""
        if state["projector_seed"] != self._projector.seed:
            raise ConfigError(f"the checkpoint's projection seed {state['projector_seed']} differs from this "
                              f"run's {self._projector.seed}: resume with the same seed")
        saved = state.get("settings")
        if saved is None:
            raise ConfigError("the checkpoint's DoGraph state predates the settings check (an older dograph "
                              "version): start the run again (overwrite=true)")
        ours = self.settings()
        differ = [f"mixer.{key}={saved.get(key)!r} in the checkpoint, {ours[key]!r} now"
                  for key in ours if saved.get(key) != ours[key]]
        if differ:
            raise ConfigError("cannot resume: the DoGraph state was built with other settings ("
                              + "; ".join(differ) + "): resume with the checkpoint's settings or start over")

    def save_artifacts(self, out_dir: Path) -> None:
        self.history.save(out_dir)

    def summary(self) -> dict[str, Any]:
        if not self.history.steps:
            return {"DoGraph": f"still in warm-up: the buffer of {self.buffer_size} gradients never filled"}
        out = {"DoGraph cluster weights (last step; 0 = absent from its batch; n = EMA cluster size, "
               "L = EMA mean loss)": self._weights_table()}
        f = self.fallbacks
        if f["total"]:
            loud = f["longest"] >= self.max_consecutive_fallbacks
            out["WARNING: solver fallbacks" if loud else "Solver fallbacks"] = (
                f"the {self.objective.name} solve fell back to its projected closed form on {f['total']} of "
                f"{len(self.history.steps)} weighted steps (longest streak {f['longest']})")
        if self.history.refreshes and self.domains:
            last = self.history.refreshes[-1]
            rows = [[f"cluster {k}", *row] for k, row in enumerate(last["contingency"])]
            title = (f"Clusters vs human domains (buffer at the refresh of step {last['step']}; "
                     f"ARI {last['ari']:.3f}, NMI {last['nmi']:.3f})")
            out[title] = markdown_table(["", *self.domains], rows)
        return out

    def _weights_table(self) -> str:
        counts = self.stats.counts.cpu().tolist()
        losses = self.stats.losses.cpu().tolist()
        sizes = self.history.sizes[-1]
        rows = [[f"cluster {k}", float(self.last_weights[k]), sizes[k], float(counts[k]), float(losses[k])]
                for k in range(self.m)]
        return markdown_table(["", "weight", "in batch", "n", "L"], rows)
