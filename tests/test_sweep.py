"""Proxy sweeps: cached proxies, resumption, failures, the launchers (dograph/sweep.py)."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import REPO

import dograph.sweep
from baselines.fixed import FixedMixer
from dograph.app import run_training
from dograph.errors import DataError
from dograph.sweep import SweepSpec

MIXTURES = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3]]


class BestProxy(FixedMixer):
    """A toy regression method: the main run samples the proxy mixture with the lowest average loss."""

    has_sweep = True

    @classmethod
    def plan_sweep(cls, node: dict[str, Any], domains: list[str], natural_mixture: list[float]) -> SweepSpec:
        return SweepSpec("proxy", {"_target_": "baselines.fixed.FixedMixer"}, MIXTURES[:node["count"]],
                         dict(node["proxy"]), min_success=node["min_proxies"], launcher=node["launcher"],
                         launcher_overrides=tuple(node["launcher_overrides"]))

    def __init__(self, *, sweep: Any, domains: list[str], **_: Any) -> None:
        mixtures, losses = sweep.arrays()
        self.sweep = sweep
        super().__init__(mixture=list(mixtures[int(np.argmin(losses.mean(1)))]), domains=domains)


def method(**changes: Any) -> dict[str, Any]:
    return {"_target_": "test_sweep.BestProxy", "count": 4, "min_proxies": 2, "launcher": "basic",
            "launcher_overrides": [], "proxy": {"model": "gpt2_tiny", "trainer": "debug", "max_steps": 2, "seed": 3},
            **changes}


@pytest.fixture
def sweep_cfg(make_config, tmp_path: Path):
    def make(*extra: str, **changes: Any):
        cfg = make_config(f"paths.output_root={tmp_path / 'out'}", "trainer.max_steps=2", *extra)
        return dataclasses.replace(cfg, mixer=method(**changes))

    return make


def table(tmp_path: Path) -> list[dict[str, str]]:
    path = next((tmp_path / "out" / "stages" / "test_sweep").glob("proxy-sweep-*/mixtures.csv"))
    with open(path) as handle:
        return list(csv.DictReader(handle))


def markers(tmp_path: Path) -> dict[str, str]:
    root = tmp_path / "out" / "stages" / "test_sweep"
    return {p.parent.name: p.read_text() for p in root.glob("proxy-*/stage.json")}


def test_sweep_trains_every_proxy_and_reuses_them(sweep_cfg, tmp_path: Path) -> None:
    run_training(sweep_cfg(), tmp_path / "main")
    rows = table(tmp_path)
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert [float(r["w:code"]) for r in rows] == [1.0, 0.0, 0.0, pytest.approx(1 / 3)]
    assert all(float(r["loss:docs"]) > 0 and float(r["val_avg_loss"]) > 0 and r["steps"] == "2" for r in rows)
    summary = json.loads((tmp_path / "main" / "stages.json").read_text())
    assert len(summary) == 4 and not any(s["reused"] for s in summary)
    before = markers(tmp_path)
    run_training(sweep_cfg("seed=9"), tmp_path / "again")  # another main run: every proxy is reused
    assert markers(tmp_path) == before
    assert all(s["reused"] for s in json.loads((tmp_path / "again" / "stages.json").read_text()))
    best = int(np.argmin([float(r["val_avg_loss"]) for r in rows]))  # same average as the mixer's over domains
    state = torch.load(tmp_path / "again" / "checkpoints" / "step_00000002.pt", weights_only=False)
    expected = np.array(MIXTURES[best]) / sum(MIXTURES[best])
    assert state["ranks"][0]["data"]["mixture"].tolist() == pytest.approx(expected)


def test_a_sweep_killed_halfway_trains_only_the_missing_proxies(sweep_cfg, tmp_path: Path, monkeypatch) -> None:
    real = dograph.sweep.run_stage
    trained: list[str] = []

    def dies_at_the_third(main, method_name, spec, needed, dist, train, **options):
        if len(trained) == 2:
            raise KeyboardInterrupt  # the job is killed while the third proxy trains
        trained.append(str(spec.mixer["mixture"]))
        return real(main, method_name, spec, needed, dist, train, **options)

    monkeypatch.setattr(dograph.sweep, "run_stage", dies_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        run_training(sweep_cfg(), tmp_path / "main")
    assert len(markers(tmp_path)) == 2
    counted: list[str] = []

    def counting(main, method_name, spec, needed, dist, train, **options):
        counted.append(str(spec.mixer["mixture"]))
        return real(main, method_name, spec, needed, dist, train, **options)

    monkeypatch.setattr(dograph.sweep, "run_stage", counting)
    run_training(sweep_cfg(), tmp_path / "main2")
    assert counted == [str(MIXTURES[2]), str(MIXTURES[3])]  # only the two it lacked
    assert len(markers(tmp_path)) == 4


def test_a_failed_proxy_is_reported_and_left_out(sweep_cfg, tmp_path: Path, monkeypatch) -> None:
    real = dograph.sweep.run_stage

    def second_fails(main, method_name, spec, needed, dist, train, **options):
        if spec.mixer["mixture"] == MIXTURES[1]:
            raise RuntimeError("out of memory (simulated)")
        return real(main, method_name, spec, needed, dist, train, **options)

    monkeypatch.setattr(dograph.sweep, "run_stage", second_fails)
    run_training(sweep_cfg(), tmp_path / "main")
    rows = table(tmp_path)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "ok"]
    assert rows[1]["error"] == "RuntimeError: out of memory (simulated)"
    assert json.loads(Path(rows[1]["run_dir"], "failed.json").read_text())["index"] == 1
    with pytest.raises(DataError, match=r"only 3 of 4 test_sweep proxies succeeded; the fit needs at least 4 "
                                        r"\(mixer\.min_proxies\)"):
        run_training(sweep_cfg(min_proxies=4), tmp_path / "refused")


@pytest.mark.slow
def test_joblib_launcher_runs_a_four_proxy_sweep_with_two_workers(sweep_cfg, tmp_path: Path) -> None:
    cfg = sweep_cfg(launcher="joblib", launcher_overrides=["hydra.launcher.n_jobs=2"])
    run_training(cfg, tmp_path / "main")
    rows = table(tmp_path)
    assert [r["status"] for r in rows] == ["ok"] * 4
    log = next((tmp_path / "out" / "stages" / "test_sweep").glob("proxy-sweep-*/launcher.log")).read_text()
    assert "Joblib.Parallel" in log and "n_jobs=2" in log


@pytest.mark.parametrize("launcher", ["submitit_slurm", "slurm"])
def test_slurm_launcher_configs_compose_without_slurm(launcher: str) -> None:
    for entry in (["run.py"], ["-m", "dograph.sweep_job", "job.file=x.json", "job.index=0"]):
        proc = subprocess.run([sys.executable, *entry, f"hydra/launcher={launcher}", "--cfg", "hydra"],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "SlurmLauncher" in proc.stdout and "timeout_min" in proc.stdout
