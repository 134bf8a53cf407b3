"""Per-cluster statistics, the domain graph and cluster/domain agreement (docs/design.md sections 2.3, 2.6).

``ClusterStatistics`` keeps, per model-centric domain k, exponential moving averages over
steps (beta = 0.9) of the count n_k, the projected mean gradient mu_k, the intra-cluster
variance s2_k and the mean loss L_k, so that a cluster missing from a batch still has
statistics. ``update`` runs every step on the batch's device with ``index_add_`` only: no
Python loop over samples or clusters, no host synchronisation.

The graph has the clusters as nodes and edges A_kl = max(0, cos(mu_k, mu_l)); its
Laplacian D - A gives the smoothness penalty w^T Lap w of the objectives (docs/design.md section 2.4).
``cluster_domain_agreement`` compares clusters with human domain labels once per refresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import Tensor

__all__ = ["Agreement", "ClusterStatistics", "cluster_domain_agreement", "cosine_adjacency", "laplacian"]

_STATE_TENSORS = ("counts", "means", "variances", "losses", "active", "variance_known", "batch_counts")


def _batch_statistics(proj: Tensor, assign: Tensor, loss: Tensor, m: int) -> tuple[Tensor, ...]:
    """Per-cluster count [m], mean [m, dim], variance [m] and mean loss [m] of one batch.

    The variance is sum ||g_i - mean_k||^2 / (n_k - 1) around the *batch's own* cluster
    mean (our choice: the within-batch spread, not inflated by how far the cluster's EMA
    mean lags behind; unbiased, and only folded in where n_k >= 2, since one sample says
    nothing about spread and a variance of 0 would hand the ``uncertainty`` objective's
    w ~ 1/s2 to any singleton). Clusters absent from the batch get zeros (never read:
    ``_fold`` keeps their old values).
    """
    counts = torch.zeros(m, dtype=proj.dtype, device=proj.device).index_add_(0, assign, torch.ones_like(loss))
    denom = counts.clamp_min(1.0)
    means = torch.zeros(m, proj.shape[1], dtype=proj.dtype, device=proj.device).index_add_(0, assign, proj)
    means = means / denom[:, None]
    resid = proj - means[assign]
    sq = (resid * resid).sum(1)
    variances = torch.zeros_like(counts).index_add_(0, assign, sq) / (counts - 1.0).clamp_min(1.0)
    losses = torch.zeros_like(counts).index_add_(0, assign, loss) / denom
    return counts, means, variances, losses


class ClusterStatistics:
    """EMA statistics per cluster (docs/design.md section 2.3); tensors follow the inputs' device (or ``to``).

    For a cluster in the batch: stat <- beta * stat + (1 - beta) * batch_stat, except the
    first time it is seen, when stat <- batch_stat (our choice: decaying from zero would
    shrink mu_k, s2_k and L_k by (1 - beta) = 0.1 at first sight, which the objectives
    would read as a near-zero variance or loss). A cluster absent from the batch keeps mu,
    s2 and L, and its count decays: n_k <- beta * n_k. Statistics are float32 (our choice:
    the projections are float32 and m x dim is small).
    """

    def __init__(
        self, num_clusters: int, dim: int, *, beta: float = 0.9, device: torch.device | str | None = None
    ) -> None:
        if num_clusters < 1 or dim < 1 or not 0.0 <= beta < 1.0:
            raise ValueError(
                f"ClusterStatistics needs m, dim >= 1 and 0 <= beta < 1, got {num_clusters=} {dim=} {beta=}"
            )
        self.num_clusters, self.dim, self.beta = int(num_clusters), int(dim), float(beta)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        """Forget everything (e.g. after cluster ids change meaning)."""
        m, kw = self.num_clusters, {"dtype": torch.float32, "device": self._device}
        self.counts = torch.zeros(m, **kw)
        self.means = torch.zeros(m, self.dim, **kw)
        self.variances = torch.zeros(m, **kw)
        self.losses = torch.zeros(m, **kw)
        self.active = torch.zeros(m, dtype=torch.bool, device=self._device)
        self.variance_known = torch.zeros(m, dtype=torch.bool, device=self._device)  # seen with n_k >= 2
        self.batch_counts = torch.zeros(m, dtype=torch.int64, device=self._device)
        self.batch_means = torch.zeros(m, self.dim, **kw)  # the last batch's per-cluster means (not state)

    def reset_clusters(self, clusters: list[int] | tuple[int, ...]) -> None:
        """Forget the statistics of ``clusters`` (a re-seeded centroid is a new domain, docs/design.md section 2.5)."""
        if not clusters:
            return
        idx = torch.as_tensor(list(clusters), dtype=torch.long, device=self._device)
        for name in ("counts", "variances", "losses"):
            getattr(self, name)[idx] = 0.0
        self.means[idx] = 0.0
        self.active[idx] = False
        self.variance_known[idx] = False

    def update(self, proj: Tensor, assign: Tensor, loss: Tensor) -> None:
        """Fold one batch in: ``proj`` [b, dim], ``assign`` [b] int64 cluster ids, ``loss`` [b]."""
        if proj.ndim != 2 or proj.shape[1] != self.dim or assign.shape != (proj.shape[0],):
            raise ValueError(
                f"update expects proj [b, {self.dim}] and assign/loss [b], got {tuple(proj.shape)}, "
                f"{tuple(assign.shape)}, {tuple(loss.shape)}"
            )
        if proj.device != self._device:
            self.to(proj.device)  # devices follow the inputs (a one-time move)
        proj, loss = proj.detach().float(), loss.detach().to(self.means).reshape(-1)
        counts, means, variances, losses = _batch_statistics(
            proj, assign.to(self._device), loss, self.num_clusters
        )
        present = counts > 0
        first = present & ~self.active
        seen = present & self.active
        b = self.beta
        self.counts = torch.where(first, counts, b * self.counts + (1.0 - b) * counts)
        self.means = _fold(self.means, means, first, seen, b)
        spread = counts >= 2
        self.variances = _fold(self.variances, variances, spread & ~self.variance_known,
                               spread & self.variance_known, b)
        self.variance_known = self.variance_known | spread
        self.losses = _fold(self.losses, losses, first, seen, b)
        self.active = self.active | present
        self.batch_counts = counts.to(torch.int64)
        self.batch_means = means

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: getattr(self, name).clone() for name in _STATE_TENSORS}
        state["beta"] = self.beta
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["means"].shape) != (self.num_clusters, self.dim):
            raise ValueError(
                f"statistics state has means of shape {tuple(state['means'].shape)}, "
                f"expected ({self.num_clusters}, {self.dim})"
            )
        self.beta = float(state["beta"])
        for name in _STATE_TENSORS:
            setattr(self, name, state[name].to(self._device).clone())

    def to(self, device: torch.device | str) -> ClusterStatistics:
        """Move every statistic to ``device`` (in place); returns self."""
        self._device = torch.device(device)
        for name in (*_STATE_TENSORS, "batch_means"):
            setattr(self, name, getattr(self, name).to(self._device))
        return self


def _fold(old: Tensor, new: Tensor, first: Tensor, seen: Tensor, beta: float) -> Tensor:
    """EMA step for rows in ``seen``, initialisation for rows in ``first``, others unchanged."""
    shape = (-1,) + (1,) * (old.ndim - 1)
    first, seen = first.view(shape), seen.view(shape)
    return torch.where(first, new, torch.where(seen, beta * old + (1.0 - beta) * new, old))


def cosine_adjacency(means: Tensor, active: Tensor, eps: float = 1e-12) -> Tensor:
    """A [m, m] with A_kl = max(0, cos(mu_k, mu_l)) for k != l (docs/design.md section 2.3).

    Zero on the diagonal and on the rows/columns of inactive clusters; a zero-norm mean
    has no edges (its direction is undefined), without NaN. Symmetric by construction.
    """
    unit = means / means.norm(dim=1, keepdim=True).clamp_min(eps)
    cos = unit @ unit.T
    adj = (0.5 * (cos + cos.T)).clamp(0.0, 1.0)
    keep = active[:, None] & active[None, :]
    keep = keep & ~torch.eye(means.shape[0], dtype=torch.bool, device=means.device)
    return torch.where(keep, adj, torch.zeros_like(adj))


def laplacian(adjacency: Tensor) -> Tensor:
    """Graph Laplacian D - A (D: diagonal of row sums); PSD for a symmetric A >= 0."""
    return torch.diag(adjacency.sum(1)) - adjacency


@dataclass(frozen=True)
class Agreement:
    """Clusters vs human domains over the labelled rows (docs/design.md section 2.6).

    ``table``: [m, D] contingency counts (rows: clusters, columns: domains). ``ari``/``nmi``:
    adjusted Rand index and normalised mutual information (scikit-learn, arithmetic mean);
    NaN when no row is labelled (our choice: no evidence either way).
    """

    table: np.ndarray
    ari: float
    nmi: float
    num_labelled: int


def cluster_domain_agreement(
    assign: np.ndarray | Tensor, domain: np.ndarray | Tensor, num_clusters: int, num_domains: int
) -> Agreement:
    """Contingency table, ARI and NMI of cluster ids vs human domain ids; label -1 ignored."""
    a = np.asarray(assign.detach().cpu() if isinstance(assign, Tensor) else assign, dtype=np.int64).ravel()
    d = np.asarray(domain.detach().cpu() if isinstance(domain, Tensor) else domain, dtype=np.int64).ravel()
    if a.shape != d.shape:
        raise ValueError(f"assign and domain must have the same length, got {a.shape[0]} and {d.shape[0]}")
    keep = d >= 0
    a, d = a[keep], d[keep]
    if a.size and (a.min() < 0 or a.max() >= num_clusters or d.max() >= num_domains):
        raise ValueError(
            f"cluster ids must lie in [0, {num_clusters}) and domain ids in [-1, {num_domains}); "
            f"got clusters in [{a.min()}, {a.max()}], domains up to {d.max()}"
        )
    table = np.bincount(a * num_domains + d, minlength=num_clusters * num_domains)
    table = table.reshape(num_clusters, num_domains)
    if not a.size:
        return Agreement(table=table, ari=float("nan"), nmi=float("nan"), num_labelled=0)
    ari = float(adjusted_rand_score(d, a))
    nmi = float(normalized_mutual_info_score(d, a))
    return Agreement(table=table, ari=ari, nmi=nmi, num_labelled=int(a.size))
