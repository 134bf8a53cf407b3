"""The experiment layer: confidence intervals, the results index, every table builder (golden Markdown)."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import REPO

from dograph.config import DataConfig
from experiments.index import build_index, find_run_dirs
from experiments.paper import ARTIFACTS
from experiments.proportions import count_domains, proportions_table
from experiments.runs import missing_runs, multirun_commands, run_command
from experiments.scale import RunRequest, Scale, find_run, load_scale, make_request, request_overrides, rows_for
from experiments.stats import mean_ci

GOLDEN = Path(__file__).parent / "golden"
TARGETS = {"uniform": "baselines.uniform.UniformMixer", "dograph": "dograph.method.mixer.DoGraphMixer",
           "doremi": "baselines.doremi.DoReMiMixer"}
DOMAINS = ["code", "wiki"]


def make_run(root: Path, name: str, method: str, *, seed: int = 0, model: str = "gpt2_tiny", m: int = 11,
             objective: str = "uncertainty", loss: float = 3.0, complete: bool = True, scores: dict | None = None,
             stages: list[float] = (), solve_s: float | None = None, hydra: bool = True, scale: Scale | None = None,
             fingerprint: str | None = None, completed_at: str = "2025-01-01T12:00:00+00:00", num_fewshot: int = 0,
             max_steps: int = 20) -> Path:
    """A run directory with the files a real run writes (only the parts the index reads).

    ``scale``: the run is the one that scale asks for (its request's fingerprint); ``fingerprint``: any other.
    """
    run = root / name
    run.mkdir(parents=True)
    config = {"mixer": {"_target_": TARGETS[method]}, "m": m, "seed": seed, "tags": [],
              "trainer": {"max_steps": max_steps}, "dataset": {}}
    if scale is not None:
        fingerprint = make_request(scale, method, model, "embedded", seed, m=m, objective=objective).fingerprint
    (run / "run_info.json").write_text(json.dumps({"config": config, "parameters": 1000, "fingerprint": fingerprint}))
    if hydra:
        (run / ".hydra").mkdir()
        choices = {"mixer": method, "model": model, "dataset": "embedded", "objective": objective, "trainer": "default"}
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    final = {f"val/{d}/loss": loss + i * 0.5 for i, d in enumerate(DOMAINS)}
    final.update({"val/avg_loss": loss + 0.25, "val/worst_loss": loss + 0.5})
    records = [{"kind": "train", "step": 10, "train/loss": loss + 1, **({"mixer/time_solve_s": solve_s} if solve_s
                                                                        else {})},
               {"kind": "eval", "step": 20, **final}]
    text = "".join(json.dumps(r) + "\n" for r in records)
    (run / "metrics.jsonl").write_text(text if complete else text[:-20])  # a crash cuts the last line
    if complete:
        (run / "summary.json").write_text(json.dumps({
            "status": "complete", "completed_at": completed_at, "steps": max_steps, "tokens_seen": 100,
            "train_time_s": 10.0 + seed, "eval_time_s": 2.0, "ckpt_time_s": 1.0, "final_eval": final}))
    if scores is not None:
        (run / "eval").mkdir()
        tasks = {t: {"metric": metric, "score": s, "stderr": 0.01, "n": 40} for t, (metric, s) in scores.items()}
        avg = sum(s for _, s in scores.values()) / len(scores)
        (run / "eval" / "scores.json").write_text(json.dumps({"tasks": tasks, "average": avg,
                                                             "num_fewshot": num_fewshot, "limit": 40}))
    if stages:
        (run / "stages.json").write_text(json.dumps([{"wall_time_s": s} for s in stages]))
    return run


def test_mean_ci_is_the_student_t_interval() -> None:
    est = mean_ci([1.0, 2.0, 3.0])
    assert est.mean == 2.0 and est.n == 3
    assert est.half_width == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)  # t_{0.975, 2} = 4.3027
    assert est.format(2) == "2.00 ± 2.48 (n=3)"
    one = mean_ci([5.0, float("nan"), None])
    assert one.n == 1 and math.isnan(one.half_width) and one.format(1) == "5.0 (n=1)"
    assert mean_ci([]).format() == "n/a"


def test_the_index_reads_complete_crashed_and_unevaluated_runs(tmp_path: Path) -> None:
    make_run(tmp_path, "a", "uniform", scores={"piqa": ("acc_norm", 0.6)}, stages=[4.0, 6.0])
    make_run(tmp_path, "b", "dograph", loss=2.0)  # no lm-eval file
    make_run(tmp_path, "c", "doremi", complete=False)  # crashed: no summary.json, a cut metrics line
    make_run(tmp_path, "d", "uniform", hydra=False)  # made without Hydra: method from the _target_
    make_run(tmp_path / "stages" / "doremi", "proxy-1", "uniform")  # a stage: a cost, not a run
    (tmp_path / "empty").mkdir()
    index = build_index([tmp_path]).set_index("run_dir")
    assert len(index) == 4 and len(find_run_dirs([tmp_path])) == 4
    a, b, c, d = (index.loc[str(tmp_path / n)] for n in "abcd")
    assert a["status"] == "complete" and a["downstream/piqa/score"] == 0.6 and a["has_downstream"]
    assert a["stage_time_s"] == 10.0 and a["total_time_s"] == 20.0 and a["stages"] == 2
    assert b["status"] == "complete" and not b["has_downstream"] and math.isnan(b["downstream/piqa/score"])
    assert b["val/avg_loss"] == 2.25
    assert c["status"] == "incomplete" and math.isnan(c["train_time_s"])
    assert d["method"] == "uniform" and d["model"] == "?"


def synthetic_scale(tmp_path: Path) -> Scale:
    return Scale(name="test", runs_root=tmp_path, results_dir=tmp_path / "results", launch="print", seeds=[0, 1],
                 methods=["uniform", "doremi", "dograph"], common=["trainer.max_steps=20"],
                 method_overrides={"doremi": ["mixer.proxy.max_steps=5"]},
                 settings={k: {"model": "gpt2_tiny", "dataset": "embedded"}
                           for k in ("slimpajama_medium", "pile_llama_1b", "pile_llama_3b", "slimpajama_small",
                                     "ablation")},
                 model_scale=["gpt2_tiny"], m_values=[3, 11], objectives=["uncertainty", "robust"],
                 corpora={"table6": "embedded", "table7": "embedded"})


def synthetic_runs(root: Path, scale: Scale, *, uniform_shots: tuple[int, int] = (0, 0)) -> pd.DataFrame:
    """uniform and dograph at two seeds, doremi never run, a robust-objective DoGraph at one seed."""
    for seed in (0, 1):
        make_run(root, f"u{seed}", "uniform", seed=seed, loss=3.0 + 0.1 * seed, scale=scale,
                 scores={"piqa": ("acc_norm", 0.60 + 0.02 * seed), "copa": ("acc", 0.55)},
                 num_fewshot=uniform_shots[seed])
        make_run(root, f"g{seed}", "dograph", seed=seed, loss=3.1 + 0.1 * seed, solve_s=0.002 + 0.001 * seed,
                 scores={"piqa": ("acc_norm", 0.58), "copa": ("acc", 0.57 + 0.01 * seed)}, stages=[], scale=scale)
    make_run(root, "r0", "dograph", objective="robust", loss=3.5, solve_s=0.004, scale=scale)
    make_run(root, "crashed", "doremi", complete=False, scale=scale)
    return build_index([root])


@pytest.fixture
def synthetic_index(tmp_path: Path) -> tuple[pd.DataFrame, Scale]:
    scale = synthetic_scale(tmp_path)
    return synthetic_runs(tmp_path, scale), scale


@pytest.mark.parametrize("name", ["table1", "table2", "table3", "table4", "table5", "table10", "table9"])
def test_table_builders_match_their_golden_markdown(name: str, synthetic_index, tmp_path: Path) -> None:
    index, scale = synthetic_index
    paths = ARTIFACTS[name].build(index, scale, tmp_path / "out")
    assert {p.suffix for p in paths} == {".md", ".tex", ".csv"}
    text = (tmp_path / "out" / f"{name}.md").read_text()
    golden = GOLDEN / f"{name}.md"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_a_method_without_runs_is_not_available_never_a_number(synthetic_index, tmp_path: Path) -> None:
    index, scale = synthetic_index
    ARTIFACTS["table2"].build(index, scale, tmp_path / "out")
    lines = (tmp_path / "out" / "table2.md").read_text().splitlines()
    doremi = next(line for line in lines if "DoReMi" in line)
    columns = next(line for line in lines if line.startswith("| Method")).count(" | ")  # every column but Method
    assert doremi.count("not available") == columns and not any(ch.isdigit() for ch in doremi)


def test_missing_runs_and_the_commands_that_make_them(synthetic_index) -> None:
    index, scale = synthetic_index
    missing = missing_runs(index, ARTIFACTS["table1"].requests(scale))
    assert [r.method for r in missing] == ["doremi", "doremi"]  # the crashed run does not count
    commands = multirun_commands(missing, scale)
    assert commands == [f"python run.py -m model=gpt2_tiny dataset=embedded mixer=doremi seed=0,1 "
                        f"trainer.max_steps=20 mixer.proxy.max_steps=5 paths.output_root={scale.runs_root} "
                        f"'tags=[methods]'"]


def test_a_request_becomes_run_overrides_with_a_fixed_directory() -> None:
    scale = load_scale("smoke")
    request = RunRequest("dograph", "gpt2_tiny", "embedded", 0, m=3)
    overrides = request_overrides(request, scale)
    assert overrides[:6] == ["mixer=dograph", "model=gpt2_tiny", "dataset=embedded", "seed=0", "m=3",
                             "objective=uncertainty"]
    assert overrides[-1] == f"hydra.run.dir={scale.runs_root}/runs/dograph/gpt2_tiny/embedded/m3_uncertainty/seed0"
    assert "mixer.buffer_size=64" in overrides and "eval=local" in overrides


def test_domain_proportions_are_counted_from_the_documents(tmp_path: Path) -> None:
    data = tmp_path / "corpus"
    data.mkdir()
    texts = {"alpha": ["hello world", "héllo"], "beta": ["a b c d e f g"] * 3}
    for domain, docs in texts.items():
        (data / f"{domain}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    counts = count_domains(DataConfig(source="jsonl", path=str(data)), "gpt2", tmp_path / "cache")
    assert counts["alpha"]["documents"] == 2 and counts["beta"]["documents"] == 3
    assert counts["alpha"]["bytes"] == len("hello world") + len("héllo".encode()) == 17
    assert counts["beta"]["tokens"] == 3 * 7  # GPT-2: "a", " b", ..., " g"
    table = proportions_table("table6", "t", counts, [])
    assert table.rows[-1][:4] == ["total", "56", "1.000", "5"]  # 17 + 3 x 13 bytes


@pytest.mark.parametrize("scale_name", ["smoke", "cpu", "paper"])
def test_every_run_of_every_scale_composes_and_validates(scale_name: str) -> None:
    """The overrides a scale gives its runs are valid configs (a typo would fail hours into a study)."""
    from conftest import compose_config

    from dograph.config import to_run_config
    from experiments.reproduce import needed_runs

    scale = load_scale(scale_name)
    requests = needed_runs(list(ARTIFACTS.values()), scale)
    variants = {(r.method, r.model, r.dataset, r.m, r.objective): r for r in requests}  # seeds compose alike
    for request in variants.values():
        overrides = [o for o in request_overrides(request, scale) if not o.startswith(("hydra.", "hydra/"))]
        cfg = to_run_config(compose_config(overrides))
        assert cfg.seed == request.seed and cfg.m == request.m


# ---- the artifacts as data (experiments/paper.py) ----------------------------------------------------------------


def test_the_artifact_table_names_what_make_builds_and_each_own_module() -> None:
    """ARTIFACTS is the Makefile's list in its order; an own module exists for exactly the entries that name one."""
    import re

    from experiments.artifact import OwnModule

    makefile = (REPO / "Makefile").read_text()
    listed = re.search(r"^ARTIFACTS := (.*?)(?<!\\)\n", makefile, re.M | re.S).group(1).replace("\\\n", " ").split()
    assert list(ARTIFACTS) == listed
    modules = {p.stem for p in (REPO / "experiments").glob("*.py") if re.fullmatch(r"(table|figure)\d+", p.stem)}
    assert modules == {name for name, artifact in ARTIFACTS.items() if isinstance(artifact, OwnModule)}
    for name, artifact in ARTIFACTS.items():  # a copied entry keeps the title of the one it was copied from
        kind, number = re.fullmatch(r"(table|figure)(\d+)", name).groups()
        assert artifact.title.startswith(f"{kind.capitalize()} {number}: "), (name, artifact.title)


@pytest.mark.parametrize("scale_name", ["smoke", "cpu", "paper"])
def test_every_setting_and_corpus_the_table_names_exists_at_every_scale(scale_name: str) -> None:
    """The artifacts without runs are checked too: a proportions table reads its corpus and its model's tokenizer."""
    from experiments.scale import model_tokenizer
    from experiments.tables import ProportionsTable

    scale = load_scale(scale_name)
    for artifact in ARTIFACTS.values():
        if isinstance(artifact, ProportionsTable):
            assert scale.corpora[artifact.name]
            assert model_tokenizer(scale.setting(artifact.setting)["model"])
        elif hasattr(artifact, "setting"):
            scale.setting(artifact.setting)


def test_reproduce_picks_artifacts_by_name_and_rejects_an_unknown_one_in_one_line(capsys) -> None:
    from experiments.reproduce import artifacts_named, main

    assert [a.name for a in artifacts_named(["table3", "figure5", "table3"])] == ["table3", "figure5"]
    assert artifacts_named(["table3", "paper"]) == list(ARTIFACTS.values())
    assert main(["table3", "tablex", "--scale", "smoke"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: unknown artifact 'tablex': choose from table1, table2,")


def test_reproduce_without_training_builds_from_what_exists_and_prints_the_rest(tmp_path: Path, capsys) -> None:
    """The no-train path of ``make table3``: no run exists, so every cell is "not available" and the runs are listed."""
    from experiments.reproduce import main

    results = tmp_path / "results"
    assert main(["table3", "--scale", "smoke", "--no-train", "--runs-root", str(tmp_path / "runs"),
                 "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert "1 artifacts need 7 runs; 7 missing" in out and out.count("python run.py -m ") == 7
    uniform = next(line for line in (results / "table3.md").read_text().splitlines() if line.startswith("| Uniform"))
    assert uniform.count("not available") == 1 and not any(ch.isdigit() for ch in uniform)  # the loss column only
    assert {p.name for p in results.iterdir()} == {"table3.md", "table3.tex", "table3.csv", "index.csv"}


# ---- which run a table reads (fingerprints, completion time, eval settings) ------------------------------------


def test_a_hand_made_200_step_run_does_not_displace_the_scales_400_step_run(tmp_path: Path) -> None:
    from dograph.runs.app import overrides_fingerprint

    scale = load_scale("cpu", runs_root=tmp_path)
    (request,) = [r for r in ARTIFACTS["table1"].requests(scale) if r.method == "uniform" and r.seed == 0]
    hand = ["model=gpt2_tiny", "dataset=embedded", "mixer=uniform", "seed=0", "trainer.max_steps=200",
            f"paths.output_root={tmp_path}", "tags=[methods]"]
    made = make_run(request.run_dir(scale).parent, "seed0", "uniform", scale=scale, max_steps=400,
                    completed_at="2025-01-01T10:00:00+00:00")
    make_run(tmp_path / "sweeps" / "methods", "mixer=uniform,seed=0,trainer.max_steps=200", "uniform",
             fingerprint=overrides_fingerprint(hand), max_steps=200, completed_at="2025-02-01T10:00:00+00:00")
    index = build_index([tmp_path])
    assert len(index) == 2 and set(index["max_steps"]) == {200, 400}
    assert list(rows_for(index, [request])["run_dir"]) == [str(made)]  # newer, and later in path order: not read
    assert missing_runs(index, [request]) == []
    shutil.rmtree(made)
    assert missing_runs(build_index([tmp_path]), [request]) == [request]  # the hand-made run alone does not count


def test_a_changed_common_makes_the_run_missing_and_starts_it_over(synthetic_index) -> None:
    index, scale = synthetic_index
    table1 = ARTIFACTS["table1"]
    assert [r.method for r in missing_runs(index, table1.requests(scale))] == ["doremi", "doremi"]
    longer = replace(scale, common=["trainer.max_steps=40"])
    assert len(missing_runs(index, table1.requests(longer))) == 6  # every run of the old common is missing
    request = next(r for r in table1.requests(scale) if r.method == "uniform" and r.seed == 0)
    run_dir = request.run_dir(scale)  # a run of the old common, stopped halfway
    make_run(run_dir.parent, run_dir.name, "uniform", scale=scale, complete=False)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "latest").write_text("step_00000010.pt")
    for at, expected in ((scale, "resume=true"), (longer, "overwrite=true")):
        request = next(r for r in table1.requests(at) if r.method == "uniform" and r.seed == 0)
        assert run_command(request, at)[-1] == expected  # it resumes only under the overrides it was made with


def test_of_two_matching_runs_the_one_completed_last_is_read(tmp_path: Path) -> None:
    scale = synthetic_scale(tmp_path)
    late = make_run(tmp_path, "a_by_hand", "uniform", scale=scale, loss=2.0, completed_at="2025-03-01T00:00:00+00:00")
    make_run(tmp_path, "z_by_the_scale", "uniform", scale=scale, loss=4.0, completed_at="2025-01-01T00:00:00+00:00")
    index = build_index([tmp_path])
    request = make_request(scale, "uniform", "gpt2_tiny", "embedded", 0)
    assert list(find_run(index, request)["run_dir"]) == [str(tmp_path / "z_by_the_scale"), str(late)]
    assert list(rows_for(index, [request])["run_dir"]) == [str(late)]
    with pytest.raises(ValueError, match="no fingerprint"):
        find_run(index, RunRequest("uniform", "gpt2_tiny", "embedded", 0))


def test_scores_of_mixed_eval_settings_are_never_averaged(tmp_path: Path) -> None:
    scale = synthetic_scale(tmp_path)
    index = synthetic_runs(tmp_path, scale, uniform_shots=(0, 5))  # uniform seed 1 was re-evaluated 5-shot
    assert set(index["downstream/setting"].dropna()) == {"tasks=copa,piqa; num_fewshot=0; limit=40",
                                                          "tasks=copa,piqa; num_fewshot=5; limit=40"}
    ARTIFACTS["table3"].build(index, scale, tmp_path / "out")
    text = (tmp_path / "out" / "table3.md").read_text()
    assert "piqa" not in text.split("\n\n")[1] and "Avg (%)" not in text  # no task column, no average
    assert "| Uniform | 3.300 ± 0.635 (n=2) |" in text  # the validation loss is still there
    (note,) = [line for line in text.splitlines() if "Downstream scores not shown" in line]
    assert "2 settings" in note and "num_fewshot=5; limit=40: 1 runs" in note


def test_every_staged_method_gets_the_shared_stage_note() -> None:
    """STAGED_METHODS is exactly the methods whose mixer plans stages or a sweep."""
    from conftest import compose_config

    from dograph.config import to_run_config
    from dograph.runs.app import mixer_class
    from experiments.tables import STAGED_METHODS, shared_stage_note

    staged = set()
    for path in sorted((Path(__file__).resolve().parent.parent / "conf" / "mixer").glob("*.yaml")):
        cfg = to_run_config(compose_config([f"mixer={path.stem}"]))
        cls = mixer_class(cfg)
        if cls.has_sweep or cls.plan_stages(dict(cfg.mixer)):
            staged.add(path.stem)
    assert staged == set(STAGED_METHODS)
    assert shared_stage_note(["uniform", "dograph"]) == []
    (note,) = shared_stage_note(["uniform", "regmix", "dograph"])
    assert "RegMix (proxy sweep)" in note and "main-run noise only" in note


def test_a_run_records_the_fingerprint_of_the_overrides_it_was_given(tmp_path: Path) -> None:
    """What run.py writes (Hydra's task overrides, any order, plus resume) is the fingerprint the scale asks for."""
    from conftest import compose_config
    from figure_runs import hydra_job

    from dograph.config import to_run_config
    from dograph.distributed import DistContext
    from dograph.runs.app import write_run_info

    scale = load_scale("smoke", runs_root=tmp_path)
    request = make_request(scale, "dograph", "gpt2_tiny", "embedded", 0, m=3)
    given = [*reversed([o for o in request_overrides(request, scale) if not o.startswith("hydra.")]), "resume=true"]
    run_dir, stage_dir = request.run_dir(scale), tmp_path / "stages" / "doremi" / "proxy-0"
    cfg = to_run_config(compose_config(given))
    with hydra_job(run_dir, given):
        for directory in (run_dir, stage_dir):
            directory.mkdir(parents=True)
            write_run_info(directory, cfg, DistContext(), 1)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["fingerprint"] == request.fingerprint and "trainer.max_steps=20" in info["overrides"]
    assert not any(o.startswith(("resume", "paths.", "hydra")) for o in info["overrides"])
    assert json.loads((stage_dir / "run_info.json").read_text())["fingerprint"] is None  # a stage is no request


@pytest.mark.slow
def test_the_printed_multiruns_make_jobs_with_their_requests_fingerprints(tmp_path: Path) -> None:
    """Each job of the Hydra multiruns describe_missing prints carries its request's fingerprint (dry runs)."""
    import shlex
    import subprocess
    import sys

    from dograph.runs.app import overrides_fingerprint

    scale = replace(synthetic_scale(tmp_path), common=["trainer.max_steps=0", "eval.tasks=[piqa, copa]"],
                    method_overrides={"loss_based": ["mixer.burn_in=5"]})
    requests = [make_request(scale, method, "gpt2_tiny", "embedded", seed)
                for method in ("uniform", "loss_based", "dograph") for seed in (0, 1)]
    commands = multirun_commands(requests, scale)
    assert len(commands) == 3  # dograph's m and objective stay off uniform's command line
    repo = Path(__file__).resolve().parent.parent
    for command in commands:
        args = shlex.split(command)[2:]  # after "python run.py"
        subprocess.run([sys.executable, str(repo / "run.py"), *args], cwd=repo, check=True, capture_output=True)
    jobs = [yaml.safe_load(p.read_text()) for p in (tmp_path / "sweeps").rglob("overrides.yaml")]
    assert len(jobs) == 6
    assert {overrides_fingerprint(job) for job in jobs} == {r.fingerprint for r in requests}


# ---- times: training only, validation and checkpoints beside it (Figure 5) ---------------------------------------


class FakeClock:
    """``time`` for dograph.train.trainer: perf_counter moves only when a test says so."""

    def __init__(self) -> None:
        import time

        self.now, self.real = 0.0, time

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name: str):
        return getattr(self.real, name)


def test_train_time_excludes_validation_and_checkpoints_and_resumes_exactly(make_config, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A step costs 1 s, a validation 10 s and a checkpoint 100 s: train_time_s counts the steps only."""
    import dograph.train.trainer as trainer_module
    from dograph.runs.app import run_training
    from dograph.train.metrics import read_metrics

    clock = FakeClock()
    monkeypatch.setattr(trainer_module, "time", clock)

    def costs(seconds: float, function):
        def run(*args, **kwargs):
            clock.now += seconds
            return function(*args, **kwargs)
        return run

    monkeypatch.setattr(trainer_module.Trainer, "train_step", costs(1.0, trainer_module.Trainer.train_step))
    monkeypatch.setattr(trainer_module, "evaluate", costs(10.0, trainer_module.evaluate))
    checkpointer = trainer_module.Checkpointer  # every save of the run goes through it (dograph.train.checkpointer)
    monkeypatch.setattr(checkpointer, "save", costs(100.0, checkpointer.save))
    run = ("mixer=uniform", "trainer.max_steps=6", "trainer.ckpt_every=2", "trainer.eval_every=3",
           "trainer.log_every=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(make_config(*run), straight)
    summary = json.loads((straight / "summary.json").read_text())
    # steps 1-6; evaluations at 3 and the final one; checkpoints at 2, 4 and the final one
    assert (summary["train_time_s"], summary["eval_time_s"], summary["ckpt_time_s"]) == (6.0, 20.0, 300.0)
    times = [(r["step"], r["train_s"], r["eval_s"], r["ckpt_s"]) for r in read_metrics(straight) if r["kind"] == "time"]
    assert times == [(2, 2.0, 0.0, 0.0), (4, 4.0, 10.0, 100.0), (6, 6.0, 20.0, 300.0)]
    first = run_training(make_config(*run, "trainer.stop_after_steps=3"), resumed)
    assert first.stopped_early and first.state.elapsed == 3.0
    run_training(make_config(*run, "resume=true"), resumed)
    again = json.loads((resumed / "summary.json").read_text())
    assert {k: again[k] for k in ("train_time_s", "eval_time_s", "ckpt_time_s")} == {
        k: summary[k] for k in ("train_time_s", "eval_time_s", "ckpt_time_s")}  # the pause's own save is not kept
    row = build_index([tmp_path]).set_index("run_dir").loc[str(straight)]
    assert (row["train_time_s"], row["eval_time_s"], row["ckpt_time_s"], row["total_time_s"]) == (6.0, 20.0, 300.0,
                                                                                                    6.0)


def test_figure5_stacks_training_time_only(synthetic_index, tmp_path: Path) -> None:
    index, scale = synthetic_index
    paths = ARTIFACTS["figure5"].build(index, scale, tmp_path / "out")
    assert {p.name for p in paths} == {"figure5.png", "figure5.pdf", "figure5_times.csv"}
    data = pd.read_csv(tmp_path / "out" / "figure5_times.csv").set_index("method")
    assert list(data.index) == ["uniform", "dograph"]  # doremi has no run
    assert data.loc["uniform", "train_s"] == 10.5 and data.loc["uniform", "stages_s"] == 0.0  # seeds 0, 1: 10, 11
    assert data.loc["uniform", "eval_s"] == 2.0 and data.loc["uniform", "ckpt_s"] == 1.0  # beside, not in, the bars
