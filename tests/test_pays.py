"""The "when does DoGraph pay" study (issue 19): its scale, its variant requests, what it reads from the cpu and
planted scales, and its tables built from synthetic runs."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from dograph.errors import ConfigError
from experiments.index import build_index
from experiments.paper import ARTIFACTS
from experiments.pays import PAYS_ARTIFACTS
from experiments.pays_artifact import Arm
from experiments.planted import PLANTED_ARTIFACTS
from experiments.records import record_id, stale_records
from experiments.reproduce import index_roots, made_elsewhere, main
from experiments.runs import multirun_commands
from experiments.scale import Scale, load_scale, make_request, request_overrides, same_identity


def pays_scale(root: Path) -> Scale:
    return replace(load_scale("pays"), runs_root=root / "runs", results_dir=root / "results")


def test_variants_replace_the_common_overrides_of_their_keys_and_are_tagged(tmp_path: Path) -> None:
    scale = pays_scale(tmp_path)
    (request,) = [r for r in PAYS_ARTIFACTS["pays_ess_cost"].requests(scale)
                  if r.variant == "b48" and r.method == "dograph" and r.m == 3 and r.seed == 1]
    overrides = request_overrides(request, scale)
    keys = [o.split("=", 1)[0] for o in overrides]
    assert len(keys) == len(set(keys))  # no key twice: the variant's max_steps replaced common's
    assert "trainer.max_steps=133" in overrides and "trainer.max_steps=400" not in overrides
    assert "tags=[variant:b48]" in overrides
    assert request.identity()["variant"] == "b48" and request.run_dir(scale).parent.name == "m3_uncertainty_b48"
    (line,) = multirun_commands([request], scale)
    assert line.startswith("python run.py mixer=dograph") and "trainer.batch_size=48" in line


def test_the_runs_a_read_scale_makes_are_the_same_runs_there() -> None:
    """Uniform and the paper's DoGraph at the cpu scale's run size have the cpu and planted scales' fingerprints:
    read from their records, never retrained by this study."""
    scale = load_scale("pays")
    cpu, planted = load_scale("cpu"), load_scale("planted")
    theirs = {r.fingerprint for a in ARTIFACTS.values() for r in a.requests(cpu)}
    theirs |= {r.fingerprint for a in PLANTED_ARTIFACTS.values() for r in a.requests(planted)}
    ours = [r for a in PAYS_ARTIFACTS.values() for r in a.requests(scale)]
    plain = [r for r in ours if r.variant is None]
    assert plain and all(r.fingerprint in theirs for r in plain)
    assert not any(r.fingerprint in theirs for r in ours if r.variant is not None)
    elsewhere = made_elsewhere(scale)
    assert {elsewhere[r.fingerprint] for r in plain} == {"cpu", "planted"}
    roots = index_roots(scale)
    assert cpu.results_dir / "runs" in roots and planted.results_dir / "runs" in roots


def test_every_variant_run_composes_and_validates() -> None:
    from conftest import compose_config

    from dograph.config import to_run_config

    scale = load_scale("pays")
    requests = [r for a in PAYS_ARTIFACTS.values() for r in a.requests(scale) if r.seed == 0 and r.variant]
    assert {r.variant for r in requests} == {"b48", "b128", "tilt", "shrink50"}  # isolation: the planted runs
    for request in requests:
        overrides = [o for o in request_overrides(request, scale) if not o.startswith(("hydra.", "hydra/"))]
        cfg = to_run_config(compose_config(overrides))
        assert cfg.tags == [f"variant:{request.variant}"]
        if request.variant == "b128":
            assert (cfg.trainer.batch_size, cfg.trainer.max_steps) == (128, 50)
        if request.variant == "shrink50":
            assert (cfg.mixer["sample_weights"], cfg.mixer["shrink"]) == ("shrink", 0.5)


def _run(root: Path, scale: Scale, request, loss: float, ess: float) -> Path:
    """A complete run as run.py leaves it (the files the index reads), for ``request``."""
    run = root / request.run_dir(scale).relative_to(scale.runs_root)
    (run / ".hydra").mkdir(parents=True)
    tags = [f"variant:{request.variant}"] if request.variant else []
    dataset = {"source": "embedded", **({"planted": {"scenario": request.scenario}} if request.scenario else {})}
    config = {"mixer": {}, "m": request.m, "seed": request.seed, "tags": tags, "trainer": {"max_steps": 400},
              "dataset": dataset}
    (run / "run_info.json").write_text(json.dumps({"config": config, "fingerprint": request.fingerprint,
                                                   "overrides": request_overrides(request, scale)[:-2]}))
    choices = {"mixer": request.method, "model": request.model, "dataset": request.dataset,
               "objective": request.objective, "trainer": "default"}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    final = {"val/avg_loss": loss}
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 400, **final}) + "\n")
    (run / "summary.json").write_text(json.dumps({"status": "complete", "completed_at": "2026-01-01T00:00:00+00:00",
                                                  "steps": 400, "final_eval": final, "weights": {"mean_ess": ess}}))
    return run


def test_the_index_reads_the_variant_and_a_plain_request_never_takes_a_variant_run(tmp_path: Path) -> None:
    scale = pays_scale(tmp_path)
    plain = make_request(scale, "dograph", "gpt2_tiny", "embedded", 0)
    tilt = Arm("dograph", "tilt", ("mixer.sample_weights=tilt",)).requests(scale, "embedded", [0])[0]
    _run(scale.runs_root, scale, tilt, 6.1, 0.9)
    index = build_index([scale.runs_root])
    row = index.iloc[0]
    assert row["variant"] == "tilt" and same_identity(row, tilt) and not same_identity(row, plain)
    assert record_id(row.to_dict()).startswith("dograph-gpt2_tiny-embedded-m11_uncertainty_tilt-seed0-")
    assert "variant" not in build_index([tmp_path / "nothing"]).columns
    # the plain request's identity matches the tilt run's keys but not its variant: not a stale record of it
    record = index.assign(source="record", run_dir=str(scale.results_dir / "runs" / "x"))
    assert stale_records(record, [plain], scale) == []


def test_the_ess_cost_table_pairs_each_cell_with_uniform_at_the_same_batch(tmp_path: Path) -> None:
    scale = replace(pays_scale(tmp_path), seeds=[0, 1])
    artifact = PAYS_ARTIFACTS["pays_ess_cost"]
    for request in artifact.requests(scale):
        if request.variant == "b128":
            continue  # a cell without runs says so
        batch = 0.2 if request.variant == "b48" else 0.0
        dograph = request.method == "dograph"
        loss = 6.0 + batch + 0.01 * request.seed + (0.05 + 0.01 * (11 - request.m) if dograph else 0.0)
        _run(scale.runs_root, scale, request, loss, 0.6 + 0.02 * request.m if dograph else 1.0)
    paths = artifact.build(build_index([scale.runs_root]), scale, tmp_path / "out")
    assert {p.name for p in paths} >= {"pays_ess_cost.md", "pays_ess_cost.png", "pays_ess_cost_points.csv"}
    table = pd.read_csv(tmp_path / "out" / "pays_ess_cost.csv")
    rows = {(r["Batch"], int(r["m"])): r for _, r in table.iterrows()}
    assert rows[("batch 48 x 133 steps", 3)]["Δ vs Uniform"].startswith("0.130 ± 0.000 (n=2)")
    assert rows[("batch 16 x 400 steps", 11)]["Δ vs Uniform"].startswith("0.050 ± 0.000 (n=2)")
    assert rows[("batch 128 x 50 steps", 11)]["Δ vs Uniform"] == "not available"
    points = pd.read_csv(tmp_path / "out" / "pays_ess_cost_points.csv")
    assert len(points) == 8 and points["delta"].notna().all()


def test_step_ess_is_each_rule_s_formula_at_the_logged_weights_and_counts() -> None:
    import numpy as np

    from experiments.pays_artifact import step_ess

    counts, half = np.array([1, 7, 0]), np.array([0.5, 0.5, 0.3])  # an absent cluster's weight plays no part
    assert step_ess(half, counts, "cluster_mean") == pytest.approx(1 / (8 * (0.25 / 1 + 0.25 / 7)))  # 0.4375
    assert step_ess(half, counts, "tilt") == pytest.approx(1.0)  # equal weights: the plain mean
    tilted = np.array([0.9, 0.1, 0.0])  # "equal" ignores the weights, cluster_mean does not
    assert step_ess(tilted, counts, "equal") == pytest.approx(0.4375)
    assert step_ess(tilted, counts, "cluster_mean") == pytest.approx(1 / (8 * (0.81 / 1 + 0.01 / 7)))  # 0.154
    skew = np.array([0.8, 0.2, 0.0])
    v = np.array([0.8] + [0.2] * 7) / (0.8 + 1.4)  # tilt: v_i proportional to w_c
    assert step_ess(skew, counts, "tilt") == pytest.approx(v.sum() ** 2 / (8 * (v ** 2).sum()))
    assert step_ess(skew, counts, "shrink", 0.0) == pytest.approx(step_ess(skew, counts, "cluster_mean"))
    assert step_ess(skew, counts, "shrink", 1.0) == pytest.approx(1.0)


def test_the_ess_rules_table_recomputes_the_logged_ess_and_names_a_run_that_disagrees(tmp_path: Path) -> None:
    import numpy as np

    from experiments.pays_artifact import step_ess

    scale = replace(pays_scale(tmp_path), seeds=[0, 1])
    artifact = PAYS_ARTIFACTS["pays_ess_rules"]
    history = pd.DataFrame([{"step": 10 + i, "objective_value": 0.1, "fallback": 0, "w0": 0.5 + 0.1 * i, "w1": 0.5,
                             "w2": 0.0, "n0": 1 + i, "n1": 15 - i, "n2": 0} for i in range(3)])
    logged = float(np.mean([step_ess(np.array([0.5 + 0.1 * i, 0.5, 0.0]), np.array([1 + i, 15 - i, 0]),
                                     "cluster_mean") for i in range(3)]))
    for request in artifact.requests(scale):
        if request.variant is None:  # batch 16, m 11: seed 1's summary disagrees with its weight history
            run = _run(scale.runs_root, scale, request, 6.0, logged if request.seed == 0 else logged + 0.1)
            (run / "mixer").mkdir()
            history.to_csv(run / "mixer" / "weights.csv", index=False)
    artifact.build(build_index([scale.runs_root]), scale, tmp_path / "out")
    text = (tmp_path / "out" / "pays_ess_rules.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| batch 16 x 400 steps | 11"))
    assert f"| {logged:.2f} ± 0.00 (n=2) |" in row and "| 2.0 ± 0.0 (n=2) |" in row
    assert "Runs whose recomputed paper ESS differs" in text and "batch 16 x 400 steps seed 1" in text
    assert "| batch 48 x 133 steps | 3 | not available" in text


def test_the_variants_table_has_every_update_on_every_corpus_and_the_longer_pair_waits(tmp_path: Path) -> None:
    scale = replace(pays_scale(tmp_path), seeds=[0], scenarios=[])
    artifact = PAYS_ARTIFACTS["pays_variants"]
    for request in artifact.requests(scale):
        _run(scale.runs_root, scale, request, 6.0 + (0.1 if request.variant == "tilt" else 0.0), 0.8)
    artifact.build(build_index([scale.runs_root]), scale, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "pays_variants.csv").set_index("Update")
    assert list(table.index) == ["Uniform", "DoGraph, paper (cluster_mean)", "DoGraph, tilt", "DoGraph, shrink50"]
    assert table.loc["DoGraph, tilt", "Δ vs Uniform"].startswith("0.100 (n=1)")
    assert PAYS_ARTIFACTS["pays_longer"].requests(scale) == []  # study.longer.update: null until question 3
    PAYS_ARTIFACTS["pays_longer"].build(build_index([scale.runs_root]), scale, tmp_path / "out")
    assert "Not run yet" in (tmp_path / "out" / "pays_longer.md").read_text()
    chosen = replace(scale, study={**scale.study, "longer": {**scale.study["longer"], "update": "tilt"}})
    longer = PAYS_ARTIFACTS["pays_longer"].requests(chosen)
    assert {r.seed for r in longer} == {3, 4, 5} and {r.variant for r in longer} == {"longer", "longer_tilt"}


def test_a_diverged_run_is_named_in_the_table_not_silently_dropped(tmp_path: Path) -> None:
    scale = replace(pays_scale(tmp_path), seeds=[0, 1, 2])
    artifact = PAYS_ARTIFACTS["pays_ess_cost"]
    for request in artifact.requests(scale):
        if request.variant is None:  # b16 only
            diverged = request.method == "dograph" and request.seed == 2
            _run(scale.runs_root, scale, request, float("nan") if diverged else 6.0 + 0.05 * (request.method
                 == "dograph"), 0.6)
    artifact.build(build_index([scale.runs_root]), scale, tmp_path / "out")
    text = (tmp_path / "out" / "pays_ess_cost.md").read_text()
    assert "1 of " in text and "ended without a finite validation loss" in text
    assert "method=dograph model=gpt2_tiny dataset=embedded seed=2" in text.split("finite validation loss")[1]


def test_the_longer_update_follows_the_rule_computed_from_the_variants(tmp_path: Path) -> None:
    from experiments.pays_artifact import rule_choice

    scale = replace(pays_scale(tmp_path), seeds=[0, 1], scenarios=[])
    shift = {None: 0.08, "tilt": 0.02, "shrink50": 0.05}
    requests = [r for r in PAYS_ARTIFACTS["pays_variants"].requests(scale)]
    for request in requests:
        if request.method == "dograph" and request.variant == "shrink50" and request.seed == 1:
            continue  # one seed short: no choice yet
        _run(scale.runs_root, scale, request, 6.0 + (shift[request.variant] if request.method == "dograph" else 0), 0.8)
    index = build_index([scale.runs_root])
    assert rule_choice(index, scale)[0] is None
    (missing,) = [r for r in requests if r.variant == "shrink50" and r.seed == 1 and r.method == "dograph"]
    _run(scale.runs_root, scale, missing, 6.05, 0.8)
    chosen, means = rule_choice(build_index([scale.runs_root]), scale)
    assert chosen == "tilt" and means["paper"] == pytest.approx(0.08)
    configured = replace(scale, study={**scale.study, "longer": {**scale.study["longer"], "update": "shrink50"}})
    PAYS_ARTIFACTS["pays_longer"].build(build_index([scale.runs_root]), configured, tmp_path / "out")
    assert "WARNING: study.longer.update is shrink50, but the rule gives tilt" in (
        tmp_path / "out" / "pays_longer.md").read_text()
    wrong = replace(scale, study={**scale.study, "longer": {**scale.study["longer"], "update": "cluster_mean"}})
    with pytest.raises(ConfigError, match=r"study\.longer\.update .* must be null or one of paper, tilt, shrink50"):
        PAYS_ARTIFACTS["pays_longer"].requests(wrong)


def test_every_batch_setting_sees_the_same_sequences_evaluated_and_kept_at_the_same_points() -> None:
    scale = load_scale("pays")

    def setting(batch: str) -> dict[str, int]:
        values = {"trainer.batch_size": 16, **{o.split("=")[0]: int(o.split("=")[1]) for o in scale.common
                                               if o.split("=")[0].startswith("trainer.") and o.split("=")[1].isdigit()}}
        values.update({o.split("=")[0]: int(o.split("=")[1]) for o in scale.study["batches"][batch]})
        return values

    for batch in scale.study["batches"]:
        values = setting(batch)
        size = values["trainer.batch_size"]
        assert abs(values["trainer.max_steps"] * size - 6400) <= 0.01 * 6400
        assert abs(values["trainer.eval_every"] * size - 1600) <= 0.05 * 1600
        assert abs(values["trainer.ckpt_every"] * size - 3200) <= 0.05 * 3200


def test_the_variants_table_reads_dograph_s_split_agreement_on_the_hidden_split(tmp_path: Path) -> None:
    scale = replace(pays_scale(tmp_path), seeds=[0, 1], scenarios=["hidden_split"])
    artifact = PAYS_ARTIFACTS["pays_variants"]
    for request in artifact.requests(scale):
        run = _run(scale.runs_root, scale, request, 6.0, 0.8)
        if request.method == "dograph" and request.scenario == "hidden_split":
            (run / "derived").mkdir()
            ari = 0.5 if request.variant == "tilt" else 0.1
            pd.DataFrame({"step": [400, 200], "ari_split": [ari + 0.1 * request.seed, 0.9]}).to_csv(
                run / "derived" / "planted_clusters.csv", index=False)
    artifact.build(build_index([scale.runs_root]), scale, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "pays_variants.csv")
    split = table[table["Corpus"] == "hidden_split"].set_index("Update")["ARI split"]
    assert split["DoGraph, tilt"].startswith("0.55 ± ") and split["DoGraph, paper (cluster_mean)"].startswith("0.15")
    assert split["Uniform"] == "—" and (table[table["Corpus"] == "embedded"]["ARI split"] == "—").all()


def test_the_isolation_table_averages_the_seeds_and_names_a_run_it_could_not_measure(tmp_path: Path) -> None:
    scale = pays_scale(tmp_path)
    artifact = PAYS_ARTIFACTS["pays_isolation"]
    requests = artifact.requests(scale)
    assert [(r.method, r.scenario, r.variant) for r in requests] == [("dograph", "noise", None)] * 3
    grid = [{"step": step, "planted": "noise", "rank": 4, "dim": 256, "cluster_on": on, "m": m, "buffer_size": n,
             "isolated": 0.1 * m / 11, "ari": 0.02 if on == "raw" else 0.04}
            for step in (200, 400) for on in ("direction", "raw") for m in (3, 11) for n in (128, 512)]
    for request in requests[:2]:  # seed 2: a record without checkpoints or derived points
        run = _run(scale.runs_root, scale, request, 6.0, 0.6)
        (run / "derived").mkdir()
        frame = pd.DataFrame(grid)
        frame["isolated"] += 0.02 * request.seed
        frame.to_csv(run / "derived" / "cluster_isolation.csv", index=False)
    _run(scale.runs_root, scale, requests[2], 6.0, 0.6)
    artifact.build(build_index([scale.runs_root]), scale, tmp_path / "out")
    text = (tmp_path / "out" / "pays_isolation.md").read_text()
    assert "| 400 | direction | 4 (256) | 0.04 / 0.04 | 0.04 / 0.04 | 0.11 / 0.04 | 0.11 / 0.04 |" in text
    assert "seed 2: not measured" in text and "Seeds: [0, 1] (n = 2)" in text
    assert len(pd.read_csv(tmp_path / "out" / "pays_isolation_points.csv")) == 2 * len(grid)


@pytest.mark.parametrize(("artifact", "scale", "message"), [
    ("pays_variants", "cpu", "error: pays_variants is a pays artifact: build it at pays (--scale), not at the cpu"),
    ("table2", "pays", "error: table2 is a paper artifact: build it at smoke or cpu or paper (--scale), not at"),
])
def test_pays_artifacts_only_at_the_pays_scale(tmp_path: Path, capsys, artifact: str, scale: str,
                                               message: str) -> None:
    where = ["--no-train", "--runs-root", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
    assert main([artifact, "--scale", scale, *where]) == 2
    assert capsys.readouterr().err.startswith(message)
