"""How well K-means clusters of projected per-sample gradients isolate a planted noise domain (issue 19, question 4).

Why: on the planted noise corpus (``dataset=planted dataset.planted.scenario=noise``: one extra domain of word
salad at 25% of the bytes) DoGraph's clusters mix the noise with every other domain (ARI about 0.1). This
asks whether the clusters *can* see that structure, and under which of DoGraph's settings: K-means on unit
directions or on raw projected gradients (``mixer.cluster_on``), the number of clusters ``m``, the
projection rank ``r`` and the buffer size ``N`` (the gradients one K-means fit sees), at each checkpoint the
run kept. Any run on the corpus will do (the model only has to be trained on it): nothing of the run's own
mixer state is used.

What, per kept checkpoint (``run_files.checkpoints_of``): the model is rebuilt (``run_files.rebuild_model``);
one pool of held-out windows (below) is projected at every rank with ``figure1.projected_gradients`` (the hooks
and projection of a training step) and a :class:`KroneckerProjector` per rank built like the run's
(a DoGraph run's ``cfg.mixer.projection``; any other run, e.g. Uniform, gets DoGraph's defaults,
``conf/mixer/dograph.yaml``: every Linear but ``lm_head``, float32, ``out_dim`` 1024, the run's seed) with
the rank varied and ``out_dim`` capped at ``r * r * layers`` (the blocks it compresses). The ranks share one
capturing backward (:class:`StackedProjection`: the same numbers as one backward per rank, up to float rounding, a
third of the cost; the backward is nearly all of it, about 85 ms a window on one shared CPU thread). Then for every
(``cluster_on``, ``m``, ``N``): :class:`KMeansClusterer` (the project's, its defaults: 3 k-means++ restarts of
3 Lloyd iterations, one FAISS thread) is fitted on the first ``N`` windows of a fixed shuffled order of the
pool, and assigns those same ``N``. Measures, of the assignment against the binary label planted-vs-rest
(:func:`isolation_measures`):

* ``ari``, ``nmi``: adjusted Rand index and normalised mutual information (sklearn's, arithmetic mean, via
  ``dograph.method.graph.cluster_domain_agreement``);
* ``isolated``: the share of the planted windows that lie in clusters at least :data:`PURITY` (80%) planted;
* ``best_f1``: the best F1 of one cluster as a detector of the planted domain, ``max_k 2 P_k / (n_k + P)``
  (``P_k`` planted windows among the ``n_k`` of cluster k, ``P`` in all);
* ``ari_domains``, ``nmi_domains``: the same assignment against every domain's label.

The windows (our choice): each domain's held-out documents (the run's hold-out rule, ``plan_holdouts``; blank
ones skipped) in index order, packed one after another into windows of ``seq_len + 1`` tokens as the run packs
its validation windows (``pack_validation_windows``: a window can span two documents of the same domain, never
two domains). A pool of ``max(buffer_sizes)`` windows is asked for, each domain's quota its natural share
(``corpus.natural_mixture``, the run's mixture under Uniform) rounded by largest remainder, and each domain
gives the first ``quota`` windows of its pack. A domain whose held-out text packs into fewer windows gives all
it has, so the pool is then smaller and the shares drift; ``pool_windows`` and ``pool_short`` (``domain taken
of wanted``) record it. The pool is shuffled once (``numpy`` PCG64, ``seed``) and a buffer of size ``N`` is the
first ``N`` of that order (all of the pool when it is smaller): so a buffer holds distinct windows, drawn
without replacement, in proportions close to the natural shares, as a run's recent batches do.
``windows``, ``planted_windows`` and ``windows_<domain>`` count what each buffer held. Why packed and not
``dograph.data.packing.spread_windows`` (windows each inside one document): on the embedded base most held-out
documents of ``informal``, ``noise`` and ``wiki`` are shorter than a window (median 36, 58 and 84 tokens at
``seq_len`` 128), so spread windows would give 54, 152 and 92 of the 142, 512 and 282 a 2048 pool wants.

CLI: ``python -m experiments.cluster_isolation RUN_DIR [--out DIR]`` writes ``cluster_isolation.csv`` and
``cluster_isolation.md`` (rows: step, cluster_on, rank; columns: m x N; cells ``isolated / ari``) into DIR
(default ``RUN_DIR/derived``). A run with ``derived/cluster_isolation.csv`` is not recomputed (the
``run_files.checkpoint_points`` cache of Figures 1 and 3) unless ``--recompute`` is given. Heavy (torch, the
corpus, a model rebuild per checkpoint): on one CPU thread about 3 minutes per checkpoint of a gpt2_tiny run at
the default grid (2048 windows of 128 tokens), K-means included (about 1 s of it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from dograph.config import RunConfig
from dograph.data.builder import corpus_tokenizer, plan_holdouts
from dograph.data.corpus import build_corpus
from dograph.data.packing import is_blank, pack_validation_windows
from dograph.method.clustering import KMeansClusterer
from dograph.method.graph import cluster_domain_agreement
from dograph.runs.app import method_name
from dograph.step.projection import BoundProjection, KroneckerProjector, LayerProjection, select_layers
from dograph.train.checkpoint import model_weights
from experiments.figure1 import projected_gradients, unit_rows
from experiments.index import DERIVED
from experiments.run_files import checkpoint_points, checkpoints_of, load_run_config, rebuild_model

NAME = "cluster_isolation"
PURITY = 0.8  # a cluster counts as the planted domain's when at least this share of it is planted
RANKS = (4, 8, 16)
CLUSTER_ON = ("direction", "raw")
M_VALUES = (3, 7, 11)
BUFFER_SIZES = (128, 512, 2048)
DEFAULT_OUT_DIM = 1024  # conf/mixer/dograph.yaml (and KroneckerProjector's default), for a run without a projection
MEASURES = ("ari", "nmi", "isolated", "best_f1", "ari_domains", "nmi_domains")


class NotMeasurable(ValueError):
    """The run has nothing to measure: no checkpoint, or not trained on a planted noise corpus."""


@dataclass(frozen=True)
class WindowPool:
    """Held-out windows of every domain in natural proportions, and the fixed shuffled order buffers take."""

    windows: Tensor  # [n, T+1] int64, domain by domain
    domain: np.ndarray  # [n] index into domains
    order: np.ndarray  # [n] a permutation: a buffer of size N is windows[order[:N]]
    domains: list[str]
    planted: int  # index of the planted domain
    wanted: list[int]  # per domain: its quota of the pool
    taken: list[int]  # per domain: the windows it gave (< wanted when its held-out text runs out)

    def short(self) -> str:
        """``domain taken of wanted`` for every domain that gave fewer windows than its quota, ``; ``-joined."""
        return "; ".join(f"{d} {t} of {w}" for d, t, w in zip(self.domains, self.taken, self.wanted, strict=True)
                         if t < w)


def require_noise(run_dir: Path, cfg: RunConfig) -> None:
    """:class:`NotMeasurable` unless the run was trained on a planted noise corpus."""
    if cfg.dataset.planted.scenario != "noise":
        raise NotMeasurable(f"{run_dir} is not on a planted noise corpus (dataset.planted.scenario="
                            f"{cfg.dataset.planted.scenario}; train with dataset=planted "
                            "dataset.planted.scenario=noise)")


def planted_domain(run_dir: Path, cfg: RunConfig, domains: Sequence[str]) -> str:
    """The run's planted noise domain: ``summary.json``'s ``planted.domain``, else the domain named ``noise``.

    :class:`NotMeasurable` when the run is not on a planted noise corpus.
    """
    require_noise(run_dir, cfg)
    summary = run_dir / "summary.json"
    named = (json.loads(summary.read_text()).get("planted") or {}).get("domain") if summary.exists() else None
    domain = named or "noise"
    if domain not in domains:
        raise NotMeasurable(f"{run_dir}: the planted domain {domain!r} is not among the corpus's domains "
                            f"{list(domains)}")
    return str(domain)


def quotas(shares: Sequence[float], total: int) -> list[int]:
    """``total`` split in proportion to ``shares`` (largest remainder: sums to ``total``, ties to the earlier)."""
    weights = np.asarray(shares, dtype=np.float64)
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    rest = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:rest]] += 1
    return counts.tolist()


def window_pool(run_dir: Path, cfg: RunConfig, size: int, seed: int = 0) -> tuple[WindowPool, Any]:
    """The pool of ``size`` held-out windows buffers are drawn from (module doc), and the run's tokenizer."""
    cache = Path(cfg.paths.cache_dir)
    corpus = build_corpus(cfg.dataset, cache)
    domains = list(corpus.domains)
    planted = domains.index(planted_domain(run_dir, cfg, domains))
    tokenizer = corpus_tokenizer(cfg.dataset, corpus, cfg.tokenizer, cache)
    holdouts = plan_holdouts(cfg.dataset, corpus, tokenizer, cfg.trainer.seq_len)
    if holdouts is None:
        raise NotMeasurable(f"{run_dir}: a planted corpus has no separate validation split, so no hold-out")
    wanted = quotas(list(corpus.natural_mixture), size)
    parts, labels = [], []
    for i, source in enumerate(corpus.train):
        rule = holdouts[i].rule
        held = (text for index, text in enumerate(source.documents()) if rule(index) and not is_blank(text))
        windows = pack_validation_windows(held, tokenizer, cfg.trainer.seq_len, wanted[i]) if wanted[i] else \
            torch.empty(0, cfg.trainer.seq_len + 1, dtype=torch.int64)
        parts.append(windows)
        labels.append(np.full(len(windows), i, dtype=np.int64))
    domain = np.concatenate(labels)
    order = np.random.default_rng(seed).permutation(len(domain))
    return WindowPool(torch.cat(parts), domain, order, domains, planted, wanted, [len(p) for p in parts]), tokenizer


def projection_settings(cfg: RunConfig) -> dict[str, Any]:
    """A DoGraph run's ``mixer.projection`` (without ``_target_``); DoGraph's defaults and the run's seed for any
    other run (DoGE's own ``mixer.projection``, which projects ``lm_head`` too, is not DoGraph's)."""
    dograph = isinstance(cfg.mixer, dict) and method_name(cfg) == "dograph"
    given = cfg.mixer.get("projection") if dograph else None
    settings = {"out_dim": DEFAULT_OUT_DIM, "include": ["*"], "exclude": ["lm_head"], "dtype": "float32",
                "seed": cfg.seed}
    settings.update({k: v for k, v in dict(given or {}).items() if k != "_target_"})
    return settings


def projector_for(cfg: RunConfig, rank: int, layers: int) -> KroneckerProjector:
    """The run's projector (:func:`projection_settings`) at ``rank``, ``out_dim`` capped at ``rank * rank * layers``."""
    settings = projection_settings(cfg)
    out_dim = settings["out_dim"]
    return KroneckerProjector(
        rank=rank, out_dim=None if out_dim is None else min(int(out_dim), rank * rank * layers),
        include=settings["include"], exclude=settings["exclude"], dtype=settings["dtype"],
        seed=int(settings["seed"]))  # fmt: skip


@dataclass(frozen=True)
class StackedProjection:
    """Bound projections that differ only in rank, as one projection whose layer matrices are theirs side by side.

    ``figure1.projected_gradients`` with it runs one capturing backward for every rank: a layer's block
    ``(Delta [R_1 .. R_j])^T (A [S_1 .. S_j])`` holds each rank's own block ``(Delta R_i)^T (A S_i)`` on its
    diagonal, so :meth:`split` reads them back and compresses each as that rank's projector does (the same
    numbers as projecting with each projector alone, up to float rounding; tested).
    """

    parts: tuple[BoundProjection, ...]

    @property
    def width(self) -> int:
        return sum(self.rank(part) for part in self.parts)

    @staticmethod
    def rank(part: BoundProjection) -> int:
        return part.layers[0].right.shape[1]

    def bind(self, model: nn.Module) -> BoundProjection:
        width = self.width
        layers = [LayerProjection(same[0].name, same[0].module, torch.cat([q.right for q in same], dim=1),
                                  torch.cat([q.left for q in same], dim=1), index * width * width)
                  for index, same in enumerate(zip(*(part.layers for part in self.parts), strict=True))]
        return BoundProjection(layers, None, len(layers) * width * width)

    def split(self, stacked: Tensor) -> list[Tensor]:
        """Each part's [n, k_i] projected gradients from the stacked ones [n, L * width^2]."""
        width, start, out = self.width, 0, []
        blocks = stacked.reshape(stacked.shape[0], -1, width, width)
        for part in self.parts:
            r = self.rank(part)
            out.append(part.finish(blocks[:, :, start:start + r, start:start + r].reshape(len(blocks), -1)))
            start += r
        return out


def projected_by_rank(model: nn.Module, projectors: Sequence[KroneckerProjector], windows: Tensor) -> list[Tensor]:
    """[n, k_i] projected per-sample gradients of ``windows`` under each projector, from one capturing backward."""
    stacked = StackedProjection(tuple(p.bind(model) for p in projectors))
    return stacked.split(projected_gradients(model, stacked, windows))  # type: ignore[arg-type]


def cluster(grads: np.ndarray, m: int, cluster_on: str, seed: int = 0) -> np.ndarray:
    """K-means ids [n] of the rows of ``grads`` [n, k]: fitted on them and assigned, on unit rows for
    ``direction`` and on the rows themselves for ``raw`` (``mixer.cluster_on``)."""
    if cluster_on not in CLUSTER_ON:
        raise ValueError(f"cluster_on must be one of {CLUSTER_ON}, got {cluster_on!r}")
    x = unit_rows(grads.astype(np.float64)) if cluster_on == "direction" else grads
    points = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    clusterer = KMeansClusterer(m, seed=seed, use_gpu=False, num_threads=1)
    clusterer.fit(points, warm_start=False)
    return clusterer.assign(points).numpy()


def isolation_measures(assign: np.ndarray, domain: np.ndarray, planted: int, num_clusters: int,
                       num_domains: int) -> dict[str, float]:
    """:data:`MEASURES` of cluster ids ``assign`` [n] against the planted-vs-rest label and the domain ids."""
    assign, domain = np.asarray(assign, dtype=np.int64), np.asarray(domain, dtype=np.int64)
    is_planted = (domain == planted).astype(np.int64)
    binary = cluster_domain_agreement(assign, is_planted, num_clusters, 2)
    every = cluster_domain_agreement(assign, domain, num_clusters, num_domains)
    size, hits = binary.table.sum(axis=1), binary.table[:, 1]
    total = int(hits.sum())
    pure = (size > 0) & (hits >= PURITY * size)
    isolated = float(hits[pure].sum() / total) if total else float("nan")
    best_f1 = float((2 * hits / (size + total)).max()) if total else float("nan")
    return {"ari": binary.ari, "nmi": binary.nmi, "isolated": isolated, "best_f1": best_f1,
            "ari_domains": every.ari, "nmi_domains": every.nmi}


def isolation_rows(run_dir: Path, *, ranks: Sequence[int] = RANKS, cluster_on: Sequence[str] = CLUSTER_ON,
                   m_values: Sequence[int] = M_VALUES, buffer_sizes: Sequence[int] = BUFFER_SIZES, seed: int = 0,
                   progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """One row per (step, rank, cluster_on, m, buffer_size): the measures and the window counts (module doc).

    :class:`NotMeasurable` for a run without checkpoints or not on a planted noise corpus. ``progress``
    receives a line per checkpoint and rank.
    """
    kept = checkpoints_of(run_dir)
    if not kept:
        raise NotMeasurable(f"{run_dir} keeps no checkpoint (train with trainer.ckpt_every > 0)")
    cfg = load_run_config(run_dir)
    require_noise(run_dir, cfg)
    pool, tokenizer = window_pool(run_dir, cfg, max(buffer_sizes), seed)
    say = progress or (lambda line: None)
    say(f"{run_dir}: planted domain {pool.domains[pool.planted]!r}, {len(pool.domain)} windows in the pool"
        + (f" (short: {pool.short()})" if pool.short() else ""))
    settings, rows = projection_settings(cfg), []
    for step, path in kept:
        model = rebuild_model(cfg, tokenizer, model_weights(path))
        layers = len(select_layers(model, settings["include"], settings["exclude"]))
        start = time.perf_counter()
        projected = projected_by_rank(model, [projector_for(cfg, r, layers) for r in ranks], pool.windows[pool.order])
        say(f"step {step}: projected {len(pool.domain)} windows at ranks {list(ranks)} in "
            f"{time.perf_counter() - start:.0f} s")
        for rank, grads_t in zip(ranks, projected, strict=True):
            start = time.perf_counter()
            grads = grads_t.numpy()
            for on, m, size in itertools.product(cluster_on, m_values, buffer_sizes):
                n = min(size, len(grads))
                domain = pool.domain[pool.order[:n]]
                counts = np.bincount(domain, minlength=len(pool.domains))
                rows.append({
                    "step": step, "planted": pool.domains[pool.planted], "rank": rank, "dim": grads.shape[1],
                    "cluster_on": on, "m": m, "buffer_size": size, "windows": n,
                    "planted_windows": int(counts[pool.planted]),
                    **isolation_measures(cluster(grads[:n], m, on, seed), domain, pool.planted, m, len(pool.domains)),
                    **{f"windows_{d}": int(c) for d, c in zip(pool.domains, counts, strict=True)},
                    "pool_windows": len(pool.domain), "pool_short": pool.short(),
                })  # fmt: skip
            fits = len(cluster_on) * len(m_values) * len(buffer_sizes)
            say(f"step {step} rank {rank} (dim {grads.shape[1]}): {fits} K-means fits in "
                f"{time.perf_counter() - start:.1f} s")
    return pd.DataFrame(rows)


def markdown_table(rows: pd.DataFrame, title: str) -> str:
    """The pivot: a row per (step, cluster_on, rank), a column per (m, N), cells ``isolated / ari``."""
    sizes, ms = sorted(set(rows["buffer_size"])), sorted(set(rows["m"]))
    columns = [(m, n) for m in ms for n in sizes]
    first = rows.iloc[0]
    domains = [c.removeprefix("windows_") for c in rows.columns if c.startswith("windows_")]
    biggest = rows[rows["buffer_size"] == sizes[-1]].iloc[0]
    short = first.get("pool_short")
    lines = [f"# {title}", "",
             f"Cells: `isolated / ari` of the planted domain against the rest (isolated: share of its windows in "
             f"clusters >= {PURITY:.0%} planted; ari: adjusted Rand index of the clusters vs planted-or-not). "
             "K-means fitted on and assigning the buffer's N held-out windows (the first N of one shuffled pool in "
             "natural proportions); rank r: the projection's rank per side (dim: the projected dimension).", "",
             f"Pool: {int(first['pool_windows'])} windows"
             + (f", short of their natural share: {short}" if isinstance(short, str) and short else "")
             + f". A buffer of N={sizes[-1]} holds "
             + ", ".join(f"{d} {int(biggest[f'windows_{d}'])}" for d in domains) + ".", "",
             "| step | cluster_on | rank (dim) | " + " | ".join(f"m={m} N={n}" for m, n in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    cells = rows.set_index(["step", "cluster_on", "rank", "m", "buffer_size"])
    order = {on: i for i, on in enumerate(CLUSTER_ON)}
    keys = rows[["step", "cluster_on", "rank", "dim"]].drop_duplicates()
    keys = keys.sort_values(["step", "cluster_on", "rank"], key=lambda c: c.map(order) if c.name == "cluster_on" else c)
    for step, on, rank, dim in keys.itertuples(index=False):
        values = []
        for m, n in columns:
            cell = cells.loc[(step, on, rank, m, n)]
            values.append(f"{cell['isolated']:.2f} / {cell['ari']:.2f}")
        lines.append(f"| {step} | {on} | {rank} ({dim}) | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def measured_rows(run_dir: Path, out_dir: Path, *, recompute: bool = False,
                  progress: Callable[[str], None] | None = None) -> tuple[pd.DataFrame, bool]:
    """The rows, and whether they were read back from the run's ``derived/cluster_isolation.csv``.

    Computed rows are cached in the run (``run_files.checkpoint_points``) only when ``out_dir`` is the run's
    ``derived/``: a run read elsewhere (``--out``) is left as it is.
    """
    cached = run_dir / DERIVED / f"{NAME}.csv"
    if cached.exists() and not recompute:
        return pd.read_csv(cached), True

    def compute(run: Path) -> pd.DataFrame:
        return isolation_rows(run, progress=progress)

    if out_dir.resolve() == (run_dir / DERIVED).resolve() and not recompute:
        return checkpoint_points(run_dir, None, NAME, compute), False
    return compute(run_dir), False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run on a planted noise corpus with kept checkpoints")
    parser.add_argument("--out", type=Path, help="where the CSV and the Markdown table go (default: RUN_DIR/derived)")
    parser.add_argument("--recompute", action="store_true", help="ignore RUN_DIR/derived/cluster_isolation.csv")
    args = parser.parse_args(argv)
    out = args.out or args.run_dir / DERIVED
    start = time.perf_counter()
    try:
        rows, reused = measured_rows(args.run_dir, out, recompute=args.recompute, progress=print)
    except (NotMeasurable, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / f"{NAME}.csv", out / f"{NAME}.md"
    if not (reused and csv.resolve() == (args.run_dir / DERIVED / f"{NAME}.csv").resolve()):
        rows.to_csv(csv, index=False)
    planted = rows["planted"].iloc[0]
    md.write_text(markdown_table(rows, f"Isolation of the planted domain `{planted}` by K-means: {args.run_dir}"))
    how = f"read back from {args.run_dir / DERIVED / f'{NAME}.csv'}" if reused else \
        f"computed in {time.perf_counter() - start:.0f} s"
    print(f"wrote {csv} and {md} ({len(rows)} rows, {how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
