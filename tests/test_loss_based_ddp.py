"""Loss-based reweighting under data parallelism (gloo, 2 processes) against one process with the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import free_port

pytestmark = pytest.mark.slow


def _loss_based_steps(rank: int, world: int, port: int, out_dir: str, micro: int = 1) -> None:
    """4 steps (the first in burn-in) on this rank's slice of fixed global batches; save grads and weights."""
    import torch
    import torch.distributed as dist

    import baselines.loss_based as loss_based

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
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
    if world > 1:
        dist.destroy_process_group()


def _run_steps(rank: int, world: int, out_dir: str, micro: int, computed: list) -> None:
    import torch

    import baselines.loss_based as loss_based
    from dograph.config import ModelConfig
    from dograph.data.sampler import Batch
    from dograph.distributed import DistContext
    from dograph.models import build_model
    from dograph.signals import ReweightStep, StepContext, build_step_runner

    ctx_dist = DistContext(rank=rank, world_size=world)
    model = build_model(ModelConfig(n_layer=2, n_head=2, d_model=32, d_ff=64, max_position_embeddings=32), 97, seed=3)
    mixer = loss_based.LossBasedMixer(strategy="extremes", kl_reg=0.4, burn_in=1, domains=["a", "b", "c"],
                                      dist=ctx_dist)
    ctx = StepContext(model, mixer, ctx_dist, 8, lambda: torch.autocast("cpu", enabled=False))
    runner = build_step_runner(ctx)
    assert isinstance(runner, ReweightStep)
    records = []
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, 97, (8, 13), generator=g)
        domain = torch.randint(0, 3, (8,), generator=g)
        rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
        batches = [Batch(part[:, :-1], part[:, 1:], dom)
                   for part, dom in zip(tokens[rows].chunk(micro), domain[rows].chunk(micro), strict=True)]
        result = runner.run(step, batches)
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
        for name, grad in single["steps"][step]["grads"].items():
            for rank in ranks:
                assert torch.allclose(rank["steps"][step]["grads"][name], grad, rtol=1e-4, atol=1e-7), (step, name)
        logged = ranks[0]["steps"][step]["metrics"]  # rank 0 logs the global batch's domain mass
        assert logged == pytest.approx(single["steps"][step]["metrics"], rel=1e-4, abs=1e-6)
        assert ranks[1]["steps"][step]["metrics"] == {}
