"""Figures 1 and 3 on a tiny DoGraph run: the files, contents consistent with the run, nothing drawn without data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from figure_runs import tiny_scale, train_tiny_dograph
from helpers import ddp_model

from dograph.step.projection import KroneckerProjector, LossModule, exact_per_sample_grads
from experiments import figure1, figure3
from experiments.artifact import NothingToPlot
from experiments.index import build_index
from experiments.paper import ARTIFACTS
from experiments.scale import Scale

DOMAINS = {"code", "docs", "licences"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, local_corpus: Path, cache_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("figure_runs")
    return train_tiny_dograph(root / "runs" / "dograph" / "seed0", local_corpus, cache_dir)


@pytest.fixture(scope="module")
def scale(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory, local_corpus: Path) -> Scale:
    return tiny_scale(tiny_run.parent.parent.parent, tmp_path_factory.mktemp("results"), local_corpus)


def written(paths: list[Path]) -> set[str]:
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    return {p.name for p in paths}


def test_figure1_draws_every_held_out_window_at_the_first_and_last_checkpoint(tiny_run: Path, scale: Scale,
                                                                            tmp_path: Path) -> None:
    paths = figure1.build(build_index([scale.runs_root]), scale, tmp_path)
    assert written(paths) == {"figure1.png", "figure1.pdf", "figure1_points.csv"}
    points = pd.read_csv(tmp_path / "figure1_points.csv")
    assert points.groupby("checkpoint")["step"].first().to_dict() == {"early": 4, "late": 8}
    # 4 held-out windows per domain (dataset.val_sequences_per_domain=4), the same ones at both checkpoints
    assert points.groupby(["checkpoint", "domain"]).size().to_dict() == {
        (c, d): 4 for c in ("early", "late") for d in DOMAINS}
    early, late = (points[points.checkpoint == c].sort_values("sample") for c in ("early", "late"))
    assert list(early["domain"]) == list(late["domain"])
    assert np.isfinite(points[["pc1", "pc2"]]).all().all()
    assert not np.allclose(early[["pc1", "pc2"]], late[["pc1", "pc2"]])  # the weights moved between them
    assert (points["pc1_share"] >= points["pc2_share"]).all() and (points["pc1_share"] <= 1).all()


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func over CPU attention
def test_projected_gradients_are_the_projection_of_the_exact_per_sample_gradients() -> None:
    model = ddp_model().eval()
    projector = KroneckerProjector(rank=4, out_dim=16, seed=5)
    windows = torch.randint(0, 97, (5, 13), generator=torch.Generator().manual_seed(0))
    got = figure1.projected_gradients(model, projector, windows)
    bound = projector.bind(model)
    exact = exact_per_sample_grads(LossModule(model), windows[:, :-1], windows[:, 1:],
                                   [f"model.{layer.name}.weight" for layer in bound.layers])
    blocks = []
    for layer in bound.layers:
        g = exact[f"model.{layer.name}.weight"].transpose(1, 2)  # GPT-2 Conv1D stores [d_in, d_out]: G is [d_out, d_in]
        blocks.append((layer.right.T @ g @ layer.left).flatten(1))
    expected = torch.cat(blocks, dim=1) @ bound.compress
    assert got.shape == (5, 16)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_figure3_contingency_matches_the_runs_refreshes(tiny_run: Path, scale: Scale, tmp_path: Path) -> None:
    paths = figure3.build(build_index([scale.runs_root]), scale, tmp_path)
    assert written(paths) == {"figure3.png", "figure3.pdf", "figure3_contingency.csv", "figure3_buffer_points.csv"}
    table = pd.read_csv(tmp_path / "figure3_contingency.csv")
    refreshes = [json.loads(line) for line in (tiny_run / "mixer" / "refreshes.jsonl").read_text().splitlines()]
    assert len(refreshes) >= 2
    assert sorted(table["step"].unique()) == [r["step"] for r in refreshes]
    assert set(table["domain"]) == DOMAINS and set(table["cluster"]) == set(range(11))
    assert (table.groupby("refresh")["count"].sum() == 24).all()  # the full buffer (mixer.buffer_size=24)
    shares = table[table["count"] > 0].groupby(["refresh", "cluster"]).size().index
    sums = table.set_index(["refresh", "cluster"]).loc[shares].groupby(level=[0, 1])["row_share"].sum()
    assert np.allclose(sums, 1.0)
    buffer = pd.read_csv(tmp_path / "figure3_buffer_points.csv")
    assert len(buffer) == 24 and set(buffer["domain"]) <= DOMAINS
    assert buffer["cluster"].between(0, 10).all() and (buffer["step"] == 8).all()


def test_no_run_and_too_little_of_a_run_draw_nothing(tiny_run: Path, scale: Scale, tmp_path: Path) -> None:
    for name in ("figure1", "figure3"):  # as reproduce builds them: the entries of experiments/paper.py
        with pytest.raises(NothingToPlot, match="no complete run"):
            ARTIFACTS[name].build(build_index([tmp_path / "empty"]), scale, tmp_path / "out")
    # a copy of the run keeping only its last checkpoint and no mixer files
    copy = tmp_path / "runs" / "dograph" / "seed0"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("checkpoints", "mixer", "derived"))
    (copy / "checkpoints").mkdir()
    shutil.copy(tiny_run / "checkpoints" / "step_00000008.pt", copy / "checkpoints")
    index = build_index([tmp_path / "runs"])
    with pytest.raises(NothingToPlot, match="keeps 1 checkpoint"):
        figure1.build(index, scale, tmp_path / "out")
    with pytest.raises(NothingToPlot, match="no K-means refresh"):
        figure3.build(index, scale, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_record_alone_redraws_figures_1_and_3_byte_identical(tiny_run: Path, scale: Scale, tmp_path: Path) -> None:
    """A record keeps no checkpoint, but the points the figures computed from them (``derived/``): a fresh clone
    with only the record draws the same files."""
    from dataclasses import replace

    from experiments.records import records_root, write_record

    run = tmp_path / "runs" / "dograph" / "seed0"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("derived"))
    here = replace(scale, runs_root=tmp_path / "runs", results_dir=tmp_path / "results")
    write_record(run, records_root(here))
    index = build_index([here.runs_root, records_root(here)])
    live = [p for m in (figure1, figure3) for p in m.build(index, here, tmp_path / "live")]
    assert {p.name for p in (records_root(here)).rglob("*.csv") if p.parent.name == "derived"} == {
        "figure1_points.csv", "figure3_buffer_points.csv"}
    shutil.rmtree(tmp_path / "runs")
    index = build_index([records_root(here)])
    assert list(index["source"]) == ["record"]
    again = [p for m in (figure1, figure3) for p in m.build(index, here, tmp_path / "record")]
    assert [p.name for p in again] == [p.name for p in live]
    for a, b in zip(live, again, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
