"""The DoReMi proxy under data parallelism (gloo, 2 processes) against one process with the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import DDP_VOCAB, assert_same_gradients, ddp_model, free_port, join_gloo, leave_gloo, rank_batches

pytestmark = pytest.mark.slow

VOCAB = DDP_VOCAB


def _save_reference(root: Path) -> None:
    from dograph.config import ModelConfig
    from dograph.models import build_model

    model = build_model(ModelConfig(n_layer=1, n_head=2, d_model=16, d_ff=32, max_position_embeddings=32), VOCAB,
                        seed=5)
    model.save_pretrained(str(root / "hf"))


def _proxy_steps(rank: int, world: int, port: int, out_dir: str, micro: int = 1) -> None:
    """4 proxy steps on this rank's slice of fixed global batches; save the DRO weights, sample weights, grads."""
    import torch

    from baselines.doremi import DoReMiProxyMixer
    from dograph.distributed import DistContext
    from dograph.runs.pipeline import StageResult
    from dograph.step.build import build_step_runner
    from dograph.step.runners import ReweightStep, StepContext

    join_gloo(rank, world, port)
    ctx_dist = DistContext(rank=rank, world_size=world)
    model = ddp_model()
    reference = StageResult("doremi", "reference", "test", Path(out_dir) / "reference")
    mixer = DoReMiProxyMixer(stage_results={"reference": reference}, domains=["a", "b", "c"],
                             natural_mixture=[0.5, 0.3, 0.2], proxy_mixture="natural", dist=ctx_dist)
    runner = build_step_runner(StepContext(model, mixer, ctx_dist, 8, lambda: torch.autocast("cpu", enabled=False)))
    assert isinstance(runner, ReweightStep)
    records = []
    for step in range(4):
        batches = rank_batches(step, rank, world, micro, num_domains=2 if step == 0 else 3)  # c absent from step 0
        result = runner.run(step, batches)
        records.append({"dro": mixer.weights.clone(), "scores": mixer.scores.clone(),
                        "sample_weights": result.weights.clone(),
                        "grads": {n: p.grad.clone() for n, p in model.named_parameters()}})
        model.zero_grad(set_to_none=True)
    torch.save({"steps": records, "outputs": mixer.outputs()}, f"{out_dir}/rank{rank}_world{world}_micro{micro}.pt")
    leave_gloo(world)


@pytest.mark.parametrize("micro", [1, 2], ids=["one_micro_batch", "two_micro_batches"])
def test_doremi_proxy_ddp_weights_identical_and_gradients_equal_single_process(tmp_path: Path, micro: int) -> None:
    """Both ranks hold bit-identical DRO weights; their sample weights and summed gradients match one process."""
    import torch
    import torch.multiprocessing as mp

    _save_reference(tmp_path / "reference")
    _proxy_steps(0, 1, 0, str(tmp_path))
    mp.spawn(_proxy_steps, args=(2, free_port(), str(tmp_path), micro), nprocs=2, join=True)
    single = torch.load(tmp_path / "rank0_world1_micro1.pt", weights_only=False)
    ranks = [torch.load(tmp_path / f"rank{r}_world2_micro{micro}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["outputs"] == ranks[1]["outputs"]
    assert list(single["outputs"]["mixture"].values()) == pytest.approx(list(ranks[0]["outputs"]["mixture"].values()))
    for step in range(4):
        zero, one = ranks[0]["steps"][step], ranks[1]["steps"][step]
        assert torch.equal(zero["dro"], one["dro"]) and torch.equal(zero["scores"], one["scores"])  # bit-identical
        expected = single["steps"][step]
        assert torch.allclose(zero["dro"], expected["dro"], rtol=1e-5)
        sampled = torch.cat([zero["sample_weights"], one["sample_weights"]])
        assert torch.allclose(sampled, expected["sample_weights"], rtol=1e-5)
        assert float(sampled.sum()) == pytest.approx(1.0, abs=1e-6)  # over the global batch
        for rank in (zero, one):
            assert_same_gradients(expected["grads"], rank["grads"], step)
    assert float(single["steps"][0]["scores"][2]) == pytest.approx(float(torch.log(torch.tensor(float(VOCAB)))))
