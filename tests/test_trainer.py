"""End-to-end training on the tiny config: outputs, exact resume, reweighting plumbing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import FakeMixer

from dograph.errors import ConfigError
from dograph.runs.app import run_training
from dograph.train.checkpoint import load_checkpoint
from dograph.train.metrics import read_metrics


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def test_end_to_end_outputs(make_config, tmp_path: Path) -> None:
    cfg = make_config("trainer.max_steps=6", "trainer.ckpt_every=3", "trainer.export_hf=true", "mixer=uniform")
    result = run_training(cfg, tmp_path)
    assert result.state.step == 6 and result.state.tokens_seen == 6 * 4 * 32
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    final = [r for r in records if r["kind"] == "eval"][-1]
    assert set(result.final_eval) <= set(final) and final["val/avg_loss"] > 0
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000006.pt"
    assert json.loads((tmp_path / "run_info.json").read_text())["parameters"] > 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = tokenizer("def f(x):", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == len(tokenizer)


def test_loss_decreases(make_config, tmp_path: Path) -> None:
    cfg = make_config("trainer.max_steps=30", "trainer.lr=3e-3", "trainer.batch_size=8")
    losses = train_losses(tmp_path) if run_training(cfg, tmp_path) else {}
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(26, 31)) / 5
    assert last < first - 1.0, (first, last)


@pytest.mark.parametrize("extra", [(), ("trainer.micro_batch_size=2",)], ids=["plain", "accumulation"])
def test_resume_is_exact(make_config, tmp_path: Path, extra: tuple[str, ...]) -> None:
    n, extra = 4, ("mixer=uniform", *extra)
    straight = tmp_path / "straight"
    run_training(make_config(f"trainer.max_steps={2 * n}", *extra), straight)
    resumed = tmp_path / "resumed"
    first = run_training(make_config(f"trainer.max_steps={2 * n}", f"trainer.stop_after_steps={n}", *extra),
                         resumed)
    assert first.stopped_early and first.state.step == n
    run_training(make_config(f"trainer.max_steps={2 * n}", "resume=true", *extra), resumed)
    expected, got = train_losses(straight), train_losses(resumed)
    assert sorted(got) == list(range(1, 2 * n + 1))
    assert got == expected  # bit-identical on CPU
    a = load_checkpoint(straight / "checkpoints" / "step_00000008.pt")["model"]
    b = load_checkpoint(resumed / "checkpoints" / "step_00000008.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_to_reuse_a_run_directory(make_config, tmp_path: Path) -> None:
    run_training(make_config("trainer.max_steps=1"), tmp_path)
    with pytest.raises(ConfigError, match="resume=true"):
        run_training(make_config("trainer.max_steps=1"), tmp_path)
    run_training(make_config("trainer.max_steps=1", "overwrite=true"), tmp_path)


def test_checkpoint_resume_with_other_world_size_is_refused(make_config, tmp_path: Path) -> None:
    run_training(make_config("trainer.max_steps=2"), tmp_path)
    path = tmp_path / "checkpoints" / "step_00000002.pt"
    state = torch.load(path, weights_only=True)
    state["ranks"] = state["ranks"] * 2
    torch.save(state, path)
    with pytest.raises(ConfigError, match="same number"):
        run_training(make_config("trainer.max_steps=3", "resume=true"), tmp_path)


class ShiftingMixer(FakeMixer):
    """Reweights by domain and, after each step, samples only domain 0 (exercises both contract calls)."""

    def sampling_mixture(self) -> torch.Tensor:
        return torch.tensor([1.0, 0.0, 0.0])


def test_reweighting_step_equals_autograd_of_the_weighted_loss() -> None:
    from dograph.config import ModelConfig
    from dograph.data.sampler import Batch
    from dograph.distributed import DistContext
    from dograph.models import build_model, per_sample_loss
    from dograph.step.build import build_step_runner
    from dograph.step.runners import ReweightStep, StepContext

    tokens = torch.randint(0, 100, (6, 9), generator=torch.Generator().manual_seed(0))
    domains = torch.tensor([0, 1, 2, 0, 1, 2])
    batches = [Batch(tokens[:3, :-1], tokens[:3, 1:], domains[:3]), Batch(tokens[3:, :-1], tokens[3:, 1:], domains[3:])]
    shape = ModelConfig(n_layer=1, n_head=2, d_model=32, d_ff=64, max_position_embeddings=16)
    model = build_model(shape, 100, seed=0)
    mixer = FakeMixer([1.0, 2.0, 5.0])
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    runner = build_step_runner(StepContext(model, mixer, DistContext(), 6, no_autocast))
    assert isinstance(runner, ReweightStep)
    runner.run(0, batches)
    reference = build_model(shape, 100, seed=0)
    v = torch.tensor([1.0, 2.0, 5.0])[domains]
    (per_sample_loss(reference, tokens[:, :-1], tokens[:, 1:]) * v / v.sum()).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-7), name


def test_trainer_applies_the_mixers_sampling_mixture(make_config, tmp_path: Path, monkeypatch) -> None:
    import dograph.runs.app

    monkeypatch.setattr(dograph.runs.app, "build_mixer", lambda *args: ShiftingMixer([1.0, 1.0, 1.0]))
    run_training(make_config("trainer.max_steps=3"), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "step_00000003.pt")
    assert torch.equal(state["ranks"][0]["data"]["mixture"], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
