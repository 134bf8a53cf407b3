"""DoGraph's clusters against the hidden and the given labels of a hidden_split run, at every kept checkpoint.

The claim the hidden_split scenario tests: DoGraph's model-centric clusters separate the two halves
of the merged domain (``code+latex``) that no label tells apart. At each checkpoint the run kept,
the model is rebuilt, the per-sample gradients of held-out windows are projected with the run's own
projector (``experiments.figure1.projected_gradients``: the hooks and projection of a training step),
put in the space K-means sees (unit rows under ``mixer.cluster_on=direction``) and assigned to the
checkpoint's nearest centroid (its mixer state), as DoGraph would assign those samples at that step.
The assignment is compared (ARI, NMI: ``dograph.method.graph.cluster_domain_agreement``) with

* the **given** labels: each window's domain as the run sees it (the merged domain is one label);
* the **hidden** labels: the same, the merged domain's windows labelled by their document's own domain
  (``dograph.data.planted.hidden_split``);
* the hidden labels **within the merged domain** alone (``split``): ARI 0 at chance (every window in one
  cluster included), 1 only when each half falls in one cluster of its own; a clean split into several
  clusters per half scores lower (3 + 2 pure clusters of 62 windows: 0.40), so beside it
  ``homogeneity_split`` (Rosenberg and Hirschberg, 2007: ``1 - H(half | cluster) / H(half)``), which is 1
  whenever no cluster mixes the halves however many clusters each half takes; it is not corrected for
  chance, so ``homogeneity_chance`` gives its mean over :data:`CHANCE_SHUFFLES` shuffles of the halves'
  labels among the same clusters (what clusters of these sizes score knowing nothing of the halves).

Windows (our choice): held-out documents only (the run's hold-out rule), each window inside one
document, spread over the documents: up to :data:`WINDOWS_PER_GROUP` per domain and per hidden half of
the merged domain, ``ceil(count / documents)`` from the start of each held-out document in index order.
Not the run's validation windows: those pack the first held-out documents one after another, and on
the embedded corpus the merged domain's 16 (even its first 256) all come from one or two code files,
which would leave nothing to split. ``windows``, ``merged_windows`` and ``merged_documents`` say how
many there were. Heavy (torch, the corpus, a model rebuild per checkpoint): imported only when a
hidden_split table is built; its rows are kept in the run's ``derived/`` and its record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from sklearn.metrics import homogeneity_score
from torch import Tensor

from dograph.config import RunConfig
from dograph.data.builder import corpus_tokenizer, plan_holdouts
from dograph.data.corpus import build_corpus, planted_directory
from dograph.data.packing import is_blank, spread_windows
from dograph.data.planted import hidden_split
from dograph.errors import DataError
from dograph.method.clustering import KMeansClusterer
from dograph.method.graph import cluster_domain_agreement
from dograph.train.checkpoint import load_checkpoint, model_weights
from experiments.figure1 import projected_gradients, unit_rows
from experiments.run_files import checkpoints_of, load_run_config, rebuild_model

WINDOWS_PER_GROUP = 32
COLUMNS = ["step", "windows", "merged_windows", "merged_documents", "clusters_in_merged", "ari_hidden", "nmi_hidden",
           "ari_given", "nmi_given", "ari_split", "nmi_split", "homogeneity_split", "homogeneity_chance"]
CHANCE_SHUFFLES = 200  # permutations of the halves' labels for homogeneity_chance (seeded: rebuilds are identical)


@dataclass(frozen=True)
class LabelledWindows:
    """Held-out windows of every domain with their given and hidden label ids."""

    windows: Tensor  # [N, T+1] int64
    given: np.ndarray  # [N] index into given_names (the run's domains)
    hidden: np.ndarray  # [N] index into hidden_names (the merged domain replaced by its hidden labels)
    merged: np.ndarray  # [N] bool: a window of the merged domain
    merged_documents: int  # held-out documents of the merged domain the windows come from
    given_names: list[str]
    hidden_names: list[str]


def labelled_windows(cfg: RunConfig, per_group: int = WINDOWS_PER_GROUP) -> tuple[LabelledWindows, Any]:
    """The windows a hidden_split run's clusters are compared on, and the run's tokenizer (same caches: same text)."""
    cache = Path(cfg.paths.cache_dir)
    corpus = build_corpus(cfg.dataset, cache)
    tokenizer = corpus_tokenizer(cfg.dataset, corpus, cfg.tokenizer, cache)
    holdouts = plan_holdouts(cfg.dataset, corpus, tokenizer, cfg.trainer.seq_len)
    if holdouts is None:
        raise DataError("a planted corpus has no separate validation split: its hold-out cannot be None")
    split = hidden_split(planted_directory(cfg.dataset, cache))
    others = [d for d in corpus.domains if d != split.domain]
    hidden_names = [*others, *split.labels]
    parts, given, hidden, documents = [], [], [], 0
    for i, (domain, source) in enumerate(zip(corpus.domains, corpus.train, strict=True)):
        rule = holdouts[i].rule
        held = [(index, text) for index, text in enumerate(source.documents()) if rule(index) and not is_blank(text)]
        if domain == split.domain:
            groups = [([t for j, t in held if split.of_document[j] == k], len(others) + k)
                      for k in range(len(split.labels))]
        else:
            groups = [([t for _, t in held], others.index(domain))]
        for texts, label in groups:
            windows, used = spread_windows(texts, tokenizer, cfg.trainer.seq_len, per_group)
            parts.append(windows)
            given.append(np.full(len(windows), i))
            hidden.append(np.full(len(windows), label))
            documents += used if domain == split.domain else 0
    given_ids = np.concatenate(given).astype(np.int64)
    return LabelledWindows(torch.cat(parts), given_ids, np.concatenate(hidden).astype(np.int64),
                           given_ids == corpus.domains.index(split.domain), documents, list(corpus.domains),
                           hidden_names), tokenizer


def assign_to_centroids(grads: np.ndarray, mixer_state: dict[str, Any]) -> np.ndarray | None:
    """Each projected gradient's nearest centroid of the checkpoint's mixer state (None before the first K-means)."""
    saved = mixer_state.get("clusterer") or {}
    centroids = saved.get("centroids")
    if centroids is None:
        return None
    if (mixer_state.get("settings") or {}).get("cluster_on", "direction") == "direction":
        grads = unit_rows(grads)
    clusterer = KMeansClusterer(centroids.shape[0], seed=int(saved["seed"]))
    clusterer.load_state_dict(saved)
    return clusterer.assign(torch.as_tensor(grads, dtype=centroids.dtype)).numpy()


def agreement_row(step: int, assign: np.ndarray, labelled: LabelledWindows, clusters: int) -> dict[str, Any]:
    """ARI and NMI of ``assign`` against the given, the hidden, and within the merged domain the hidden labels."""
    inside = labelled.merged
    given = cluster_domain_agreement(assign, labelled.given, clusters, len(labelled.given_names))
    hidden = cluster_domain_agreement(assign, labelled.hidden, clusters, len(labelled.hidden_names))
    split = cluster_domain_agreement(assign[inside], labelled.hidden[inside], clusters, len(labelled.hidden_names))
    halves, clusters_inside = labelled.hidden[inside], assign[inside]
    both = len(set(halves.tolist())) > 1  # with one half present, homogeneity is 1 trivially
    homogeneity = float(homogeneity_score(halves, clusters_inside)) if both else float("nan")
    shuffles = np.random.default_rng(0)
    chance = float(np.mean([homogeneity_score(shuffles.permutation(halves), clusters_inside)
                            for _ in range(CHANCE_SHUFFLES)])) if both else float("nan")
    return {"step": step, "windows": len(assign), "merged_windows": int(inside.sum()),
            "merged_documents": labelled.merged_documents, "clusters_in_merged": len(set(assign[inside].tolist())),
            "ari_hidden": hidden.ari, "nmi_hidden": hidden.nmi, "ari_given": given.ari, "nmi_given": given.nmi,
            "ari_split": split.ari, "nmi_split": split.nmi, "homogeneity_split": homogeneity,
            "homogeneity_chance": chance}


def cluster_agreement(run_dir: Path, per_group: int = WINDOWS_PER_GROUP) -> pd.DataFrame | None:
    """One row per kept checkpoint with K-means centroids (:data:`COLUMNS`); None when there is nothing to compare
    (no checkpoint, not a DoGraph run on a hidden_split corpus, or K-means never ran)."""
    kept = checkpoints_of(run_dir)
    if not kept:
        return None
    cfg = load_run_config(run_dir)
    if not isinstance(cfg.mixer, dict) or "projection" not in cfg.mixer or \
            cfg.dataset.planted.scenario != "hidden_split":
        return None
    labelled, tokenizer = labelled_windows(cfg, per_group)
    projector = instantiate(cfg.mixer["projection"])
    rows = []
    for step, path in kept:
        state = load_checkpoint(path).get("mixer") or {}
        if (state.get("clusterer") or {}).get("centroids") is None:
            continue
        model = rebuild_model(cfg, tokenizer, model_weights(path))
        grads = projected_gradients(model, projector, labelled.windows).numpy().astype(np.float64)
        assign = assign_to_centroids(grads, state)
        rows.append(agreement_row(step, assign, labelled, int(state["clusterer"]["centroids"].shape[0])))
    return pd.DataFrame(rows, columns=COLUMNS) if rows else None
