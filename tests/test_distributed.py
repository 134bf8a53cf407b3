"""Data parallelism on CPU (gloo): torchrun with 2 processes against one process, same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, free_port

from dograph.metrics import read_metrics

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


def test_ddp_matches_single_process(tiny_overrides: list[str], tmp_path: Path) -> None:
    overrides = [*tiny_overrides, "trainer.max_steps=24", "trainer.batch_size=8", "trainer.lr=2e-3",
                 "trainer.log_every=1"]
    launch(1, tmp_path / "single", overrides)
    launch(2, tmp_path / "ddp", overrides)
    single, single_val = curves(tmp_path / "single")
    ddp, ddp_val = curves(tmp_path / "ddp")
    assert len(single) == len(ddp) == 24
    assert abs(single[0] - ddp[0]) < 0.05  # same initial model, same-size batches
    tail_single, tail_ddp = sum(single[-6:]) / 6, sum(ddp[-6:]) / 6
    assert abs(tail_single - tail_ddp) < 0.05 * tail_single, (tail_single, tail_ddp)
    assert abs(single_val - ddp_val) < 0.03 * single_val, (single_val, ddp_val)
    assert (tmp_path / "ddp" / "checkpoints" / "latest").exists()
    assert len([r for r in read_metrics(tmp_path / "ddp") if r["kind"] == "train"]) == 24  # rank 0 only
