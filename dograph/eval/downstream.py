"""Downstream evaluation of a causal LM with lm-evaluation-harness (lm-eval 0.4).

One code path for the model in memory at the end of training and for a run's ``hf/``
export (``python -m dograph.eval``): the model object is wrapped in lm-eval's ``HFLM``
and scored by ``lm_eval.simple_evaluate``. Outputs, in the run directory:

* ``eval/lm_eval.json``: lm-eval's whole result (without per-sample logs);
* ``eval/scores.json``: the compact table (task -> metric, score, stderr, n; the average);
* a ``{"kind": "downstream", ...}`` record in ``metrics.jsonl`` (and a W&B table when the
  run logs to W&B).

Score rule (the paper's): ``acc_norm`` where a task has it, else ``acc``; a
loglikelihood_rolling task has no accuracy and reports ``word_perplexity`` (lm-eval's
wikitext convention: perplexity per whitespace-separated word, comparable across
tokenizers). The average is over the tasks scored by an accuracy.

lm-eval's hub datasets need the network: unless the user set ``HF_HUB_OFFLINE`` or
``HF_DATASETS_OFFLINE``, evaluation runs offline (a missing dataset fails at once instead of
after retries) and a task whose dataset is not cached is a one-line DataError.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import os
import shlex
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from dograph.atomic import write_text_atomically
from dograph.config import RunConfig
from dograph.distributed import DistContext
from dograph.errors import ConfigError, DataError, DographError
from dograph.reporting import markdown_table

ACCURACY_METRICS = ("acc_norm", "acc")  # in order of preference (the paper reports acc_norm where there is one)
PERPLEXITY_METRICS = ("word_perplexity", "perplexity", "byte_perplexity", "bits_per_byte")
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
MIN_CONTEXT = 128  # tokens; our choice, see eval_context
HOW_TO_FIX = ("pre-download them into HF_DATASETS_CACHE on a machine with network (and run with HF_HUB_OFFLINE=0 "
              "there), or point eval.include_path at local task YAMLs (eval=local needs no network)")


# ---- the score rule -------------------------------------------------------------------------------------


def _metric_value(task_results: dict[str, Any], name: str) -> tuple[str, Any] | None:
    """lm-eval keys results ``"<metric>,<filter>"``; the default filter ``none`` first."""
    if f"{name},none" in task_results:
        return f"{name},none", task_results[f"{name},none"]
    for key, value in task_results.items():
        if key.split(",")[0] == name:
            return key, value
    return None


def _number(value: Any) -> float | None:
    """A finite float, or None (lm-eval writes ``"N/A"`` for a stderr it did not compute)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def select_score(task_results: dict[str, Any]) -> tuple[str, float, float | None]:
    """(metric, value, stderr) of one task's lm-eval results by the paper's rule.

    ``acc_norm`` if present, else ``acc``, else a perplexity-type metric
    (``word_perplexity`` first); the stderr is lm-eval's ``<metric>_stderr,<filter>``.
    """
    for name in (*ACCURACY_METRICS, *PERPLEXITY_METRICS):
        found = _metric_value(task_results, name)
        if found is not None and _number(found[1]) is not None:
            key, value = found
            filter_name = key.split(",", 1)[1] if "," in key else "none"
            stderr = task_results.get(f"{name}_stderr,{filter_name}")
            return name, float(value), _number(stderr)
    raise ValueError(f"no accuracy or perplexity metric in {sorted(task_results)}")


def is_accuracy(metric: str) -> bool:
    return metric in ACCURACY_METRICS


@dataclass
class TaskScore:
    task: str
    metric: str
    score: float
    stderr: float | None
    n: int | None  # examples evaluated


@dataclass
class DownstreamResult:
    scores: list[TaskScore]
    average: float | None  # over the tasks scored by an accuracy
    num_fewshot: int
    limit: int | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # lm-eval's output
    command: str = ""  # lm-eval's CLI command that gives the same numbers on the run's hf/ export

    def table(self) -> str:
        rows = [[s.task, s.metric, s.score, "" if s.stderr is None else s.stderr, "" if s.n is None else s.n]
                for s in self.scores]
        if self.average is not None:
            rows.append(["average (accuracy tasks)", "", self.average, "", ""])
        return markdown_table(["task", "metric", "score", "stderr", "n"], rows)

    def record(self) -> dict[str, Any]:
        """The values of the ``downstream`` record of metrics.jsonl."""
        values: dict[str, Any] = {}
        for s in self.scores:
            values |= {f"downstream/{s.task}/score": s.score, f"downstream/{s.task}/stderr": s.stderr,
                       f"downstream/{s.task}/metric": s.metric}
        values["downstream/avg"] = self.average
        return values

    def compact(self) -> dict[str, Any]:
        """``eval/scores.json``."""
        return {"tasks": {s.task: {"metric": s.metric, "score": s.score, "stderr": s.stderr, "n": s.n}
                          for s in self.scores},
                "average": self.average, "num_fewshot": self.num_fewshot, "limit": self.limit}


def summarize(raw: dict[str, Any], *, num_fewshot: int, limit: int | None) -> DownstreamResult:
    """Scores of every task (and group) lm-eval reports; the average over accuracy tasks, groups left out."""
    groups = set(raw.get("groups", {}))
    n_samples = raw.get("n-samples", {})
    scores = []
    for task, task_results in raw.get("results", {}).items():
        try:
            metric, value, stderr = select_score(task_results)
        except ValueError:
            continue
        n = n_samples.get(task, {}).get("effective")
        scores.append(TaskScore(task, metric, value, stderr, int(n) if n is not None else None))
    accuracies = [s.score for s in scores if is_accuracy(s.metric) and s.task not in groups]
    average = sum(accuracies) / len(accuracies) if accuracies else None
    return DownstreamResult(scores, average, num_fewshot, limit, raw)


# ---- tasks --------------------------------------------------------------------------------------------


@contextmanager
def offline_unless_set() -> Iterator[None]:
    """HF hub and datasets offline for the block, unless the user set either variable.

    Both libraries read the variables once, at import, so the already-imported constants
    are set too (and restored after).
    """
    if any(name in os.environ for name in OFFLINE_VARS):
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = (hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    os.environ.update({name: "1" for name in OFFLINE_VARS})
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        for name in OFFLINE_VARS:
            os.environ.pop(name, None)
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


def task_manager(names: list[str], include_paths: list[Path]) -> Any:
    """An lm-eval TaskManager that knows ``names``; ConfigError with close names for an unknown one.

    lm-eval's built-in tasks are indexed only when some name is not found under
    ``include_paths`` (indexing them takes ~7 s, a local directory ~0.2 s).
    """
    paths = tuple(str(p) for p in include_paths)
    if paths:
        manager = _task_index(paths, False)
        if all(name in manager.all_tasks for name in names):
            return manager
    manager = _task_index(paths, True)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        hints = "; ".join(f"{name}: did you mean {', '.join(close)}?" if (close := difflib.get_close_matches(
            name, manager.all_tasks, n=4)) else f"{name}: no close name" for name in unknown)
        raise ConfigError(f"eval.tasks names unknown lm-eval task(s) {', '.join(unknown)} ({hints}); "
                          "`lm-eval ls tasks` lists them, eval.include_path adds a directory of task YAMLs")
    return manager


@functools.lru_cache(maxsize=4)
def _task_index(paths: tuple[str, ...], include_defaults: bool) -> Any:
    """Cached: the check before training and the evaluation after it share one index."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=include_defaults)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_network_error(exc: BaseException) -> bool:
    """A dataset that needs the hub: no connection, offline mode, or not found while offline.

    datasets 4/5 and huggingface_hub raise ``ConnectionError`` (``OfflineModeIsEnabled``
    is one) with "Couldn't reach ... on the Hub", caused by ``FileNotFoundError`` ("not
    cached"); requests' ConnectionError is an OSError of its own.
    """
    for item in _chain(exc):
        text = str(item).lower()
        if isinstance(item, ConnectionError) or type(item).__name__ in ("ConnectionError", "OfflineModeIsEnabled",
                                                                       "LocalEntryNotFoundError"):
            return True
        if "offline" in text or "couldn't reach" in text or "not cached" in text:
            return True
    return False


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_tasks(manager: Any, names: list[str]) -> list[Any]:
    """lm-eval Task/Group objects, one name at a time so a failure names its task.

    A dataset that needs the network is a DataError naming every such task and the fix.
    """
    built: list[Any] = []
    offline: list[str] = []
    for name in names:
        try:
            loaded = manager.load([name])
        except (OSError, ValueError, RuntimeError, ImportError) as exc:
            if is_network_error(exc):
                offline.append(name)
                continue
            raise DataError(f"lm-eval task {name}: cannot load its dataset ({type(exc).__name__}: "
                            f"{_first_line(exc)})") from exc
        except Exception as exc:  # datasets' own errors (DatasetsError) derive from Exception only
            if is_network_error(exc):
                offline.append(name)
                continue
            raise DataError(f"lm-eval task {name}: cannot load it ({type(exc).__name__}: {_first_line(exc)})") from exc
        if name in loaded["groups"]:
            built.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            built.append(loaded["tasks"][name])
        else:  # a tag: its tasks
            built.extend(loaded["tasks"].values())
    if offline:
        raise DataError(f"lm-eval task(s) {', '.join(offline)}: no network and the hub dataset is not cached: "
                        f"{HOW_TO_FIX}")
    return built


def resolve_tasks(cfg: RunConfig, corpus: Any = None) -> tuple[list[str], list[Path]]:
    """Task names (``paper9`` expanded) and the task directories to include.

    The local ``dograph_*`` tasks are built on demand from the run's corpus into
    ``paths.cache_dir/lm_eval_tasks`` unless ``eval.include_path`` is set (it then provides them).
    """
    from dograph.eval.tasks import LOCAL_TASKS, local_tasks_dir

    names = cfg.eval.task_names
    paths = [Path(cfg.eval.include_path).expanduser().resolve()] if cfg.eval.include_path else []
    if paths and not paths[0].is_dir():
        raise ConfigError(f"eval.include_path={cfg.eval.include_path} is not a directory")
    if not paths and any(name in LOCAL_TASKS for name in names):
        if corpus is None:
            from dograph.data.corpus import build_corpus

            corpus = build_corpus(cfg.dataset, Path(cfg.paths.cache_dir))
        paths.append(local_tasks_dir(cfg.dataset, corpus, Path(cfg.paths.cache_dir), n_items=cfg.eval.local_items))
    return names, paths


def check_task_names(cfg: RunConfig) -> None:
    """Fail before training on a task name lm-eval does not know (local tasks need no index)."""
    from dograph.eval.tasks import LOCAL_TASKS

    names = [n for n in cfg.eval.task_names if cfg.eval.include_path or n not in LOCAL_TASKS]
    if names:
        with lm_eval_logging(verbose=False):
            task_manager(names, [Path(cfg.eval.include_path).expanduser()] if cfg.eval.include_path else [])


# ---- running lm-eval ------------------------------------------------------------------------------------


@contextmanager
def lm_eval_logging(verbose: bool) -> Iterator[None]:
    """lm-eval's logs at WARNING and above unless ``verbose`` (at INFO it logs every step of its setup).

    Its model wrapper also warns once per request whose context it truncates to
    ``max_length`` (expected: contexts longer than the training ``seq_len``), so that
    logger is kept at ERROR unless ``verbose``.
    """
    loggers = {logging.getLogger("lm_eval"): logging.WARNING, logging.getLogger("lm_eval.models.huggingface"):
               logging.ERROR}
    saved = {logger: logger.level for logger in loggers}
    for logger, quiet in loggers.items():
        logger.setLevel(logging.INFO if verbose else quiet)
    try:
        yield
    finally:
        for logger, level in saved.items():
            logger.setLevel(level)


def run_lm_eval(model: Any, tokenizer: Any, names: list[str], *, include_paths: list[Path], num_fewshot: int = 0,
                limit: int | None = None, batch_size: int = 8, max_length: int | None = None,
                verbose: bool = False) -> dict[str, Any]:
    """lm-eval's result dict for ``model`` (a transformers causal LM, on its device) on ``names``.

    ``max_length`` caps the context lm-eval gives the model (the training ``seq_len``:
    positions beyond it were never trained); rolling loglikelihoods use windows of it.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with lm_eval_logging(verbose), offline_unless_set():
        manager = task_manager(names, include_paths)
        tasks = load_tasks(manager, names)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        try:
            raw = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=False, bootstrap_iters=1000)
        except AssertionError as exc:  # lm-eval checks its inputs with assert (e.g. an answer longer than max_length)
            where = traceback.extract_tb(exc.__traceback__)[-1]
            raise DataError(f"lm-eval stopped at a failed check ({Path(where.filename).name}:{where.lineno}: "
                            f"{where.line}); with a {lm.max_length}-token context, does some answer not fit?") from None
    if raw is None:
        raise DataError("lm-eval returned no result (not the main process?)")
    return raw


# ---- writing the results ----------------------------------------------------------------------------------


def _write_json(path: Path, payload: Any) -> None:
    write_text_atomically(path, json.dumps(payload, indent=2, default=str))


def write_results(run_dir: Path, result: DownstreamResult, *, step: int | None, writer: Any = None) -> None:
    """eval/lm_eval.json, eval/scores.json, the metrics.jsonl record and a W&B table."""
    _write_json(run_dir / "eval" / "lm_eval.json", result.raw)
    _write_json(run_dir / "eval" / "scores.json", result.compact())
    if writer is None:
        from dograph.config import LoggerConfig
        from dograph.train.metrics import MetricsWriter

        writer = MetricsWriter(run_dir, LoggerConfig(mode="disabled"), enabled=True, config={}, run_name="eval")
    writer.write("downstream", step, result.record())
    if getattr(writer, "wandb_run", None) is not None:
        import wandb

        rows = [[s.task, s.metric, s.score, s.stderr, s.n] for s in result.scores]
        writer.wandb_run.log({"downstream/table": wandb.Table(columns=["task", "metric", "score", "stderr", "n"],
                                                              data=rows)}, step=step)


def eval_context(cfg: RunConfig) -> int:
    """lm-eval's context: the training ``seq_len`` (positions past it were never trained), at least
    MIN_CONTEXT tokens so that a task's answer fits (lm-eval refuses one longer than the context),
    at most the model's positions."""
    return min(cfg.model.max_position_embeddings, max(cfg.trainer.seq_len, MIN_CONTEXT))


def lm_eval_command(cfg: RunConfig, run_dir: Path, names: list[str], include_paths: list[Path]) -> str:
    """lm-eval's CLI on ``run_dir/hf`` with the settings used here, so that it gives the same numbers.

    ``max_length`` is what makes them agree: without it the CLI takes the export's positions
    (``n_positions`` / ``max_position_embeddings``, read before the tokenizer's ``model_max_length``)
    as the context, where this project uses :func:`eval_context`.
    """
    model_args = f"pretrained={Path(run_dir) / 'hf'},max_length={eval_context(cfg)}"
    parts = ["lm_eval --model hf", f"--model_args {shlex.quote(model_args)}", f"--tasks {','.join(names)}",
             f"--num_fewshot {cfg.eval.num_fewshot}", f"--batch_size {cfg.eval.batch_size}"]
    parts += [f"--include_path {shlex.quote(str(path))}" for path in include_paths]
    if cfg.eval.limit is not None:
        parts.append(f"--limit {cfg.eval.limit}")
    return " ".join(parts)


def evaluate(model: Any, tokenizer: Any, cfg: RunConfig, run_dir: Path, *, step: int | None = None,
             writer: Any = None, corpus: Any = None, verbose: bool = False) -> DownstreamResult:
    """Evaluate ``model`` on ``cfg.eval.tasks`` and write the results into ``run_dir``."""
    names, paths = resolve_tasks(cfg, corpus)
    if not names:
        raise ConfigError("eval.tasks is empty: name tasks (eval.tasks=paper9, eval=local or eval.tasks=[piqa,sciq])")
    was_training = model.training
    try:
        raw = run_lm_eval(model, tokenizer, names, include_paths=paths, num_fewshot=cfg.eval.num_fewshot,
                          limit=cfg.eval.limit, batch_size=cfg.eval.batch_size, max_length=eval_context(cfg),
                          verbose=verbose)
    finally:
        model.train(was_training)
    result = summarize(raw, num_fewshot=cfg.eval.num_fewshot, limit=cfg.eval.limit)
    result.command = lm_eval_command(cfg, Path(run_dir), names, paths)
    write_results(Path(run_dir), result, step=step, writer=writer)
    return result


def print_result(result: DownstreamResult) -> None:
    print(f"\nDownstream (lm-eval, {result.num_fewshot}-shot{'' if result.limit is None else f', limit {result.limit}'}"
          "; score = acc_norm where a task has it, else acc; rolling tasks: word perplexity)")
    print(result.table())


def evaluate_after_training(cfg: RunConfig, model: Any, tokenizer: Any, run_dir: Path, dist: DistContext, *,
                            step: int, writer: Any = None, corpus: Any = None) -> DownstreamResult | None:
    """The end-of-training evaluation, on rank 0 only; the other ranks wait at a barrier.

    Why rank 0 alone: the models here are small, and lm-eval's own data parallelism needs
    accelerate's launcher and a model per process, not torchrun's group. The barrier is a
    gloo group with a long timeout, so a long evaluation does not trip NCCL's watchdog.
    A task that cannot be loaded (no network) is a warning here, not a failed run: the
    trained model is saved and ``python -m dograph.eval`` evaluates it later.
    """
    group = _long_barrier_group(dist)
    result = None
    try:
        if dist.is_main:
            started = time.time()
            print(f"\ndownstream evaluation: {', '.join(cfg.eval.task_names)} ...", flush=True)
            try:
                result = evaluate(model, tokenizer, cfg, run_dir, step=step, writer=writer, corpus=corpus)
            except DographError as exc:
                print(f"warning: downstream evaluation skipped: {exc} (evaluate the run later with "
                      f"python -m dograph.eval {run_dir})", file=sys.stderr)
            else:
                print_result(result)
                print(f"({time.time() - started:.0f} s; {run_dir / 'eval' / 'scores.json'})")
    finally:
        if group is not None:
            import torch.distributed

            torch.distributed.barrier(group=group)
    return result


def _long_barrier_group(dist: DistContext) -> Any:
    if not dist.enabled:
        return None
    import torch.distributed

    return torch.distributed.new_group(backend="gloo", timeout=timedelta(days=1))
