"""Loss-based reweighting under data parallelism (gloo, 2 processes) against one process with the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import assert_same_gradients, ddp_model, free_port, join_gloo, leave_gloo, rank_batches

pytestmark = pytest.mark.slow


def _loss_based_steps(rank: int, world: int, port: int, out_dir: str, micro: int = 1) -> None:
    """4 steps (the first in burn-in) on this rank's slice of fixed global batches; save grads and weights."""
    import baselines.loss_based as loss_based

    join_gloo(rank, world, port)
    computed = []  # every global weight vector this rank computed
    formula = loss_based.loss_based_weights

    def recording(*args, **kwargs):
        computed.append(formula(*args, **kwargs).clone())
        return computed[-1]

    loss_based.loss_based_weights = recording  # restored below: the single-process run is in pytest's process
    try:
        _run_steps(rank, world, out_dir, micro, computed)
    finally:
        loss_based.loss_based_weights = formula
    leave_gloo(world)


def _run_steps(rank: int, world: int, out_dir: str, micro: int, computed: list) -> None:
    import torch

    import baselines.loss_based as loss_based
    from dograph.distributed import DistContext
    from dograph.step.build import build_step_runner
    from dograph.step.runners import ReweightStep, StepContext

    ctx_dist = DistContext(rank=rank, world_size=world)
    model = ddp_model()
    mixer = loss_based.LossBasedMixer(strategy="extremes", kl_reg=0.4, burn_in=1, domains=["a", "b", "c"],
                                      dist=ctx_dist)
    ctx = StepContext(model, mixer, ctx_dist, 8, lambda: torch.autocast("cpu", enabled=False))
    runner = build_step_runner(ctx)
    assert isinstance(runner, ReweightStep)
    records = []
    for step in range(4):
        result = runner.run(step, rank_batches(step, rank, world, micro, num_domains=3))
        records.append({"grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                        "weights": None if result.weights is None else result.weights.clone(),
                        "metrics": {k: float(v) for k, v in result.metrics.items()}})
        model.zero_grad(set_to_none=True)
    torch.save({"steps": records, "computed": computed},
               f"{out_dir}/rank{rank}_world{world}_micro{micro}.pt")


@pytest.mark.parametrize("micro", [1, 2], ids=["one_micro_batch", "two_micro_batches"])
def test_loss_based_ddp_weights_and_gradients_equal_single_process(tmp_path: Path, micro: int) -> None:
    """Both ranks compute the same global weights; their slices and the summed gradients match one process."""
    import torch
    import torch.multiprocessing as mp

    _loss_based_steps(0, 1, 0, str(tmp_path))
    mp.spawn(_loss_based_steps, args=(2, free_port(), str(tmp_path), micro), nprocs=2, join=True)
    single = torch.load(tmp_path / "rank0_world1_micro1.pt", weights_only=False)
    ranks = [torch.load(tmp_path / f"rank{r}_world2_micro{micro}.pt", weights_only=False) for r in (0, 1)]
    assert len(single["computed"]) == 3  # step 0 is the burn-in (plain mean)
    for a, b in zip(ranks[0]["computed"], ranks[1]["computed"], strict=True):
        assert torch.equal(a, b)  # identical weights on both ranks, no broadcast needed
    for step in range(4):
        expected = single["steps"][step]["weights"]
        got = [rank["steps"][step]["weights"] for rank in ranks]
        if step == 0:
            assert expected is None and got == [None, None]
        else:
            assert torch.allclose(torch.cat(got), expected, rtol=1e-4, atol=1e-7), step
            assert torch.allclose(ranks[0]["computed"][step - 1], single["computed"][step - 1], rtol=1e-4)
        for rank in ranks:
            assert_same_gradients(single["steps"][step]["grads"], rank["steps"][step]["grads"], step)
        logged = ranks[0]["steps"][step]["metrics"]  # rank 0 logs the global batch's domain mass
        assert logged == pytest.approx(single["steps"][step]["metrics"], rel=1e-4, abs=1e-6)
        assert ranks[1]["steps"][step]["metrics"] == {}
