"""The DoGraph mixer: warm-up, per-sample weights, edge cases, state, and full runs (resume, artifacts)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from dograph.method.mixer import DoGraphMixer, per_sample_weights
from dograph.method.objectives import UncertaintyObjective
from dograph.mixing import StepSignals
from dograph.runs.app import run_training
from dograph.step.projection import KroneckerProjector
from dograph.train.metrics import read_metrics


def make_mixer(m: int = 3, buffer_size: int = 12, **kwargs) -> DoGraphMixer:
    return DoGraphMixer(num_clusters=m, objective=functools.partial(UncertaintyObjective),
                        projection=KroneckerProjector(seed=0), buffer_size=buffer_size, domains=["a", "b"],
                        **kwargs)


def blobs(step: int, b: int = 6, dim: int = 8, spread: float = 0.05) -> StepSignals:
    """Three well-separated groups of projected gradients, with domain labels."""
    generator = torch.Generator().manual_seed(step)
    centers = torch.eye(dim)[:3] * 10
    group = torch.arange(b) % 3
    g = centers[group] + spread * torch.randn(b, dim, generator=generator)
    loss = 1.0 + group.float()
    return StepSignals(step=step, input_ids=torch.zeros(b, 4, dtype=torch.long), loss=loss,
                       domain=(group > 0).long(), grad_proj=g)


def test_per_sample_weights_formula_and_empty_clusters() -> None:
    w = torch.tensor([0.5, 0.3, 0.2])
    assign = torch.tensor([0, 0, 2, 2, 2])  # cluster 1 absent from the batch
    v = per_sample_weights(w, assign, 3)
    assert torch.isclose(v.sum(), torch.tensor(1.0))
    expected = torch.tensor([0.5 / 2, 0.5 / 2, 0.2 / 3, 0.2 / 3, 0.2 / 3]) / 0.7
    assert torch.allclose(v, expected)


def test_warmup_is_uniform_then_clusters() -> None:
    mixer = make_mixer(buffer_size=12)
    first = mixer.weigh(blobs(0))
    assert first.sample_weights is None and first.metrics["mixer/warmup"] == 1.0  # the plain mean
    second = mixer.weigh(blobs(1))  # the buffer is full after this push: first clustering
    assert "mixer/refresh/ari" in second.metrics and mixer.clusterer.centroids is not None
    third = mixer.weigh(blobs(2))
    assert third.metrics["mixer/warmup"] == 0.0
    assert torch.isclose(third.sample_weights.sum(), torch.tensor(1.0))
    assert sorted(third.metrics["mixer/cluster_sizes"]) == [2, 2, 2]


def test_refresh_cadence_defaults_to_one_pass_over_the_buffer() -> None:
    mixer = make_mixer(buffer_size=12)
    refreshes = [s for s in range(12) if "mixer/refresh/step" in mixer.weigh(blobs(s)).metrics]
    assert refreshes == [1, 3, 5, 7, 9, 11]  # 12 / 6 = every 2 steps once full


def test_fewer_points_than_m_stays_in_warmup() -> None:
    mixer = make_mixer(m=8, buffer_size=8)
    out = mixer.weigh(blobs(0, b=4))
    assert out.metrics["mixer/warmup"] == 1.0 and mixer.clusterer.centroids is None


def test_single_cluster_is_the_plain_mean() -> None:
    mixer = make_mixer(m=1, buffer_size=6)
    for step in range(3):
        out = mixer.weigh(blobs(step))
    assert out.metrics["mixer/warmup"] == 0.0
    assert torch.allclose(out.sample_weights, torch.full((6,), 1 / 6))


def test_duplicate_points_give_finite_weights() -> None:
    mixer = make_mixer(m=3, buffer_size=12)
    for step in range(4):
        signals = blobs(step)
        same = StepSignals(step=step, input_ids=signals.input_ids, loss=torch.ones(6),
                           domain=signals.domain, grad_proj=torch.ones(6, 8))
        out = mixer.weigh(same)
    assert torch.isfinite(out.sample_weights).all() and torch.isclose(out.sample_weights.sum(), torch.tensor(1.0))


def test_non_finite_gradient_skips_the_step(caplog: pytest.LogCaptureFixture) -> None:
    mixer = make_mixer()
    for step in range(3):
        mixer.weigh(blobs(step))
    before = {k: v.clone() for k, v in mixer.stats.state_dict().items() if isinstance(v, torch.Tensor)}
    filled = len(mixer.buffer)
    bad = blobs(3)
    bad.grad_proj[2, 0] = float("nan")
    with caplog.at_level(logging.WARNING):
        out = mixer.weigh(bad)
    assert out.skip_step and out.sample_weights is None and "step 3" in caplog.text
    after = mixer.stats.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and len(mixer.buffer) == filled
    assert not mixer.weigh(blobs(4)).skip_step


def test_state_dict_round_trip_continues_identically() -> None:
    a = make_mixer()
    for step in range(4):
        a.weigh(blobs(step))
    b = make_mixer()
    b.load_state_dict(a.state_dict())
    for step in range(4, 8):
        wa, wb = a.weigh(blobs(step)), b.weigh(blobs(step))
        assert torch.equal(wa.sample_weights, wb.sample_weights)
    assert a.history.steps == b.history.steps


def test_clusters_recover_separated_groups() -> None:
    mixer = make_mixer(buffer_size=12)
    for step in range(6):
        mixer.weigh(blobs(step))
    assert mixer.history.refreshes[-1]["empty_clusters"] == 0
    assignment = mixer.history.assignments[-1]
    groups = np.arange(6) % 3
    assert len({(a, g) for a, g in zip(assignment, groups, strict=True)}) == 3  # a bijection


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


DOGRAPH_RUN = ("mixer=dograph", "mixer.buffer_size=16", "m=3", "trainer.batch_size=4")


def deterministic_train_records(run_dir: Path) -> list[dict]:
    """Train records without wall-clock fields (time, throughput, timers)."""
    clock = ("time", "tokens_per_s")
    return [{k: v for k, v in r.items() if k not in clock and not k.startswith("mixer/time_")}
            for r in read_metrics(run_dir) if r["kind"] == "train"]


def test_dograph_resume_is_exact(make_config, tmp_path: Path) -> None:
    """Resumed mid log window (step 6 of windows of 4): every logged value is bit-identical."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run = (*DOGRAPH_RUN, "trainer.max_steps=12", "trainer.log_every=4")
    done = run_training(make_config(*run), straight)
    first = run_training(make_config(*run, "trainer.stop_after_steps=6"), resumed)
    assert first.stopped_early
    again = run_training(make_config(*run, "resume=true"), resumed)
    expected = deterministic_train_records(straight)
    assert [r["step"] for r in expected] == [4, 8, 12] and "train/ess" in expected[-1]
    assert deterministic_train_records(resumed) == expected
    assert again.weight_summary == done.weight_summary and done.weight_summary.steps > 0
    a = (straight / "mixer" / "weights.csv").read_text()
    assert a == (resumed / "mixer" / "weights.csv").read_text() and len(a.splitlines()) > 5


def test_weights_report_ess_and_effective_mixture(make_config, tmp_path: Path, capsys) -> None:
    """Every reweighted step's ESS and effective human-domain mixture are logged and summarised."""
    from dograph.runs.summary import print_weight_summary

    result = run_training(make_config("trainer.max_steps=10", *DOGRAPH_RUN), tmp_path)
    assignments = np.load(tmp_path / "mixer" / "assignments.npz")
    weights = np.loadtxt(tmp_path / "mixer" / "weights.csv", delimiter=",", skiprows=1)
    ess, effective = [], []
    for row, cluster, domain in zip(weights, assignments["cluster"], assignments["domain"], strict=True):
        w, sizes = row[3:6], row[6:9]
        v = w[cluster] / (sizes[cluster] * w[sizes > 0].sum())
        ess.append(1.0 / (len(v) * np.sum(v**2)))
        effective.append(np.bincount(domain, weights=v, minlength=3))
    summary = result.weight_summary
    assert summary.steps == len(ess) > 0
    assert summary.mean_ess == pytest.approx(np.mean(ess), rel=1e-5)
    assert summary.ess_min == pytest.approx(min(ess), rel=1e-5)
    assert summary.mean_mixtures()[1] == pytest.approx(np.mean(effective, 0).tolist(), rel=1e-5, abs=1e-7)
    logged = [r for r in read_metrics(tmp_path) if r["kind"] == "train" and "train/ess" in r]
    assert len(logged) == len(ess) and all(0 < r["train/ess"] <= 1 + 1e-6 for r in logged)
    assert all(abs(sum(r["train/effective_mixture"]) - 1) < 1e-5 for r in logged)
    print_weight_summary(result, build_corpus_stub(3))
    out = capsys.readouterr().out
    assert f"mean {np.mean(ess):.3f}, min {min(ess):.3f}" in out and "effective (sum of weights)" in out


def build_corpus_stub(num_domains: int):
    from types import SimpleNamespace

    return SimpleNamespace(domains=[f"d{i}" for i in range(num_domains)],
                           natural_mixture=[1 / num_domains] * num_domains)


def test_dograph_run_logs_and_saves_its_histories(make_config, tmp_path: Path) -> None:
    run_training(make_config("trainer.max_steps=10", *DOGRAPH_RUN), tmp_path)
    train = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    weighted = [r for r in train if r.get("mixer/warmup") == 0.0]
    assert weighted and len(weighted[-1]["mixer/weights"]) == 3
    assert all(k in weighted[-1] for k in ("mixer/cluster_sizes", "mixer/objective_value", "mixer/time_solve_s",
                                           "mixer/time_projection_s", "mixer/time_cluster_s"))
    assert any("mixer/refresh/contingency" in r for r in train)
    files = {p.name for p in (tmp_path / "mixer").iterdir()}
    assert {"weights.csv", "assignments.npz", "refreshes.jsonl"} <= files
    saved = np.load(tmp_path / "mixer" / "assignments.npz")
    assert saved["cluster"].shape[1] == 4 and saved["cluster"].max() < 3


@pytest.mark.parametrize("objective", ["uncertainty", "variance", "robust", "alignment"])
def test_every_objective_trains(make_config, tmp_path: Path, objective: str) -> None:
    result = run_training(make_config("trainer.max_steps=7", f"objective={objective}", *DOGRAPH_RUN), tmp_path)
    assert result.state.step == 7 and np.isfinite(result.final_eval["val/avg_loss"])
