"""The one-backward weighted update equals the two-pass reference; hooks cost nothing when off."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baselines.uniform import UniformMixer
from dograph.config import ModelConfig
from dograph.data.sampler import Batch
from dograph.distributed import DistContext
from dograph.errors import ConfigError
from dograph.mixing import Mixer, MixerOutput, Signal, StepSignals
from dograph.models import build_model, per_sample_loss
from dograph.step.build import build_step_runner
from dograph.step.capture import GradientCapture
from dograph.step.projection import KroneckerProjector
from dograph.step.runners import PlainStep, StepContext

SHAPES = {
    "gpt2": ModelConfig(n_layer=2, n_head=2, d_model=64, d_ff=128, max_position_embeddings=64),
    "llama": ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96,
                         max_position_embeddings=64, tie_embeddings=False),
}


class ProjectionWeightMixer(Mixer):
    """Weights from the projected gradients themselves (so the test exercises the whole signal path)."""

    requires = frozenset({Signal.GRAD_PROJ})

    def __init__(self) -> None:
        self._projector = KroneckerProjector(rank=4, out_dim=32, seed=5)
        self.seen: list[torch.Tensor] = []

    @property
    def projector(self) -> KroneckerProjector:
        return self._projector

    def weigh(self, signals: StepSignals) -> MixerOutput:
        self.seen.append(signals.grad_proj.clone())
        raw = signals.grad_proj.norm(dim=1) + signals.loss
        return MixerOutput(sample_weights=raw / raw.sum())


def make_batches(vocab: int, sizes: list[int], seed: int = 0) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for size in sizes:
        tokens = torch.randint(0, vocab, (size, 17), generator=generator)
        out.append(Batch(tokens[:, :-1], tokens[:, 1:], torch.zeros(size, dtype=torch.long)))
    return out


def gradients_of(family: str, sizes: list[int], two_pass: bool) -> tuple[dict[str, torch.Tensor], list]:
    model = build_model(SHAPES[family], 200, seed=1)
    mixer = ProjectionWeightMixer()
    ctx = StepContext(model, mixer, DistContext(), sum(sizes), lambda: torch.autocast("cpu", enabled=False))
    runner = build_step_runner(ctx, "two_pass" if two_pass else "fast")
    runner.run(0, make_batches(200, sizes))
    return {n: p.grad.clone() for n, p in model.named_parameters()}, mixer.seen


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("sizes", [[6], [2, 3, 1]], ids=["one_batch", "accumulation"])
def test_fast_update_equals_two_pass(family: str, sizes: list[int]) -> None:
    fast, fast_seen = gradients_of(family, sizes, two_pass=False)
    slow, slow_seen = gradients_of(family, sizes, two_pass=True)
    assert torch.allclose(fast_seen[0], slow_seen[0], rtol=1e-5, atol=1e-6)  # same projections either way
    for name in slow:
        scale = slow[name].abs().max()
        assert (fast[name] - slow[name]).abs().max() <= 1e-5 * scale + 1e-9, name


def test_fast_update_equals_autograd_of_the_weighted_loss() -> None:
    sizes = [4, 4]
    fast, seen = gradients_of("gpt2", sizes, two_pass=False)
    model = build_model(SHAPES["gpt2"], 200, seed=1)
    batches = make_batches(200, sizes)
    x = torch.cat([b.input_ids for b in batches])
    y = torch.cat([b.targets for b in batches])
    loss = per_sample_loss(model, x, y)
    raw = seen[0].norm(dim=1) + loss.detach()
    (loss * raw / raw.sum()).sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(fast[name], p.grad, rtol=1e-4, atol=1e-7), name


def test_capture_restores_requires_grad_and_removes_hooks() -> None:
    model = build_model(SHAPES["gpt2"], 100)
    capture = GradientCapture(model, KroneckerProjector(rank=2, out_dim=8).bind(model), keep_for_update=True)
    with capture.capturing():
        assert not any(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    capture.remove()
    assert not any(m._forward_hooks for m in model.modules())


def test_uniform_registers_no_hooks() -> None:
    model = build_model(SHAPES["gpt2"], 100)
    ctx = StepContext(model, UniformMixer(), DistContext(), 4, lambda: torch.autocast("cpu", enabled=False))
    runner = build_step_runner(ctx)
    assert isinstance(runner, PlainStep)
    runner.run(0, make_batches(100, [4]))
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fast_step_leaves_every_requires_grad_flag_unchanged(family: str) -> None:
    """Norms, embeddings and the tied head must stay trainable after a fast step; frozen ones stay frozen."""
    model = build_model(SHAPES[family], 200, seed=1)
    frozen = next(n for n, p in model.named_parameters() if "norm" in n or "ln_" in n)
    model.get_parameter(frozen).requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    ctx = StepContext(model, ProjectionWeightMixer(), DistContext(), 6, lambda: torch.autocast("cpu", enabled=False))
    runner = build_step_runner(ctx, "fast")
    for step in range(2):
        runner.run(step, make_batches(200, [3, 3], seed=step))
        assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads[frozen] is None and all(g is not None for n, g in grads.items() if n != frozen)


class ScaledPair(nn.Module):
    """A module with its own parameter whose output is a tuple (the hooks cannot follow it)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * self.scale, x


class TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.pair = ScaledPair(8)
        self.head = nn.Linear(8, 20)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        scaled, _ = self.pair(self.embed(ids))
        return self.head(scaled)


def test_a_parameter_left_without_gradient_stops_the_step_naming_it() -> None:
    model = TupleModel()
    capture = GradientCapture(model, KroneckerProjector(rank=2, out_dim=8).bind(model), keep_for_update=True)
    ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(0))
    with capture.capturing():
        capture.start_micro_batch(3)
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
        loss.sum().backward()
        capture.end_micro_batch()
    with pytest.raises(ConfigError, match=r"no gradient for pair\.scale.*not a Tensor: pair.*two_pass"):
        capture.apply_weights([torch.full((3,), 1 / 3)])


def test_inputs_are_projected_in_the_projections_dtype_under_autocast() -> None:
    """``A S`` is formed in the forward hook, under the forward's autocast: must stay float32 (as in the backward)."""
    model = build_model(SHAPES["gpt2"], 200, seed=1)
    capture = GradientCapture(model, KroneckerProjector(rank=4, out_dim=32, seed=5).bind(model), keep_for_update=False)
    batch = make_batches(200, [3])[0]
    dtypes = set()
    with capture.capturing():
        capture.start_micro_batch(len(batch))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = per_sample_loss(model, batch.input_ids, batch.targets)
        dtypes = {c.projected_input.dtype for h in capture.hooked for c in h.calls if c.projected_input is not None}
        assert all(c.args == () for h in capture.hooked if h.projection is not None for c in h.calls)  # not kept
        loss.sum().backward()
        projected = capture.end_micro_batch()
    assert dtypes == {torch.float32} and projected.dtype == torch.float32 and torch.isfinite(projected).all()
