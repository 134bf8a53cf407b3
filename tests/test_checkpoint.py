"""Checkpoints: loaded without running code (weights_only), a damaged `latest` falls back, one save per step,
and Figure 1 rebuilds the model from an FSDP checkpoint's shards."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dograph.errors import DataError
from dograph.runs.app import run_training
from dograph.train.checkpoint import (
    UnsafeCheckpoint,
    from_plain,
    load_checkpoint,
    load_latest,
    model_weights,
    save_checkpoint,
    to_plain,
)
from dograph.train.metrics import read_metrics


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def same(a, b) -> bool:
    """Equal values of the same types, all the way down (numpy dtypes and shapes included)."""
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return type(b) is np.ndarray and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


# ---- weights_only: what is not a tensor is stored as plain values -------------------------------


def test_rng_and_numpy_state_round_trip_and_the_file_loads_with_weights_only(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.Generator().get_state(),
             "arrays": [np.arange(6).reshape(2, 3).astype(t) for t in (np.int32, np.int64, np.uint32, np.float32,
                                                                        np.float64, np.bool_, np.complex64)],
             "views": [np.arange(6.0).reshape(2, 3).T, np.array(3.5), np.zeros((0, 4)), np.arange(3, dtype=">f8")],
             "scalars": [np.float64(0.25), np.int64(-3), np.bool_(True), np.float32(1.5)],
             "text": np.array(["a", "bc"]),
             "plain": {"n": 1, "x": 0.5, "s": "s", "t": (1, None), "l": [True], "b": b"\x00"}}
    save_checkpoint(tmp_path, 1, state)
    raw = torch.load(tmp_path / "step_00000001.pt", weights_only=True)  # the old pickles of numpy values fail here
    assert same(from_plain(raw), state)
    assert same(load_checkpoint(tmp_path / "step_00000001.pt"), state)
    np.random.set_state(load_checkpoint(tmp_path / "step_00000001.pt")["numpy"])
    assert np.random.rand() == (np.random.seed(2), np.random.rand())[1]


def test_a_state_that_could_not_be_loaded_safely_is_not_written(tmp_path: Path) -> None:
    from collections import defaultdict
    from enum import IntEnum

    class Kind(IntEnum):
        A = 1

    for bad, where in (({"mixer": {"fit": Path("x")}}, r"checkpoint\['mixer'\]\['fit'\]: a pathlib"),
                       ({"kind": Kind.A}, r"\['kind'\]: a .*Kind"), ({np.int64(1): 2}, r"key .*1.* is a int64")):
        with pytest.raises(TypeError, match=where):
            to_plain(bad)
    assert same(from_plain(to_plain({"d": defaultdict(list, a=[np.float64(1.0)])})), {"d": {"a": [np.float64(1.0)]}})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, {"bad": object()})
    assert not list(tmp_path.glob("*step*")) and not (tmp_path / "latest").exists()


def _run_code_on_load(marker: str) -> None:
    Path(marker).write_text("ran")


class Payload:
    """What a malicious checkpoint carries: unpickling it calls ``_run_code_on_load``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return _run_code_on_load, (self.marker,)


def test_a_checkpoint_carrying_an_arbitrary_object_is_refused_in_one_line(make_config, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_training(make_config("trainer.max_steps=2", "mixer=uniform"), run)
    path = run / "checkpoints" / "step_00000002.pt"
    state = torch.load(path, weights_only=True)
    marker = tmp_path / "marker"
    state["mixer"] = {"payload": Payload(marker)}
    torch.save(state, path)
    with pytest.raises(UnsafeCheckpoint, match=r"refusing to load checkpoint .*_run_code_on_load") as caught:
        load_checkpoint(path)
    assert "\n" not in str(caught.value)
    with pytest.raises(UnsafeCheckpoint):  # resuming refuses it too, and does not skip to an older one
        run_training(make_config("trainer.max_steps=3", "mixer=uniform", "resume=true"), run)
    assert not marker.exists()  # nothing it holds ran


# ---- a damaged `latest` ---------------------------------------------------------------------


def test_resume_falls_back_to_the_newest_readable_checkpoint(make_config, tmp_path: Path, caplog) -> None:
    """`latest` names step 3, truncated (a full disk): resume warns once, restarts from step 2, stays exact."""
    run = ("mixer=uniform", "trainer.max_steps=4", "trainer.ckpt_every=1")
    run_training(make_config(*run), tmp_path / "straight")
    resumed = tmp_path / "resumed"
    run_training(make_config(*run, "trainer.stop_after_steps=3"), resumed)
    checkpoints = resumed / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000003.pt"
    damaged = checkpoints / "step_00000003.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="dograph.train.checkpoint"):
        run_training(make_config(*run, "resume=true"), resumed)
    warnings = [r.getMessage() for r in caplog.records if r.name == "dograph.train.checkpoint"]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "step_00000003.pt" in warnings[0] and "resuming from step_00000002.pt" in warnings[0]
    assert train_losses(resumed) == train_losses(tmp_path / "straight")  # steps 3 and 4 again, exactly
    assert [r["step"] for r in read_metrics(resumed) if r["kind"] == "train"] == [1, 2, 3, 4]
    assert (checkpoints / "latest").read_text() == "step_00000004.pt"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == [
        "step_00000003.pt", "step_00000003.pt.abandoned", "step_00000004.pt"]  # the damaged one set aside
    load_checkpoint(checkpoints / "step_00000003.pt")  # rewritten whole


def test_after_a_fallback_the_damaged_checkpoint_never_displaces_a_readable_one(make_config, tmp_path: Path) -> None:
    """Saves at 2 (cadence) and 3 (stop); 3 is damaged; the resumed run falls back to 2 and saves at 4 (keep 2).

    The damaged 3 must not count as one of the two kept (it would push out 2): every checkpoint
    left is readable, so a damaged 4 still falls back to a readable one.
    """
    run = ("mixer=uniform", "trainer.max_steps=6", "trainer.ckpt_every=2", "trainer.keep_checkpoints=2")
    run_dir = tmp_path / "run"
    run_training(make_config(*run, "trainer.stop_after_steps=3"), run_dir)
    checkpoints = run_dir / "checkpoints"
    damaged = checkpoints / "step_00000003.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    run_training(make_config(*run, "resume=true", "trainer.stop_after_steps=2"), run_dir)  # from 2 to 4
    kept = sorted(p.name for p in checkpoints.glob("step_*.pt"))
    assert kept == ["step_00000002.pt", "step_00000004.pt"]
    assert (checkpoints / "step_00000003.pt.abandoned").exists()
    for name in kept:
        load_checkpoint(checkpoints / name)
    (checkpoints / "step_00000004.pt").write_bytes(b"")
    assert load_latest(checkpoints)[0].name == "step_00000002.pt"


def _shards(directory: Path, name: str) -> str:
    (directory / name).mkdir()
    (directory / name / ".metadata").write_bytes(b"")
    return name


def test_load_latest_skips_missing_truncated_and_shardless_checkpoints(tmp_path: Path, caplog) -> None:
    save_checkpoint(tmp_path, 1, {"step": 1}, keep=3)
    save_checkpoint(tmp_path, 2, {"step": 2, "shards": _shards(tmp_path, "step_00000002.shards")}, keep=3)
    save_checkpoint(tmp_path, 3, {"step": 3, "shards": _shards(tmp_path, "step_00000003.shards")}, keep=3)
    assert load_latest(tmp_path)[1]["step"] == 3
    (tmp_path / "step_00000003.shards" / ".metadata").unlink()  # its shards are incomplete
    with caplog.at_level(logging.WARNING, logger="dograph.train.checkpoint"):
        path, state = load_latest(tmp_path)
    assert path.name == "step_00000002.pt" and state["step"] == 2
    assert "step_00000003.pt" in caplog.records[-1].getMessage()
    (tmp_path / "step_00000002.pt").write_bytes(b"")  # empty
    (tmp_path / "latest").write_text("step_00000009.pt")  # names a file that is not there
    assert load_latest(tmp_path)[1]["step"] == 1
    (tmp_path / "step_00000001.pt").write_bytes(b"PK")
    with pytest.raises(DataError, match=r"step_00000009\.pt.*no other checkpoint .* can be read") as caught:
        load_latest(tmp_path)
    assert "\n" not in str(caught.value)
    assert load_latest(tmp_path / "nowhere") is None


def test_saving_after_a_fallback_drops_the_abandoned_newer_checkpoints(tmp_path: Path) -> None:
    for step in (2, 4):
        save_checkpoint(tmp_path, step, {"step": step, "shards": _shards(tmp_path, f"step_{step:08d}.shards")})
    save_checkpoint(tmp_path, 3, {"step": 3})  # resumed from step 2, step 4 could not be read
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002.pt", "step_00000002.shards",
                                                          "step_00000003.pt"]


# ---- the checkpointer: named Stateful parts (torch.distributed.checkpoint.stateful) ------------------


class Tally:
    """A part this test defines, Stateful by its two methods alone: a count and a tensor."""

    def __init__(self) -> None:
        self.count, self.seen = 0, torch.zeros(2)

    def state_dict(self) -> dict:
        return {"count": self.count, "seen": self.seen.clone()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.count, self.seen = state_dict["count"], state_dict["seen"].clone()


class CountingPacker:
    """Windows of one domain numbered 1, 2, ...: its position is its whole state."""

    def __init__(self, domain: int) -> None:
        self.domain, self.position = domain, 0

    def next_window(self) -> np.ndarray:
        self.position += 1
        return np.full(5, 100 * self.domain + self.position)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def run_parts() -> dict:
    """A fresh set of what a trainer hands its checkpointer (the same seeds every time)."""
    from dograph.data.sampler import MixtureSampler
    from dograph.train.checkpointer import RNGState
    from dograph.train.metrics import MetricAccumulator
    from dograph.train.trainer import TrainState

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    sampler = MixtureSampler([CountingPacker(d) for d in range(3)], [0.5, 0.3, 0.2], seed=3)
    return {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=0.1),
            "shared": {"trainer": TrainState(), "tally": Tally()},
            "per_rank": {"data": sampler, "rng": RNGState(), "metrics": MetricAccumulator()}}


def checkpointer(run_dir: Path, parts: dict):
    from dograph.distributed import DistContext
    from dograph.train.checkpointer import Checkpointer

    return Checkpointer(run_dir, DistContext(), sharded=False, **parts)


def test_the_checkpointer_saves_and_restores_named_stateful_parts(tmp_path: Path) -> None:
    """Every named part, the test's own included, comes back; what follows the save follows the restore."""
    parts = run_parts()
    parts["model"](torch.ones(1, 3)).sum().backward()
    parts["optimizer"].step()
    state, tally = parts["shared"]["trainer"], parts["shared"]["tally"]
    state.step, state.tokens_seen = 4, 64
    state.weight_summary.add(torch.tensor([0.5]), torch.tensor([[0.2, 0.8]]), torch.tensor([[0.5, 0.5]]))
    tally.count, tally.seen = 3, torch.tensor([1.0, 2.0])
    parts["per_rank"]["data"].next_batch(4)
    parts["per_rank"]["metrics"].add({"train/loss": torch.tensor(2.5)})
    path = checkpointer(tmp_path, parts).save(4)
    after = parts["per_rank"]["data"].next_batch(4), torch.rand(3)  # what follows the save

    raw = load_checkpoint(path)  # the format as before: shared parts by name, per-rank parts under "ranks"
    assert path == tmp_path / "checkpoints" / "step_00000004.pt" and (tmp_path / "checkpoints" / "latest").exists()
    assert set(raw) == {"trainer", "tally", "model", "optimizer", "ranks", "parallelism"}
    assert raw["trainer"]["step"] == 4 and raw["trainer"]["weight_summary"]["steps"] == 1
    assert raw["tally"]["count"] == 3 and set(raw["ranks"][0]) == {"data", "rng", "metrics"}

    fresh = run_parts()
    restored = fresh["shared"]["trainer"]
    assert restored != state and fresh["shared"]["tally"].count == 0
    assert checkpointer(tmp_path, fresh).restore() == path
    assert restored == state and fresh["shared"]["trainer"] is restored  # in place: the trainer holds it
    assert fresh["shared"]["tally"].count == 3 and torch.equal(fresh["shared"]["tally"].seen, tally.seen)
    assert torch.equal(fresh["model"].weight, parts["model"].weight)
    assert same(fresh["optimizer"].state_dict(), parts["optimizer"].state_dict())
    batch, draw = fresh["per_rank"]["data"].next_batch(4), torch.rand(3)
    assert torch.equal(batch.input_ids, after[0].input_ids) and torch.equal(batch.domain, after[0].domain)
    assert torch.equal(draw, after[1])  # the global RNG
    assert fresh["per_rank"]["metrics"].flush() == {"train/loss": 2.5}  # the pending window


def test_the_checkpointer_finds_nothing_and_refuses_a_part_that_is_not_stateful(tmp_path: Path) -> None:
    parts = run_parts()
    assert checkpointer(tmp_path, parts).restore() is None
    parts["per_rank"]["data"] = object()
    with pytest.raises(TypeError, match=r"part 'data' \(object\) is not Stateful"):
        checkpointer(tmp_path, parts).save(1)
    assert not (tmp_path / "checkpoints").exists()


def test_mixer_sampler_and_train_state_are_stateful() -> None:
    from helpers import FakeMixer
    from torch.distributed.checkpoint.stateful import Stateful

    from dograph.data.sampler import MixtureSampler
    from dograph.mixing import MIXERS, Mixer
    from dograph.train.checkpointer import RNGState
    from dograph.train.metrics import MetricAccumulator
    from dograph.train.trainer import TrainState

    parts = [FakeMixer([1.0]), MixtureSampler([CountingPacker(0)], [1.0], seed=0), TrainState(), RNGState(),
             MetricAccumulator()]
    assert all(isinstance(part, Stateful) for part in parts)
    assert issubclass(Mixer, Stateful) and all(issubclass(cls, Stateful) for cls in MIXERS.values())
    assert not isinstance(object(), Stateful) and not isinstance(Path("x"), Stateful)


# ---- item 7: one save when the checkpoint cadence and the stop coincide ---------------------------


def test_a_stop_on_a_checkpoint_step_saves_once(make_config, tmp_path: Path, monkeypatch) -> None:
    import dograph.train.checkpointer

    saved: list[int] = []
    real = dograph.train.checkpointer.save_checkpoint
    monkeypatch.setattr(dograph.train.checkpointer, "save_checkpoint",
                        lambda directory, step, *a, **k: (saved.append(step), real(directory, step, *a, **k))[1])
    result = run_training(make_config("mixer=uniform", "trainer.max_steps=6", "trainer.ckpt_every=2",
                                      "trainer.stop_after_steps=4"), tmp_path)
    assert result.stopped_early and saved == [2, 4]


# ---- item 6: Figure 1 from an FSDP run ------------------------------------------------------


def _as_fsdp_checkpoints(run_dir: Path) -> None:
    """Rewrite a run's checkpoints as an FSDP run keeps them: model and optimizer in DCP shards the .pt names."""
    import torch.distributed.checkpoint as dcp

    for path in sorted((run_dir / "checkpoints").glob("step_*.pt")):
        state = load_checkpoint(path)
        shards = path.with_suffix(".shards")
        dcp.save({"model": state.pop("model"), "optimizer": state.pop("optimizer")}, checkpoint_id=str(shards),
                 no_dist=True)
        state.update(shards=shards.name, parallelism="fsdp")
        torch.save(to_plain(state), path)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process, as meant
def test_figure1_rebuilds_the_model_from_fsdp_shards(local_corpus: Path, cache_dir: Path, tmp_path: Path) -> None:
    """The same points from a run's checkpoints as from the same weights kept as an FSDP run's shards."""
    import shutil

    from figure_runs import train_tiny_dograph

    from experiments import figure1

    run = train_tiny_dograph(tmp_path / "runs" / "dograph" / "seed0", local_corpus, cache_dir)  # steps 4 and 8
    fsdp = tmp_path / "fsdp"
    shutil.copytree(run, fsdp)
    _as_fsdp_checkpoints(fsdp)
    late = fsdp / "checkpoints" / "step_00000008.pt"
    assert "model" not in load_checkpoint(late) and (fsdp / "checkpoints" / "step_00000008.shards").is_dir()
    expected = load_checkpoint(run / "checkpoints" / "step_00000008.pt")["model"]
    got = model_weights(late)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    points = figure1.compute_points(fsdp, max_per_domain=2)
    pd.testing.assert_frame_equal(points, figure1.compute_points(run, max_per_domain=2))
    assert sorted(points["step"].unique()) == [4, 8]
