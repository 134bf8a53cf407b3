"""Windows packed ahead on a background thread change nothing: same batches, exact resume, errors surface."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FakeMixer
from test_trainer import train_losses

from dograph.data.packing import DomainPacker
from dograph.data.sampler import MixtureSampler
from dograph.data.tokenizer import train_bpe
from dograph.errors import DataError
from dograph.mixing import StepSignals
from dograph.runs.app import run_training


class ListSource:
    def __init__(self, name: str, texts: list[str], fail_at: int | None = None, error: type = DataError) -> None:
        self.name, self.texts, self.fail_at, self.error = name, texts, fail_at, error

    def documents(self, start: int = 0):
        for i in range(start, len(self.texts)):
            if i == self.fail_at:
                raise self.error(f"{self.name}: unreadable document {i}")
            yield self.texts[i]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([f"document {i} about topic {i % 7} with words alpha beta gamma" for i in range(300)], 400)


def make_sampler(tokenizer, prefetch: int, fail_at: int | None = None, rank: int = 0, world: int = 1,
                 error: type = DataError):
    packers = [DomainPacker(ListSource(n, [f"{n} text {i} " + "w " * (i % 9) for i in range(60)],
                                       fail_at if n == "c" else None, error), tokenizer, seq_len=5, rank=rank,
                            world=world) for n in ("a", "b", "c")]
    sampler = MixtureSampler(packers, [0.5, 0.3, 0.2], seed=3, rank=rank, world=world)
    sampler.set_prefetch(prefetch)
    return sampler


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dograph-prefetch"]


def draw(sampler: MixtureSampler, steps: int, mixtures: list[list[float]]) -> list[torch.Tensor]:
    out = []
    for step in range(steps):
        batch = sampler.next_batch(6)
        out += [batch.input_ids, batch.targets, batch.domain]
        sampler.set_mixture(torch.tensor(mixtures[step % len(mixtures)]))  # changes every step
    return out


MIXTURES = [[1.0, 0.0, 0.0], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3], [0.0, 1.0, 0.0]]


@pytest.mark.parametrize("world", [1, 2])
def test_prefetched_batches_equal_synchronous_ones_under_changing_mixtures(tokenizer, world: int) -> None:
    for rank in range(world):
        plain, ahead = make_sampler(tokenizer, 0, rank=rank, world=world), make_sampler(tokenizer, 4, rank=rank,
                                                                                        world=world)
        try:
            assert all(torch.equal(x, y) for x, y in zip(draw(plain, 25, MIXTURES), draw(ahead, 25, MIXTURES),
                                                         strict=True))
            # the checkpointed position is that of what was consumed, whatever was prepared ahead
            a, b = plain.state_dict(), ahead.state_dict()
            assert torch.equal(a["generator"], b["generator"]) and torch.equal(a["mixture"], b["mixture"])
            for pa, pb in zip(a["packers"], b["packers"], strict=True):
                assert pa.keys() == pb.keys() and np.array_equal(pa.pop("buffer"), pb.pop("buffer")) and pa == pb
        finally:
            ahead.close()


def test_prefetched_state_resumes_exactly_in_both_modes(tokenizer) -> None:
    straight = make_sampler(tokenizer, 3)
    first = make_sampler(tokenizer, 3)
    try:
        expected = draw(straight, 30, MIXTURES)
        got = draw(first, 12, MIXTURES)
        state = first.state_dict()
        for prefetch in (0, 3):  # a prefetched checkpoint resumes with or without prefetch
            resumed = make_sampler(tokenizer, prefetch)
            resumed.load_state_dict(state)
            more = draw(resumed, 18, MIXTURES[12 % 4:] + MIXTURES[:12 % 4])
            resumed.close()
            assert all(torch.equal(x, y) for x, y in zip(got + more, expected, strict=True))
        first.load_state_dict(state)  # a running prefetcher is stopped, rewound and restarted
        more = draw(first, 18, MIXTURES[12 % 4:] + MIXTURES[:12 % 4])
        assert all(torch.equal(x, y) for x, y in zip(got + more, expected, strict=True))
    finally:
        straight.close()
        first.close()
    assert prefetch_threads() == []


def test_worker_error_surfaces_when_its_domain_is_needed(tokenizer) -> None:
    sampler = make_sampler(tokenizer, 4, fail_at=3)
    try:
        sampler.set_mixture(torch.tensor([0.5, 0.5, 0.0]))  # the failing domain is never drawn: no error
        for _ in range(10):
            sampler.next_batch(6)
        sampler.set_mixture(torch.tensor([0.0, 0.0, 1.0]))
        with pytest.raises(DataError, match="c: unreadable document 3"):
            for _ in range(10):
                sampler.next_batch(6)
    finally:
        sampler.close()
    assert prefetch_threads() == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread dies on purpose
def test_a_dead_worker_fails_the_step_instead_of_hanging(tokenizer) -> None:
    sampler = make_sampler(tokenizer, 4, fail_at=0, error=SystemExit)  # not an Exception: ends the thread
    try:
        sampler.set_mixture(torch.tensor([0.0, 0.0, 1.0]))
        with pytest.raises(RuntimeError, match="prefetch thread is not running"):
            sampler.next_batch(6)
    finally:
        sampler.close()
    assert prefetch_threads() == []


class DriftingMixer(FakeMixer):
    """Reweights by domain and samples from a softmax of each domain's latest loss (changes every step)."""

    def __init__(self, domain_weights: list[float], **_) -> None:
        super().__init__(domain_weights)
        self.mixture = torch.ones(3, dtype=torch.float64)

    def weigh(self, signals: StepSignals):
        loss = signals.loss.detach().double().cpu()
        domain = signals.domain.cpu()
        for d in domain.unique().tolist():
            self.mixture[d] = torch.exp(8.0 * loss[domain == d].mean())  # sharp, so the mixture moves
        return super().weigh(signals)

    def sampling_mixture(self) -> torch.Tensor:
        return self.mixture / self.mixture.sum()


@pytest.mark.parametrize("mixer", ["loss_based", "drifting"])
def test_training_losses_equal_with_and_without_prefetch(make_config, tmp_path: Path, monkeypatch,
                                                         mixer: str) -> None:
    import dograph.runs.app

    if mixer == "drifting":
        monkeypatch.setattr(dograph.runs.app, "build_mixer", lambda *args: DriftingMixer([1.0, 2.0, 1.0]))
    losses = {}
    for prefetch in (0, 2):
        run_dir = tmp_path / f"prefetch{prefetch}"
        overrides = ["trainer.max_steps=6", f"trainer.prefetch={prefetch}"]
        run_training(make_config(*overrides, *([f"mixer={mixer}"] if mixer != "drifting" else [])), run_dir)
        losses[prefetch] = train_losses(run_dir)
        state = torch.load(run_dir / "checkpoints" / "step_00000006.pt", weights_only=False)["ranks"][0]["data"]
        losses[prefetch]["mixture"] = state["mixture"].tolist()
    assert losses[0] == losses[2]
    if mixer == "drifting":  # the mixture really moved away from the natural one
        assert max(losses[0]["mixture"]) > 0.5, losses[0]["mixture"]
    assert prefetch_threads() == []


def test_resume_with_prefetch_matches_a_straight_synchronous_run(make_config, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(make_config("trainer.max_steps=6", "trainer.prefetch=0", "trainer.micro_batch_size=2"), straight)
    extra = ("trainer.max_steps=6", "trainer.prefetch=3", "trainer.micro_batch_size=2")
    assert run_training(make_config(*extra, "trainer.stop_after_steps=3"), resumed).stopped_early
    assert prefetch_threads() == []
    run_training(make_config(*extra, "resume=true"), resumed)
    assert train_losses(resumed) == train_losses(straight)
    assert prefetch_threads() == []


def test_prefetch_thread_ends_when_training_fails(make_config, tmp_path: Path, monkeypatch) -> None:
    from dograph.train.trainer import Trainer

    def fail(self) -> None:
        self.data.sampler.next_batch(self.micro_batch)  # the worker is running now
        raise RuntimeError("step failed")

    monkeypatch.setattr(Trainer, "train_step", fail)
    with pytest.raises(RuntimeError, match="step failed"):
        run_training(make_config("trainer.max_steps=3"), tmp_path)
    assert prefetch_threads() == []
