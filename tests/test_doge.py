"""DoGE: the one-backward domain Gram, the update against the official recipe, the formulas, state and full runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_capture import SHAPES, make_batches

from baselines.doge import (
    DoGEMixer,
    DoGEProxyMixer,
    clip_coefficients,
    doge_scores,
    doge_step,
    mirror_step,
    projected_domain_gram,
    sample_coefficients,
)
from dograph.data.sampler import Batch
from dograph.distributed import DistContext
from dograph.errors import ConfigError
from dograph.mixing import Mixer, MixerOutput, Signal, StepSignals
from dograph.models import build_model, per_sample_loss
from dograph.runs.app import run_training
from dograph.runs.pipeline import StageIncomplete, read_marker
from dograph.step.build import build_step_runner
from dograph.step.capture import GradientCapture
from dograph.step.projected import ProjectedStep, domain_weight_matrix
from dograph.step.projection import KroneckerProjector
from dograph.step.runners import StepContext
from dograph.train.metrics import read_metrics

NUM_DOMAINS = 3
# two micro-batches (accumulation); domain 1 is absent from the whole step
DOMAINS = [torch.tensor([0, 2, 0, 2]), torch.tensor([2, 0, 0])]


def domain_batches(domains: list[torch.Tensor], vocab: int = 200, seed: int = 0) -> list[Batch]:
    batches = make_batches(vocab, [len(d) for d in domains], seed=seed)
    return [Batch(b.input_ids, b.targets, d) for b, d in zip(batches, domains, strict=True)]


def no_autocast():
    return torch.autocast("cpu", enabled=False)


def official_domain_grads(model: torch.nn.Module, batches: list[Batch], max_grad_norm: float = 0.0
                          ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor] | None]]:
    """The official recipe: per domain, backward of its mean loss over the step, clip_grad_norm_, flatten.

    Returns the [D, P] float64 matrix (a zero row for an absent domain) and each domain's gradients.
    """
    x = torch.cat([b.input_ids for b in batches])
    y = torch.cat([b.targets for b in batches])
    domain = torch.cat([b.domain for b in batches])
    params = list(model.parameters())
    rows, grads = [], []
    for d in range(NUM_DOMAINS):
        model.zero_grad(set_to_none=True)
        mask = domain == d
        if not mask.any():
            rows.append(torch.zeros(sum(p.numel() for p in params), dtype=torch.float64))
            grads.append(None)
            continue
        per_sample_loss(model, x[mask], y[mask]).mean().backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        rows.append(torch.cat([p.grad.flatten() for p in params]).double())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return torch.stack(rows), grads


class GramRecorder(Mixer):
    """Records the Gram signals; the plain mean as weights."""

    requires = frozenset({Signal.DOMAIN_GRAM, Signal.DOMAIN})

    def __init__(self) -> None:
        self.seen: list[StepSignals] = []

    def weigh(self, signals: StepSignals) -> MixerOutput:
        self.seen.append(signals)
        return MixerOutput()


def assert_close_relative(got: torch.Tensor, expected: torch.Tensor, rel: float, label: str = "") -> None:
    scale = expected.abs().max()
    assert (got.double() - expected.double()).abs().max() <= rel * scale + 1e-12, label


# ---- the one-backward Gram ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_backward_gram_equals_d_backward_passes(family: str) -> None:
    """Tied (gpt2) and untied (llama) weights, 2 micro-batches, a domain absent: the Gram of D backwards, 1e-5."""
    model = build_model(SHAPES[family], 200, seed=1)
    mixer = GramRecorder()
    ctx = StepContext(model, mixer, DistContext(), 7, no_autocast, lr_at=lambda step: 1e-3,
                      num_domains=NUM_DOMAINS)
    runner = build_step_runner(ctx)
    assert isinstance(runner, ProjectedStep) and runner.capture.projection is None
    batches = domain_batches(DOMAINS)
    runner.run(0, batches)
    signals = mixer.seen[0]
    assert signals.grad_proj is None and signals.lr == 1e-3
    assert signals.domain_counts.tolist() == [4, 0, 3]
    matrix, _ = official_domain_grads(build_model(SHAPES[family], 200, seed=1), batches)
    expected = matrix @ matrix.T
    assert signals.domain_gram.dtype == torch.float64 and signals.domain_gram.shape == (3, 3)
    assert_close_relative(signals.domain_gram, expected, 1e-5, family)
    diagonal = signals.domain_gram.diagonal()
    assert torch.allclose(diagonal[[0, 2]], expected.diagonal()[[0, 2]], rtol=1e-5)
    assert diagonal[1] == 0 and signals.domain_gram[1].abs().max() == 0  # absent: no gradient at all


def test_gram_of_general_weights_and_frozen_parameters_are_left_out() -> None:
    """Overlapping weight rows (not a partition) and a frozen norm: still the Gram of sum_i W[d, i] g_i."""
    model = build_model(SHAPES["gpt2"], 200, seed=2)
    frozen = next(n for n, _ in model.named_parameters() if "ln_f" in n)
    model.get_parameter(frozen).requires_grad_(False)
    batches = make_batches(200, [5], seed=3)
    w = torch.tensor([[0.2, 0.0, 0.3, 0.5, 0.0], [0.1, 0.4, 0.0, 0.0, 0.5]])
    capture = GradientCapture(model, None, keep_for_update=True)
    with capture.capturing():
        capture.start_micro_batch(5)
        per_sample_loss(model, batches[0].input_ids, batches[0].targets).sum().backward()
        assert capture.end_micro_batch() is None
    gram = capture.weighted_gram([w])
    rows = []
    for d in range(2):
        model.zero_grad(set_to_none=True)
        (per_sample_loss(model, batches[0].input_ids, batches[0].targets) * w[d]).sum().backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]).double())
    expected = torch.stack(rows) @ torch.stack(rows).T
    assert_close_relative(gram, expected, 1e-5)
    capture.apply_weights([w[0]])  # the kept tensors still serve the update afterwards
    assert model.get_parameter(frozen).grad is None


# ---- the update against the official two-step recipe --------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_weighted_update_equals_the_official_two_step_recipe(family: str) -> None:
    """D backwards + clip_grad_norm_ + scores on the D x P matrix + sum_d w_d g_d, against one backward.

    Step 1 lacks domain 1 (never seen: the official zero row), step 2 has all three; the clip sits
    between the domain norms, so some domains are clipped and some are not.
    """
    lr, mu, dw_min = 0.02, 0.01, -5.0  # dw_min < 0 lets negative alignment move the weights too
    steps = [DOMAINS, [torch.tensor([1, 0, 2, 1]), torch.tensor([2, 1, 0])]]
    reference = build_model(SHAPES[family], 200, seed=1)
    norms = official_domain_grads(reference, domain_batches(steps[0]))[0].norm(dim=1)
    max_grad_norm = float(norms[[0, 2]].mean())  # between the two present domains' norms
    assert min(norms[0], norms[2]) < max_grad_norm < max(norms[0], norms[2])

    model = build_model(SHAPES[family], 200, seed=1)
    mixer = DoGEProxyMixer(mu=mu, dw_min=dw_min, max_grad_norm=max_grad_norm, domains=["a", "b", "c"])
    ctx = StepContext(model, mixer, DistContext(), 7, no_autocast, lr_at=lambda step: lr, num_domains=NUM_DOMAINS)
    runner = build_step_runner(ctx)
    weights = torch.full((NUM_DOMAINS,), 1 / NUM_DOMAINS, dtype=torch.float64)
    for step, domains in enumerate(steps):
        batches = domain_batches(domains, seed=step)
        result = runner.run(step, batches)
        matrix, grads = official_domain_grads(reference, batches, max_grad_norm)
        gram = matrix @ matrix.T
        scores = lr * (gram.sum(1) - gram.diagonal()) / (matrix.norm(dim=1).mean() + 1e-6)
        scores = scores.clamp(dw_min * lr, 5.0 * lr)
        weights = torch.softmax(weights.log() + scores / mu, dim=0)
        assert torch.allclose(mixer.weights, weights, rtol=1e-6, atol=1e-9), (step, mixer.weights, weights)
        assert not torch.allclose(weights, torch.full_like(weights, 1 / 3), atol=1e-3)  # the weights moved
        for name, p in model.named_parameters():
            expected = sum(float(weights[d]) * g[name] for d, g in enumerate(grads) if g is not None)
            assert_close_relative(p.grad, expected, 1e-5, f"{family} step {step} {name}")
        # losses and weights come back in the sampler's order (the runner sorts samples by domain)
        x, y = torch.cat([b.input_ids for b in batches]), torch.cat([b.targets for b in batches])
        assert torch.allclose(result.loss, per_sample_loss(reference, x, y).detach(), rtol=1e-5)
        unclipped = official_domain_grads(reference, batches)[0].norm(dim=1)
        clip = (max_grad_norm / (unclipped + 1e-6)).clamp(max=1.0)
        domain = torch.cat(domains)
        counts = torch.bincount(domain, minlength=NUM_DOMAINS)
        expected_v = (weights * clip / counts.clamp_min(1))[domain]
        assert torch.allclose(result.weights.double(), expected_v, rtol=1e-5), (result.weights, expected_v)
        assert float(result.weights.sum()) <= 1.0 + 1e-6
        model.zero_grad(set_to_none=True)


def test_two_pass_update_equals_the_fast_one() -> None:
    """``trainer.weighted_update=two_pass`` with DoGE: the Gram from the kept tensors, then autograd's update."""
    grads = {}
    for mode in ("fast", "two_pass"):
        model = build_model(SHAPES["gpt2"], 200, seed=1)
        mixer = DoGEProxyMixer(max_grad_norm=1.0, domains=["a", "b", "c"])
        ctx = StepContext(model, mixer, DistContext(), 7, no_autocast, lr_at=lambda step: 0.05, num_domains=3)
        build_step_runner(ctx, mode).run(0, domain_batches(DOMAINS))
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, expected in grads["two_pass"].items():
        assert_close_relative(grads["fast"][name], expected, 1e-5, name)


# ---- the formulas -------------------------------------------------------------------------------------------


def test_clip_coefficients_are_clip_grad_norm() -> None:
    generator = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 10.0):
        grads = [torch.randn(5, 3, generator=generator) * scale, torch.randn(7, generator=generator) * scale]
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        coefficient = clip_coefficients(norm.view(1).double(), 2.0)
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        for p, g in zip(params, grads, strict=True):
            assert torch.allclose(p.grad, g * float(coefficient), rtol=1e-6)
    assert clip_coefficients(torch.tensor([9.0, 1.0]), 0.0).tolist() == [1.0, 1.0]  # max_grad_norm <= 0: no clip


def test_scores_on_a_synthetic_gram() -> None:
    gram = torch.tensor([[4.0, 1.0, -2.0], [1.0, 9.0, 3.0], [-2.0, 3.0, 1.0]], dtype=torch.float64)
    # row sums minus diagonal: -1, 4, 1; mean norm (2 + 3 + 1) / 3 = 2
    raw = torch.tensor([-1.0, 4.0, 1.0], dtype=torch.float64) * 0.1 / (2 + 1e-6)
    assert torch.allclose(doge_scores(gram, 0.1, -10.0, 10.0), raw)
    assert torch.allclose(doge_scores(gram, 0.1, 0.0, 5.0), raw.clamp(0, 0.5))  # the negative score -> lr * 0
    assert torch.allclose(doge_scores(gram, 0.1, 0.0, 1.0), torch.tensor([0.0, 0.1, 0.05], dtype=torch.float64))


def test_mirror_step_is_softmax_then_smoothing() -> None:
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    s = torch.tensor([0.01, 0.0, 0.02], dtype=torch.float64)
    expected = torch.exp(torch.log(w) + s / 0.01)
    expected = expected / expected.sum()
    assert torch.allclose(mirror_step(w, s, 0.01, 0.0), expected)
    assert torch.allclose(mirror_step(w, s, 0.01, 0.3), 0.7 * expected + 0.1)
    assert torch.isclose(mirror_step(w, s, 0.01, 0.3).sum(), torch.tensor(1.0, dtype=torch.float64))


def test_doge_step_scores_the_clipped_gram_and_weights_after_the_update() -> None:
    gram = torch.tensor([[100.0, 6.0, 2.0], [6.0, 4.0, 1.0], [2.0, 1.0, 1.0]], dtype=torch.float64)
    present = torch.tensor([True, True, True])
    w0 = torch.full((3,), 1 / 3, dtype=torch.float64)
    step = doge_step(w0, torch.zeros(3, 3, dtype=torch.float64), gram, present, 0.01, mu=0.01, dw_min=0.0,
                     dw_max=5.0, max_grad_norm=5.0, eps=0.0)
    c = torch.tensor([5.0 / (10.0 + 1e-6), 1.0, 1.0], dtype=torch.float64)  # ||g_0|| = 10 > 5: clipped
    assert torch.allclose(step.clip, c) and torch.allclose(step.norms, torch.tensor([10.0, 2.0, 1.0]).double())
    clipped = gram * c.unsqueeze(0) * c.unsqueeze(1)
    assert torch.allclose(step.gram, clipped)
    assert torch.allclose(step.scores, doge_scores(clipped, 0.01, 0.0, 5.0))
    assert torch.allclose(step.weights, mirror_step(w0, step.scores, 0.01, 0.0))
    counts = torch.tensor([2, 4, 1])
    assert torch.allclose(sample_coefficients(step, counts), step.weights * c / counts)  # w after the update


def test_absent_domain_keeps_stale_entries_moves_and_adds_nothing() -> None:
    gram = torch.tensor([[4.0, 1.0, 2.0], [1.0, 9.0, 3.0], [2.0, 3.0, 16.0]], dtype=torch.float64)
    kwargs = {"mu": 0.01, "dw_min": 0.0, "dw_max": 5.0, "max_grad_norm": 5.0, "eps": 0.0}
    w0 = torch.full((3,), 1 / 3, dtype=torch.float64)
    first = doge_step(w0, torch.zeros(3, 3, dtype=torch.float64), gram, torch.tensor([True] * 3), 0.1, **kwargs)
    fresh = torch.tensor([[1.0, 0.5, 0.0], [0.5, 4.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)  # domain 2 absent
    second = doge_step(first.weights, first.gram, fresh, torch.tensor([True, True, False]), 0.1, **kwargs)
    assert torch.equal(second.gram[2], first.gram[2]) and torch.equal(second.gram[:, 2], first.gram[:, 2])
    assert torch.equal(second.gram[:2, :2], fresh[:2, :2])  # both present: fresh (norms 1 and 2, unclipped)
    assert second.scores[2] > 0 and second.weights[2] != first.weights[2]  # it still moves, from stale entries
    coefficient = sample_coefficients(second, torch.tensor([3, 2, 0]))
    assert coefficient[2] == 0 and coefficient[0] > 0  # but adds nothing to the update
    never = doge_step(w0, torch.zeros(3, 3, dtype=torch.float64), fresh, torch.tensor([True, True, False]), 0.1,
                      **kwargs)  # never seen: the official zero row (norm 0 in the mean, score 0)
    assert never.scores[2] == 0 and torch.isclose(never.gram[:2, :2].diagonal().sqrt().sum() / 3,
                                                  torch.tensor(1.0, dtype=torch.float64))


def synthetic_signals(step: int) -> StepSignals:
    num = 3
    generator = torch.Generator().manual_seed(step)
    vectors = torch.randn(num, 6, generator=generator, dtype=torch.float64) + 0.5
    domain = torch.tensor([0, 1, 1, 2, 0, 2, 2, 1] if step % 3 else [0, 1, 1, 0, 1, 0])  # step 0, 3, ...: no 2
    counts = torch.bincount(domain, minlength=num)
    vectors[counts == 0] = 0
    return StepSignals(step=step, input_ids=torch.zeros(len(domain), 4, dtype=torch.long),
                       loss=torch.ones(len(domain)), domain=domain, lr=0.05, domain_gram=vectors @ vectors.T,
                       domain_counts=counts)


def test_mixer_output_metrics_average_and_history(tmp_path: Path) -> None:
    mixer = DoGEProxyMixer(domains=["a", "b", "c"])
    assert mixer.requires == {Signal.DOMAIN_GRAM, Signal.DOMAIN} and mixer.projector is None
    assert mixer.sampling_mixture().tolist() == pytest.approx([1 / 3] * 3)  # the official proxy samples uniformly
    assert mixer.mixture() == pytest.approx([1 / 3] * 3)  # before any update
    seen = []
    for step in range(5):
        signals = synthetic_signals(step)
        out = mixer.weigh(signals)
        seen.append(mixer.weights.clone())
        coefficient = sample_coefficients(DoGEStepView(mixer, signals), signals.domain_counts)
        assert torch.allclose(out.sample_weights.double(), coefficient[signals.domain], atol=1e-7)
        assert set(out.metrics) >= {"mixer/weights/a", "mixer/scores/b", "mixer/grad_norm/c"}
        assert out.metrics["mixer/weights/a"] == pytest.approx(float(mixer.weights[0]))
    average = torch.stack(seen).mean(0)  # the initial weights are not a term
    assert mixer.mixture() == pytest.approx(average.tolist(), abs=1e-12)
    assert mixer.outputs()["mixture"] == pytest.approx(dict(zip("abc", average.tolist(), strict=True)))
    mixer.save_artifacts(tmp_path)
    rows = list(csv.reader((tmp_path / "weights.csv").read_text().splitlines()))
    assert rows[0][:4] == ["step", "a", "b", "c"] and "score_a" in rows[0] and rows[0][-1] == "lr"
    assert [int(r[0]) for r in rows[1:]] == list(range(5))
    saved = json.loads((tmp_path / "mixture.json").read_text())
    assert saved["updates"] == 5 and saved["mixture"] == pytest.approx(mixer.outputs()["mixture"])
    assert "5 updates" in next(iter(mixer.summary()))


class DoGEStepView:
    """The last step's weights and clip coefficients, as ``sample_coefficients`` reads them."""

    def __init__(self, mixer: DoGEProxyMixer, signals: StepSignals) -> None:
        self.weights = mixer.weights
        norms = signals.domain_gram.diagonal().sqrt()
        self.clip = torch.where(signals.domain_counts > 0, clip_coefficients(norms, mixer.max_grad_norm), 0.0)


def test_non_finite_gram_skips_the_step_and_keeps_the_state() -> None:
    mixer = DoGEProxyMixer(domains=["a", "b", "c"])
    mixer.weigh(synthetic_signals(1))
    before = mixer.state_dict()
    bad = synthetic_signals(2)
    bad.domain_gram[0, 1] = float("nan")
    out = mixer.weigh(bad)
    assert out.skip_step and out.sample_weights is None
    after = mixer.state_dict()
    assert torch.equal(after["weights"], before["weights"]) and after["updates"] == before["updates"] == 1


def test_state_dict_resumes_bit_identically(tmp_path: Path) -> None:
    a = DoGEProxyMixer(domains=["a", "b", "c"])
    for step in range(3):
        a.weigh(synthetic_signals(step))
    b = DoGEProxyMixer(domains=["a", "b", "c"])
    b.load_state_dict(a.state_dict())
    for step in range(3, 7):
        wa, wb = a.weigh(synthetic_signals(step)).sample_weights, b.weigh(synthetic_signals(step)).sample_weights
        assert torch.equal(wa, wb)
    assert torch.equal(a.weights, b.weights) and a.mixture() == b.mixture()
    a.save_artifacts(tmp_path / "a")
    b.save_artifacts(tmp_path / "b")
    assert (tmp_path / "a" / "weights.csv").read_text() == (tmp_path / "b" / "weights.csv").read_text()
    with pytest.raises(ConfigError, match="domains"):
        DoGEProxyMixer(domains=["a", "b", "x"]).load_state_dict(a.state_dict())
    with pytest.raises(ConfigError, match="settings"):
        DoGEProxyMixer(mu=0.05, domains=["a", "b", "c"]).load_state_dict(a.state_dict())


def test_a_bad_projection_is_a_one_line_config_error() -> None:
    """The projector's own check (the method's settings are checked in tests/test_settings.py)."""
    with pytest.raises(ConfigError, match=r"mixer\.projection\.rank must be >= 1") as info:
        DoGEProxyMixer(domains=["a", "b"], gradients="projected", projection={"rank": 0})
    assert "\n" not in str(info.value)


def test_plan_stages_and_projected_mode_requirements() -> None:
    node = {"_target_": "baselines.doge.DoGEMixer", "mixture_from": "proxy", "mu": 0.01, "dw_min": 0.0,
            "dw_max": 5.0, "max_grad_norm": 5.0, "eps": 0.0, "gradients": "exact",
            "projection": {"rank": 4, "out_dim": 32}, "proxy": {"model": "gpt2_tiny", "max_steps": 10, "seed": 0}}
    (spec,) = DoGEMixer.plan_stages(node)
    assert spec.name == "proxy" and spec.settings == node["proxy"] and spec.needs == ()
    assert spec.mixer == {"_target_": "baselines.doge.DoGEProxyMixer", "mu": 0.01, "dw_min": 0.0, "dw_max": 5.0,
                          "max_grad_norm": 5.0, "eps": 0.0, "gradients": "exact"}  # no projection: same stage key
    (projected,) = DoGEMixer.plan_stages({**node, "gradients": "projected"})
    assert projected.mixer["projection"] == {"rank": 4, "out_dim": 32}
    mixer = DoGEProxyMixer(gradients="projected", projection={"rank": 4, "out_dim": 32, "exclude": []},
                           domains=["a", "b"], seed=7)
    assert mixer.requires == {Signal.GRAD_PROJ, Signal.DOMAIN}
    assert isinstance(mixer.projector, KroneckerProjector) and mixer.projector.seed == 7


def test_projected_mode_step_uses_the_projected_domain_means() -> None:
    """Through the runner: the Gram is that of the per-domain means of the gathered projections."""
    model = build_model(SHAPES["gpt2"], 200, seed=1)
    mixer = DoGEProxyMixer(gradients="projected", projection={"rank": 4, "out_dim": 32, "exclude": []},
                           domains=["a", "b", "c"], seed=3)
    recorded = []
    original = mixer._gram

    def recording(signals: StepSignals):
        recorded.append((signals.grad_proj.clone(), original(signals)))
        return recorded[-1][1]

    mixer._gram = recording
    ctx = StepContext(model, mixer, DistContext(), 7, no_autocast, lr_at=lambda step: 0.05, num_domains=3)
    result = build_step_runner(ctx).run(0, domain_batches(DOMAINS))
    projections, (gram, counts) = recorded[0]
    domain = torch.cat(DOMAINS)
    means = torch.stack([projections[domain == d].double().mean(0) if (domain == d).any()
                         else torch.zeros(32, dtype=torch.float64) for d in range(3)])
    assert counts.tolist() == [4, 0, 3] and torch.allclose(gram, means @ means.T)
    assert result.weights is not None and 0 < float(result.weights.sum()) <= 1 + 1e-6


# ---- projected mode: its error against the exact Gram ---------------------------------------------------------


@pytest.fixture(scope="module")
def trained_setting(local_corpus: Path):
    """A small GPT-2 briefly trained on real text; 48 held-out windows in 6 single-source groups (pseudo-domains)."""
    from dograph.config import ModelConfig
    from dograph.data.packing import DomainPacker
    from dograph.data.sources import JsonlDomainSource
    from dograph.data.tokenizer import train_bpe

    sources = [JsonlDomainSource(n, [local_corpus / f"{n}.jsonl"]) for n in ("code", "docs", "licences")]
    tokenizer = train_bpe((t for s in sources for t in s.documents()), 2048)
    packers = [DomainPacker(s, tokenizer, 64) for s in sources]
    size = 48
    windows = torch.tensor(np.array([packers[i % 3].next_window() for i in range(size + 16 * 20)]), dtype=torch.long)
    model = build_model(ModelConfig(n_layer=2, n_head=4, d_model=128, d_ff=512, max_position_embeddings=128),
                        len(tokenizer), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for i in range(20):
        chunk = windows[size + 16 * i: size + 16 * (i + 1)]
        optimizer.zero_grad()
        per_sample_loss(model, chunk[:, :-1], chunk[:, 1:]).mean().backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    index = torch.arange(size)
    group = index % 3 + 3 * ((index // 3) % 2)  # 6 groups of 8 windows, each from one source
    return model, windows[:size, :-1], windows[:size, 1:], group


def test_projected_gram_error_against_the_exact_gram(trained_setting) -> None:
    """Measured (4 seeds, defaults r = 16, k = 1024, every Linear): relative Frobenius error 0.36-0.58, Pearson
    correlation of the 15 off-diagonal entries 0.80-0.94. A loose bound; the numbers are reported."""
    model, x, y, group = trained_setting
    num = 6
    counts = torch.bincount(group, minlength=num)
    capture = GradientCapture(model, None, keep_for_update=True)
    with capture.capturing():
        capture.start_micro_batch(len(x))
        per_sample_loss(model, x, y).sum().backward()
        capture.end_micro_batch()
    exact = capture.weighted_gram([domain_weight_matrix(group, counts)])
    capture.remove()
    errors, correlations = [], []
    rows, cols = torch.triu_indices(num, num, 1)
    for seed in range(4):
        projector = KroneckerProjector(rank=16, out_dim=1024, exclude=[], seed=seed)
        capture = GradientCapture(model, projector.bind(model), keep_for_update=False)
        with capture.capturing():
            capture.start_micro_batch(len(x))
            per_sample_loss(model, x, y).sum().backward()
            projected = capture.end_micro_batch()
        capture.remove()
        gram, _ = projected_domain_gram(projected, group, num)
        errors.append(float((gram - exact).norm() / exact.norm()))
        correlations.append(float(torch.corrcoef(torch.stack([gram[rows, cols], exact[rows, cols]]))[0, 1]))
    print(f"projected vs exact domain Gram: relative Frobenius error {[round(e, 3) for e in errors]}, "
          f"off-diagonal correlation {[round(c, 3) for c in correlations]}")
    assert sum(errors) / len(errors) < 0.8 and max(errors) < 1.0, errors
    assert sum(correlations) / len(correlations) > 0.6, correlations


# ---- full runs ------------------------------------------------------------------------------------------------


def deterministic_train_records(run_dir: Path) -> list[dict]:
    clock = ("time", "tokens_per_s", "mixer/time_gram_s")
    return [{k: v for k, v in r.items() if k not in clock} for r in read_metrics(run_dir) if r["kind"] == "train"]


def proxy_dir(output_root: Path) -> Path:
    (path,) = [p for p in (output_root / "stages" / "doge").iterdir() if p.is_dir()]
    return path


DOGE_RUN = ("mixer=doge", "mixer.proxy.max_steps=4", "trainer.max_steps=3")


def test_doge_defaults_compose(make_config) -> None:
    cfg = make_config("mixer=doge")
    node = cfg.mixer
    assert node["_target_"] == "baselines.doge.DoGEMixer" and node["mixture_from"] == "proxy"
    assert (node["mu"], node["dw_min"], node["dw_max"], node["max_grad_norm"], node["eps"]) == (0.01, 0.0, 5.0,
                                                                                                 5.0, 0.0)
    assert node["gradients"] == "exact" and node["proxy"]["grad_clip"] == 5.0


def test_doge_run_end_to_end(make_config, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_training(make_config(*DOGE_RUN, f"paths.output_root={out}", "+mixer.proxy.log_every=1"),
                          tmp_path / "main")
    proxy = proxy_dir(out)
    marker = read_marker(proxy)
    assert marker["complete"] and marker["steps"] == 4 and marker["outputs"]["updates"] == 4
    mixture = marker["outputs"]["mixture"]
    assert set(mixture) == {"code", "docs", "licences"} and sum(mixture.values()) == pytest.approx(1.0)
    rows = list(csv.reader((proxy / "mixer" / "weights.csv").read_text().splitlines()))
    assert len(rows) == 5 and rows[0][:4] == ["step", "code", "docs", "licences"]
    average = [sum(float(r[i]) for r in rows[1:]) / 4 for i in (1, 2, 3)]
    assert average == pytest.approx(list(mixture.values()), abs=1e-12)
    assert json.loads((proxy / "mixer" / "mixture.json").read_text())["mixture"] == mixture
    records = deterministic_train_records(proxy)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        assert all(f"mixer/weights/{d}" in record for d in mixture)
        assert sum(record[f"mixer/weights/{d}"] for d in mixture) == pytest.approx(1.0)
        assert record["data/mixture/code"] == pytest.approx(1 / 3)  # the proxy samples uniformly
    main = torch.load(tmp_path / "main" / "checkpoints" / "step_00000003.pt", weights_only=False)
    assert main["ranks"][0]["data"]["mixture"].tolist() == pytest.approx(list(mixture.values()), abs=1e-12)
    assert result.state.step == 3 and json.loads((tmp_path / "main" / "stages.json").read_text())[0]["stage"] == "proxy"


def test_doge_resumes_exactly_mid_stage_and_mid_main_run(make_config, tmp_path: Path) -> None:
    run = (*DOGE_RUN, "trainer.max_steps=4", "trainer.log_every=1", "+mixer.proxy.log_every=1")
    straight = tmp_path / "straight"
    run_training(make_config(*run, f"paths.output_root={straight}"), straight / "main")
    resumed = tmp_path / "resumed"
    cfg = make_config(*run, f"paths.output_root={resumed}", "mixer.proxy.stop_after_steps=2")
    with pytest.raises(StageIncomplete, match=r"stage doge/proxy stopped at step 2 of 4"):
        run_training(cfg, resumed / "main")
    first = run_training(make_config(*run, f"paths.output_root={resumed}", "trainer.stop_after_steps=2"),
                         resumed / "main")  # the proxy resumes and completes; the main run stops at 2
    assert first.stopped_early
    run_training(make_config(*run, f"paths.output_root={resumed}", "resume=true"), resumed / "main")
    a, b = proxy_dir(straight), proxy_dir(resumed)
    assert a.name == b.name  # stop_after_steps is not part of the stage key
    assert deterministic_train_records(b) == deterministic_train_records(a)
    assert (b / "mixer" / "weights.csv").read_text() == (a / "mixer" / "weights.csv").read_text()
    assert read_marker(b)["outputs"] == read_marker(a)["outputs"]
    expected = deterministic_train_records(straight / "main")
    assert [r["step"] for r in expected] == [1, 2, 3, 4]
    assert deterministic_train_records(resumed / "main") == expected
    assert all(math.isfinite(r["train/loss"]) for r in expected)
