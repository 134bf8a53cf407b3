"""The planted study's artifacts (issue 18): the scale, its requests, the per-run measures, the tables (golden
Markdown), a byte-identical rebuild from committed records, and the evaluation-only parts on tiny real runs.

The fixture ``tests/fixtures/planted_records/`` holds records of a synthetic planted study and the artifacts
built from them; regenerate both after a deliberate change of the artifacts with
``python tests/test_planted_artifacts.py --regenerate`` (the golden tables: ``UPDATE_GOLDEN=1``).
"""

from __future__ import annotations

import filecmp
import json
import math
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from helpers import REPO

from dograph.eval.planted import FRESH_SAMPLE
from experiments.index import build_index
from experiments.planted import PLANTED_ARTIFACTS
from experiments.planted_measures import (
    CLEAN,
    FRESH,
    RATIO,
    WEIGHT,
    clean_loss,
    measured_rows,
    time_average,
    weight_curve,
)
from experiments.records import record_id, write_record
from experiments.reproduce import artifacts_named, main, reproduce
from experiments.runs import multirun_commands
from experiments.scale import Scale, load_scale, make_request, request_overrides

GOLDEN = Path(__file__).parent / "golden"
FIXTURE = Path(__file__).parent / "fixtures" / "planted_records"
TARGETS = {"uniform": "baselines.uniform.UniformMixer", "loss_based": "baselines.loss_based.LossBasedMixer",
           "doremi": "baselines.doremi.DoReMiMixer", "dograph": "dograph.method.mixer.DoGraphMixer"}
SCENARIOS = ("noise", "duplicates", "hidden_split")
# the synthetic corpus of each scenario: domains and natural shares, the planted domain
CORPORA = {"noise": ({"books": 0.30, "code": 0.30, "wiki": 0.15, "noise": 0.25}, "noise"),
           "duplicates": ({"books-dup": 0.20, "code": 0.50, "wiki": 0.30}, "books-dup"),
           "hidden_split": ({"books": 0.40, "code+latex": 0.45, "wiki": 0.15}, "code+latex")}
REWEIGHTS = {"loss_based", "dograph"}


def planted_scale(root: Path, results: Path | None = None) -> Scale:
    return Scale(name="test_planted", runs_root=root, results_dir=results or root / "results", launch="print",
                 seeds=[0, 1], methods=["uniform", "loss_based", "doremi", "dograph"],
                 common=["trainer.max_steps=20"], method_overrides={"loss_based": ["mixer.burn_in=5"]},
                 settings={"planted": {"model": "gpt2_tiny", "dataset": "planted"}}, model_scale=[], m_values=[],
                 objectives=[], corpora={}, scenarios=list(SCENARIOS))


def make_planted_run(root: Path, scale: Scale, method: str, scenario: str, seed: int) -> Path:
    """A complete run on a planted corpus as ``run.py`` leaves it (the files the index and the measures read).

    Its numbers are a function of (method, scenario, seed): the planted domain's mixture (or, for the reweighting
    methods, its share of the sample weights from step 20) moves away from its natural share by the method.
    """
    natural, planted = CORPORA[scenario]
    domains = list(natural)
    run = root / f"{scenario}-{method}-{seed}"
    (run / ".hydra").mkdir(parents=True)
    request = make_request(scale, method, "gpt2_tiny", "planted", seed, scenario=scenario)
    config = {"mixer": {"_target_": TARGETS[method]}, "m": 11, "seed": seed, "tags": [],
              "trainer": {"max_steps": 20}, "dataset": {"source": "embedded", "planted": {"scenario": scenario}}}
    (run / "run_info.json").write_text(json.dumps({"config": config, "parameters": 1000,
                                                   "fingerprint": request.fingerprint}))
    choices = {"mixer": method, "model": "gpt2_tiny", "dataset": "planted", "objective": "uncertainty",
               "trainer": "default"}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    shift = {"uniform": 0.0, "loss_based": -0.04, "doremi": -0.10, "dograph": -0.08}[method] * (1 + 0.1 * seed)
    sampled = dict(natural) if method in REWEIGHTS else {**natural, planted: natural[planted] + shift}
    rest = 1.0 - sampled[planted]
    others = sum(s for d, s in natural.items() if d != planted)
    mixture = {d: sampled[planted] if d == planted else s * rest / others for d, s in natural.items()}
    records = []
    for step in (10, 20):
        record = {"kind": "train", "step": step, "train/loss": 4.0 - 0.01 * step,
                  **{f"data/mixture/{d}": p for d, p in mixture.items()}}
        if method in REWEIGHTS and step == 20:
            effective = [natural[d] + (shift if d == planted else -shift / (len(domains) - 1)) for d in domains]
            record.update({"train/effective_mixture": effective, "train/sampled_mixture": list(natural.values())})
        records.append(record)
    base = 3.0 + 0.05 * seed + {"uniform": 0.0, "loss_based": 0.01, "doremi": -0.03, "dograph": -0.02}[method]
    final = {f"val/{d}/loss": base + 0.2 * i + (0.5 if d == planted else 0.0) for i, d in enumerate(domains)}
    final["val/avg_loss"] = sum(natural[d] * final[f"val/{d}/loss"] for d in domains)
    records.append({"kind": "eval", "step": 20, **final})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report = {"scenario": scenario, "domain": planted, "share": natural[planted]}
    if scenario == "duplicates":
        report["fresh"] = {"domain": "books", "windows": 16, "documents": 16, "sample": FRESH_SAMPLE,
                           "loss": base + 0.7 - 0.5 * shift}
    summary = {"status": "complete", "completed_at": "2025-01-01T12:00:00+00:00", "steps": 20, "tokens_seen": 100,
               "train_time_s": 10.0, "eval_time_s": 1.0, "ckpt_time_s": 1.0, "domains": domains,
               "natural_mixture": natural, "final_eval": final, "planted": report}
    (run / "summary.json").write_text(json.dumps(summary))
    if method == "dograph" and scenario == "hidden_split":  # what planted_clusters computed from its checkpoints
        (run / "derived").mkdir()
        pd.DataFrame([{"step": step, "windows": 96, "merged_windows": 64, "merged_documents": 20,
                       "clusters_in_merged": 2 + k, "ari_hidden": 0.20 + 0.1 * k + 0.02 * seed,
                       "nmi_hidden": 0.30 + 0.1 * k, "ari_given": 0.15 + 0.05 * k, "nmi_given": 0.25 + 0.05 * k,
                       "ari_split": 0.10 + 0.2 * k + 0.03 * seed, "nmi_split": 0.12 + 0.2 * k,
                       "homogeneity_split": 0.3 + 0.2 * k, "homogeneity_chance": 0.1}
                      for k, step in enumerate((10, 20))]).to_csv(run / "derived" / "planted_clusters.csv",
                                                                  index=False)
    return run


def planted_study(root: Path, scale: Scale, *, skip: tuple[tuple[str, str, int], ...] = ()) -> None:
    for scenario in SCENARIOS:
        for method in scale.methods:
            for seed in scale.seeds:
                if (scenario, method, seed) not in skip:
                    make_planted_run(root, scale, method, scenario, seed)


# ---- the scale and its requests ------------------------------------------------------------------------------


def test_the_planted_scale_is_the_cpu_scale_run_size_on_three_scenarios() -> None:
    planted, cpu = load_scale("planted"), load_scale("cpu")
    for key in ("common", "method_overrides", "seeds", "methods", "jobs", "launch"):
        assert getattr(planted, key) == getattr(cpu, key), key
    assert planted.scenarios == ["noise", "duplicates", "hidden_split"] and not cpu.scenarios
    assert planted.setting("planted") == {"model": "gpt2_tiny", "dataset": "planted"}
    assert planted.results_dir == REPO / "results" / "planted"
    requests = [r for a in artifacts_named(["planted"]) for r in a.requests(planted)]
    assert len(requests) == len(set(requests)) == 7 * 3 * 3


def test_a_scenario_is_in_the_overrides_the_directory_the_identity_and_the_fingerprint(tmp_path: Path) -> None:
    scale = load_scale("planted", runs_root=tmp_path)
    asked = {s: PLANTED_ARTIFACTS[f"planted_{s}"].requests(scale) for s in SCENARIOS}
    fingerprints = {r.fingerprint for rs in asked.values() for r in rs}
    assert len(fingerprints) == 63  # no two methods, seeds or scenarios share a run
    (noise,) = [r for r in asked["noise"] if r.method == "dograph" and r.seed == 1]
    overrides = request_overrides(noise, scale)
    assert overrides[:5] == ["mixer=dograph", "model=gpt2_tiny", "dataset=planted", "dataset.planted.scenario=noise",
                             "seed=1"]
    assert noise.run_dir(scale) == tmp_path / "runs/dograph/gpt2_tiny/planted_noise/m11_uncertainty/seed1"
    assert noise.identity()["scenario"] == "noise" and "scenario=noise" in noise.label()
    same_but_duplicates = replace(noise, scenario="duplicates")
    assert same_but_duplicates != noise and same_but_duplicates.run_dir(scale) != noise.run_dir(scale)
    (line,) = [c for c in multirun_commands([noise], scale)]
    assert "dataset=planted dataset.planted.scenario=noise mixer=dograph seed=1" in line


def test_the_fingerprints_of_the_committed_cpu_records_do_not_move() -> None:
    """A request without a scenario composes the same command line as before issue 18: every committed record of the
    cpu scale is still the run one of the paper's requests asks for (same fingerprint, same method, model, dataset,
    seed, and m and objective for DoGraph, whose Figure 4 and Table 10 runs differ in those only)."""
    from experiments.paper import ARTIFACTS

    scale = load_scale("cpu")
    asked = {r.fingerprint: r for artifact in ARTIFACTS.values() for r in artifact.requests(scale)}
    records = sorted((REPO / "results" / "cpu" / "runs").glob("*/record.json"))
    assert records
    for path in records:
        info = json.loads((path.parent / "run_info.json").read_text())
        assert info["fingerprint"] in asked, f"{path.parent.name}: no request of the cpu scale has its fingerprint"
        request = asked[info["fingerprint"]]
        config, choices = info["config"], json.loads(path.read_text())["choices"]
        assert (request.method, request.model, request.dataset, request.seed) == (
            choices["mixer"], choices["model"], choices["dataset"], config["seed"])
        if request.method == "dograph":
            assert (request.m, request.objective) == (config["m"], choices["objective"])
        assert path.parent.name.endswith(request.fingerprint) and "scenario" not in request.identity()


def test_every_planted_run_composes_and_validates_with_its_scenario() -> None:
    from conftest import compose_config

    from dograph.config import to_run_config

    scale = load_scale("planted")
    requests = [r for a in artifacts_named(["planted"]) for r in a.requests(scale) if r.seed == 0]
    for request in requests:
        overrides = [o for o in request_overrides(request, scale) if not o.startswith(("hydra.", "hydra/"))]
        cfg = to_run_config(compose_config(overrides))
        assert cfg.dataset.planted.scenario == request.scenario and cfg.trainer.max_steps == 400


def test_planted_artifacts_only_at_the_planted_scale_in_one_line(tmp_path: Path, capsys) -> None:
    assert [a.name for a in artifacts_named(["planted"])] == list(PLANTED_ARTIFACTS)
    assert [a.name for a in artifacts_named(["planted_duplicates", "table2"])] == ["planted_duplicates", "table2"]
    where = ["--no-train", "--runs-root", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
    assert main(["planted_noise", "--scale", "cpu", *where]) == 2
    assert main(["table2", "--scale", "planted", *where]) == 2
    first, second = capsys.readouterr().err.splitlines()
    assert first.startswith("error: planted_noise is a planted artifact: build it at planted (--scale), not at the cpu")
    assert second.startswith("error: table2 is a paper artifact: build it at smoke or cpu or paper (--scale)")
    assert not (tmp_path / "results").exists()


# ---- the measures ------------------------------------------------------------------------------------------------


def test_the_clean_loss_renormalises_the_natural_shares_over_the_clean_domains() -> None:
    final = {"val/a/loss": 2.0, "val/b/loss": 4.0, "val/noise/loss": 9.0}
    natural = {"a": 0.25, "b": 0.5, "noise": 0.25}
    assert clean_loss(final, natural, "noise") == pytest.approx((0.25 * 2 + 0.5 * 4) / 0.75)
    assert clean_loss(final, natural, None) == pytest.approx(0.5 + 2.0 + 2.25)
    assert clean_loss({"val/a/loss": 2.0}, natural, "noise") is None  # a domain's loss is missing: no number


def test_the_effective_weight_is_the_weights_share_else_the_mixture_averaged_over_steps(tmp_path: Path) -> None:
    records = [{"kind": "train", "step": 10, "data/mixture/x": 0.5, "data/mixture/y": 0.5},
               {"kind": "time", "step": 10},
               {"kind": "train", "step": 40, "data/mixture/x": 0.5, "data/mixture/y": 0.5,
                "train/effective_mixture": [0.2, 0.8]},
               {"kind": "eval", "step": 40, "val/x/loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tr')
    curve = weight_curve(tmp_path, "x", ["x", "y"])
    assert curve.to_dict("list") == {"step": [10, 40], "weight": [0.5, 0.2], "source": ["mixture", "weights"]}
    assert time_average(curve) == pytest.approx((10 * 0.5 + 30 * 0.2) / 40)  # each record: the steps it covers
    assert time_average(curve.iloc[0:0]) is None
    records[2]["mixer/warmup"] = 0.2  # 2 of the window's steps were the warm-up's plain mean: the natural mixture
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert weight_curve(tmp_path, "x", ["x", "y"])["weight"].tolist() == pytest.approx([0.5, 0.2 * 0.5 + 0.8 * 0.2])


def test_each_run_gets_its_measures_and_a_run_without_planted_facts_none(tmp_path: Path) -> None:
    scale = planted_scale(tmp_path)
    run = make_planted_run(tmp_path, scale, "doremi", "duplicates", 1)
    make_planted_run(tmp_path, scale, "uniform", "duplicates", 1)
    summary = json.loads((run / "summary.json").read_text())
    index = build_index([tmp_path])
    requests = PLANTED_ARTIFACTS["planted_duplicates"].requests(scale)
    rows = measured_rows(index, requests, leave_out_planted=True).set_index("method")
    doremi = rows.loc["doremi"]
    assert doremi[WEIGHT] == pytest.approx(0.20 - 0.11) and doremi[RATIO] == pytest.approx(0.09 / 0.20)
    assert doremi[FRESH] == summary["planted"]["fresh"]["loss"]
    final = summary["final_eval"]
    assert doremi[CLEAN] == pytest.approx((0.5 * final["val/code/loss"] + 0.3 * final["val/wiki/loss"]) / 0.8)
    assert rows.loc["uniform", RATIO] == pytest.approx(1.0)
    (run / "summary.json").write_text(json.dumps({**summary, "planted": None}))  # a run made before issue 18
    assert math.isnan(measured_rows(build_index([tmp_path]), requests, True).set_index("method").loc["doremi", CLEAN])


def test_the_index_reads_the_scenario_and_a_record_names_it(tmp_path: Path) -> None:
    from test_experiments import make_run, synthetic_scale

    scale = planted_scale(tmp_path / "runs")
    run = make_planted_run(tmp_path / "runs", scale, "uniform", "hidden_split", 0)
    make_run(tmp_path / "other", "u0", "uniform", scale=synthetic_scale(tmp_path / "other"))
    assert "scenario" not in build_index([tmp_path / "other"]).columns  # index.csv of the other scales unchanged
    row = build_index([tmp_path / "runs"]).iloc[0]
    assert row["scenario"] == "hidden_split" and row["dataset"] == "planted"
    record = write_record(run, tmp_path / "records")
    assert record.name == record_id(row.to_dict()) and "-planted_hidden_split-default-seed0-" in record.name


# ---- the tables and figures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PLANTED_ARTIFACTS))
def test_planted_tables_match_their_golden_markdown(name: str, tmp_path: Path) -> None:
    scale = planted_scale(tmp_path)
    planted_study(tmp_path, scale, skip=(("noise", "doremi", 1), ("duplicates", "uniform", 1)))
    paths = PLANTED_ARTIFACTS[name].build(build_index([tmp_path]), scale, tmp_path / "out")
    assert {p.name for p in paths} >= {f"{name}.md", f"{name}.tex", f"{name}.csv", f"{name}.png",
                                       f"{name}_curves.csv"}
    text = (tmp_path / "out" / f"{name}.md").read_text()
    golden = GOLDEN / f"{name}.md"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_the_hidden_split_table_says_why_other_methods_have_no_clusters(tmp_path: Path) -> None:
    scale = planted_scale(tmp_path)
    planted_study(tmp_path, scale)
    PLANTED_ARTIFACTS["planted_hidden_split"].build(build_index([tmp_path]), scale, tmp_path / "out")
    lines = {line.split(" | ")[0].strip("| "): line for line in (tmp_path / "out" / "planted_hidden_split.md")
             .read_text().splitlines() if line.startswith("| ")}
    assert "cannot see the split" in lines["DoReMi"] and "does not adapt" in lines["Uniform"]
    assert "no clusters" in lines["Loss-based"]
    cluster_cells = lines["DoGraph"].split(" | ")[-5:]
    assert all(any(ch.isdigit() for ch in cell) for cell in cluster_cells)  # DoGraph: numbers, at its last step
    assert cluster_cells[-3].startswith("0.32 ± ")  # ARI within code+latex at step 20 (0.30, 0.33), not step 10's
    clusters = pd.read_csv(tmp_path / "out" / "planted_hidden_split_clusters.csv")
    assert set(clusters["step"]) == {10, 20} and set(clusters["method"]) == {"dograph"}


def test_without_runs_the_tables_name_the_missing_runs_and_no_figure_is_drawn(tmp_path: Path) -> None:
    scale = planted_scale(tmp_path)
    for artifact in PLANTED_ARTIFACTS.values():
        paths = artifact.build(build_index([tmp_path / "none"]), scale, tmp_path / "out")
        assert {p.suffix for p in paths} == {".md", ".tex", ".csv"}
        text = (tmp_path / "out" / f"{artifact.name}.md").read_text()
        assert "8 of 8 runs are missing" in text and f"scenario={artifact.scenario}" in text
        assert not any(ch.isdigit() for line in text.splitlines() if line.startswith("| Uniform") for ch in line)


def fixture_scale(results_dir: Path, runs_root: Path) -> Scale:
    return planted_scale(runs_root, results_dir)


def build_fixture(out: Path) -> None:
    """Records of the synthetic planted study and the artifacts built from them, into ``out``."""
    runs = out.parent / (out.name + ".runs")
    scale = fixture_scale(out, runs)
    planted_study(runs, scale)
    reproduce(artifacts_named(["planted"]), scale, train=False)
    shutil.rmtree(runs)


def test_the_committed_planted_artifacts_rebuild_byte_identical_from_the_committed_records(tmp_path: Path,
                                                                                           capsys) -> None:
    """A fresh clone: only ``results/planted/runs``; ``--no-train`` rewrites the same bytes."""
    assert (FIXTURE / "runs").is_dir(), "run python tests/test_planted_artifacts.py --regenerate"
    results = tmp_path / "results"
    shutil.copytree(FIXTURE / "runs", results / "runs")
    scale = fixture_scale(results, tmp_path / "no-runs-here")
    reproduce(artifacts_named(["planted"]), scale, train=False)
    assert capsys.readouterr().out.rstrip().endswith("24 of 24 runs done")
    committed = sorted(p.name for p in FIXTURE.iterdir() if p.is_file())
    assert {"planted_noise.md", "planted_duplicates.png", "planted_hidden_split_clusters.csv", "index.csv"} <= set(
        committed)
    _, mismatch, errors = filecmp.cmpfiles(FIXTURE, results, committed, shallow=False)
    assert mismatch == [] and errors == [], f"rebuilt differently: {mismatch}; missing: {errors}"


def test_the_committed_planted_results_rebuild_from_their_records(tmp_path: Path) -> None:
    """The real thing: every file of ``results/planted/`` from ``results/planted/runs/`` alone, byte for byte (a
    change to the tables' code must come with the rebuilt files: ``reproduce planted --scale planted --no-train``)."""
    from helpers import committed_records_scale

    committed, results, scale = committed_records_scale("planted", tmp_path)
    reproduce(artifacts_named(["planted"]), scale, train=False)
    names = sorted(p.name for p in committed.iterdir() if p.is_file())
    assert {"planted_noise.md", "planted_duplicates.md", "planted_hidden_split.md", "index.csv"} <= set(names)
    _, mismatch, errors = filecmp.cmpfiles(committed, results, names, shallow=False)
    assert mismatch == [] and errors == [], f"results/planted/ is not what its records give: {mismatch} {errors}"


# ---- the evaluation-only parts on tiny real runs -------------------------------------------------------------------


def tiny_planted_scale(runs_root: Path, corpus: Path, cache_dir: Path) -> Scale:
    """DoGraph and Uniform on the local 3-domain corpus with structure planted in it, a few steps of tiny batches."""
    common = ["dataset.source=jsonl", f"dataset.path={corpus}", "dataset.val_fraction=0.1",
              "dataset.val_sequences_per_domain=4", "dataset.planted.duplicate_domain=docs",
              "dataset.planted.merge_domains=[code,licences]", "tokenizer=bpe1k", "trainer=debug",
              "trainer.batch_size=8", "trainer.seq_len=32", "trainer.max_steps=8", "trainer.ckpt_every=4",
              "logger=disabled", "trainer.device=cpu", f"paths.cache_dir={cache_dir}"]
    return replace(planted_scale(runs_root), seeds=[0], methods=["uniform", "dograph"], common=common,
                   method_overrides={"dograph": ["mixer.buffer_size=24"]}, scenarios=["duplicates", "hidden_split"])


def train_request(scale: Scale, method: str, scenario: str) -> Path:
    """Train one request of ``scale`` as ``run.py`` would (its fingerprint and Hydra choices included)."""
    from conftest import compose_config
    from figure_runs import hydra_job

    from dograph.config import to_run_config
    from dograph.runs.app import run_training

    request = make_request(scale, method, "gpt2_tiny", "planted", 0, scenario=scenario)
    run_dir = request.run_dir(scale)
    overrides = [o for o in request_overrides(request, scale) if not o.startswith("hydra.")]
    with hydra_job(run_dir, overrides):
        run_training(to_run_config(compose_config(overrides)), run_dir)
    choices = {"mixer": method, "model": "gpt2_tiny", "dataset": "planted", "objective": "uncertainty",
               "trainer": "debug"}
    (run_dir / ".hydra").mkdir(exist_ok=True)
    (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    return run_dir


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory, local_corpus: Path, cache_dir: Path) -> Scale:
    scale = tiny_planted_scale(tmp_path_factory.mktemp("planted_runs"), local_corpus, cache_dir)
    for method, scenario in (("uniform", "duplicates"), ("dograph", "hidden_split")):
        train_request(scale, method, scenario)
    return scale


def test_a_duplicates_run_keeps_its_natural_mixture_and_the_loss_on_fresh_documents(tiny_study: Scale) -> None:
    from dograph.data.corpus import planted_directory
    from dograph.data.planted import load_manifest
    from experiments.run_files import load_run_config

    run = make_request(tiny_study, "uniform", "gpt2_tiny", "planted", 0, scenario="duplicates").run_dir(tiny_study)
    summary = json.loads((run / "summary.json").read_text())
    cfg = load_run_config(run)
    manifest = load_manifest(planted_directory(cfg.dataset, Path(cfg.paths.cache_dir)))
    assert summary["natural_mixture"] == pytest.approx({d: e["share"] for d, e in manifest["domains"].items()})
    report = summary["planted"]
    assert report["domain"] == "docs-dup" and report["share"] == pytest.approx(summary["natural_mixture"]["docs-dup"])
    fresh = report["fresh"]
    assert fresh["domain"] == "docs" and fresh["windows"] >= fresh["documents"] >= 4 and 0 < fresh["loss"] < 20
    assert "evenly spaced" in fresh["sample"]
    assert fresh["loss"] != summary["final_eval"]["val/docs-dup/loss"]


def test_planted_report_scores_the_fresh_windows_and_nothing_else(tiny_study: Scale, tmp_path: Path) -> None:
    from dograph.eval.planted import planted_report
    from experiments.run_files import load_run_config, rebuild_data

    run = make_request(tiny_study, "uniform", "gpt2_tiny", "planted", 0, scenario="duplicates").run_dir(tiny_study)
    cfg = load_run_config(run)
    data = rebuild_data(cfg)
    scored = []
    report = planted_report(cfg.dataset, Path(cfg.paths.cache_dir), data.tokenizer, 32,
                            lambda windows: scored.append(windows) or 1.5)
    (windows,) = scored
    assert windows.shape == (report["fresh"]["windows"], 33) and len(windows) >= 4 and report["fresh"]["loss"] == 1.5
    trained = {tuple(w.tolist()) for w in data.validation[data.corpus.domains.index("docs-dup")]}
    assert not trained & {tuple(w.tolist()) for w in windows}
    unplanted = replace(cfg.dataset, planted=replace(cfg.dataset.planted, scenario="none"))
    assert planted_report(unplanted, Path(cfg.paths.cache_dir), data.tokenizer, 32, lambda w: 0.0) is None


def test_dograph_clusters_are_compared_with_both_labels_at_each_kept_checkpoint(tiny_study: Scale,
                                                                                tmp_path: Path) -> None:
    from experiments.planted_clusters import labelled_windows
    from experiments.records import records_root
    from experiments.run_files import load_run_config

    run = make_request(tiny_study, "dograph", "gpt2_tiny", "planted", 0, scenario="hidden_split").run_dir(tiny_study)
    labelled, _ = labelled_windows(load_run_config(run), per_group=8)
    assert labelled.hidden_names == ["docs", "code", "licences"] and labelled.given_names == ["code+licences", "docs"]
    assert np.bincount(labelled.hidden).tolist() == [8, 8, 8] and labelled.merged.sum() == 16
    assert set(labelled.given[labelled.merged].tolist()) == {0} and labelled.merged_documents >= 2
    here = replace(tiny_study, methods=["dograph"], scenarios=["hidden_split"], results_dir=tmp_path / "results")
    write_record(run, records_root(here))
    index = build_index([here.runs_root, records_root(here)])
    paths = PLANTED_ARTIFACTS["planted_hidden_split"].build(index, here, tmp_path / "out")
    clusters = pd.read_csv(tmp_path / "out" / "planted_hidden_split_clusters.csv")
    assert list(clusters["step"]) == [4, 8] and (clusters["merged_windows"] > 0).all()
    for key in ("ari_hidden", "ari_given", "ari_split"):
        assert clusters[key].between(-1, 1).all() and clusters[key.replace("ari", "nmi")].between(0, 1).all()
    record = next(records_root(here).iterdir())
    assert (record / "derived" / "planted_clusters.csv").read_bytes() == (run / "derived" / "planted_clusters.csv"
                                                                           ).read_bytes()
    dograph = next(line for line in (tmp_path / "out" / "planted_hidden_split.md").read_text().splitlines()
                   if line.startswith("| DoGraph"))
    assert "not available" not in dograph and "(n=1)" in dograph
    assert {p.name for p in paths} >= {"planted_hidden_split.png", "planted_hidden_split_curves.csv"}


def test_the_fresh_windows_start_distinct_documents_spread_over_the_whole_file(tiny_study: Scale) -> None:
    """Not the first few documents packed one after another (which scored two passages of the embedded corpus)."""
    from dograph.data.corpus import planted_directory
    from dograph.data.packing import encode_documents, is_blank
    from dograph.data.planted import fresh_source
    from dograph.eval.planted import fresh_windows
    from experiments.run_files import load_run_config, rebuild_data

    run = make_request(tiny_study, "uniform", "gpt2_tiny", "planted", 0, scenario="duplicates").run_dir(tiny_study)
    cfg = load_run_config(run)
    directory = planted_directory(cfg.dataset, Path(cfg.paths.cache_dir))
    tokenizer = rebuild_data(cfg).tokenizer
    texts = [t for t in fresh_source(directory).documents() if not is_blank(t)]
    starts = {tuple(encode_documents(tokenizer, [t])[:33].tolist()): i for i, t in enumerate(texts)}
    windows, documents = fresh_windows(directory, tokenizer, 32, documents=4)
    found = sorted(starts[tuple(w.tolist())] for w in windows)  # each window is the start of one fresh document
    assert len(found) == documents == len(set(found)) >= 3 and len(texts) > 8
    assert found[-1] - found[0] >= len(texts) // 2  # spread over the file, not its head


def test_a_run_scored_by_the_older_rule_is_rescored_from_its_last_checkpoint_exactly(tiny_study: Scale,
                                                                                       tmp_path: Path) -> None:
    """The post-hoc score of a run's final checkpoint equals the score the run wrote itself; a run whose summary
    predates the spread sample gets it in the table, kept in ``derived/`` of the run and of its record."""
    from experiments.planted_fresh import FRESH_FILE, fresh_from_checkpoint
    from experiments.records import records_root

    run = make_request(tiny_study, "uniform", "gpt2_tiny", "planted", 0, scenario="duplicates").run_dir(tiny_study)
    summary = json.loads((run / "summary.json").read_text())
    rescored = fresh_from_checkpoint(run)
    assert rescored is not None and int(rescored["step"].iloc[0]) == 8
    assert float(rescored["loss"].iloc[0]) == pytest.approx(summary["planted"]["fresh"]["loss"], abs=1e-6)
    old = shutil.copytree(run, tmp_path / "old_run")  # as a run made before the rule: its fresh has no sample
    summary["planted"]["fresh"] = {"domain": "docs", "windows": 4, "loss": 99.0}  # no sample: made before the rule
    (old / "summary.json").write_text(json.dumps(summary))
    here = replace(tiny_study, methods=["uniform"], scenarios=["duplicates"], runs_root=tmp_path,
                   results_dir=tmp_path / "results")
    write_record(old, records_root(here))
    index = build_index([tmp_path / "old_run", records_root(here)])
    PLANTED_ARTIFACTS["planted_duplicates"].build(index, here, tmp_path / "out")
    table = (tmp_path / "out" / "planted_duplicates.md").read_text()
    assert f"{float(rescored['loss'].iloc[0]):.3f} (n=1)" in table and "99.000" not in table
    record = next(records_root(here).iterdir())
    assert (record / "derived" / f"{FRESH_FILE}.csv").read_bytes() == (old / "derived" / f"{FRESH_FILE}.csv"
                                                                         ).read_bytes()


def test_a_run_without_planted_facts_or_a_rescorable_fresh_loss_is_named_not_dropped(tmp_path: Path) -> None:
    scale = planted_scale(tmp_path)
    planted_study(tmp_path, scale)
    bare = tmp_path / "duplicates-doremi-1" / "summary.json"
    summary = json.loads(bare.read_text())
    bare.write_text(json.dumps({k: v for k, v in summary.items() if k != "planted"}))
    older = tmp_path / "duplicates-dograph-0" / "summary.json"  # an older sample and no checkpoint to re-score
    summary = json.loads(older.read_text())
    summary["planted"]["fresh"]["sample"] = "the first 16 windows in file order"
    older.write_text(json.dumps(summary))
    kept = tmp_path / "duplicates-dograph-0" / "derived"  # a kept re-score of yet another sample: not used either
    kept.mkdir()
    pd.DataFrame([{"step": 20, "windows": 8, "documents": 8, "sample": "8 documents", "loss": 1.0}]).to_csv(
        kept / "planted_fresh.csv", index=False)
    diverged = tmp_path / "duplicates-loss_based-0" / "summary.json"  # the current sample, a non-finite loss
    summary = json.loads(diverged.read_text())
    summary["planted"]["fresh"]["loss"] = None
    diverged.write_text(json.dumps(summary))
    PLANTED_ARTIFACTS["planted_duplicates"].build(build_index([tmp_path]), scale, tmp_path / "out")
    notes = [line for line in (tmp_path / "out" / "planted_duplicates.md").read_text().splitlines()
             if line.startswith("- ")]
    assert any(n.startswith("- Complete runs without planted facts") and n.endswith(": DoReMi seed 1.") for n in notes)
    assert any(n.startswith("- Runs without a fresh-document loss") and n.endswith(": DoGraph seed 0.") for n in notes)
    assert any(n.startswith("- Runs whose fresh-document loss is not finite") and n.endswith(": Loss-based seed 0.")
               for n in notes)


def test_within_the_merged_domain_a_clean_split_is_homogeneous_and_the_labels_are_not_swapped() -> None:
    import torch

    from experiments.planted_clusters import LabelledWindows, agreement_row

    # 10 windows of domain A (given 0, hidden 0), 31 + 31 of the merged domain (given 1, hidden 1 | 2)
    given = np.array([0] * 10 + [1] * 62)
    hidden = np.array([0] * 10 + [1] * 31 + [2] * 31)
    labelled = LabelledWindows(torch.zeros(72, 4, dtype=torch.int64), given, hidden, given == 1, 6,
                               ["a", "m"], ["a", "m1", "m2"])
    clean = np.array([0] * 10 + [1] * 10 + [2] * 10 + [3] * 11 + [4] * 15 + [5] * 16)  # halves in 3 + 2 clusters
    row = agreement_row(100, clean, labelled, clusters=11)
    assert row["homogeneity_split"] == pytest.approx(1.0) and 0.3 < row["ari_split"] < 0.5
    assert 0.0 < row["homogeneity_chance"] < 0.2  # 6 clusters of 10-16 windows that know nothing of the halves
    assert row["ari_hidden"] > row["ari_given"]  # the clusters follow the halves, which only the hidden labels have
    blind = np.array([0] * 10 + [1] * 62)  # one cluster per given domain: perfect on the given labels
    row = agreement_row(100, blind, labelled, clusters=11)
    assert row["ari_given"] == pytest.approx(1.0) and row["ari_hidden"] < 1.0
    assert row["ari_split"] == pytest.approx(0.0) and row["homogeneity_split"] == pytest.approx(0.0)
    assert row["homogeneity_chance"] == pytest.approx(0.0)


def test_kept_points_written_by_older_code_are_computed_again_where_the_checkpoints_are(tmp_path: Path) -> None:
    from experiments.run_files import checkpoint_points

    run, record = tmp_path / "run", tmp_path / "record"
    for where in (run, record):
        (where / "derived").mkdir(parents=True)
        pd.DataFrame({"step": [1], "old": [0.5]}).to_csv(where / "derived" / "p.csv", index=False)
    now = pd.DataFrame({"step": [1], "old": [0.5], "new": [0.25]})
    def has(column: str):
        return lambda kept: column in kept.columns

    assert list(checkpoint_points(run, record, "p", lambda d: now, current=has("old")).columns) == ["step", "old"]
    gone = checkpoint_points(record, None, "p", lambda d: None, current=has("new"))  # a record: nothing to recompute
    assert list(gone.columns) == ["step", "old"]
    assert checkpoint_points(run, record, "p", lambda d: now, current=has("new"))["new"].tolist() == [0.25]
    assert pd.read_csv(record / "derived" / "p.csv")["new"].tolist() == [0.25]  # the record gets the new file too


def test_a_column_whose_seeds_agree_exactly_says_so_instead_of_a_zero_interval() -> None:
    from experiments.tables import Column, metric

    rows = pd.DataFrame({"x": [0.25, 0.25, 0.25]})
    assert Column("x", metric("x"), 3, when_equal="equal in every seed").cell(rows) == \
        "0.250 (equal in every seed, n=3)"
    assert Column("x", metric("x"), 3).cell(rows) == "0.250 ± 0.000 (n=3)"
    assert Column("x", metric("x"), 3, when_equal="same").cell(pd.DataFrame({"x": [0.2, 0.3]})).startswith("0.250 ±")
    ratio = pd.DataFrame({"x": [0.363 / 0.25, 0.363 / 0.25 * (1 + 1e-15), 0.363 / 0.25]})  # equal but for the last bits
    assert Column("x", metric("x"), 2, when_equal="same").cell(ratio) == "1.45 (same, n=3)"


if __name__ == "__main__" and sys.argv[1:] == ["--regenerate"]:
    shutil.rmtree(FIXTURE, ignore_errors=True)
    build_fixture(FIXTURE)
    print(f"wrote {FIXTURE}")
