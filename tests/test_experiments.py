"""The experiment layer: confidence intervals, the results index, every table builder (golden Markdown)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dograph.config import DataConfig
from experiments import table1, table2, table3, table4, table5, table9, table10
from experiments.index import build_index, find_run_dirs
from experiments.proportions import count_domains, proportions_table
from experiments.runs import missing_runs, multirun_commands
from experiments.scale import RunRequest, Scale, load_scale, request_overrides
from experiments.stats import mean_ci

GOLDEN = Path(__file__).parent / "golden"
TARGETS = {"uniform": "baselines.uniform.UniformMixer", "dograph": "dograph.dograph_mixer.DoGraphMixer",
           "doremi": "baselines.doremi.DoReMiMixer"}
DOMAINS = ["code", "wiki"]


def make_run(root: Path, name: str, method: str, *, seed: int = 0, model: str = "gpt2_tiny", m: int = 11,
             objective: str = "uncertainty", loss: float = 3.0, complete: bool = True, scores: dict | None = None,
             stages: list[float] = (), solve_s: float | None = None, hydra: bool = True) -> Path:
    """A run directory with the files a real run writes (only the parts the index reads)."""
    run = root / name
    run.mkdir(parents=True)
    config = {"mixer": {"_target_": TARGETS[method]}, "m": m, "seed": seed, "tags": [],
              "trainer": {"max_steps": 20}, "dataset": {}}
    (run / "run_info.json").write_text(json.dumps({"config": config, "parameters": 1000}))
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
        (run / "summary.json").write_text(json.dumps({"status": "complete", "steps": 20, "tokens_seen": 100,
                                                      "train_time_s": 10.0 + seed, "final_eval": final}))
    if scores is not None:
        (run / "eval").mkdir()
        tasks = {t: {"metric": metric, "score": s, "stderr": 0.01, "n": 40} for t, (metric, s) in scores.items()}
        avg = sum(s for _, s in scores.values()) / len(scores)
        (run / "eval" / "scores.json").write_text(json.dumps({"tasks": tasks, "average": avg}))
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


@pytest.fixture
def synthetic_index(tmp_path: Path) -> tuple[pd.DataFrame, Scale]:
    """uniform and dograph at two seeds, doremi never run, a robust-objective DoGraph at one seed."""
    for seed in (0, 1):
        make_run(tmp_path, f"u{seed}", "uniform", seed=seed, loss=3.0 + 0.1 * seed,
                 scores={"piqa": ("acc_norm", 0.60 + 0.02 * seed), "copa": ("acc", 0.55)})
        make_run(tmp_path, f"g{seed}", "dograph", seed=seed, loss=3.1 + 0.1 * seed, solve_s=0.002 + 0.001 * seed,
                 scores={"piqa": ("acc_norm", 0.58), "copa": ("acc", 0.57 + 0.01 * seed)}, stages=[])
    make_run(tmp_path, "r0", "dograph", objective="robust", loss=3.5, solve_s=0.004)
    make_run(tmp_path, "crashed", "doremi", complete=False)
    return build_index([tmp_path]), synthetic_scale(tmp_path)


@pytest.mark.parametrize("module", [table1, table2, table3, table4, table5, table10, table9],
                         ids=lambda m: m.NAME)
def test_table_builders_match_their_golden_markdown(module, synthetic_index, tmp_path: Path) -> None:
    index, scale = synthetic_index
    paths = module.build(index, scale, tmp_path / "out")
    assert {p.suffix for p in paths} == {".md", ".tex", ".csv"}
    text = (tmp_path / "out" / f"{module.NAME}.md").read_text()
    golden = GOLDEN / f"{module.NAME}.md"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_a_method_without_runs_is_not_available_never_a_number(synthetic_index, tmp_path: Path) -> None:
    index, scale = synthetic_index
    table2.build(index, scale, tmp_path / "out")
    doremi = next(line for line in (tmp_path / "out" / "table2.md").read_text().splitlines() if "DoReMi" in line)
    assert doremi.count("not available") == 5 and not any(ch.isdigit() for ch in doremi)


def test_missing_runs_and_the_commands_that_make_them(synthetic_index) -> None:
    index, scale = synthetic_index
    missing = missing_runs(index, table1.requests(scale))
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
    from experiments.reproduce import ARTIFACTS, artifact_module, needed_runs

    scale = load_scale(scale_name)
    requests = needed_runs([artifact_module(a) for a in ARTIFACTS], scale)
    variants = {(r.method, r.model, r.dataset, r.m, r.objective): r for r in requests}  # seeds compose alike
    for request in variants.values():
        overrides = [o for o in request_overrides(request, scale) if not o.startswith(("hydra.", "hydra/"))]
        cfg = to_run_config(compose_config(overrides))
        assert cfg.seed == request.seed and cfg.m == request.m
