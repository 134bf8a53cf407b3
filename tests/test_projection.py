"""Projected per-sample gradients: fidelity to exact (torch.func) inner products, determinism, layer choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dograph.config import ModelConfig
from dograph.data.packing import DomainPacker
from dograph.data.sources import JsonlDomainSource
from dograph.data.tokenizer import train_bpe
from dograph.models import build_model, per_sample_loss
from dograph.step.capture import GradientCapture
from dograph.step.projection import (
    DenseReferenceProjector,
    KroneckerProjector,
    LossModule,
    exact_per_sample_grads,
    select_layers,
)

SMALL_GPT2 = ModelConfig(n_layer=2, n_head=4, d_model=128, d_ff=512, max_position_embeddings=128)


@pytest.fixture(scope="module")
def setting(local_corpus: Path):
    """A small GPT-2 briefly trained on real text, and a held-out batch of 24 windows from 3 domains."""
    sources = [JsonlDomainSource(n, [local_corpus / f"{n}.jsonl"]) for n in ("code", "docs", "licences")]
    tokenizer = train_bpe((t for s in sources for t in s.documents()), 2048)
    packers = [DomainPacker(s, tokenizer, 64) for s in sources]
    windows = torch.tensor([packers[i % 3].next_window() for i in range(24 + 16 * 20)], dtype=torch.long)
    model = build_model(SMALL_GPT2, len(tokenizer), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for i in range(20):
        chunk = windows[24 + 16 * i: 24 + 16 * (i + 1)]
        optimizer.zero_grad()
        per_sample_loss(model, chunk[:, :-1], chunk[:, 1:]).mean().backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    x, y = windows[:24, :-1], windows[:24, 1:]
    layers = select_layers(model, ["*"], ["lm_head"])
    names = [f"model.{n}.weight" for n, _ in layers]
    grads = exact_per_sample_grads(LossModule(model), x, y, names)
    exact = torch.cat([grads[n].flatten(1) for n in names], dim=1)
    return model, x, y, exact


def project(model, x, y, **kwargs) -> torch.Tensor:
    capture = GradientCapture(model, KroneckerProjector(**kwargs).bind(model), keep_for_update=False)
    try:
        with capture.capturing():
            capture.start_micro_batch(len(x))
            per_sample_loss(model, x, y).sum().backward()
            return capture.end_micro_batch()
    finally:
        capture.remove()


def gram_correlation(a: torch.Tensor, b: torch.Tensor, offset: int) -> float:
    """Pearson correlation of the pairwise inner products <g_i, g_j>, i <= j - offset."""
    rows, cols = torch.triu_indices(len(a), len(a), offset)
    pairs = torch.stack([(a @ a.T)[rows, cols], (b @ b.T)[rows, cols]])
    return torch.corrcoef(pairs)[0, 1].item()


def test_projected_inner_products_match_exact_ones(setting) -> None:
    model, x, y, exact = setting
    default = [gram_correlation(project(model, x, y, seed=s), exact, 0) for s in range(6)]
    assert sum(default) / len(default) >= 0.9 and min(default) >= 0.8, default  # a random projection: its mean
    by_rank = {r: sum(gram_correlation(project(model, x, y, rank=r, out_dim=None, seed=s), exact, 1)
                      for s in range(4)) / 4 for r in (2, 8, 32)}
    assert by_rank[2] < by_rank[8] < by_rank[32], by_rank


def test_projection_is_unbiased(setting) -> None:
    """Averaged over seeds, projected Gram matrices converge to the exact one (E<Pg, Pg'> = <g, g'>)."""
    model, x, y, exact = setting
    grams = [p @ p.T for p in (project(model, x[:8], y[:8], rank=8, out_dim=None, seed=s) for s in range(40))]
    mean = torch.stack(grams).mean(0)
    truth = exact[:8] @ exact[:8].T
    assert torch.allclose(mean.diagonal(), truth.diagonal(), rtol=0.15)
    assert (mean - truth).abs().max() < 0.2 * truth.diagonal().max()


def test_same_seed_same_projection_any_order(setting) -> None:
    model, x, y, _ = setting
    first = project(model, x[:4], y[:4], seed=11)
    again = project(model, x[:4], y[:4], seed=11)
    other = project(model, x[:4], y[:4], seed=12)
    assert torch.equal(first, again) and not torch.allclose(first, other)
    a, b = KroneckerProjector(seed=3).bind(model), KroneckerProjector(seed=3).bind(model)
    assert all(torch.equal(p.left, q.left) and torch.equal(p.right, q.right) for p, q in zip(a.layers, b.layers,
                                                                                            strict=True))


def test_output_dimensions(setting) -> None:
    model, x, y, _ = setting
    assert project(model, x[:3], y[:3], out_dim=64).shape == (3, 64)
    blocks = project(model, x[:3], y[:3], rank=4, out_dim=None)
    assert blocks.shape == (3, 8 * 16)  # 2 layers x (c_attn, c_proj, c_fc, mlp.c_proj) x r^2


def test_layer_selection() -> None:
    gpt2 = build_model(SMALL_GPT2, 100)
    names = [n for n, _ in select_layers(gpt2, ["*"], ["lm_head"])]
    assert "lm_head" not in names and "transformer.h.0.attn.c_attn" in names and len(names) == 8
    assert [n for n, _ in select_layers(gpt2, ["c_fc"], [])] == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    llama = build_model(ModelConfig(family="llama", n_layer=1, n_head=4, n_kv_head=2, d_model=64, d_ff=96,
                                    tie_embeddings=False), 100)
    assert {n.rsplit(".", 1)[-1] for n, _ in select_layers(llama, ["*"], ["lm_head"])} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_reference_projector_agrees_with_exact(setting) -> None:
    model, x, y, exact = setting
    layers = select_layers(model, ["*"], ["lm_head"])
    reference = DenseReferenceProjector(out_dim=512, seed=0).project(model, layers, x[:8], y[:8])
    assert reference.shape == (8, 512)
    assert gram_correlation(reference, exact[:8], 0) > 0.95
