"""Pipeline stages: the earlier runs a method needs before its main run (docs/design.md section 3).

DoReMi trains a reference model, then a proxy whose domain weights become the main run's
mixture; DoGE trains a proxy; the regression methods train many small proxies. A method
declares them with ``Mixer.plan_stages`` as :class:`StageSpec` s, in order; each is an
ordinary training run of this trainer in its own directory

    ${paths.output_root}/stages/<method>/<stage>-<key>/

where ``key`` hashes exactly what determines the stage (:func:`stage_key`): the model, the
data, the tokenizer, the training settings, the stage's own seed, its mixer node (the
method's constants) and the keys of the stages it reads. A stage's seed is its own, not the
main run's ``seed``, so a sweep over main-run seeds or model sizes reuses a complete stage.

* **Complete** stages (``stage.json`` with ``complete: true``) are reused, never retrained.
* **Interrupted** stages (checkpoints, no marker) resume from their last checkpoint.
* **Concurrent** jobs (two jobs of one multirun that need the same stage) serialise on a
  file lock next to the stage directory: the second waits, then reuses the result.
* ``stage.json`` records what the stage produced (``Mixer.outputs``, e.g. a mixture), its
  training wall time, its device and config, so a report can add up a method's full cost.

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
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dograph.config import ModelConfig, RunConfig, TrainerConfig, load_group_option
from dograph.distributed import DistContext, all_gather_objects, barrier
from dograph.errors import ConfigError, DataError, DographError

log = logging.getLogger(__name__)

MARKER = "stage.json"
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


def stage_key(method: str, spec: StageSpec, cfg: RunConfig, needed: dict[str, StageResult]) -> str:
    """12 hex digits of a hash of everything that determines the stage's result."""
    trainer = {k: v for k, v in asdict(cfg.trainer).items() if k not in COSMETIC_TRAINER_FIELDS}
    identity = {"method": method, "stage": spec.name, "model": asdict(cfg.model), "dataset": asdict(cfg.dataset),
                "tokenizer": cfg.tokenizer, "trainer": trainer, "seed": cfg.seed, "mixer": spec.mixer,
                "needs": {name: needed[name].key for name in spec.needs}}
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
    tmp = run_dir / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, run_dir / MARKER)


@contextlib.contextmanager
def stage_lock(run_dir: Path, dist: DistContext) -> Iterator[None]:
    """An exclusive file lock on ``<run_dir>.lock`` held by rank 0 (all ranks wait for it)."""
    handle = None
    if dist.is_main:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir.with_name(run_dir.name + ".lock"), "w")  # noqa: SIM115 (held across the yield)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("stage %s is being trained by another job: waiting for it", run_dir.name)
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


def locate_stage(main: RunConfig, method: str, spec: StageSpec, needed: dict[str, StageResult]
                 ) -> tuple[RunConfig, str, Path]:
    """The stage's run config, key and directory."""
    cfg = stage_config(main, method, spec)
    key = stage_key(method, spec, cfg, needed)
    return cfg, key, Path(main.paths.output_root) / "stages" / method / f"{spec.name}-{key}"


def run_stage(main: RunConfig, method: str, spec: StageSpec, needed: dict[str, StageResult], dist: DistContext,
              train: TrainFn, **train_options: Any) -> StageResult:
    """Reuse, resume or train one stage (under its lock); ``train_options`` go to ``train`` (e.g. ``quiet``)."""
    cfg, key, run_dir = locate_stage(main, method, spec, needed)
    with stage_lock(run_dir, dist):
        record = all_gather_objects(dist, read_marker(run_dir) if dist.is_main else None)[0]
        if record is not None:
            log.info("stage %s/%s: reusing %s (trained in %.0f s)", method, spec.name, run_dir,
                     float(record.get("wall_time_s", 0.0)))
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
                  "config": asdict(cfg)}
        record = all_gather_objects(dist, record)[0]  # rank 0's outputs, on every rank
        if dist.is_main:
            write_marker(run_dir, record)
        return stage_result(method, spec, key, run_dir, record, reused=False)


def run_stages(main: RunConfig, method: str, specs: list[StageSpec], dist: DistContext,
               train: TrainFn) -> dict[str, StageResult]:
    """Every stage in order; a stage may read only earlier ones."""
    for spec in specs:  # refuse bad settings of any stage before the first is trained
        stage_config(main, method, spec)
    results: dict[str, StageResult] = {}
    for spec in specs:
        missing = [name for name in spec.needs if name not in results]
        if missing:
            raise ConfigError(f"stage {method}/{spec.name} needs {', '.join(missing)}, which no earlier stage is")
        results[spec.name] = run_stage(main, method, spec, results, dist, train)
    return results


def write_stage_summary(run_dir: Path, results: list[StageResult]) -> None:
    """``stages.json`` in the main run's directory: each earlier run's directory, cost and reuse."""
    (run_dir / "stages.json").write_text(json.dumps([r.summary() for r in results], indent=2))
