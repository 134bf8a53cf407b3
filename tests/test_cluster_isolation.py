"""experiments/cluster_isolation.py: the isolation measures on synthetic clusters, and the whole grid on a tiny run.

The tiny run: gpt2_tiny, Uniform, 8 steps of 8 x 32 tokens on the local 3-domain corpus with noise planted in it,
a checkpoint every 4 steps (so steps 4 and 8), trained in this process as ``run.py`` would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from experiments.cluster_isolation import (
    MEASURES,
    NAME,
    NotMeasurable,
    cluster,
    isolation_measures,
    isolation_rows,
    main,
    projected_by_rank,
    projection_settings,
    projector_for,
    quotas,
    window_pool,
)
from experiments.figure1 import projected_gradients


def groups(sizes: list[int], dim: int = 16, spread: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points around one orthogonal direction per group (lengths varying 10x), and their group ids."""
    rng = np.random.default_rng(seed)
    points, labels = [], []
    for g, n in enumerate(sizes):
        centre = np.eye(dim)[g]
        scale = rng.uniform(1, 10, size=(n, 1))
        points.append(scale * (centre + spread * rng.standard_normal((n, dim))))
        labels.append(np.full(n, g))
    return np.concatenate(points).astype(np.float32), np.concatenate(labels)


@pytest.mark.parametrize("cluster_on", ["direction", "raw"])
def test_a_perfectly_separated_planted_group_is_isolated(cluster_on: str) -> None:
    grads, domain = groups([20, 30, 25])  # group 0 planted
    measures = isolation_measures(cluster(grads, 3, cluster_on), domain, 0, 3, 3)
    assert measures["isolated"] == 1 and measures["best_f1"] == 1
    assert measures["ari_domains"] == pytest.approx(1) and measures["nmi_domains"] == pytest.approx(1)
    binary = np.where(domain == 0, 0, 1)  # the rest as one group: the clusters are then exactly planted-or-not
    two = isolation_measures(cluster(grads[domain < 2], 2, cluster_on), binary[domain < 2], 0, 2, 2)
    assert two["ari"] == pytest.approx(1) and two["nmi"] == pytest.approx(1)
    assert two["isolated"] == 1 and two["best_f1"] == 1


def test_a_planted_group_spread_evenly_over_the_clusters_is_not_isolated() -> None:
    index = np.arange(120)
    assign, domain = index % 4, (index // 4) % 3  # every cluster a third planted (domain 0)
    measures = isolation_measures(assign, domain, 0, 4, 3)
    assert measures["isolated"] == 0 and measures["ari"] == pytest.approx(0, abs=0.02)
    assert measures["nmi"] == pytest.approx(0, abs=1e-9) and measures["best_f1"] == pytest.approx(2 * 10 / (30 + 40))


def test_k_means_on_points_unrelated_to_the_label_neither_isolates_nor_agrees() -> None:
    rng = np.random.default_rng(1)
    grads = rng.standard_normal((400, 16)).astype(np.float32)
    domain = rng.integers(0, 4, size=400)
    measures = isolation_measures(cluster(grads, 5, "direction"), domain, 0, 5, 4)
    assert measures["isolated"] == 0 and abs(measures["ari"]) < 0.03 and abs(measures["ari_domains"]) < 0.03


def test_isolated_counts_only_clusters_at_least_80_percent_planted() -> None:
    # cluster 0: 8 planted of 10 (pure), cluster 1: 7 of 10 (not), cluster 2: no planted
    domain = np.array([1] * 8 + [0] * 2 + [1] * 7 + [0] * 3 + [0] * 10)
    assign = np.repeat([0, 1, 2], 10)
    measures = isolation_measures(assign, domain, 1, 3, 2)
    assert measures["isolated"] == pytest.approx(8 / 15) and measures["best_f1"] == pytest.approx(16 / 25)


def test_quotas_follow_the_shares_and_sum_to_the_total() -> None:
    assert quotas([0.5, 0.25, 0.25], 8) == [4, 2, 2]
    shares = [0.1375, 0.1375, 0.1375, 0.0693, 0.1186, 0.25, 0.0121, 0.1375]
    for total in (7, 128, 2048):
        got = quotas(shares, total)
        assert sum(got) == total and all(abs(g - total * s / sum(shares)) < 1 for g, s in zip(got, shares, strict=True))


def test_only_a_dograph_run_s_projection_is_used_other_runs_get_dograph_s_defaults(make_config) -> None:
    dograph = projection_settings(make_config("mixer.projection.exclude=[]", "mixer.projection.out_dim=64", "seed=3"))
    assert dograph["exclude"] == [] and dograph["out_dim"] == 64 and dograph["seed"] == 3
    defaults = {"out_dim": 1024, "include": ["*"], "exclude": ["lm_head"], "dtype": "float32", "seed": 3}
    assert projection_settings(make_config("mixer=doge", "seed=3")) == defaults  # DoGE's own projection: not DoGraph's
    assert projection_settings(make_config("mixer=uniform", "seed=3")) == defaults
    capped = projector_for(make_config("mixer=uniform"), 4, 16)
    assert capped.rank == 4 and capped.out_dim == 4 * 4 * 16


# ---- a tiny real run ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory: pytest.TempPathFactory, local_corpus: Path, cache_dir: Path) -> Path:
    from conftest import compose_config
    from figure_runs import hydra_job

    from dograph.config import to_run_config
    from dograph.runs.app import run_training

    run_dir = tmp_path_factory.mktemp("isolation") / "uniform" / "seed0"
    overrides = ["model=gpt2_tiny", "mixer=uniform", "dataset=planted", "dataset.source=jsonl",
                 f"dataset.path={local_corpus}", "dataset.planted.scenario=noise", "dataset.val_fraction=0.1",
                 "dataset.val_sequences_per_domain=4", "tokenizer=bpe1k", "trainer=debug", "trainer.batch_size=8",
                 "trainer.seq_len=32", "trainer.max_steps=8", "trainer.ckpt_every=4", "logger=disabled",
                 "trainer.device=cpu", f"paths.cache_dir={cache_dir}"]
    with hydra_job(run_dir, overrides):
        run_training(to_run_config(compose_config(overrides)), run_dir)
    return run_dir


GRID = {"ranks": (2, 4), "cluster_on": ("direction", "raw"), "m_values": (2, 3), "buffer_sizes": (8, 24)}


def test_every_checkpoint_gets_the_whole_grid_with_values_in_range(noise_run: Path) -> None:
    lines: list[str] = []
    rows = isolation_rows(noise_run, **GRID, progress=lines.append)
    assert sorted(set(rows["step"])) == [4, 8]
    assert len(rows) == 2 * 2 * 2 * 2 * 2 and not rows.duplicated(["step", "rank", "cluster_on", "m", "buffer_size"]
                                                                    ).any()
    assert (rows["planted"] == "noise").all() and len(lines) == 1 + 2 * (1 + 2)
    assert (rows["windows"] == rows["buffer_size"]).all() and (rows["pool_windows"] == 24).all()
    per_domain = rows[[c for c in rows.columns if c.startswith("windows_")]]
    assert (per_domain.sum(axis=1) == rows["windows"]).all()
    assert (rows["planted_windows"] == rows["windows_noise"]).all()
    assert (rows["windows_noise"][rows["buffer_size"] == 24] == 6).all()  # a quarter of the bytes and of the pool
    for key in ("isolated", "best_f1", "nmi", "nmi_domains"):
        assert rows[key].between(0, 1).all(), key
    for key in ("ari", "ari_domains"):
        assert rows[key].between(-1, 1).all(), key
    assert rows[list(MEASURES)].notna().all().all()
    assert set(rows["dim"]) == {2 * 2 * 16, 4 * 4 * 16}  # out_dim 1024 capped at r*r*layers (16 Linear layers)


def test_one_backward_for_all_ranks_gives_each_projector_s_own_gradients(noise_run: Path) -> None:
    from dograph.train.checkpoint import model_weights
    from experiments.run_files import checkpoints_of, load_run_config, rebuild_model

    cfg = load_run_config(noise_run)
    pool, tokenizer = window_pool(noise_run, cfg, 12)
    model = rebuild_model(cfg, tokenizer, model_weights(checkpoints_of(noise_run)[-1][1]))
    projectors = [projector_for(cfg, r, 16) for r in (2, 3, 4)]
    together = projected_by_rank(model, projectors, pool.windows)
    for projector, got in zip(projectors, together, strict=True):
        alone = projected_gradients(model, projector, pool.windows)
        assert got.shape == alone.shape and torch.allclose(got, alone, rtol=1e-4, atol=1e-6 * alone.abs().max())


def test_the_cli_writes_the_table_reuses_the_run_s_rows_and_refuses_in_one_line(noise_run: Path, tmp_path: Path,
                                                                              monkeypatch, capsys) -> None:
    import experiments.cluster_isolation as module

    real = module.isolation_rows
    monkeypatch.setattr(module, "isolation_rows", lambda run, progress=None: real(run, **GRID, progress=progress))
    run = tmp_path / "run"
    shutil.copytree(noise_run, run)
    assert main([str(run), "--out", str(tmp_path / "out")]) == 0
    assert not (run / "derived").exists()  # --out elsewhere leaves the run as it is
    table = (tmp_path / "out" / f"{NAME}.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2 * 2 * 2 and all(line.count(" / ") == 4 for line in rows)  # (step, on, rank) x (m, N)
    assert main([str(run)]) == 0  # default: into the run's derived/, the cache
    written = pd.read_csv(run / "derived" / f"{NAME}.csv")
    pd.testing.assert_frame_equal(written, pd.read_csv(tmp_path / "out" / f"{NAME}.csv"))
    monkeypatch.setattr(module, "isolation_rows", lambda *a, **k: pytest.fail("recomputed a cached run"))
    assert main([str(run), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / f"{NAME}.md").read_text() == table
    assert "read back" in capsys.readouterr().out

    monkeypatch.setattr(module, "isolation_rows", real)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "step_00000004.pt").write_bytes(b"")
    info = json.loads((noise_run / "run_info.json").read_text())
    info["config"]["dataset"]["planted"]["scenario"] = "duplicates"
    (other / "run_info.json").write_text(json.dumps(info))
    with pytest.raises(NotMeasurable, match="not on a planted noise corpus"):
        module.measured_rows(other, other / "derived")
    assert main([str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
