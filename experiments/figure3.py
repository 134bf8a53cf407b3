"""Figure 3: DoGraph's model-centric clusters against the human domains.

Read from the ablation setting's DoGraph run (same run as Figure 1):

(a) the agreement over training: at every K-means refresh (``mixer/refreshes.jsonl``) the
    adjusted Rand index and the normalised mutual information of the buffer's clusters
    against its human domain labels, and the row-normalised contingency (each cluster's
    share of each domain) at the first and at the last refresh;
(b) the buffer itself in 2-D: the projected gradients DoGraph clustered, taken from the mixer
    state of the latest checkpoint, in the space K-means sees (unit directions under
    ``mixer.cluster_on=direction``), assigned to the checkpoint's centroids, PCA to 2-D;
    colour = cluster, marker = human domain. A run without a checkpoint falls back to the
    clusters' domain profiles (rows of the last contingency) and the domains (the simplex's
    corners) embedded together by PCA.

Writes ``figure3.png``/``.pdf``, ``figure3_contingency.csv`` (one row per refresh, cluster and
domain: count, row share, ARI, NMI) and, with a checkpoint, ``figure3_buffer_points.csv``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dograph.method.buffer import ProjectionBuffer
from dograph.method.clustering import KMeansClusterer
from dograph.train.checkpoint import load_checkpoint
from experiments.artifact import NothingToPlot
from experiments.figure1 import pca_2d, unit_rows
from experiments.render import save_figure
from experiments.run_files import (
    ablation_dograph_request,
    checkpoint_points,
    checkpoints_of,
    domains_of_run,
    read_refreshes,
    run_and_record_of,
)
from experiments.scale import RunRequest, Scale

NAME = "figure3"
TITLE = "Figure 3: model-centric clusters vs human domains (agreement over training; the buffer in 2-D)"
MARKERS = "os^vDPX*<>hp8H+x"


def requests(scale: Scale) -> list[RunRequest]:
    return [ablation_dograph_request(scale)]


def contingency_frame(refreshes: list[dict[str, Any]], domains: list[str]) -> pd.DataFrame:
    """One row per refresh x cluster x domain: count, the cluster's share of it (row-normalised), ARI, NMI."""
    rows = []
    for order, record in enumerate(refreshes):
        table = np.asarray(record["contingency"], dtype=np.float64)
        totals = table.sum(axis=1, keepdims=True)
        shares = np.divide(table, totals, out=np.zeros_like(table), where=totals > 0)
        for k in range(table.shape[0]):
            for d, domain in enumerate(domains):
                rows.append({"refresh": order, "step": int(record["step"]), "cluster": k, "domain": domain,
                             "count": int(table[k, d]), "row_share": float(shares[k, d]),
                             "ari": record.get("ari"), "nmi": record.get("nmi")})
    return pd.DataFrame(rows)


def buffer_points(run_dir: Path, domains: list[str]) -> pd.DataFrame | None:
    """The latest checkpoint's buffer in K-means space, assigned to its centroids, PCA to 2-D (None if unavailable)."""
    kept = checkpoints_of(run_dir)
    if not kept:
        return None
    step, path = kept[-1]
    state = load_checkpoint(path).get("mixer") or {}
    if state.get("buffer") is None or (state.get("clusterer") or {}).get("centroids") is None:
        return None
    saved = state["buffer"]
    buffer = ProjectionBuffer(saved["data"].shape[0], saved["data"].shape[1])
    buffer.load_state_dict(saved)
    data, labels = buffer.data().double().numpy(), buffer.labels().numpy()
    if (state.get("settings") or {}).get("cluster_on", "direction") == "direction":
        data = unit_rows(data)
    centroids = state["clusterer"]["centroids"]
    clusterer = KMeansClusterer(centroids.shape[0], seed=int(state["clusterer"]["seed"]))
    clusterer.load_state_dict(state["clusterer"])
    cluster = clusterer.assign(torch.as_tensor(data, dtype=centroids.dtype)).numpy()
    coords, share = pca_2d(data)
    return pd.DataFrame({"step": step, "cluster": cluster, "domain": [domains[i] if i >= 0 else "?" for i in labels],
                         "pc1": coords[:, 0], "pc2": coords[:, 1], "pc1_share": share[0], "pc2_share": share[1]})


def _heatmap(ax: Any, frame: pd.DataFrame, domains: list[str], title: str) -> Any:
    table = frame.pivot(index="cluster", columns="domain", values="row_share")[domains].to_numpy()
    image = ax.imshow(table, vmin=0, vmax=1, cmap="Blues", aspect="auto")
    ax.set_xticks(range(len(domains)), domains, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(table.shape[0]), [f"c{k}" for k in range(table.shape[0])], fontsize=7)
    if table.size <= 200:
        for (k, d), value in np.ndenumerate(table):
            ax.text(d, k, f"{value:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if value > 0.6 else "black")
    ax.set_title(title, fontsize=9)
    return image


def _agreement(ax: Any, contingency: pd.DataFrame) -> None:
    per = contingency.drop_duplicates("refresh")
    ax.plot(per["step"], per["nmi"], "o-", label="NMI")
    ax.plot(per["step"], per["ari"], "s--", label="ARI")
    ax.set_xlabel("step (K-means refresh)")
    ax.set_ylabel("agreement with human domains")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("(a) clusters vs domains over training", fontsize=9)


def _scatter(ax: Any, points: pd.DataFrame, domains: list[str]) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    clusters = sorted(points["cluster"].unique())
    cmap = plt.get_cmap("tab10" if max(clusters) < 10 else "tab20")
    for d, domain in enumerate(domains):
        rows = points[points["domain"] == domain]
        ax.scatter(rows["pc1"], rows["pc2"], c=[cmap(k % cmap.N) for k in rows["cluster"]], s=16, alpha=0.8,
                   marker=MARKERS[d % len(MARKERS)], label=domain)
    ax.set_xlabel(f"PC1 ({points['pc1_share'].iloc[0]:.0%})")
    ax.set_ylabel(f"PC2 ({points['pc2_share'].iloc[0]:.0%})")
    ax.set_title(f"(b) buffer at step {int(points['step'].iloc[0])}: colour = cluster, marker = domain", fontsize=9)
    legend = ax.legend(fontsize=7, title="domain", title_fontsize=7, loc="upper left")
    for handle in legend.legend_handles:
        handle.set_color("grey")
    ax.add_artist(legend)
    keys = [Patch(color=cmap(k % cmap.N), label=f"c{k}") for k in clusters]
    ax.legend(handles=keys, fontsize=7, title="cluster", title_fontsize=7, loc="lower right")


def _profiles(ax: Any, contingency: pd.DataFrame, domains: list[str]) -> None:
    """Fallback for (b): the last refresh's cluster profiles and the domain corners, PCA to 2-D."""
    last = contingency[contingency["refresh"] == contingency["refresh"].max()]
    profiles = last.pivot(index="cluster", columns="domain", values="row_share")[domains].to_numpy()
    coords, _ = pca_2d(np.vstack([profiles, np.eye(len(domains))]))
    m = len(profiles)
    ax.scatter(coords[:m, 0], coords[:m, 1], s=40, c="tab:blue", label="cluster (domain profile)")
    ax.scatter(coords[m:, 0], coords[m:, 1], s=60, marker="*", c="tab:red", label="human domain")
    for d, domain in enumerate(domains):
        ax.annotate(domain, coords[m + d], fontsize=7)
    ax.legend(fontsize=7)
    ax.set_title("(b) clusters' domain profiles (last refresh), PCA", fontsize=9)


def draw(contingency: pd.DataFrame, points: pd.DataFrame | None, domains: list[str]) -> Any:
    """Panel (a): NMI/ARI per refresh and the first and last row-normalised contingency; panel (b): 2-D view."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.6), gridspec_kw={"width_ratios": [1.1, 1, 1, 1.3]},
                             layout="constrained")
    _agreement(axes[0], contingency)
    first, last = contingency["refresh"].min(), contingency["refresh"].max()
    for ax, which, name in ((axes[1], first, "first"), (axes[2], last, "last")):
        frame = contingency[contingency["refresh"] == which]
        image = _heatmap(ax, frame, domains, f"(a) {name} refresh (step {frame['step'].iloc[0]}): cluster rows "
                         "by domain")
    fig.colorbar(image, ax=axes[2], fraction=0.05, label="share of the cluster")
    if points is not None:
        _scatter(axes[3], points, domains)
    else:
        _profiles(axes[3], contingency, domains)
    fig.suptitle(TITLE, fontsize=10)
    return fig


def build(index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
    run_dir, record = run_and_record_of(index, ablation_dograph_request(scale))
    refreshes = read_refreshes(run_dir)
    if not refreshes:
        raise NothingToPlot(f"{run_dir} has no K-means refresh in mixer/refreshes.jsonl (not a DoGraph run, or "
                            "its buffer never filled: lower mixer.buffer_size or train longer)")
    domains = domains_of_run(run_dir, len(refreshes[0]["contingency"][0]))
    contingency = contingency_frame(refreshes, domains)
    points = checkpoint_points(run_dir, record, "figure3_buffer_points", lambda d: buffer_points(d, domains))
    data = {"contingency": contingency, **({"buffer_points": points} if points is not None else {})}
    return save_figure(draw(contingency, points, domains), out_dir, NAME, data)
