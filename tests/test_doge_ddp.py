"""DoGE under data parallelism (gloo, 2 processes) against one process with the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import assert_same_gradients, ddp_model, free_port, join_gloo, leave_gloo, rank_batches

pytestmark = pytest.mark.slow


def _doge_steps(rank: int, world: int, port: int, out_dir: str, gradients: str, micro: int = 1) -> None:
    """4 DoGE proxy steps on this rank's slice of fixed global batches; save grads, weights and Grams."""
    import torch

    from baselines.doge import DoGEProxyMixer
    from dograph.distributed import DistContext
    from dograph.step.build import build_step_runner
    from dograph.step.projected import ProjectedStep
    from dograph.step.runners import StepContext

    join_gloo(rank, world, port)
    ctx_dist = DistContext(rank=rank, world_size=world)
    model = ddp_model()
    mixer = DoGEProxyMixer(mu=0.01, dw_min=-5.0, max_grad_norm=1.0, gradients=gradients,
                           projection={"rank": 4, "out_dim": 16, "exclude": []}, domains=["a", "b", "c"],
                           dist=ctx_dist, seed=1)
    grams = []
    original = mixer._gram

    def recording(signals):
        grams.append([t.clone() for t in original(signals)])
        return grams[-1]

    mixer._gram = recording
    ctx = StepContext(model, mixer, ctx_dist, 8, lambda: torch.autocast("cpu", enabled=False),
                      lr_at=lambda step: 0.05, num_domains=3)
    runner = build_step_runner(ctx)
    assert isinstance(runner, ProjectedStep)
    records = []
    for step in range(4):
        batches = rank_batches(step, rank, world, micro, num_domains=2 if step == 2 else 3)  # step 2: domain 2 absent
        result = runner.run(step, batches)
        records.append({"grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                        "sample_weights": result.weights.clone(), "weights": mixer.weights.clone(),
                        "gram": grams[-1][0], "counts": grams[-1][1]})
        model.zero_grad(set_to_none=True)
    torch.save({"steps": records, "mixture": mixer.mixture()},
               f"{out_dir}/{gradients}_rank{rank}_world{world}_micro{micro}.pt")
    leave_gloo(world)


@pytest.mark.parametrize(("gradients", "micro"), [("exact", 1), ("exact", 2), ("projected", 1)],
                         ids=["exact", "exact_2_micro_batches", "projected"])
def test_doge_ddp_weights_and_gradients_equal_single_process(tmp_path: Path, gradients: str, micro: int) -> None:
    """Both ranks hold identical weights (bit for bit); Grams, weights and summed gradients match one process."""
    import torch
    import torch.multiprocessing as mp

    _doge_steps(0, 1, 0, str(tmp_path), gradients)
    mp.spawn(_doge_steps, args=(2, free_port(), str(tmp_path), gradients, micro), nprocs=2, join=True)
    single = torch.load(tmp_path / f"{gradients}_rank0_world1_micro1.pt", weights_only=False)
    ranks = [torch.load(tmp_path / f"{gradients}_rank{r}_world2_micro{micro}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["mixture"] == ranks[1]["mixture"]
    assert ranks[0]["mixture"] == pytest.approx(single["mixture"], rel=1e-5)
    for step in range(4):
        one, (r0, r1) = single["steps"][step], (rank["steps"][step] for rank in ranks)
        assert torch.equal(r0["weights"], r1["weights"]) and torch.equal(r0["gram"], r1["gram"])  # no broadcast
        assert torch.equal(r0["counts"].cpu(), one["counts"].cpu())
        assert torch.allclose(r0["gram"], one["gram"], rtol=1e-4, atol=1e-9 * float(one["gram"].abs().max()))
        assert torch.allclose(r0["weights"], one["weights"], rtol=1e-5)
        assert torch.allclose(torch.cat([r0["sample_weights"], r1["sample_weights"]]), one["sample_weights"],
                              rtol=1e-4, atol=1e-8)
        for rank in (r0, r1):
            assert_same_gradients(one["grads"], rank["grads"], step)
    assert float(single["steps"][2]["counts"][2]) == 0  # the absent-domain step was exercised
