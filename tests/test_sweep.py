"""Proxy sweeps: cached proxies, resumption, failures, the launchers (dograph/runs/sweep.py)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from helpers import REPO

import dograph.atomic
import dograph.runs.pipeline
import dograph.runs.sweep
from baselines.fixed import FixedMixer
from baselines.sweep_fit import FitOutcome, SweepFitMixer
from dograph.distributed import DistContext
from dograph.errors import DataError
from dograph.runs.app import run_training
from dograph.runs.pipeline import StageIncomplete
from dograph.runs.sweep import ProxyOutcome, SweepResult, SweepSpec

MIXTURES = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3]]


class BestProxy(FixedMixer):
    """A toy regression method: the main run samples the proxy mixture with the lowest average loss."""

    name = "test_sweep"  # its proxies live under stages/test_sweep/
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
    real = dograph.runs.sweep.run_stage
    trained: list[str] = []

    def dies_at_the_third(main, method_name, spec, needed, dist, train, **options):
        if len(trained) == 2:
            raise KeyboardInterrupt  # the job is killed while the third proxy trains
        trained.append(str(spec.mixer["mixture"]))
        return real(main, method_name, spec, needed, dist, train, **options)

    monkeypatch.setattr(dograph.runs.sweep, "run_stage", dies_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        run_training(sweep_cfg(), tmp_path / "main")
    assert len(markers(tmp_path)) == 2
    counted: list[str] = []

    def counting(main, method_name, spec, needed, dist, train, **options):
        counted.append(str(spec.mixer["mixture"]))
        return real(main, method_name, spec, needed, dist, train, **options)

    monkeypatch.setattr(dograph.runs.sweep, "run_stage", counting)
    run_training(sweep_cfg(), tmp_path / "main2")
    assert counted == [str(MIXTURES[2]), str(MIXTURES[3])]  # only the two it lacked
    assert len(markers(tmp_path)) == 4


def test_a_failed_proxy_is_reported_and_left_out(sweep_cfg, tmp_path: Path, monkeypatch) -> None:
    real = dograph.runs.sweep.run_stage

    def second_fails(main, method_name, spec, needed, dist, train, **options):
        if spec.mixer["mixture"] == MIXTURES[1]:
            raise RuntimeError("out of memory (simulated)")
        return real(main, method_name, spec, needed, dist, train, **options)

    monkeypatch.setattr(dograph.runs.sweep, "run_stage", second_fails)
    run_training(sweep_cfg(), tmp_path / "main")
    rows = table(tmp_path)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "ok"]
    assert rows[1]["error"] == "RuntimeError: out of memory (simulated)"
    assert json.loads(Path(rows[1]["run_dir"], "failed.json").read_text())["index"] == 1
    with pytest.raises(DataError, match=r"only 3 of 4 test_sweep proxies succeeded; the fit needs at least 4 "
                                        r"\(mixer\.min_proxies\)"):
        run_training(sweep_cfg(min_proxies=4), tmp_path / "refused")


def test_a_paused_proxy_stops_the_sweep_and_the_same_command_continues_it(sweep_cfg, tmp_path: Path) -> None:
    """stop_after_steps pauses a proxy: the sweep stops in one line (not "failed"), and reruns continue it."""
    cfg = sweep_cfg(count=2, proxy={"model": "gpt2_tiny", "trainer": "debug", "max_steps": 2, "seed": 3,
                                    "stop_after_steps": 1})
    for paused in (0, 1):  # each run finishes the paused proxy, then pauses the next one
        with pytest.raises(StageIncomplete, match=r"stage test_sweep/proxy stopped at step 1 of 2 "
                                                  r"\(stop_after_steps\): run the same command again"):
            run_training(cfg, tmp_path / "main")
        root = tmp_path / "out" / "stages" / "test_sweep"
        assert not list(root.glob("proxy-*/failed.json"))
        assert len(list(root.glob("proxy-*/paused.json"))) == 1 and len(markers(tmp_path)) == paused
    result = run_training(cfg, tmp_path / "main")
    assert [(r["status"], r["steps"]) for r in table(tmp_path)] == [("ok", "2"), ("ok", "2")]
    assert not list((tmp_path / "out" / "stages" / "test_sweep").glob("proxy-*/paused.json"))
    assert result.state.step == 2


DOMAINS = ["code", "docs", "licences"]


def fake_train(cfg, run_dir: Path, dist, stage_results=None, **_: Any) -> SimpleNamespace:
    """Stands in for a proxy's training (no model), with the trainer's pause and resume.

    ``steps`` holds the steps done; ``stop_after_steps`` pauses after that many more (checkpointed).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    done = int((run_dir / "steps").read_text()) if cfg.resume else 0
    done = min(cfg.trainer.max_steps, done + (cfg.trainer.stop_after_steps or cfg.trainer.max_steps))
    (run_dir / "steps").write_text(str(done))
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "checkpoints" / "latest").write_text(str(done))
    losses = {f"val/{d}/loss": 2.0 + i for i, d in enumerate(DOMAINS)}
    return SimpleNamespace(stopped_early=done < cfg.trainer.max_steps, outputs={},
                           final_eval={**losses, "val/avg_loss": 3.0}, state=SimpleNamespace(step=done, elapsed=0.1))


def fake_sweep(launcher: str = "basic", **settings: Any) -> SweepSpec:
    return SweepSpec("proxy", {"_target_": "baselines.fixed.FixedMixer"}, MIXTURES[:3],
                     {"model": "gpt2_tiny", "trainer": "debug", "max_steps": 2, "seed": 3, **settings},
                     min_success=2, launcher=launcher)


def test_paused_proxies_of_a_launcher_stop_the_sweep(sweep_cfg, tmp_path: Path, monkeypatch) -> None:
    """A launcher's jobs pause (paused.json): the sweep stops in one line instead of fitting on fewer proxies."""
    main, spec = sweep_cfg(), fake_sweep("joblib", stop_after_steps=1)

    def jobs(main, method_name, spec, missing, directory, env) -> None:  # what dograph.runs.sweep_job does per proxy
        for index in missing:
            with contextlib.suppress(StageIncomplete):
                dograph.runs.sweep.train_proxy(main, method_name, spec, index, DistContext(), fake_train, env)

    monkeypatch.setattr(dograph.runs.sweep, "_launch_multirun", jobs)
    with pytest.raises(StageIncomplete, match=r"3 of 3 test_sweep proxies stopped before their last step "
                                              r"\(stop_after_steps\), the first in .*proxy-.*: run the same command"):
        dograph.runs.sweep.run_sweep(main, "test_sweep", spec, DOMAINS, DistContext(), fake_train)
    assert [r["status"] for r in table(tmp_path)] == ["paused"] * 3
    result = dograph.runs.sweep.run_sweep(main, "test_sweep", spec, DOMAINS, DistContext(), fake_train)  # resumes
    assert [o.ok for o in result.outcomes] == [True] * 3 and [o.result.steps for o in result.outcomes] == [2] * 3


def _write_tables(result: SweepResult, rounds: int) -> None:
    for _ in range(rounds):
        dograph.runs.sweep.write_table(result, {"seed": 3})


def test_main_runs_sharing_a_sweep_write_its_table_under_their_own_temporaries(tmp_path: Path) -> None:
    """Two processes rewrite mixtures.csv at once: no clash of temporaries, never a torn table."""
    outcomes = [ProxyOutcome(i, [1.0, 0.0, 0.0], tmp_path / f"proxy-{i}", error="x" * 2000) for i in range(50)]
    result = SweepResult("m", "proxy", DOMAINS, tmp_path / "sweep", outcomes)
    context = multiprocessing.get_context("fork")  # fast: nothing to import again
    writers = [context.Process(target=_write_tables, args=(result, 200)) for _ in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
    assert [w.exitcode for w in writers] == [0, 0]  # a shared temporary name makes one writer's rename fail
    with open(result.table) as handle:
        assert len(list(csv.DictReader(handle))) == 50
    assert sorted(p.name for p in result.directory.iterdir()) == ["mixtures.csv"]  # no temporary left behind


def test_fit_report_and_plot_are_written_under_temporaries_of_this_process(tmp_path: Path, monkeypatch) -> None:
    renamed: list[tuple[str, str]] = []
    real = os.replace

    def recording(src, dst) -> None:
        renamed.append((Path(src).name, Path(dst).name))
        real(src, dst)

    monkeypatch.setattr(dograph.atomic.os, "replace", recording)
    outcome = FitOutcome(np.array([0.5, 0.5]), 1.0, "loss", {}, np.array([1.0, 2.0]), np.array([1.1, 1.9]))
    reporter = SimpleNamespace(report=lambda: {"predicted_loss": 1.0}, outcome=outcome, label="toy")
    SweepFitMixer.write_report(reporter, tmp_path, "-abc")
    SweepFitMixer.write_report(reporter, tmp_path, "-abc")
    assert sorted({dst for _, dst in renamed}) == ["fit-abc.json", "predicted_vs_measured-abc.png"]
    temporaries = [src for src, _ in renamed]
    assert len(set(temporaries)) == 4 and all(f".{os.getpid()}-" in src for src in temporaries)
    assert (tmp_path / "predicted_vs_measured-abc.png").read_bytes()[:4] == b"\x89PNG"


def _hold_sweep_lock(directory: str, held: Any, seconds: float) -> None:
    with dograph.runs.sweep.sweep_lock(Path(directory), DistContext()):
        held.set()
        time.sleep(seconds)


def test_main_runs_sharing_a_sweep_take_its_lock(sweep_cfg, tmp_path: Path) -> None:
    """A second main run waits for the first to finish with the sweep before it writes the sweep's files."""
    main, spec = sweep_cfg(), fake_sweep()
    env = dograph.runs.sweep.sweep_environment(main, "test_sweep", spec, DistContext())
    keys = [dograph.runs.pipeline.locate_stage(main, "test_sweep", spec.proxy(i), {}, env)[1] for i in range(3)]
    directory = dograph.runs.sweep.sweep_directory(main, "test_sweep", spec, keys)
    context = multiprocessing.get_context("fork")
    held = context.Event()
    other = context.Process(target=_hold_sweep_lock, args=(str(directory), held, 2.0))
    other.start()
    assert held.wait(60)
    started = time.perf_counter()
    result = dograph.runs.sweep.run_sweep(main, "test_sweep", spec, DOMAINS, DistContext(), fake_train)
    waited = time.perf_counter() - started
    other.join(30)
    assert result.directory == directory and waited > 1.0, waited


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
    for entry in (["run.py"], ["-m", "dograph.runs.sweep_job", "job.file=x.json", "job.index=0"]):
        proc = subprocess.run([sys.executable, *entry, f"hydra/launcher={launcher}", "--cfg", "hydra"],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "SlurmLauncher" in proc.stdout and "timeout_min" in proc.stdout
