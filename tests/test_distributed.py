"""Data parallelism on CPU (gloo): torchrun with 2 processes against one process, same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, assert_same_gradients, ddp_model, free_port, join_gloo, leave_gloo, rank_batches

from dograph.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def launch(nproc: int, run_dir: Path, overrides: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "run.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(REPO / "run.py")]
    proc = subprocess.run([*cmd, *overrides, f"hydra.run.dir={run_dir}"], capture_output=True, text=True,
                          timeout=900, env=env, cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def curves(run_dir: Path) -> tuple[list[float], float]:
    records = read_metrics(run_dir)
    train = [r["train/loss"] for r in records if r["kind"] == "train"]
    return train, [r for r in records if r["kind"] == "eval"][-1]["val/avg_loss"]


# DoGraph at lr 1e-3: at 2e-3 the one-process run of this 8-sequence, 3-cluster toy spikes once (loss 6.6 -> 11.9
# at step 18, then recovers) while the 2-process run, on other data, does not, so the tail comparison failed on
# a trajectory, not on DDP. The exact gradient equality is tested apart (DoGraph under 2-process DDP).
@pytest.mark.parametrize("mixer", [["mixer=uniform"],
                                   ["mixer=dograph", "mixer.buffer_size=32", "m=3", "trainer.lr=1e-3"],
                                   ["mixer=loss_based", "mixer.burn_in=4"],
                                   ["mixer=doge", "mixer.proxy.max_steps=6", "mixer.proxy.trainer=debug"]],
                         ids=["uniform", "dograph", "loss_based", "doge_stages"])
def test_ddp_matches_single_process(tiny_overrides: list[str], tmp_path: Path, mixer: list[str]) -> None:
    overrides = [*tiny_overrides, "trainer.max_steps=24", "trainer.batch_size=8", "trainer.lr=2e-3",
                 "trainer.log_every=1", *mixer]
    launch(1, tmp_path / "single", [*overrides, f"paths.output_root={tmp_path / 'out1'}"])
    launch(2, tmp_path / "ddp", [*overrides, f"paths.output_root={tmp_path / 'out2'}"])
    single, single_val = curves(tmp_path / "single")
    ddp, ddp_val = curves(tmp_path / "ddp")
    assert len(single) == len(ddp) == 24
    assert abs(single[0] - ddp[0]) < 0.05  # same initial model, same-size batches
    tail_single, tail_ddp = sum(single[-6:]) / 6, sum(ddp[-6:]) / 6
    assert abs(tail_single - tail_ddp) < 0.05 * tail_single, (tail_single, tail_ddp)
    assert abs(single_val - ddp_val) < 0.03 * single_val, (single_val, ddp_val)
    assert (tmp_path / "ddp" / "checkpoints" / "latest").exists()
    assert len([r for r in read_metrics(tmp_path / "ddp") if r["kind"] == "train"]) == 24  # rank 0 only
    if "mixer=dograph" in mixer:  # past the warm-up: weights were computed and logged
        assert any(r.get("mixer/warmup") == 0.0 for r in read_metrics(tmp_path / "ddp") if r["kind"] == "train")
    if "mixer=loss_based" in mixer:  # reweighted steps were logged with their ESS
        assert any("train/ess" in r for r in read_metrics(tmp_path / "ddp") if r["kind"] == "train")
    if "mixer=doge" in mixer:  # the proxy stage ran under torchrun too, once per job
        summaries = [json.loads((tmp_path / run / "stages.json").read_text()) for run in ("single", "ddp")]
        assert [s[0]["device"] for s in summaries] == ["cpu x 1", "cpu x 2"] and not summaries[1][0]["reused"]


def _dograph_steps(rank: int, world: int, port: int, two_pass: bool, out_dir: str, micro: int = 1,
                   rule: str = "cluster_mean") -> None:
    """Run 4 DoGraph steps on this rank's slice of fixed global batches (in ``micro`` micro-batches), with the
    sample-weight rule ``rule`` (``mixer.sample_weights``); save grads."""
    import functools

    import torch

    from dograph.distributed import DistContext
    from dograph.method.mixer import DoGraphMixer
    from dograph.method.objectives import UncertaintyObjective
    from dograph.step.build import build_step_runner
    from dograph.step.projection import KroneckerProjector
    from dograph.step.runners import StepContext

    join_gloo(rank, world, port)
    ctx_dist = DistContext(rank=rank, world_size=world)
    model = ddp_model()
    mixer = DoGraphMixer(num_clusters=2, objective=functools.partial(UncertaintyObjective),
                         projection=KroneckerProjector(rank=4, out_dim=16, seed=1), buffer_size=8, dist=ctx_dist,
                         sample_weights=rule, shrink=0.5 if rule == "shrink" else None)
    ctx = StepContext(model, mixer, ctx_dist, 8, lambda: torch.autocast("cpu", enabled=False))
    runner = build_step_runner(ctx, "two_pass" if two_pass else "fast")
    records = []
    for step in range(4):
        result = runner.run(step, rank_batches(step, rank, world, micro))
        records.append({"grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                        "skipped": result.skipped})
        model.zero_grad(set_to_none=True)
    torch.save(records, f"{out_dir}/{_grads_file(rank, world, micro, two_pass, rule)}")
    leave_gloo(world)


def _grads_file(rank: int, world: int, micro: int, two_pass: bool, rule: str) -> str:
    return f"rank{rank}_world{world}_micro{micro}_{'two' if two_pass else 'fast'}_{rule}.pt"


@pytest.mark.parametrize(("two_pass", "micro", "rule"),
                         [(False, 1, "cluster_mean"), (True, 1, "cluster_mean"), (False, 2, "cluster_mean"),
                          (False, 1, "tilt"), (True, 1, "tilt"), (False, 1, "shrink"), (True, 1, "shrink")],
                         ids=["fast", "two_pass", "fast_2_micro_batches", "fast_tilt", "two_pass_tilt", "fast_shrink",
                              "two_pass_shrink"])
def test_dograph_ddp_gradients_equal_single_process(tmp_path: Path, two_pass: bool, micro: int, rule: str) -> None:
    """Weights come from the gathered global batch, so 2 ranks (x ``micro`` micro-batches) reproduce one process,
    with the paper's sample weights and with our variants (``mixer.sample_weights``)."""
    import torch
    import torch.multiprocessing as mp

    _dograph_steps(0, 1, 0, two_pass, str(tmp_path), rule=rule)
    mp.spawn(_dograph_steps, args=(2, free_port(), two_pass, str(tmp_path), micro, rule), nprocs=2, join=True)
    single = torch.load(tmp_path / _grads_file(0, 1, 1, two_pass, rule), weights_only=False)
    ranks = [torch.load(tmp_path / _grads_file(r, 2, micro, two_pass, rule), weights_only=False) for r in (0, 1)]
    assert not any(record["skipped"] for record in single)
    for step in range(4):
        for rank in ranks:
            assert_same_gradients(single[step]["grads"], rank[step]["grads"], step)


@pytest.mark.parametrize("rule", ["cluster_mean", "tilt", "shrink"])
def test_dograph_one_backward_equals_two_pass_for_every_sample_weight_rule(tmp_path: Path, rule: str) -> None:
    """The one-backward update forms ``sum_i v_i g_i`` for whatever ``v`` the rule gives: equal to the reference."""
    import torch

    for two_pass in (False, True):
        _dograph_steps(0, 1, 0, two_pass, str(tmp_path), rule=rule)
    fast, reference = (torch.load(tmp_path / _grads_file(0, 1, 1, two_pass, rule), weights_only=False)
                       for two_pass in (False, True))
    for step in range(4):
        assert_same_gradients(reference[step]["grads"], fast[step]["grads"], step)


def _window_on_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch

    from dograph.distributed import DistContext
    from dograph.train.weight_stats import WeightSummary, global_window, step_weight_stats

    join_gloo(rank, world, port)
    losses = [torch.tensor(1.0 + rank), torch.tensor(3.0 + 2 * rank)]  # this rank's mean sample loss per step
    v = torch.tensor([0.1, 0.2]) if rank == 0 else torch.tensor([0.3, 0.4])  # one step's weights, sum 1 globally
    stats = [step_weight_stats(v, torch.tensor([0, rank]), 2)]
    out = global_window(DistContext(rank=rank, world_size=world), losses, stats, 4, WeightSummary())
    torch.save(out, f"{out_dir}/window{rank}.pt")
    leave_gloo(world)


def test_logged_train_loss_and_weights_are_global(tmp_path: Path) -> None:
    """Every rank logs the mean over all ranks, and the ESS of the whole batch's weights."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_window_on_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        out = torch.load(tmp_path / f"window{rank}.pt", weights_only=False)
        assert out["train/loss"] == pytest.approx(((1 + 2) / 2 + (3 + 5) / 2) / 2)
        assert out["train/ess"] == pytest.approx(1 / (4 * (0.01 + 0.04 + 0.09 + 0.16)))
        assert out["train/effective_mixture"] == pytest.approx([0.1 + 0.2 + 0.3, 0.4])  # domains [0, 0] and [0, 1]
        assert out["train/sampled_mixture"] == pytest.approx([0.75, 0.25])
