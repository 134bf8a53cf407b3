"""Figure 1: projected per-sample gradients of held-out samples, early vs late in training.

The paper's motivation: human domain labels and the model's view of the data disagree, and the
disagreement changes as the model trains. We take the ablation setting's DoGraph run, rebuild
its model at the earliest and at the latest checkpoint it kept, and project the per-sample
gradients of a fixed set of held-out validation windows (up to ``MAX_PER_DOMAIN`` per domain)
with the run's own projector (``mixer.projection``, same seed, same hooks as training:
``dograph.step.capture.GradientCapture``). The projected gradients are unit-normalised first,
because DoGraph clusters directions (``mixer.cluster_on=direction``), then reduced to 2-D by a
PCA fitted per checkpoint; points are coloured by human domain.

Writes ``figure1.png``/``.pdf`` and ``figure1_points.csv`` (checkpoint, step, domain, sample,
pc1, pc2, and each axis's share of variance) so a notebook can redraw it. The earliest kept
checkpoint is the earliest of the ``trainer.keep_checkpoints`` newest ones: a run must keep two.
An FSDP run's checkpoints hold no weights but name their shards; the model is read back whole from
them in this one process (``dograph.train.checkpoint.model_weights``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from dograph.models import per_sample_loss
from dograph.step.capture import GradientCapture
from dograph.step.projection import KroneckerProjector
from dograph.train.checkpoint import model_weights
from experiments.artifact import NothingToPlot
from experiments.render import save_figure
from experiments.run_files import (
    ablation_dograph_request,
    checkpoint_points,
    checkpoints_of,
    load_run_config,
    rebuild_data,
    rebuild_model,
    run_and_record_of,
)
from experiments.scale import RunRequest, Scale

NAME = "figure1"
TITLE = "Figure 1: projected per-sample gradients of held-out samples by human domain (PCA), early vs late"
MAX_PER_DOMAIN = 32  # held-out windows per domain (fewer when the run holds out fewer)
BATCH = 32  # windows per capturing backward
NOTE = ("Projected per-sample gradients (the run's Kronecker projector), unit-normalised as DoGraph clusters "
        "directions, PCA fitted per checkpoint.")


def requests(scale: Scale) -> list[RunRequest]:
    return [ablation_dograph_request(scale)]


def held_out_windows(validation: list[Tensor], max_per_domain: int = MAX_PER_DOMAIN) -> tuple[Tensor, np.ndarray]:
    """The first ``max_per_domain`` validation windows of every domain [N, T+1] and their domain ids [N]."""
    chosen = [windows[:max_per_domain] for windows in validation]
    labels = np.concatenate([np.full(len(w), d, dtype=np.int64) for d, w in enumerate(chosen)])
    return torch.cat(chosen), labels


def projected_gradients(model: nn.Module, projector: KroneckerProjector, windows: Tensor) -> Tensor:
    """[N, k] projected per-sample gradients of the mean-token loss of each window, as a DoGraph step computes them."""
    capture = GradientCapture(model, projector.bind(model), keep_for_update=False)
    out = []
    try:
        with capture.capturing():
            for chunk in windows.split(BATCH):
                capture.start_micro_batch(len(chunk))
                per_sample_loss(model, chunk[:, :-1], chunk[:, 1:]).sum().backward()
                out.append(capture.end_micro_batch())
    finally:
        capture.remove()
    return torch.cat(out).float()


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``x`` on its first two principal axes [n, 2] and each axis's share of the variance.

    Signs are fixed (each axis's largest loading positive) so reruns draw the same picture.
    """
    centred = x - x.mean(axis=0, keepdims=True)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2]
    axes *= np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])[:, None]
    coords = centred @ axes.T
    total = float((singular**2).sum())
    share = (singular[:2] ** 2) / total if total > 0 else np.zeros(2)
    if coords.shape[1] < 2:  # a single point or one direction: pad the missing axis
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
        share = np.pad(share, (0, 2 - len(share)))
    return coords, share


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def compute_points(run_dir: Path, max_per_domain: int = MAX_PER_DOMAIN) -> pd.DataFrame:
    """The figure's points: one row per held-out window and checkpoint (early, late).

    :class:`NothingToPlot` when the run kept fewer than two checkpoints.
    """
    kept = checkpoints_of(run_dir)
    if len(kept) < 2:
        raise NothingToPlot(f"{run_dir} keeps {len(kept)} checkpoint(s); Figure 1 needs two (an early and a late "
                            "one): train it with trainer.ckpt_every below trainer.max_steps and keep_checkpoints >= 2")
    cfg = load_run_config(run_dir)
    if not isinstance(cfg.mixer, dict) or "projection" not in cfg.mixer:
        raise NothingToPlot(f"{run_dir} is not a DoGraph run (its mixer has no projection)")
    projector: KroneckerProjector = instantiate(cfg.mixer["projection"])
    data = rebuild_data(cfg)
    windows, labels = held_out_windows(data.validation, max_per_domain)
    domains = list(data.corpus.domains)
    frames = []
    for name, (step, path) in (("early", kept[0]), ("late", kept[-1])):
        model = rebuild_model(cfg, data.tokenizer, model_weights(path))  # a ddp .pt's weights, or an fsdp one's shards
        grads = projected_gradients(model, projector, windows).numpy().astype(np.float64)
        coords, share = pca_2d(unit_rows(grads))
        frames.append(pd.DataFrame({"checkpoint": name, "step": step, "domain": [domains[i] for i in labels],
                                    "sample": np.arange(len(labels)), "pc1": coords[:, 0], "pc2": coords[:, 1],
                                    "pc1_share": share[0], "pc2_share": share[1]}))
    return pd.concat(frames, ignore_index=True)


def draw(points: pd.DataFrame) -> Any:
    """Two panels (early, late), one colour per human domain, a shared legend below."""
    import matplotlib.pyplot as plt

    domains = list(dict.fromkeys(points["domain"]))
    cmap = plt.get_cmap("tab10" if len(domains) <= 10 else "tab20")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, (name, panel) in zip(axes, points.groupby("checkpoint", sort=False), strict=False):
        for i, domain in enumerate(domains):
            rows = panel[panel["domain"] == domain]
            ax.scatter(rows["pc1"], rows["pc2"], s=14, alpha=0.8, color=cmap(i % cmap.N), label=domain)
        ax.set_title(f"{name}: step {int(panel['step'].iloc[0])}")
        ax.set_xlabel(f"PC1 ({panel['pc1_share'].iloc[0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({panel['pc2_share'].iloc[0]:.0%} of variance)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(domains), 8), frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(TITLE, fontsize=10)
    fig.text(0.5, -0.08, NOTE, ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def build(index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
    run_dir, record = run_and_record_of(index, ablation_dograph_request(scale))
    points = checkpoint_points(run_dir, record, "figure1_points", compute_points)
    return save_figure(draw(points), out_dir, NAME, {"points": points})
