"""Run records: what a record keeps, how the index reads it beside live runs, stale records, the budgeted
scheduler, and the byte-identical rebuild of committed artifacts from committed records (a fixture).

The fixture ``tests/fixtures/records/`` holds records of a synthetic study and the artifacts built from
them; regenerate both after a deliberate change of the artifacts with
``python tests/test_records.py --regenerate``.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_experiments import make_run, synthetic_scale

from experiments.index import build_index
from experiments.records import record_id, records_root, stale_records, write_record
from experiments.reproduce import needed_runs, parse_budget, reproduce
from experiments.runs import train_missing
from experiments.scale import RunRequest, Scale, find_run, make_request

FIXTURE = Path(__file__).parent / "fixtures" / "records"
FIXTURE_ARTIFACTS = ("table1", "table2", "figure5")


def staged_run(root: Path, scale: Scale, name: str, method: str, seed: int, **kwargs) -> Path:
    """A complete run as the scale's scheduler leaves it: heavy files beside what a record keeps."""
    run = make_run(root, name, method, seed=seed, scale=scale, scores={"piqa": ("acc_norm", 0.5 + 0.01 * seed)},
                   **kwargs)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step_00000020.pt").write_bytes(b"\0" * (2 << 20))
    (run / "hf").mkdir()
    (run / "hf" / "model.safetensors").write_bytes(b"\0" * 1024)
    (run / "wandb").mkdir()
    (run / "mixer").mkdir()
    (run / "mixer" / "weights.csv").write_text("step,code,wiki\n1,0.5,0.5\n")
    (run / "mixer" / "assignments.npz").write_bytes(b"\0" * 64)
    (run / ".hydra" / "config.yaml").write_text(f"seed: {seed}\n")
    (run / "launch.json").write_text(json.dumps({"wall_s": 30.0 + seed, "threads": 1, "jobs": 2}))
    return run


def test_a_record_keeps_what_the_index_reads_and_nothing_heavy(tmp_path: Path) -> None:
    scale = synthetic_scale(tmp_path / "runs")
    run = staged_run(tmp_path / "runs", scale, "u0", "uniform", 0, stages=[4.0])
    record = write_record(run, tmp_path / "records")
    kept = {str(p.relative_to(record)) for p in record.rglob("*") if p.is_file()}
    assert kept == {"run_info.json", "summary.json", "metrics.jsonl", "eval/scores.json", "launch.json", "config.yaml",
                    "stages.json", "mixer/weights.csv", "record.json"}
    meta = json.loads((record / "record.json").read_text())
    assert meta["bytes"] < 64 * 1024 and meta["choices"]["mixer"] == "uniform"
    live = build_index([tmp_path / "runs"]).iloc[0]
    copy = build_index([tmp_path / "records"]).iloc[0]
    assert copy["source"] == "record" and live["source"] == "run"
    same = [c for c in live.index if c not in ("run_dir", "source")]
    assert copy[same].equals(live[same])
    assert record.name == record_id(live.to_dict())


def test_a_live_run_and_its_own_record_are_one_row_and_a_newer_run_wins(tmp_path: Path) -> None:
    scale = synthetic_scale(tmp_path / "runs")
    run = staged_run(tmp_path / "runs", scale, "u0", "uniform", 0)
    record = write_record(run, tmp_path / "records")
    both = build_index([tmp_path / "runs", tmp_path / "records"])
    assert len(both) == 1 and both.iloc[0]["source"] == "run" and both.iloc[0]["record"] == str(record)
    make_run(tmp_path / "runs", "u0_again", "uniform", scale=scale, loss=1.0, completed_at="2026-01-01T00:00:00+00:00")
    index = build_index([tmp_path / "runs", tmp_path / "records"])
    request = make_request(scale, "uniform", "gpt2_tiny", "embedded", 0)
    assert len(index) == 2 and find_run(index, request).iloc[-1]["val/avg_loss"] == 1.25


def test_a_record_made_with_other_overrides_is_stale_and_says_which(tmp_path: Path) -> None:
    scale = replace(synthetic_scale(tmp_path / "runs"), results_dir=tmp_path / "results")
    old = replace(scale, common=["trainer.max_steps=10"])
    run = make_run(tmp_path / "runs", "u0", "uniform", scale=old)
    from dograph.runs.app import canonical_overrides
    from experiments.scale import request_overrides

    info = json.loads((run / "run_info.json").read_text())
    request = make_request(old, "uniform", "gpt2_tiny", "embedded", 0)
    info["overrides"] = canonical_overrides(request_overrides(request, old))
    (run / "run_info.json").write_text(json.dumps(info))
    write_record(run, records_root(scale))
    shutil.rmtree(tmp_path / "runs")
    from experiments.paper import ARTIFACTS

    requests = needed_runs([ARTIFACTS["table2"]], scale)
    index = build_index([records_root(scale)])
    ((where, why),) = stale_records(index, requests, scale)
    assert "uniform" in where and "trainer.max_steps=10" in why and "now trainer.max_steps=20" in why
    assert find_run(index, requests[0]).empty


def test_priority_puts_the_method_comparison_first_seed_by_seed(tmp_path: Path) -> None:
    from experiments.paper import ARTIFACTS

    scale = synthetic_scale(tmp_path)
    requests = needed_runs(list(ARTIFACTS.values()), scale)
    comparison = len(scale.methods) * len(scale.seeds)
    head = requests[:comparison]
    assert [(r.seed, r.method) for r in head] == [(s, m) for s in scale.seeds for m in scale.methods]
    assert {r.model for r in head} == {"gpt2_tiny"} and all(r.m == 11 for r in head)
    assert len(set(requests)) == len(requests)


def test_budget_text() -> None:
    assert parse_budget("100m") == 6000 and parse_budget("2h") == 7200 and parse_budget("90s") == 90
    assert parse_budget("5") == 300
    with pytest.raises(ValueError, match="cannot read the budget 'soon'"):
        parse_budget("soon")


def test_the_scheduler_starts_only_what_fits_in_the_budget_in_order(tmp_path: Path, monkeypatch) -> None:
    """Runs whose estimate does not fit are left for the next invocation; the first misfit stops the launching."""
    scale = replace(synthetic_scale(tmp_path), runs_root=tmp_path)
    requests = [make_request(scale, "uniform", "gpt2_tiny", "embedded", s) for s in (0, 1, 2)]
    launched: list[list[str]] = []

    def fake_command(request: RunRequest, at: Scale) -> list[str]:
        launched.append([request.label()])
        request.run_dir(at).mkdir(parents=True, exist_ok=True)
        return [sys.executable, "-c", "pass"]

    monkeypatch.setattr("experiments.runs.run_command", fake_command)
    estimates = {0: 1.0, 1: 1000.0, 2: 1.0}
    done = []
    outcome = train_missing(requests, scale, jobs=2, budget_s=60, estimate_s=lambda r: estimates[r.seed],
                            on_done=lambda r, d: done.append(r.seed))
    assert [r.seed for r in outcome.done] == [0] == done
    assert [r.seed for r in outcome.not_started] == [1, 2]  # seed 2 would fit, but it comes after seed 1
    assert json.loads((requests[0].run_dir(scale) / "launch.json").read_text())["jobs"] == 2


def test_a_run_the_scheduler_is_still_finishing_is_not_recorded_by_another_process(tmp_path: Path) -> None:
    """A run's summary says complete before its process has evaluated, exported and been given launch.json: a
    second process (``reproduce --no-train``) must leave it to the scheduler, until that process is gone."""
    import subprocess

    from experiments.index import in_flight, running_marker
    from experiments.records import record_missing

    scale = synthetic_scale(tmp_path / "runs")
    run = staged_run(tmp_path / "runs", scale, "u0", "uniform", 0)
    request = make_request(scale, "uniform", "gpt2_tiny", "embedded", 0)
    index = build_index([tmp_path / "runs"])
    running_marker(run).write_text(f"{os.getpid()}\n")  # a live process
    assert in_flight(run) and record_missing(index, [request], tmp_path / "records") == []
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    running_marker(run).write_text(f"{gone.pid}\n")  # its scheduler was killed: the run is as it is
    assert not in_flight(run) and len(record_missing(index, [request], tmp_path / "records")) == 1


def test_the_scheduler_marks_a_run_while_its_process_runs(tmp_path: Path, monkeypatch) -> None:
    scale = replace(synthetic_scale(tmp_path), runs_root=tmp_path)
    request = make_request(scale, "uniform", "gpt2_tiny", "embedded", 0)
    seen = []

    def fake_command(request: RunRequest, at: Scale) -> list[str]:
        request.run_dir(at).mkdir(parents=True, exist_ok=True)
        marker = request.run_dir(at).with_name(request.run_dir(at).name + ".running")
        wait = (f"import pathlib, time\np = pathlib.Path({str(marker)!r})\n"  # written just after the start
                "for _ in range(200):\n    if p.exists() and p.read_text().strip():\n        break\n"
                "    time.sleep(0.05)\nprint(p.read_text())")
        return [sys.executable, "-c", wait]

    monkeypatch.setattr("experiments.runs.run_command", fake_command)
    train_missing([request], scale, jobs=1, on_done=lambda r, d: seen.append(d))
    log = next((tmp_path / "logs").iterdir()).read_text()
    assert log.strip().isdigit() and seen  # the child read its own pid in the marker
    assert not request.run_dir(scale).with_name(request.run_dir(scale).name + ".running").exists()


def test_the_estimate_reads_the_runs_recorded_so_far(tmp_path: Path) -> None:
    """The median recorded wall time of the method and model; another method of the model; 15 minutes."""
    from experiments.reproduce import UNKNOWN_RUN_S, estimate_run_s

    scale = synthetic_scale(tmp_path / "runs")
    estimate = estimate_run_s([scale.runs_root], scale)
    dograph = make_request(scale, "dograph", "gpt2_tiny", "embedded", 2)
    assert estimate(dograph) == UNKNOWN_RUN_S
    staged_run(scale.runs_root, scale, "u0", "uniform", 0)  # wall_s 30 (launch.json)
    assert estimate(dograph) == 30.0  # read again: the run recorded since counts
    staged_run(scale.runs_root, scale, "g0", "dograph", 0)
    staged_run(scale.runs_root, scale, "g1", "dograph", 1)
    assert estimate(dograph) == 30.5


def fixture_scale(results_dir: Path, runs_root: Path) -> Scale:
    return replace(synthetic_scale(runs_root), results_dir=results_dir)


def build_fixture(out: Path) -> None:
    """Records of a synthetic study (uniform, DoReMi with stages, DoGraph; 2 seeds) and the artifacts built from
    them, into ``out`` (the runs themselves are made in a temporary directory and dropped)."""
    runs = out.parent / (out.name + ".runs")
    scale = fixture_scale(out, runs)
    for seed in (0, 1):
        staged_run(runs, scale, f"u{seed}", "uniform", seed, loss=3.0 + 0.1 * seed)
        staged_run(runs, scale, f"d{seed}", "doremi", seed, loss=2.9 + 0.05 * seed, stages=[40.0, 20.0])
        staged_run(runs, scale, f"g{seed}", "dograph", seed, loss=3.1 - 0.02 * seed, solve_s=0.002)
    from experiments.paper import ARTIFACTS

    reproduce([ARTIFACTS[n] for n in FIXTURE_ARTIFACTS], scale, train=False)
    shutil.rmtree(runs)


def test_the_committed_artifacts_rebuild_byte_identical_from_the_committed_records(tmp_path: Path, capsys) -> None:
    """A fresh clone: no run directories, only ``results/<scale>/runs``; ``--no-train`` rewrites the same bytes."""
    from experiments.paper import ARTIFACTS

    assert (FIXTURE / "runs").is_dir(), "run python tests/test_records.py --regenerate"
    results = tmp_path / "results"
    shutil.copytree(FIXTURE / "runs", results / "runs")
    scale = fixture_scale(results, tmp_path / "no-runs-here")
    reproduce([ARTIFACTS[n] for n in FIXTURE_ARTIFACTS], scale, train=False)
    assert capsys.readouterr().out.rstrip().endswith("6 of 6 runs done")
    committed = sorted(p.name for p in FIXTURE.iterdir() if p.is_file())
    assert {"table1.md", "table2.md", "figure5.png", "index.csv"} <= set(committed)
    _, mismatch, errors = filecmp.cmpfiles(FIXTURE, results, committed, shallow=False)
    assert mismatch == [] and errors == [], f"rebuilt differently: {mismatch}; missing: {errors}"


def test_the_committed_cpu_comparison_rebuilds_from_its_records(tmp_path: Path) -> None:
    """The real thing: Tables 1-2 and Figure 5 of ``results/cpu/`` from ``results/cpu/runs/`` alone, byte for byte
    (a change to the tables' code must come with the rebuilt files: ``reproduce paper --scale cpu --no-train``)."""
    from helpers import committed_records_scale

    from experiments.paper import ARTIFACTS

    committed, results, scale = committed_records_scale("cpu", tmp_path)
    requests = needed_runs([ARTIFACTS[n] for n in ("table2",)], scale)
    assert stale_records(build_index([results / "runs"]), requests, scale) == []
    for name in ("table1", "table2", "figure5"):
        ARTIFACTS[name].build(build_index([results / "runs"]), scale, results)
    names = ["table1.md", "table1.csv", "table2.md", "table2.csv", "table2.tex", "figure5_times.csv", "figure5.png"]
    _, mismatch, errors = filecmp.cmpfiles(committed, results, names, shallow=False)
    assert mismatch == [] and errors == [], f"results/cpu/ is not what its records give: {mismatch} {errors}"
    assert "(n=3)" in (results / "table2.md").read_text() and "(n=2)" not in (results / "table2.md").read_text()


if __name__ == "__main__" and sys.argv[1:] == ["--regenerate"]:
    shutil.rmtree(FIXTURE, ignore_errors=True)
    build_fixture(FIXTURE)
    print(f"wrote {FIXTURE}")


def test_sync_copies_new_records_and_derived_points_added_later(tmp_path: Path, capsys) -> None:
    from experiments.records import main as records_main

    source, target = tmp_path / "study" / "runs", tmp_path / "main" / "runs"
    for name in ("a-seed0-1", "b-seed0-2"):
        (source / name / "derived").mkdir(parents=True)
        (source / name / "record.json").write_text("{}")
    (source / "a-seed0-1" / "derived" / "points.csv").write_text("step\n400\n")
    (target / "a-seed0-1").mkdir(parents=True)
    (target / "a-seed0-1" / "record.json").write_text("{}")  # copied before its points were computed
    assert records_main(["sync", str(source), str(target)]) == 0
    assert capsys.readouterr().out.split() == ["a-seed0-1/derived/points.csv", "b-seed0-2"]
    assert (target / "a-seed0-1" / "derived" / "points.csv").read_text() == "step\n400\n"
    assert sorted(p.name for p in target.iterdir()) == ["a-seed0-1", "b-seed0-2"]  # no temporary left
    assert records_main(["sync", str(source), str(target)]) == 0
    assert capsys.readouterr().out.strip() == "nothing new"
    assert records_main(["sync", str(tmp_path / "none"), str(target)]) == 2
