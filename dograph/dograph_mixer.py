"""DoGraph: weights over model-centric domains found in projected gradient space (DESIGN section 2).

Each step (on rank 0, with the global batch gathered from every rank):

1. the batch's projected per-sample gradients enter a FIFO buffer (2.2);
2. every ``recluster_every`` steps K-means refreshes the m centroids (warm-started, ids
   kept by Hungarian matching); until the buffer first fills, weights are uniform (warm-up);
3. samples go to their nearest centroid; per-cluster EMA statistics and the cosine graph
   are updated (2.3);
4. the objective gives cluster weights ``w`` on the simplex (2.4);
5. per-sample loss weights ``v_i = w_c(i) / (n_c(i) * sum_{present k} w_k)`` (2.5) are
   broadcast, so every rank applies the same weights.

Host synchronisation: one per step (a single copy of the statistics, the finiteness flag
and the assignments to the host for the solve); K-means refreshes add one every
``recluster_every`` steps. A non-finite projected gradient or loss skips the step (its
statistics are rolled back and nothing enters the buffer) and is logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dograph.buffer import ProjectionBuffer
from dograph.clustering import KMeansClusterer
from dograph.distributed import DistContext, all_gather_cat, broadcast
from dograph.errors import ConfigError
from dograph.graph import ClusterStatistics, cluster_domain_agreement, cosine_adjacency
from dograph.mixer_history import MixerHistory
from dograph.mixing import Mixer, MixerOutput, Signal, StepSignals
from dograph.objectives import Objective, ObjectiveInputs
from dograph.projection import KroneckerProjector
from dograph.reporting import markdown_table

log = logging.getLogger(__name__)


def per_sample_weights(cluster_weights: Tensor, assign: Tensor, num_clusters: int) -> Tensor:
    """``v_i = w_c(i) / (n_c(i) * sum_{k present} w_k)`` (DESIGN 2.5); sums to 1 over the batch."""
    counts = torch.bincount(assign, minlength=num_clusters).to(cluster_weights.dtype)
    present_mass = (cluster_weights * (counts > 0)).sum()
    return cluster_weights[assign] / (counts[assign] * present_mass)


class DoGraphMixer(Mixer):
    """Model-centric domains as graph nodes, weighted by an auxiliary objective.

    ``DOMAIN`` labels are read only for diagnostics (the cluster-vs-domain table).
    """

    requires = frozenset({Signal.GRAD_PROJ, Signal.DOMAIN})

    def __init__(self, *, num_clusters: int, objective: Callable[..., Objective], projection: KroneckerProjector,
                 buffer_size: int = 4096, recluster_every: int | None = None, ema_beta: float = 0.9,
                 kmeans_iterations: int = 3, kmeans_warm_iterations: int = 1, kmeans_restarts: int = 3,
                 cluster_on: str = "direction",
                 domains: Sequence[str] = (), natural_mixture: Sequence[float] = (),
                 dist: DistContext | None = None, seed: int = 0) -> None:
        if num_clusters < 1:
            raise ConfigError(f"m must be >= 1 (got {num_clusters})")
        if buffer_size < num_clusters:
            raise ConfigError(f"m={num_clusters} is larger than mixer.buffer_size={buffer_size}: K-means needs "
                              "at least m buffered gradients (lower m or raise mixer.buffer_size)")
        if recluster_every is not None and recluster_every < 1:
            raise ConfigError(f"mixer.recluster_every must be >= 1 or null (got {recluster_every})")
        if not 0.0 <= ema_beta < 1.0:
            raise ConfigError(f"mixer.ema_beta must be in [0, 1) (got {ema_beta})")
        if cluster_on not in ("raw", "direction"):
            raise ConfigError(f"mixer.cluster_on must be raw or direction (got {cluster_on!r})")
        self.cluster_on = cluster_on
        self.m, self.buffer_size, self.recluster_every = num_clusters, buffer_size, recluster_every
        self.ema_beta, self.domains = ema_beta, list(domains)
        self.dist = dist or DistContext()
        self.objective = objective(num_clusters=num_clusters)
        self._projector = projection
        self.clusterer = KMeansClusterer(num_clusters, niter=kmeans_iterations, niter_warm=kmeans_warm_iterations,
                                         nredo_first=kmeans_restarts, seed=seed)
        self.buffer: ProjectionBuffer | None = None
        self.stats: ClusterStatistics | None = None
        self.w_prev = np.full(num_clusters, 1.0 / num_clusters)
        self.last_refresh_step = -1
        self.history = MixerHistory()
        self._announced_warmup = False

    @property
    def projector(self) -> KroneckerProjector:
        return self._projector

    # ---- the step ------------------------------------------------------------------------
    def weigh(self, signals: StepSignals) -> MixerOutput:
        if signals.grad_proj is None:
            raise RuntimeError("DoGraphMixer.weigh needs projected gradients (Signal.GRAD_PROJ)")
        g = all_gather_cat(self.dist, signals.grad_proj.float())  # [B, k]
        loss = all_gather_cat(self.dist, signals.loss.float())
        domain = None if signals.domain is None else all_gather_cat(self.dist, signals.domain)
        if self.dist.is_main:
            weights, skip, metrics = self._weigh_global(signals.step, g, loss, domain)
        else:
            weights, skip, metrics = torch.zeros_like(loss), False, {}
        if self.dist.enabled:
            packed = broadcast(self.dist, torch.cat([weights, torch.tensor([float(skip)], device=weights.device)]))
            weights, skip = packed[:-1], bool(packed[-1].item())
        b = signals.loss.shape[0]
        local = weights[self.dist.rank * b:(self.dist.rank + 1) * b]
        return MixerOutput(sample_weights=None if skip else local, skip_step=skip, metrics=metrics)

    def _ensure_state(self, g: Tensor) -> None:
        if self.buffer is None:
            self.buffer = ProjectionBuffer(self.buffer_size, g.shape[1], device=g.device)
            self.stats = ClusterStatistics(self.m, g.shape[1], beta=self.ema_beta, device=g.device)
        if self.buffer.device != g.device:  # restored from a checkpoint on the CPU
            self.buffer.to(g.device)
            self.stats.to(g.device)
        if self.recluster_every is None:  # our choice (DESIGN 2.2): one pass over the buffer
            self.recluster_every = max(1, self.buffer_size // g.shape[0])

    def _weigh_global(self, step: int, g: Tensor, loss: Tensor, domain: Tensor | None
                      ) -> tuple[Tensor, bool, dict[str, Any]]:
        self._ensure_state(g)
        started = time.perf_counter()
        fitted = self.clusterer.centroids is not None
        finite = torch.isfinite(g).all() & torch.isfinite(loss).all()
        if fitted:
            assign = self.clusterer.assign(self._cluster_space(torch.nan_to_num(g)))
            saved = self.stats.state_dict()
            self.stats.update(torch.nan_to_num(g), assign, torch.nan_to_num(loss))
            host = self._to_host(finite, g, assign, domain)  # the step's one host synchronisation
            ok = bool(host["finite"])
        else:
            ok = bool(finite.item())
        if not ok:
            if fitted:
                self.stats.load_state_dict(saved)
            log.warning("DoGraph: non-finite projected gradient or loss at step %d: step skipped", step)
            return torch.zeros_like(loss), True, {"mixer/skipped_nonfinite": 1.0}
        self.buffer.push(g, domain)
        metrics: dict[str, Any] = {"mixer/buffer_fill": len(self.buffer) / self.buffer_size}
        metrics.update(self._maybe_refresh(step))
        if not fitted:
            self._announce_warmup(g.shape[0])
            metrics["mixer/warmup"] = 1.0
            return torch.full_like(loss, 1.0 / len(loss)), False, metrics
        cluster_time = time.perf_counter() - started
        result = self.objective.solve(self._objective_inputs(host), self.w_prev, step=step)
        self.w_prev = result.weights
        w = torch.as_tensor(result.weights, dtype=torch.float32).to(g.device, non_blocking=True)
        self.history.record_step(step, result.weights, host["sizes"], result.value, result.fallback,
                                 host["assign"], host["domain"])
        metrics.update({"mixer/warmup": 0.0, "mixer/weights": result.weights.tolist(),
                        "mixer/cluster_sizes": host["sizes"].tolist(), "mixer/objective_value": result.value,
                        "mixer/fallback": float(result.fallback), "mixer/time_solve_s": result.solve_seconds,
                        "mixer/time_cluster_s": cluster_time})
        return per_sample_weights(w, assign, self.m), False, metrics

    def _to_host(self, finite: Tensor, g: Tensor, assign: Tensor, domain: Tensor | None) -> dict[str, Any]:
        """Everything the solve and the history need, in one device-to-host copy."""
        s, m, k = self.stats, self.m, g.shape[1]
        labels = domain if domain is not None else torch.full_like(assign, -1)
        parts = [finite.float().view(1), s.counts, s.variances, s.variance_known.float(), s.losses, s.active.float(),
                 s.batch_counts.float(),
                 s.means.flatten(), g.mean(0), cosine_adjacency(s.means, s.active).flatten(),
                 assign.float(), labels.float()]
        flat = torch.cat([p.float().reshape(-1) for p in parts]).cpu().double().numpy()
        sizes = [1, m, m, m, m, m, m, m * k, k, m * m, len(assign), len(assign)]
        names = ["finite", "counts", "variances", "variance_known", "losses", "active", "sizes", "means", "mean_grad",
                 "adjacency", "assign", "domain"]
        out = dict(zip(names, np.split(flat, np.cumsum(sizes)[:-1]), strict=True))
        out["finite"], out["active"] = out["finite"][0] > 0.5, out["active"] > 0.5
        out["means"], out["adjacency"] = out["means"].reshape(m, k), out["adjacency"].reshape(m, m)
        for key in ("sizes", "assign", "domain"):
            out[key] = out[key].astype(np.int64)
        return out

    @staticmethod
    def _objective_inputs(host: dict[str, Any]) -> ObjectiveInputs:
        """The solve's inputs; a cluster never seen with two samples gets the mean known variance (our choice)."""
        known = host["variance_known"] > 0.5
        variances = np.where(known, host["variances"], host["variances"][known].mean() if known.any() else 1.0)
        return ObjectiveInputs(counts=host["counts"], means=host["means"], variances=variances,
                               losses=host["losses"], adjacency=host["adjacency"], mean_grad=host["mean_grad"],
                               active=host["active"])

    def _announce_warmup(self, batch: int) -> None:
        if not self._announced_warmup:
            steps = -(-self.buffer_size // batch)
            log.info("DoGraph warm-up: uniform weights until the buffer holds %d projected gradients (%d steps)",
                     self.buffer_size, steps)
            self._announced_warmup = True

    # ---- K-means refreshes ---------------------------------------------------------------------
    def _cluster_space(self, g: Tensor) -> Tensor:
        """What K-means sees: the projected gradients, or their directions (``cluster_on=direction``)."""
        if self.cluster_on == "raw":
            return g
        return g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def _maybe_refresh(self, step: int) -> dict[str, Any]:
        due = self.clusterer.centroids is None or step - self.last_refresh_step >= self.recluster_every
        if not (self.buffer.is_full and due):
            return {}
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
                  "ari": agreement.ari, "nmi": agreement.nmi, "contingency": agreement.table.tolist()}
        self.history.refreshes.append(record)
        return {"mixer/refresh/step": float(step), "mixer/refresh/drift": refresh.drift,
                "mixer/refresh/ari": agreement.ari, "mixer/refresh/nmi": agreement.nmi,
                "mixer/refresh/contingency": record["contingency"], "mixer/time_kmeans_s": refresh.seconds}

    # ---- state and reports -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"buffer": None if self.buffer is None else self.buffer.state_dict(),
                "stats": None if self.stats is None else self.stats.state_dict(),
                "clusterer": self.clusterer.state_dict(), "w_prev": self.w_prev.copy(),
                "last_refresh_step": self.last_refresh_step, "recluster_every": self.recluster_every,
                "history": self.history.state_dict(), "projector_seed": self._projector.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["projector_seed"] != self._projector.seed:
            raise ConfigError(f"the checkpoint's projection seed {state['projector_seed']} differs from this "
                              f"run's {self._projector.seed}: resume with the same seed")
        if state["buffer"] is not None:
            dim = state["buffer"]["data"].shape[1]
            self.buffer = ProjectionBuffer(self.buffer_size, dim)
            self.buffer.load_state_dict(state["buffer"])
            self.stats = ClusterStatistics(self.m, dim, beta=self.ema_beta)
            self.stats.load_state_dict(state["stats"])
        self.clusterer.load_state_dict(state["clusterer"])
        self.w_prev = np.asarray(state["w_prev"], dtype=np.float64)
        self.last_refresh_step, self.recluster_every = state["last_refresh_step"], state["recluster_every"]
        self.history.load_state_dict(state["history"])

    def save_artifacts(self, out_dir: Path) -> None:
        self.history.save(out_dir)

    def summary(self) -> dict[str, Any]:
        if not self.history.steps:
            return {"DoGraph": f"still in warm-up: the buffer of {self.buffer_size} gradients never filled"}
        out = {"DoGraph cluster weights (last step; n = EMA cluster size, L = EMA mean loss)":
               self._weights_table()}
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
        rows = [[f"cluster {k}", float(self.w_prev[k]), float(counts[k]), float(losses[k])] for k in range(self.m)]
        return markdown_table(["", "weight", "n", "L"], rows)
