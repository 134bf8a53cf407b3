"""Pipeline stages: the earlier runs a method needs before its main run (docs/design.md section 3).

DoReMi trains a reference model, then a proxy whose domain weights become the main run's
mixture; DoGE trains a proxy; the regression methods train many small proxies. A method
declares them with ``Mixer.plan_stages`` as :class:`StageSpec` s, in order; each is an
ordinary training run of this trainer in its own directory

    ${paths.output_root}/stages/<method>/<stage>-<key>/

where ``key`` hashes exactly what determines the stage (:func:`stage_key`): the model, the
data config and a fingerprint of the corpus files, the tokenizer and its fingerprint, the
training settings with the resolved precision, the world size, the stage's own seed, its
mixer node (the method's constants), the keys of the stages it reads and
:data:`STAGE_FORMAT_VERSION` (bumped whenever code that makes stages changes). A stage's
seed is its own, not the main run's ``seed``, so a sweep over main-run seeds or model sizes
reuses a complete stage.

* **Complete** stages (``stage.json`` with ``complete: true``) are reused, never retrained.
* **Interrupted** stages (checkpoints, no marker) resume from their last checkpoint.
* **Concurrent** jobs (two jobs of one multirun that need the same stage) serialise on a
  file lock next to the stage directory: the second waits, then reuses the result.
* ``stage.json`` records what the stage produced (``Mixer.outputs``, e.g. a mixture), its
  training wall time, its device and config, so a report can add up a method's full cost,
  and the git commit that made it (a reuse by another commit is said in one line).
* Under ``torchrun`` rank 0 alone reads files (records, corpus fingerprints) and shares the
  outcome, an error included, so every rank fails with the same line (:func:`from_main`).

Stage settings (``mixer.<stage>.*``): ``model`` (a ``conf/model`` name), ``trainer`` (a
``conf/trainer`` preset, default ``default``), ``tokenizer`` (null: the model's), ``seed``,
and any ``trainer`` field (``max_steps``, ``batch_size``, ``lr``, ``stop_after_steps``, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dograph.atomic import write_text_atomically
from dograph.config import DataConfig, ModelConfig, RunConfig, TrainerConfig, load_group_option
from dograph.data.tokenizer import is_pretrained
from dograph.distributed import DistContext, all_gather_objects, barrier, from_main
from dograph.errors import ConfigError, DataError, DographError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Bump it whenever code that makes a stage's result changes (the proxy mixers, the trainer, the data
# pipeline, the tokenizers): it is part of every stage key, so no stage made by the old code is reused
# (CONTRIBUTING.md; docs/design.md section 3.1). History: 1 = the first versioned key.
STAGE_FORMAT_VERSION = 1
MARKER = "stage.json"
REPO_ROOT = Path(__file__).resolve().parents[2]
# files of a tokenizer directory that no tokenizer reads (a model directory's weights): not hashed
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
STAGE_KEYS = ("model", "trainer", "tokenizer", "seed")
# Trainer fields that do not change what a stage produces: left out of its key.
COSMETIC_TRAINER_FIELDS = ("eval_every", "eval_batch_size", "log_every", "ckpt_every", "keep_checkpoints",
                           "progress", "stop_after_steps", "export_hf", "device", "prefetch")  # prefetch: same batches


class StageIncomplete(DographError):
    """A stage stopped before its last step (``stop_after_steps``): rerun to resume it."""


@dataclass(frozen=True)
class StageSpec:
    """One earlier run of a method.

    ``mixer``: the stage run's mixer node (``_target_`` + constants); ``settings``: the
    stage's node of the method config (see the module doc); ``needs``: earlier stages whose
    results the stage's mixer receives as ``stage_results``.
    """

    name: str
    mixer: dict[str, Any]
    settings: dict[str, Any]
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class StageResult:
    """A complete stage: where it is and what it produced."""

    method: str
    name: str
    key: str
    run_dir: Path
    outputs: dict[str, Any] = field(default_factory=dict)
    final_eval: dict[str, Any] = field(default_factory=dict)  # the run's last validation (val/<domain>/loss, ...)
    wall_time_s: float = 0.0
    device: str = ""
    steps: int = 0
    reused: bool = False

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "stage": self.name, "key": self.key, "run_dir": str(self.run_dir),
                "wall_time_s": self.wall_time_s, "device": self.device, "steps": self.steps,
                "reused": self.reused}


# ---- a stage's config and key ---------------------------------------------------------------------


def _check_settings(method: str, spec: StageSpec) -> None:
    trainer_fields = {f.name for f in dataclasses.fields(TrainerConfig)}
    unknown = sorted(set(spec.settings) - set(STAGE_KEYS) - trainer_fields)
    if unknown:
        raise ConfigError(f"mixer.{spec.name}: unknown key(s) {', '.join(unknown)} for a stage of {method} "
                          f"(stage keys: {', '.join(STAGE_KEYS)}, or any trainer.* field)")
    steps = spec.settings.get("max_steps", 1)
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"mixer.{spec.name}.max_steps must be a positive integer (got {steps!r})")
    if not isinstance(spec.settings.get("seed", 0), int):
        raise ConfigError(f"mixer.{spec.name}.seed must be an integer (got {spec.settings.get('seed')!r})")


def stage_config(main: RunConfig, method: str, spec: StageSpec) -> RunConfig:
    """The stage's full run config: the main run's data, paths and logger; its own model, training and seed."""
    _check_settings(method, spec)
    settings = dict(spec.settings)
    model_node = load_group_option("model", settings.pop("model", "gpt2_tiny"))
    trainer_node = load_group_option("trainer", settings.pop("trainer", "default"))
    tokenizer = settings.pop("tokenizer", None) or model_node.get("tokenizer", main.tokenizer)
    seed = settings.pop("seed", 0)
    trainer_fields = {**trainer_node, **settings, "export_hf": True, "progress": main.trainer.progress,
                      "device": main.trainer.device}
    try:
        model = ModelConfig(**model_node)
        trainer = TrainerConfig(**trainer_fields)
        return RunConfig(model=model, dataset=main.dataset, trainer=trainer, logger=main.logger, paths=main.paths,
                         mixer=dict(spec.mixer), objective=None, tokenizer=tokenizer, m=main.m, seed=seed,
                         tags=[*main.tags, f"stage:{method}/{spec.name}"])
    except ConfigError as exc:
        raise ConfigError(f"mixer.{spec.name}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"mixer.{spec.name}: {exc}") from None


def resolved_precision(precision: str, device_type: str) -> str:
    """``auto`` is bf16 autocast on CUDA and fp32 elsewhere: the rule of ``Trainer`` (dograph/train/trainer.py)."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


def _file_stats(files: list[Path], root: Path) -> list[list[Any]]:
    return [[str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _visible_files(directory: Path) -> list[Path]:
    """Every file under ``directory`` (recursively), hidden ones (caches, temporaries) left out."""
    return sorted(f for f in directory.rglob("*")
                  if f.is_file() and not any(part.startswith(".") for part in f.relative_to(directory).parts))


def corpus_fingerprint(cfg: DataConfig, cache_dir: Path) -> str:
    """What identifies the corpus's contents, cheaply (docs/design.md section 3.1).

    ``jsonl``: the name, size and mtime of every file it reads (no byte of a large corpus is read;
    any rewrite changes the mtime, and a mere copy only retrains); the embedded corpus: its
    manifest (the sha256 of every file, the same on every host); a hub dataset: its id (its
    config and split are in the data config; no revision is pinned); a local ``hf`` directory:
    its files as for ``jsonl``; a planted corpus: its settings and the sha256 of every file of it.
    """
    if cfg.planted.active:
        from dograph.data.corpus import build_corpus

        return "planted:" + build_corpus(cfg, cache_dir).fingerprint
    if cfg.source == "embedded":
        from dograph.data.embedded import ensure_embedded_corpus

        directory = ensure_embedded_corpus(cache_dir, min_domains=cfg.min_domains, log=log.info)
        return "embedded:" + embedded_manifest_digest(json.loads((directory / "manifest.json").read_text()))
    path = Path(os.path.expanduser(str(cfg.path)))
    if not path.exists():
        if cfg.source == "hf":
            return f"hub:{cfg.path}"
        raise DataError(f"dataset.path={path} does not exist (a directory with one DOMAIN.jsonl per domain, "
                        "or a jsonl file with dataset.domain_field)")
    if path.is_file():
        files, root = [path], path.parent
    elif cfg.source == "jsonl":
        from dograph.data.sources import JSONL_SUFFIXES

        files, root = sorted(p for p in path.iterdir() if p.name.endswith(JSONL_SUFFIXES)), path
    else:
        files, root = _visible_files(path), path
    text = json.dumps([cfg.source, _file_stats(files, root)])
    return f"{cfg.source}:" + hashlib.sha256(text.encode()).hexdigest()


def embedded_manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of what the embedded corpus holds: its version, build parameters and each domain file's sha256.

    The manifest's build date, builder machine and timings are left out, so the same corpus rebuilt
    elsewhere (or after the cache was cleared) keeps its stage keys.
    """
    content = {"version": manifest.get("corpus_version"), "params": manifest.get("params"),
               "files": {d: e.get("sha256") for d, e in manifest.get("domains", {}).items()}}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def tokenizer_fingerprint(name: str) -> str:
    """What identifies a tokenizer: a built-in one (``gpt2``, ``bpe<N>k``) by its name and the version of
    its training sample (a BPE is trained on the corpus, which the key covers); a directory by the
    sha256 of its files (small; a copy elsewhere keeps the key; model weights are left out); any
    other name (a hub id) by the name.
    """
    if not is_pretrained(name):
        from dograph.data.builder import TOKENIZER_SAMPLE_VERSION

        return name if name == "gpt2" else f"{name}:{TOKENIZER_SAMPLE_VERSION}"
    path = Path(os.path.expanduser(name))
    if path.is_file():
        return "file:" + hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        digest = hashlib.sha256()
        for f in _visible_files(path):
            if not f.name.endswith(WEIGHT_SUFFIXES):
                digest.update(f"{f.relative_to(path)}\0{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
        return "directory:" + digest.hexdigest()
    return f"name:{name}"


def tokenizer_key_name(name: str) -> str:
    """The tokenizer as the stage key names it: a directory or file by ``path`` (its contents are
    fingerprinted beside it, so moving or copying it keeps the key), anything else by its name."""
    return "path" if is_pretrained(name) and Path(os.path.expanduser(name)).exists() else name


def git_state(root: Path = REPO_ROOT) -> dict[str, Any]:
    """The checkout's commit (``unknown`` outside git) and whether tracked files have uncommitted changes.

    Untracked files (run outputs, results written inside the checkout) do not make it dirty.
    """
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    if head.returncode != 0 or not head.stdout.strip():
        return {"commit": "unknown", "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


@dataclass(frozen=True)
class StageEnvironment:
    """What a stage's key and record need beyond its config, found once per main run (on rank 0, shared).

    ``device_type`` resolves ``trainer.precision=auto``; ``git`` is recorded, not keyed.
    """

    world_size: int = 1
    device_type: str = "cpu"
    corpus: str = ""
    git: dict[str, Any] = field(default_factory=dict)
    tokenizers: dict[str, str] = field(default_factory=dict)  # name -> tokenizer_fingerprint(name)

    def tokenizer(self, name: str) -> str:
        if name not in self.tokenizers:  # found when the environment was made, unless called directly
            self.tokenizers[name] = tokenizer_fingerprint(name)
        return self.tokenizers[name]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stage_environment(main: RunConfig, dist: DistContext, configs: Sequence[RunConfig] = ()) -> StageEnvironment:
    """The environment of the stages of ``configs`` (their tokenizers fingerprinted), read on rank 0."""
    def read() -> tuple[str, dict[str, Any], dict[str, str]]:
        tokenizers = {c.tokenizer: tokenizer_fingerprint(c.tokenizer) for c in configs}
        return corpus_fingerprint(main.dataset, Path(main.paths.cache_dir)), git_state(), tokenizers

    corpus, git, tokenizers = from_main(dist, read)
    return StageEnvironment(world_size=dist.world_size, device_type=dist.device.type, corpus=corpus, git=git,
                            tokenizers=tokenizers)


def _dataset_identity(cfg: DataConfig) -> dict[str, Any]:
    """The data config as the stage key hashes it: ``planted`` only when active, so other keys are unchanged."""
    identity = asdict(cfg)
    if not cfg.planted.active:
        del identity["planted"]
    return identity


def stage_key(method: str, spec: StageSpec, cfg: RunConfig, needed: dict[str, StageResult],
              env: StageEnvironment) -> str:
    """12 hex digits of a hash of everything that determines the stage's result (docs/design.md 3.1)."""
    trainer = {k: v for k, v in asdict(cfg.trainer).items() if k not in COSMETIC_TRAINER_FIELDS}
    trainer["precision"] = resolved_precision(cfg.trainer.precision, env.device_type)
    identity = {"format": STAGE_FORMAT_VERSION, "method": method, "stage": spec.name, "model": asdict(cfg.model),
                "dataset": _dataset_identity(cfg.dataset), "corpus": env.corpus,
                "tokenizer": tokenizer_key_name(cfg.tokenizer),
                "tokenizer_files": env.tokenizer(cfg.tokenizer), "trainer": trainer, "world_size": env.world_size,
                "seed": cfg.seed, "mixer": spec.mixer, "needs": {name: needed[name].key for name in spec.needs}}
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---- markers and locks ---------------------------------------------------------------------------------


def read_marker(run_dir: Path) -> dict[str, Any] | None:
    """The stage's completion record, None if it has none; a damaged one is a one-line DataError."""
    path = run_dir / MARKER
    try:
        if not path.exists():
            return None
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"stage record {path} is unreadable ({type(exc).__name__}: {exc}): delete "
                        f"{run_dir} to train the stage again") from None
    if not isinstance(record, dict) or record.get("complete") is not True:
        raise DataError(f"stage record {path} is not a complete-stage record: delete {run_dir} to train it again")
    return record


def write_marker(run_dir: Path, record: dict[str, Any]) -> None:
    write_text_atomically(run_dir / MARKER, json.dumps(record, indent=2, default=str))


@contextlib.contextmanager
def stage_lock(run_dir: Path, dist: DistContext, what: str = "stage", lock_file: Path | None = None
               ) -> Iterator[None]:
    """An exclusive file lock on ``lock_file`` (default ``<run_dir>.lock``) held by rank 0 (all ranks wait for it).

    ``what`` names the directory in the waiting message (a stage, or a sweep whose files main runs share).
    """
    handle = None
    if dist.is_main:
        lock_file = lock_file or run_dir.with_name(run_dir.name + ".lock")
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_file, "w")  # noqa: SIM115 (held across the yield)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s %s is in use by another job: waiting for it", what, run_dir.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
    barrier(dist)
    try:
        yield
    finally:
        barrier(dist)
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


# ---- running stages ------------------------------------------------------------------------------------

TrainFn = Callable[..., Any]  # (cfg, run_dir, dist, stage_results=...) -> TrainResult (with .outputs)


def stage_result(method: str, spec: StageSpec, key: str, run_dir: Path, record: dict[str, Any],
                 reused: bool) -> StageResult:
    """A StageResult from a stage's record (``stage.json``)."""
    return StageResult(method=method, name=spec.name, key=key, run_dir=run_dir, outputs=record.get("outputs", {}),
                       final_eval=record.get("final_eval", {}), wall_time_s=float(record.get("wall_time_s", 0.0)),
                       device=str(record.get("device", "")), steps=int(record.get("steps", 0)), reused=reused)


def locate_stage(main: RunConfig, method: str, spec: StageSpec, needed: dict[str, StageResult],
                 env: StageEnvironment) -> tuple[RunConfig, str, Path]:
    """The stage's run config, key and directory."""
    cfg = stage_config(main, method, spec)
    key = stage_key(method, spec, cfg, needed, env)
    return cfg, key, Path(main.paths.output_root) / "stages" / method / f"{spec.name}-{key}"


def note_other_commit(what: str, record: dict[str, Any], env: StageEnvironment) -> None:
    """One line when a reused stage was made by another commit (its key says the stage code is the same)."""
    made, now = record.get("git") or {}, env.git
    if made.get("commit", "unknown") != now.get("commit", "unknown"):
        log.info("%s was made by commit %s%s; this is %s%s (same stage format %d, so reused)", what,
                 made.get("commit", "unknown"), " (dirty)" if made.get("dirty") else "", now.get("commit", "unknown"),
                 " (dirty)" if now.get("dirty") else "", STAGE_FORMAT_VERSION)


def run_stage(main: RunConfig, method: str, spec: StageSpec, needed: dict[str, StageResult], dist: DistContext,
              train: TrainFn, env: StageEnvironment | None = None, **train_options: Any) -> StageResult:
    """Reuse, resume or train one stage (under its lock); ``train_options`` go to ``train`` (e.g. ``quiet``)."""
    if env is None:
        env = stage_environment(main, dist, [stage_config(main, method, spec)])
    cfg, key, run_dir = locate_stage(main, method, spec, needed, env)
    with stage_lock(run_dir, dist):
        record = from_main(dist, lambda: read_marker(run_dir))
        if record is not None:
            log.info("stage %s/%s: reusing %s (trained in %.0f s)", method, spec.name, run_dir,
                     float(record.get("wall_time_s", 0.0)))
            note_other_commit(f"stage {method}/{spec.name}", record, env)
            return stage_result(method, spec, key, run_dir, record, reused=True)
        resume = (run_dir / "checkpoints" / "latest").exists()
        log.info("stage %s/%s: %s %s", method, spec.name, "resuming" if resume else "training", run_dir)
        started = time.time()
        # nothing to resume: start over (a job killed before its first checkpoint may have left files)
        result = train(dataclasses.replace(cfg, resume=resume, overwrite=not resume), run_dir, dist,
                       stage_results={name: needed[name] for name in spec.needs}, **train_options)
        if result.stopped_early:
            raise StageIncomplete(f"stage {method}/{spec.name} stopped at step {result.state.step} of "
                                  f"{cfg.trainer.max_steps} (stop_after_steps): run the same command again to "
                                  f"resume it ({run_dir})")
        record = {"complete": True, "method": method, "stage": spec.name, "key": key,
                  "outputs": result.outputs, "final_eval": result.final_eval,
                  "wall_time_s": result.state.elapsed, "steps": result.state.step,
                  "device": f"{dist.device} x {dist.world_size}", "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "session_seconds": time.time() - started, "needs": {n: needed[n].key for n in spec.needs},
                  "stage_format": STAGE_FORMAT_VERSION, "world_size": env.world_size,
                  "precision": resolved_precision(cfg.trainer.precision, env.device_type), "corpus": env.corpus,
                  "tokenizer_files": env.tokenizer(cfg.tokenizer), "git": env.git, "config": asdict(cfg)}
        record = all_gather_objects(dist, record)[0]  # rank 0's outputs, on every rank
        if dist.is_main:
            write_marker(run_dir, record)
        return stage_result(method, spec, key, run_dir, record, reused=False)


def run_stages(main: RunConfig, method: str, specs: list[StageSpec], dist: DistContext,
               train: TrainFn) -> dict[str, StageResult]:
    """Every stage in order; a stage may read only earlier ones."""
    # refuse bad settings of any stage before the first is trained
    configs = [stage_config(main, method, spec) for spec in specs]
    env = stage_environment(main, dist, configs)
    results: dict[str, StageResult] = {}
    for spec in specs:
        missing = [name for name in spec.needs if name not in results]
        if missing:
            raise ConfigError(f"stage {method}/{spec.name} needs {', '.join(missing)}, which no earlier stage is")
        results[spec.name] = run_stage(main, method, spec, results, dist, train, env=env)
    return results


def write_stage_summary(run_dir: Path, results: list[StageResult]) -> None:
    """``stages.json`` in the main run's directory: each earlier run's directory, cost and reuse."""
    (run_dir / "stages.json").write_text(json.dumps([r.summary() for r in results], indent=2))
