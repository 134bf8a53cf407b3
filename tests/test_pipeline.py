"""Pipeline stages (cached by config hash, resumed, locked) and static mixtures (mixer=fixed)."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import re
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import compose_config
from helpers import build_local_corpus, free_port

import dograph.distributed
import dograph.runs.pipeline
from baselines.fixed import PUBLISHED_MIXTURES, SLIMPAJAMA, StageMixtureMixer, resolve_mixture
from dograph.config import DataConfig, to_run_config
from dograph.distributed import DistContext
from dograph.errors import ConfigError, DataError
from dograph.mixing import Mixer, MixerOutput, StepSignals
from dograph.runs.app import run_training
from dograph.runs.pipeline import (
    StageEnvironment,
    StageIncomplete,
    StageSpec,
    corpus_fingerprint,
    read_marker,
    run_stage,
    stage_config,
    stage_environment,
    stage_key,
    stage_lock,
    tokenizer_fingerprint,
)
from dograph.train.metrics import read_metrics

# ---- a two-stage method for the tests: uniform "first", then "second" turns first's steps into a mixture


class StepsToMixture(Mixer):
    """A stage mixer that reads an earlier stage's result and outputs a mixture."""

    reweights = False

    def __init__(self, *, favourite: int, stage_results: dict, domains: list[str], **_: Any) -> None:
        self.first = stage_results["first"]
        self.domains, self.favourite = domains, favourite

    def weigh(self, signals: StepSignals) -> MixerOutput:
        return MixerOutput()

    def outputs(self) -> dict[str, Any]:
        raw = [1.0 + (10.0 if i == self.favourite else 0.0) for i in range(len(self.domains))]
        return {"mixture": {d: w / sum(raw) for d, w in zip(self.domains, raw, strict=True)},
                "first_steps": self.first.steps}


class TwoStageMethod(StageMixtureMixer):
    name = "test_pipeline"  # its stages live under stages/test_pipeline/

    @classmethod
    def plan_stages(cls, node: dict[str, Any]) -> list[StageSpec]:
        return [StageSpec("first", {"_target_": "baselines.uniform.UniformMixer"}, dict(node["first"])),
                StageSpec("second", {"_target_": "test_pipeline.StepsToMixture", "favourite": node["favourite"]},
                          dict(node["second"]), needs=("first",))]


def method_node(**changes: Any) -> dict[str, Any]:
    node = {"_target_": "test_pipeline.TwoStageMethod", "mixture_from": "second", "favourite": 2,
            "first": {"model": "gpt2_tiny", "trainer": "debug", "max_steps": 4, "seed": 5},
            "second": {"model": "gpt2_tiny", "trainer": "debug", "max_steps": 3, "seed": 5}}
    for path, value in changes.items():
        parts = path.split("__")
        target = node
        for part in parts[:-1]:
            target = target[part]
        target[parts[-1]] = value
    return node


@pytest.fixture
def staged(make_config, tmp_path: Path):
    """A RunConfig factory for the two-stage method, with every output under tmp_path."""

    def make(*extra: str, **node_changes: Any):
        cfg = make_config(f"paths.output_root={tmp_path / 'out'}", "trainer.max_steps=2", *extra)
        return dataclasses.replace(cfg, mixer=method_node(**node_changes))

    return make


def stage_dirs(root: Path) -> dict[str, Path]:
    return {p.name.split("-")[0]: p for p in (root / "out" / "stages" / "test_pipeline").iterdir() if p.is_dir()}


def train_losses(run_dir: Path) -> list[float]:
    return [r["train/loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


def test_stages_run_in_order_and_feed_the_main_run(staged, tmp_path: Path) -> None:
    result = run_training(staged(), tmp_path / "main")
    dirs = stage_dirs(tmp_path)
    assert set(dirs) == {"first", "second"}
    first, second = read_marker(dirs["first"]), read_marker(dirs["second"])
    assert first["steps"] == 4 and second["steps"] == 3 and second["outputs"]["first_steps"] == 4
    assert second["needs"] == {"first": first["key"]} and first["wall_time_s"] > 0 and "cpu" in first["device"]
    assert (dirs["first"] / "hf" / "config.json").exists()  # stages export their model for later stages
    mixture = torch.load(tmp_path / "main" / "checkpoints" / "step_00000002.pt", weights_only=False)
    expected = list(second["outputs"]["mixture"].values())
    assert mixture["ranks"][0]["data"]["mixture"].tolist() == pytest.approx(expected)
    summary = json.loads((tmp_path / "main" / "stages.json").read_text())
    assert [s["stage"] for s in summary] == ["first", "second"] and not any(s["reused"] for s in summary)
    assert result.state.step == 2


def test_complete_stages_are_reused_by_another_main_seed(staged, tmp_path: Path) -> None:
    run_training(staged(), tmp_path / "main0")
    markers = {name: (d / "stage.json").read_text() for name, d in stage_dirs(tmp_path).items()}
    started = time.perf_counter()
    run_training(staged("seed=1"), tmp_path / "main1")
    elapsed = time.perf_counter() - started
    assert {name: (d / "stage.json").read_text() for name, d in stage_dirs(tmp_path).items()} == markers
    summary = json.loads((tmp_path / "main1" / "stages.json").read_text())
    assert all(s["reused"] for s in summary), summary
    assert elapsed < 120


def test_stage_key_covers_what_determines_the_stage(staged) -> None:
    base = staged()
    spec = TwoStageMethod.plan_stages(base.mixer)[0]

    def key(cfg, s=spec) -> str:
        return stage_key("m", s, stage_config(cfg, "m", s), {}, ENV)

    reference = key(base)
    assert key(staged("seed=7")) == reference  # the main run's seed is not the stage's
    assert key(staged("trainer.log_every=3")) == reference
    changed = [dataclasses.replace(spec, settings={**spec.settings, "seed": 6}),
               dataclasses.replace(spec, settings={**spec.settings, "max_steps": 5}),
               dataclasses.replace(spec, settings={**spec.settings, "lr": 1e-4}),
               dataclasses.replace(spec, settings={**spec.settings, "model": "llama_tiny"}),
               dataclasses.replace(spec, mixer={**spec.mixer, "constant": 1})]
    assert len({reference, *(key(base, s) for s in changed)}) == 1 + len(changed)
    cosmetic = dataclasses.replace(spec, settings={**spec.settings, "log_every": 1, "stop_after_steps": 2})
    assert key(base, cosmetic) == reference


ENV = StageEnvironment(world_size=1, device_type="cpu", corpus="corpus-a")


def test_stage_key_changes_with_format_version_world_size_and_precision(staged, monkeypatch) -> None:
    base = staged()
    spec = TwoStageMethod.plan_stages(base.mixer)[0]

    def key(precision: str = "auto", env: StageEnvironment = ENV) -> str:
        s = dataclasses.replace(spec, settings={**spec.settings, "precision": precision})
        return stage_key("m", s, stage_config(base, "m", s), {}, env)

    cuda = dataclasses.replace(ENV, device_type="cuda")
    reference = key()
    assert key(env=dataclasses.replace(ENV, git={"commit": "other", "dirty": True})) == reference  # recorded only
    assert key(env=dataclasses.replace(ENV, world_size=2)) != reference  # another rank's share of the documents
    assert key(env=dataclasses.replace(ENV, corpus="corpus-b")) != reference
    # trainer.precision=auto is fp32 on CPU and bf16 on CUDA; the device itself is cosmetic
    assert key(env=cuda) != reference
    assert key("fp32") == reference and key("fp32", cuda) == reference
    assert key("bf16") == key(env=cuda) == key("bf16", cuda)
    monkeypatch.setattr("dograph.runs.pipeline.STAGE_FORMAT_VERSION", dograph.runs.pipeline.STAGE_FORMAT_VERSION + 1)
    assert key() != reference  # stage-making code changed: no stage made by the old code is reused


def test_stage_key_follows_the_jsonl_corpus_files(make_config, local_corpus: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(local_corpus, corpus)
    cfg = make_config(f"dataset.path={corpus}", f"paths.output_root={tmp_path / 'out'}")
    cfg = dataclasses.replace(cfg, mixer=method_node())
    spec = TwoStageMethod.plan_stages(cfg.mixer)[0]

    def key() -> str:
        env = stage_environment(cfg, DistContext(), [stage_config(cfg, "m", spec)])
        return stage_key("m", spec, stage_config(cfg, "m", spec), {}, env)

    reference = key()
    assert key() == reference
    (corpus / "README.txt").write_text("not a domain file")  # not read by the corpus: same key
    assert key() == reference
    domain_file = sorted(corpus.glob("*.jsonl"))[0]
    with open(domain_file, "a") as handle:
        handle.write(json.dumps({"text": "one more document"}) + "\n")
    assert key() != reference


def test_embedded_corpus_is_fingerprinted_by_its_manifest(tmp_path: Path, monkeypatch) -> None:
    built = tmp_path / "embedded" / "v1"
    built.mkdir(parents=True)
    monkeypatch.setattr("dograph.data.embedded.ensure_embedded_corpus", lambda *a, **k: built)
    (built / "manifest.json").write_text('{"domains": {"code": {"sha256": "aa"}}}')
    first = corpus_fingerprint(DataConfig(source="embedded"), tmp_path)
    (built / "code.jsonl").write_text("{}")  # files are checked against the manifest when the corpus is loaded
    assert corpus_fingerprint(DataConfig(source="embedded"), tmp_path) == first
    (built / "manifest.json").write_text('{"domains": {"code": {"sha256": "bb"}}}')
    assert corpus_fingerprint(DataConfig(source="embedded"), tmp_path) != first


def test_the_embedded_corpus_rebuilt_elsewhere_keeps_its_fingerprint(tmp_path: Path, monkeypatch) -> None:
    built = tmp_path / "embedded" / "v1"
    built.mkdir(parents=True)
    monkeypatch.setattr("dograph.data.embedded.ensure_embedded_corpus", lambda *a, **k: built)

    def manifest(date: str, platform: str, seconds: float, sha: str = "aa") -> str:
        return json.dumps({"build_date": date, "builder": {"platform": platform, "python": "3.11"},
                           "corpus_version": "v1", "params": {"domains": ["code"]},
                           "domains": {"code": {"sha256": sha, "seconds": seconds, "file": "code.jsonl"}}})

    (built / "manifest.json").write_text(manifest("2026-12-01", "host-a", 0.19))
    first = corpus_fingerprint(DataConfig(source="embedded"), tmp_path)
    (built / "manifest.json").write_text(manifest("2026-12-07", "host-b", 0.42))  # the same files, rebuilt
    assert corpus_fingerprint(DataConfig(source="embedded"), tmp_path) == first
    (built / "manifest.json").write_text(manifest("2026-12-07", "host-b", 0.42, sha="bb"))
    assert corpus_fingerprint(DataConfig(source="embedded"), tmp_path) != first


def test_a_moved_tokenizer_directory_keeps_the_stage_key(staged, tmp_path: Path) -> None:
    base = staged()
    spec = TwoStageMethod.plan_stages(base.mixer)[0]
    here, there = tmp_path / "tok", tmp_path / "elsewhere" / "tok"
    here.mkdir()
    (here / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    shutil.copytree(here, there)

    def key(path: Path) -> str:
        cfg = dataclasses.replace(stage_config(base, "m", spec), tokenizer=str(path))
        env = dataclasses.replace(ENV, tokenizers={str(path): tokenizer_fingerprint(str(path))})
        return stage_key("m", spec, cfg, {}, env)

    assert key(here) == key(there)
    (there / "tokenizer.json").write_text('{"model": {"vocab": {"b": 0}}}')
    assert key(here) != key(there)


def test_tokenizer_fingerprint_hashes_a_directory_and_keeps_names(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    (tok / "tokenizer_config.json").write_text("{}")
    first = tokenizer_fingerprint(str(tok))
    shutil.copytree(tok, tmp_path / "copy")
    assert tokenizer_fingerprint(str(tmp_path / "copy")) == first  # content, not place
    (tok / "model.safetensors").write_bytes(b"weights of a model directory")
    assert tokenizer_fingerprint(str(tok)) == first
    (tok / "tokenizer.json").write_text('{"model": {"vocab": {"b": 0}}}')
    assert tokenizer_fingerprint(str(tok)) != first
    assert tokenizer_fingerprint("org/some-tokenizer") == "name:org/some-tokenizer"  # a hub name
    assert tokenizer_fingerprint("bpe8k").startswith("bpe8k:") and tokenizer_fingerprint("gpt2") == "gpt2"


def fake_train(cfg, run_dir: Path, dist, stage_results=None, **_: Any) -> SimpleNamespace:
    """Stands in for a stage's training (no model): what run_stage reads of a TrainResult."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(stopped_early=False, outputs={"mixture": [1.0]}, final_eval={},
                           state=SimpleNamespace(step=cfg.trainer.max_steps, elapsed=0.5))


def test_stage_records_its_commit_and_a_reuse_by_another_commit_says_so(staged, caplog) -> None:
    main = staged()
    spec = TwoStageMethod.plan_stages(main.mixer)[0]
    made = dataclasses.replace(ENV, git={"commit": "aaa111", "dirty": True})
    first = run_stage(main, "m", spec, {}, DistContext(), fake_train, env=made)
    assert read_marker(first.run_dir)["git"] == {"commit": "aaa111", "dirty": True}
    assert read_marker(first.run_dir)["stage_format"] == dograph.runs.pipeline.STAGE_FORMAT_VERSION
    with caplog.at_level(logging.INFO, logger="dograph.runs.pipeline"):
        same = run_stage(main, "m", spec, {}, DistContext(), fake_train, env=made)
    assert same.reused and "made by commit" not in caplog.text
    with caplog.at_level(logging.INFO, logger="dograph.runs.pipeline"):
        again = run_stage(main, "m", spec, {}, DistContext(), fake_train,
                          env=dataclasses.replace(ENV, git={"commit": "bbb222", "dirty": False}))
    assert again.reused and again.run_dir == first.run_dir
    lines = [r.getMessage() for r in caplog.records if "made by commit" in r.getMessage()]
    assert lines == [f"stage m/first was made by commit aaa111 (dirty); this is bbb222 (same stage format "
                     f"{dograph.runs.pipeline.STAGE_FORMAT_VERSION}, so reused)"]


def _unreadable_record_on_rank(rank: int, world: int, port: int, main: Any, out_dir: str) -> None:
    """Rank 0 finds a damaged stage.json; every rank must raise the same line (no rank left waiting)."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    context = DistContext(rank=rank, world_size=world)
    spec = TwoStageMethod.plan_stages(main.mixer)[0]
    env = stage_environment(main, context, [stage_config(main, "m", spec)])
    _, _, run_dir = dograph.runs.pipeline.locate_stage(main, "m", spec, {}, env)
    if rank == 0:
        run_dir.mkdir(parents=True)
        (run_dir / "stage.json").write_text("{truncated")
    try:
        run_stage(main, "m", spec, {}, context, fake_train, env=env)
        outcome = "no error"
    except DataError as exc:
        outcome = f"DataError: {exc}"
    Path(out_dir, f"rank{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


class ThreadWorld:
    """Collectives of a world of threads (one per rank): a fake process group, fast and in-process.

    A rank that never reaches a collective leaves the others waiting: they fail after ``timeout``.
    """

    def __init__(self, world: int, timeout: float = 10.0) -> None:
        self.wall = threading.Barrier(world, timeout=timeout)
        self.slots: list[Any] = [None] * world

    def barrier(self, ctx: DistContext) -> None:
        if ctx.enabled:
            self.wall.wait()

    def all_gather_objects(self, ctx: DistContext, obj: Any) -> list[Any]:
        if not ctx.enabled:
            return [obj]
        self.wall.wait()
        self.slots[ctx.rank] = obj
        self.wall.wait()
        out = list(self.slots)
        self.wall.wait()
        return out


def test_an_unreadable_record_fails_every_rank_with_the_same_line(staged, monkeypatch) -> None:
    """Rank 0 alone reads stage.json; when it cannot, every rank raises its one line (none waits)."""
    main = staged()
    spec = TwoStageMethod.plan_stages(main.mixer)[0]
    env = dataclasses.replace(ENV, world_size=2)
    _, _, run_dir = dograph.runs.pipeline.locate_stage(main, "m", spec, {}, env)
    run_dir.mkdir(parents=True)
    (run_dir / "stage.json").write_text("{truncated")
    world = ThreadWorld(2)
    monkeypatch.setattr(dograph.runs.pipeline, "all_gather_objects", world.all_gather_objects)
    monkeypatch.setattr(dograph.distributed, "all_gather_objects", world.all_gather_objects)  # from_main
    monkeypatch.setattr(dograph.runs.pipeline, "barrier", world.barrier)
    outcomes: dict[int, str] = {}

    def rank(r: int) -> None:
        try:
            run_stage(main, "m", spec, {}, DistContext(rank=r, world_size=2), fake_train, env=env)
            outcomes[r] = "no error"
        except Exception as exc:
            outcomes[r] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert outcomes[0] == outcomes[1], outcomes
    assert re.match(r"DataError: stage record .*stage\.json is unreadable .*delete", outcomes[0])


@pytest.mark.slow
def test_an_unreadable_record_fails_every_gloo_rank_with_the_same_line(staged, tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    port = free_port()
    ranks = [context.Process(target=_unreadable_record_on_rank, args=(r, 2, port, staged(), str(tmp_path)))
             for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(150)
    alive = [p for p in ranks if p.is_alive()]
    for process in alive:
        process.kill()
    assert not alive, "a rank was left waiting in a collective"
    lines = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert lines[0] == lines[1] and re.match(r"DataError: stage record .*stage\.json is unreadable", lines[0])


def test_interrupted_stage_resumes_and_matches_an_uninterrupted_one(staged, tmp_path: Path) -> None:
    straight = run_training(staged(), tmp_path / "straight")
    straight_dirs = stage_dirs(tmp_path)
    expected = train_losses(straight_dirs["first"])
    other = tmp_path / "other"
    cfg = staged(first__stop_after_steps=2)
    cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, output_root=str(other / "out")))
    with pytest.raises(StageIncomplete, match=r"stage test_pipeline/first stopped at step 2 of 4"):
        run_training(cfg, other / "main")
    cfg = dataclasses.replace(cfg, mixer=method_node())
    resumed = run_training(cfg, other / "main")
    dirs = stage_dirs(other)
    assert train_losses(dirs["first"]) == expected  # bit-identical, resumed from step 2
    assert dirs["first"].name == straight_dirs["first"].name  # stop_after_steps is not part of the key
    assert resumed.state.step == straight.state.step


def _hold_lock(run_dir: str, held: Any, seconds: float) -> None:
    with stage_lock(Path(run_dir), DistContext()):
        held.set()
        time.sleep(seconds)


def test_stage_lock_makes_a_second_job_wait(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    held = context.Event()
    other = context.Process(target=_hold_lock, args=(str(tmp_path / "stage-abc"), held, 1.5))
    other.start()
    assert held.wait(60)
    started = time.perf_counter()
    with stage_lock(tmp_path / "stage-abc", DistContext()):
        waited = time.perf_counter() - started
    other.join(30)
    assert waited > 0.5, waited


def test_bad_stage_settings_and_records_are_one_line_errors(staged, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mixer\.second\.max_steps must be a positive integer \(got 0\)"):
        run_training(staged(second__max_steps=0), tmp_path / "main")
    with pytest.raises(ConfigError, match=r"mixer\.first: unknown key\(s\) colour"):
        run_training(staged(first__colour="red"), tmp_path / "main")
    with pytest.raises(ConfigError, match=r"unknown model 'gpt9'"):
        run_training(staged(first__model="gpt9"), tmp_path / "main")
    run_training(staged(), tmp_path / "ok")
    marker = stage_dirs(tmp_path)["first"] / "stage.json"
    marker.write_text("{not json")
    with pytest.raises(DataError, match=r"stage record .*stage\.json is unreadable .*delete"):
        run_training(staged(), tmp_path / "again")


# ---- mixer=fixed ----------------------------------------------------------------------------------------


def test_resolve_mixture_from_numbers_names_and_mappings() -> None:
    assert resolve_mixture([1, 3], ["a", "b"]) == [0.25, 0.75]
    assert resolve_mixture({"b": 1.0, "a": 1.0}, ["a", "b"]) == [0.5, 0.5]
    doge = resolve_mixture("doge_slimpajama", list(SLIMPAJAMA))
    assert doge == pytest.approx([0.088, 0.045, 0.269, 0.214, 0.070, 0.166, 0.148], abs=1e-3)
    assert all(name in PUBLISHED_MIXTURES for name in ("doremi_slimpajama", "doge_slimpajama", "doremi_pile"))
    subset = resolve_mixture("doremi_pile", ["Pile-CC", "ArXiv"], renormalise_subset=True)
    assert subset == pytest.approx([0.6057 / 0.6093, 0.0036 / 0.6093])


@pytest.mark.parametrize(("mixture", "message"), [
    ("doge_slimpajama", r"its domains \(RedPajamaArXiv, .*\) do not match the dataset's \(code, docs, licences\)"),
    ("no_such", r"'no_such' is not a published mixture: choose one of doge_slimpajama, doremi_pile"),
    ([0.5, 0.5], r"has 2 entries; the dataset has 3 domains \(code, docs, licences\)"),
    ([0.5, -0.1, 0.6], r"must be finite and non-negative"),
    ([0, 0, 0], r"must have a positive sum"),
])
def test_bad_mixtures_are_one_line_errors(mixture: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_mixture(mixture, ["code", "docs", "licences"])


def test_fixed_mixture_applies_from_the_first_step(make_config, tmp_path: Path) -> None:
    run_training(make_config("mixer=fixed", "mixer.mixture=[0,1,0]", "trainer.max_steps=3"), tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "step_00000003.pt", weights_only=False)
    assert state["ranks"][0]["data"]["mixture"].tolist() == [0.0, 1.0, 0.0]
    packers = state["ranks"][0]["data"]["packers"]
    assert packers[0]["next_doc"] == packers[2]["next_doc"] == 0 < packers[1]["next_doc"]  # never sampled
    assert (tmp_path / "mixer" / "weights.csv").read_text().splitlines()[1] == "0,0.0,1.0,0.0"
    logged = next(r for r in read_metrics(tmp_path) if r["kind"] == "train")
    assert [logged[f"data/mixture/{d}"] for d in ("code", "docs", "licences")] == [0.0, 1.0, 0.0]


def slimpajama_directory(root: Path) -> Path:
    """A local directory in the SlimPajama hub schema (7 sources named in meta.redpajama_set_name)."""
    corpus = build_local_corpus(root / "src", bytes_per_domain=60_000, doc_chars=600)
    texts = [json.loads(line)["text"] for f in sorted(corpus.glob("*.jsonl")) for line in f.read_text().splitlines()]
    data = root / "slimpajama"
    data.mkdir()
    for split, share in (("train", slice(0, None)), ("validation", slice(0, None, 4))):
        rows = [{"text": t, "meta": {"redpajama_set_name": SLIMPAJAMA[i % 7]}} for i, t in enumerate(texts)][share]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_published_mixture_runs_on_slimpajama_and_is_refused_elsewhere(cache_dir: Path, tmp_path: Path,
                                                                        make_config) -> None:
    data = slimpajama_directory(tmp_path)
    cfg = to_run_config(compose_config([
        "model=gpt2_tiny", "dataset=slimpajama_6b", f"dataset.path={data}", "dataset.val_sequences_per_domain=2",
        "trainer=debug", "trainer.max_steps=2", "logger=disabled", f"paths.cache_dir={cache_dir}",
        "trainer.device=cpu", "mixer=fixed", "mixer.mixture=doge_slimpajama"]))
    run_training(cfg, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000002.pt", weights_only=False)
    expected = resolve_mixture("doge_slimpajama", list(SLIMPAJAMA))
    assert state["ranks"][0]["data"]["mixture"].tolist() == pytest.approx(expected)
    with pytest.raises(ConfigError, match=r"do not match the dataset's \(code, docs, licences\)"):
        run_training(make_config("mixer=fixed", "mixer.mixture=doge_slimpajama"), tmp_path / "refused")
