"""K-means into model-centric domains (docs/design.md section 2.2), with FAISS.

``KMeansClusterer.fit`` clusters the projected-gradient buffer every ``recluster_every``
steps: several k-means++ restarts the first time, then warm starts from the previous
centroids. New centroids are matched to the old ones (Hungarian on squared centroid
distance) so a cluster keeps its id across refreshes. ``assign`` maps a batch to its
nearest centroid with torch on the batch's device, without a host synchronisation.

Traps handled (docs/design.md section 6): ``faiss.Kmeans`` subsamples to ``max_points_per_centroid``
(256) points per cluster unless told otherwise, so it is set to the number of points;
``faiss.Kmeans(gpu=True)`` silently runs on the CPU without a GPU, so the path is
decided here and recorded in ``ClusterRefresh.backend``.

Defaults (our choice), tuned on the 2-core CPU for a 4096 x 1024 buffer and m = 11
against docs/design.md section 5 (cold <= 50 ms, warm <= 10 ms); one Lloyd iteration there costs about
2.5-3.5 ms (memory-bound: each reads the 16 MiB buffer):

* first fit: ``nredo_first = 3`` restarts from k-means++ seeding, ``niter = 3`` iterations
  each, the best objective kept. On clustered data (7 unequal Gaussian sources, m = 11),
  against a best-of-10, 30-iteration fit: k-means++ was 2.0% above it where random
  seeding was 4.3% (well separated sources: local minima dominate), and 3 iterations
  instead of 5 added under 0.2% (0.36% vs 0.15% above it, weakly separated sources).
  Measured: median 37-39 ms (p90 46 ms).
* warm refresh: ``niter_warm = 1`` iteration from the previous centroids (a refresh sees a
  fresh buffer from a slowly moving distribution, and successive refreshes keep
  iterating). Objective within 0.1% of 2-3 warm iterations and on average within 1% of a
  cold fit (a test checks it). Measured: median 8 ms (p90 9 ms), including the exact
  re-assignment pass that counts empty clusters and the objective (about 2 ms). A refresh
  on which FAISS split a cluster adds one more pass (the vanished-region check).
* ``num_threads = None`` leaves FAISS's OpenMP pool as it is (2 threads here, faster than
  1 on an idle machine: cold 45 vs 54 ms at niter 5). Under CPU oversubscription
  OpenMP's spin-waits collapse: with another job on the 2 cores, cold fits (niter 5) took
  a median of 825 ms with 2 threads and 58 ms with 1, so set ``num_threads = 1`` where
  cores are shared.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = ["ClusterRefresh", "KMeansClusterer", "match_centroids", "matching_permutation", "squared_distances"]

logger = logging.getLogger(__name__)
FAISS_SEED_LIMIT = 2**31  # faiss.Kmeans takes its seed as a C int


@dataclass(frozen=True)
class ClusterRefresh:
    """What one K-means refresh did; logged per refresh (docs/design.md section 2.6).

    ``drift``: mean Euclidean distance moved per centroid after id matching (0 on the
    first fit). ``objective``: mean squared distance of a point to its nearest centroid.
    ``empty_clusters``: clusters with no point after FAISS, re-seeded from the farthest
    points. ``vanished``: previous ids that no buffered point is nearest to (their region
    left the buffer; FAISS splits another cluster into them during ``train``).
    ``reseeded``: every id, after matching, whose statistics must start afresh
    (docs/design.md section 2.2): the empty and vanished ones and any id whose new centroid
    is no longer nearest to its own previous centroid. ``backend``: "faiss-gpu" or
    "faiss-cpu", the path that actually ran.
    """

    centroids: Tensor
    drift: float
    seconds: float
    backend: str
    num_points: int
    empty_clusters: int
    objective: float
    warm_started: bool
    reseeded: tuple[int, ...] = ()
    vanished: tuple[int, ...] = ()


def squared_distances(x: Tensor, centroids: Tensor, x_sq: Tensor | None = None) -> Tensor:
    """[n, m] squared Euclidean distances ``||x||^2 - 2 x c^T + ||c||^2``, clamped at 0."""
    if x_sq is None:
        x_sq = torch.linalg.vector_norm(x, dim=1).square()
    c_sq = (centroids * centroids).sum(1)
    return torch.addmm(x_sq[:, None] + c_sq, x, centroids.T, alpha=-2.0).clamp_min_(0.0)


def matching_permutation(old: Tensor, new: Tensor) -> Tensor:
    """``perm`` [m] such that ``new[perm][k]`` is the centroid matched to ``old[k]``.

    Hungarian algorithm (scipy ``linear_sum_assignment``) on the squared-distance matrix
    (docs/design.md section 2.2).
    """
    cost = ((old.double()[:, None, :] - new.double()[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(cols[np.argsort(rows)], device=new.device)


def match_centroids(old: Tensor, new: Tensor) -> tuple[Tensor, float]:
    """Reorder ``new`` [m, dim] so row k is the centroid matched to ``old[k]``.

    Returns the reordered centroids and the mean distance moved per centroid.
    """
    matched = new[matching_permutation(old, new)]
    drift = float((matched.double() - old.double()).norm(dim=1).mean())
    return matched, drift


def _reseed_empty(x: Tensor, x_sq: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor, float]:
    """Give each cluster with no point one of the farthest points (deterministic).

    Points are taken in decreasing distance to their nearest centroid, ties by index (our
    choice: a farthest point is the worst-served one, and the rule needs no RNG). ``x_sq``:
    squared row norms of ``x``. Returns the centroids, the [m] bool mask of the re-seeded
    ones and the objective (mean squared distance to the nearest centroid).
    """
    m = centroids.shape[0]
    d_min, nearest = squared_distances(x, centroids, x_sq).min(1)
    empty_mask = torch.bincount(nearest, minlength=m) == 0
    empty = torch.nonzero(empty_mask).flatten()
    num_empty = int(empty.numel())
    if num_empty:
        far = torch.argsort(d_min, descending=True, stable=True)[:num_empty]
        centroids = centroids.clone()
        centroids[empty] = x[far]
        d_min = squared_distances(x, centroids, x_sq).min(1).values
    return centroids, empty_mask, float(d_min.mean())


def _faiss_split(km: faiss.Kmeans) -> bool:
    """Whether FAISS split a cluster into an empty one during ``train`` (True when it does not say)."""
    stats = getattr(km, "iteration_stats", None)
    if not stats or "nsplit" not in stats[0]:
        return True
    return any(int(s["nsplit"]) > 0 for s in stats)


def _vanished(x: Tensor, x_sq: Tensor, prev: Tensor) -> Tensor:
    """[m] bool: previous centroids that no point of ``x`` is nearest to (one [n, m] distance pass).

    FAISS's first Lloyd step finds these empty and re-seeds each by splitting a large
    cluster, so after ``train`` nothing is empty although the region is gone.
    """
    nearest = squared_distances(x, prev, x_sq).argmin(1)
    return torch.bincount(nearest, minlength=prev.shape[0]) == 0


def _left_their_region(prev: Tensor, matched: Tensor) -> Tensor:
    """[m] bool: ids whose matched centroid is nearer to another previous centroid than to its own.

    Hungarian matching minimises the total distance, so after a split it can give the
    vanished id the continuation of a third cluster and that cluster's id the split-off
    half (1-D: old A=0, B=10, C=11, C vanishes, A splits: C gets B's centroid, B gets half
    of A). Such an id's statistics describe another region, so it starts afresh too.
    """
    own = torch.arange(prev.shape[0], device=prev.device)
    return squared_distances(matched, prev).argmin(1) != own


def _ids(mask: Tensor) -> tuple[int, ...]:
    return tuple(int(k) for k in torch.nonzero(mask).flatten().tolist())


def _faiss_gpu_available() -> bool:
    return torch.cuda.is_available() and faiss.get_num_gpus() > 0


class KMeansClusterer:
    """FAISS K-means with warm starts and stable cluster ids (docs/design.md sections 2.2, 5, 6).

    ``use_gpu``: None picks the FAISS GPU path when torch sees CUDA and FAISS was built
    with GPU support; True without such a GPU logs a warning and runs on the CPU (our
    choice: a config shared between machines should not crash on a CPU box; ``backend``
    tells which path ran). Each fit seeds FAISS with ``seed + num_fits`` (our choice:
    reproducible from ``state_dict`` and different restarts across refreshes).
    ``num_threads``: FAISS OpenMP threads during ``fit`` (None: FAISS's default), set and
    restored around the call. ``niter``, ``niter_warm``, ``nredo_first``: see the module doc.
    """

    def __init__(
        self,
        num_clusters: int,
        *,
        niter: int = 3,
        niter_warm: int = 1,
        nredo_first: int = 3,
        seed: int = 0,
        use_gpu: bool | None = None,
        num_threads: int | None = None,
    ) -> None:
        if num_clusters < 1 or niter < 1 or niter_warm < 1 or nredo_first < 1:
            raise ValueError(
                f"KMeansClusterer needs num_clusters, niter, niter_warm, nredo_first >= 1, got "
                f"{num_clusters=} {niter=} {niter_warm=} {nredo_first=}"
            )
        self.num_clusters = int(num_clusters)
        self.niter, self.niter_warm, self.nredo_first = int(niter), int(niter_warm), int(nredo_first)
        self.seed = int(seed)
        self.num_threads = num_threads
        self.num_fits = 0
        self._gpu = self._resolve_gpu(use_gpu)
        self._gpu_resources: Any = None
        self._centroids: Tensor | None = None
        self._c_sq: Tensor | None = None
        self._device: torch.device | None = None  # where centroids live: the last fit's input or to()

    @staticmethod
    def _resolve_gpu(use_gpu: bool | None) -> bool:
        available = _faiss_gpu_available()
        if use_gpu and not available:
            logger.warning("use_gpu=True but torch CUDA or faiss GPU support is missing: K-means runs on CPU")
        return available if use_gpu is None else bool(use_gpu) and available

    @property
    def backend(self) -> str:
        return "faiss-gpu" if self._gpu else "faiss-cpu"

    @property
    def centroids(self) -> Tensor | None:
        """[m, dim] float32 centroids, None before the first fit."""
        return self._centroids

    def fit(self, x: Tensor, *, warm_start: bool | None = None) -> ClusterRefresh:
        """Cluster ``x`` [n, dim] (n >= m) and keep ids matched to the previous centroids.

        ``warm_start``: None warm-starts whenever previous centroids exist; False forces
        ``nredo_first`` restarts from k-means++ (ids are still matched). Moves ``x`` to the
        host once.
        """
        start = time.perf_counter()
        xd, x_sq = self._check_input(x)
        host = np.ascontiguousarray(xd.cpu().numpy())
        prev = self._centroids
        warm = prev is not None and warm_start is not False
        km = self._faiss_kmeans(host.shape[0], host.shape[1], warm)
        self._train(km, host, prev.cpu().numpy() if warm else None)
        centroids = torch.from_numpy(km.centroids).to(xd.device)
        centroids, reseeded, objective = _reseed_empty(xd, x_sq, centroids)
        empty = int(reseeded.sum())
        drift, vanished = 0.0, torch.zeros_like(reseeded)
        if prev is not None:
            prev = prev.to(xd.device)
            perm = matching_permutation(prev, centroids)
            centroids, reseeded = centroids[perm], reseeded[perm]
            drift = float((centroids.double() - prev.double()).norm(dim=1).mean())
            if _faiss_split(km):
                vanished = _vanished(xd, x_sq, prev)
            reseeded = reseeded | vanished | _left_their_region(prev, centroids)
        self._set_centroids(centroids)
        self._device = centroids.device
        self.num_fits += 1
        refresh = ClusterRefresh(
            centroids=centroids.clone(), drift=drift, seconds=time.perf_counter() - start,
            backend=self.backend, num_points=host.shape[0], empty_clusters=empty,
            objective=objective, warm_started=warm,
            reseeded=_ids(reseeded), vanished=_ids(vanished),
        )  # fmt: skip
        logger.debug(
            "k-means refresh %d (%s, warm=%s): %.1f ms, drift %.4g, objective %.4g, %d empty, re-seeded %s",
            self.num_fits, refresh.backend, warm, 1e3 * refresh.seconds, drift, objective, empty,
            refresh.reseeded,
        )  # fmt: skip
        return refresh

    def _check_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` as float32 and its squared row norms; clear errors for bad shapes or values."""
        if x.ndim != 2:
            raise ValueError(f"K-means expects a 2-D tensor [n, dim], got shape {tuple(x.shape)}")
        n, m = x.shape[0], self.num_clusters
        if n < m:
            raise ValueError(f"K-means with {m} clusters needs at least {m} points, got {n}")
        if self._centroids is not None and self._centroids.shape[1] != x.shape[1]:
            raise ValueError(
                f"K-means input has dim {x.shape[1]}, the centroids have {self._centroids.shape[1]}"
            )
        xd = x.detach().float()
        x_sq = torch.linalg.vector_norm(xd, dim=1).square()  # also the finiteness check
        if not bool(torch.isfinite(x_sq).all()):
            raise ValueError("K-means input contains NaN, infinite or overflowing values")
        return xd, x_sq

    def _faiss_kmeans(self, n: int, dim: int, warm: bool) -> faiss.Kmeans:
        """The FAISS object for one fit; ``max_points_per_centroid = n`` so nothing is subsampled."""
        km = faiss.Kmeans(
            dim, self.num_clusters,
            niter=self.niter_warm if warm else self.niter,
            nredo=1 if warm else self.nredo_first,
            init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,  # our choice, see the module doc
            seed=(self.seed + self.num_fits) % FAISS_SEED_LIMIT,  # a C int in FAISS; run seeds go up to 2**32
            max_points_per_centroid=n,  # docs/design.md section 6: the default 256 would subsample the buffer
            min_points_per_centroid=1,  # our choice: silences faiss's "too few points" warning
            check_input_data_for_NaNs=False,  # checked in _check_input with a clear message
            verbose=False,
        )  # fmt: skip
        if self._gpu:
            km.index = self._gpu_index(dim)
        return km

    def _train(self, km: faiss.Kmeans, host: np.ndarray, init: np.ndarray | None) -> None:
        """``km.train``, with FAISS's OpenMP pool set to ``num_threads`` and restored after."""
        if self.num_threads is None:
            km.train(host, init_centroids=init)
            return
        saved = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(self.num_threads)
        try:
            km.train(host, init_centroids=init)
        finally:
            faiss.omp_set_num_threads(saved)

    def _gpu_index(self, dim: int) -> Any:
        if self._gpu_resources is None:
            self._gpu_resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(
            self._gpu_resources, torch.cuda.current_device(), faiss.IndexFlatL2(dim)
        )

    def _set_centroids(self, centroids: Tensor) -> None:
        self._centroids = centroids.float().contiguous()
        self._c_sq = (self._centroids * self._centroids).sum(1)

    def assign(self, x: Tensor) -> Tensor:
        """[b] int64 id of the nearest centroid of each row of ``x`` [b, dim]; no host sync.

        Computed as argmin of ``-2 x c^T + ||c||^2`` (``||x||^2`` is constant per row, so it
        is left out).
        """
        if self._centroids is None or self._c_sq is None:
            raise RuntimeError("KMeansClusterer.assign called before the first fit")
        c, c_sq = self._centroids, self._c_sq
        if c.device != x.device:
            c, c_sq = c.to(x.device), c_sq.to(x.device)
        return torch.addmm(c_sq, x.to(c.dtype), c.T, alpha=-2.0).argmin(1)

    def state_dict(self) -> dict[str, Any]:
        """Centroids, number of fits and seed: enough to continue exactly."""
        c = None if self._centroids is None else self._centroids.clone()
        return {"centroids": c, "num_fits": self.num_fits, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        c = state["centroids"]
        if c is not None and c.shape[0] != self.num_clusters:
            raise ValueError(f"state has {c.shape[0]} centroids, this clusterer has {self.num_clusters}")
        self.num_fits, self.seed = int(state["num_fits"]), int(state["seed"])
        if c is None:
            self._centroids = self._c_sq = None
        else:
            self._set_centroids(c.to(self._device) if self._device is not None else c)

    def to(self, device: torch.device | str) -> KMeansClusterer:
        """Move the centroids to ``device`` (in place); returns self."""
        self._device = torch.device(device)
        if self._centroids is not None:
            self._set_centroids(self._centroids.to(device))
        return self
