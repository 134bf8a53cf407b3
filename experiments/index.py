"""The results index: every run directory under some roots, read into one table (one row per run).

A run directory is any directory holding ``run_info.json`` (written when a run starts), outside
a ``stages/`` tree (a method's stages are costs of its main run, read from ``stages.json``).
A run is ``complete`` when it holds ``summary.json`` (written after the final evaluation);
otherwise it is ``incomplete`` (crashed, killed or still running) and artifacts skip it.
A run **record** (``experiments.records``: the committed copy of a completed run, with
``record.json``) is read the same way. When a live run and a record are the same run (same
fingerprint and completion time), the live one is kept (it has the checkpoints) and names its
record in the ``record`` column.

Columns (a missing value is NaN / None):
  run_dir, source ("run" | "record"), record (the record of a live run), status,
  method, model, dataset, scenario (only for a run on a planted corpus: ``dataset.planted.scenario``),
  variant (only for a study's variant run: its tag ``variant:NAME``, issue 19),
  objective, trainer, m, seed, tags, max_steps,
  fingerprint (of the run's command-line overrides, ``run_info.json``; None without Hydra), overrides,
  wall_s (the run's process seconds, when ``experiments.runs.train_missing`` trained it),
  completed_at (Unix seconds: ``summary.json``'s ``completed_at``, else its modification time),
  steps, tokens_seen, train_time_s (training only), eval_time_s, ckpt_time_s (validation and
  checkpoint seconds of the main run), stage_time_s (the stages' training seconds), stages,
  total_time_s (train_time_s + stage_time_s), mean_ess,
  mean_time_solve_s, mean_time_cluster_s, ... (means of the mixer's logged timings),
  val/<domain>/loss, val/avg_loss, val/avg_ppl, val/worst_loss,
  downstream/<task>/score, downstream/<task>/stderr, downstream/<task>/metric, downstream/avg,
  downstream/setting (the task set, num_fewshot and limit the scores were made with),
  has_downstream (False when the run has no ``eval/scores.json``).
The method, model, dataset and objective are Hydra's choices (``.hydra/hydra.yaml``); runs made
without Hydra fall back to the registered name of the mixer their ``_target_`` names.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

log = logging.getLogger(__name__)

# Run directories made before the package layout of issue 16 name DoGraph's mixer by its former module.
FORMER_TARGETS = {"dograph.dograph_mixer.DoGraphMixer": "dograph"}
TIMINGS = ("mixer/time_solve_s", "mixer/time_cluster_s", "mixer/time_kmeans_s", "mixer/time_projection_s")
IDENTITY = ("method", "model", "dataset", "scenario", "variant", "objective", "m", "seed")
OPTIONAL_IDENTITY = ("scenario", "variant")  # columns only some runs have (the others' index.csv is unchanged)
VARIANT_TAG = "variant:"  # the tag (``tags=[variant:NAME]``) naming a study's variant run (issue 19)
TIMES = ("train_time_s", "eval_time_s", "ckpt_time_s")  # summary.json's seconds: training, validation, checkpoints
RECORD_FILE = "record.json"  # marks a run record (experiments.records)
DERIVED = "derived"  # points a figure computed from a run's checkpoints, kept in the run and its record
LAUNCH_FILE = "launch.json"  # the scheduler's wall seconds of a run it trained (experiments.runs)
RUNNING_SUFFIX = ".running"  # <run dir>.running beside a run the scheduler is training: the process's pid


def running_marker(run_dir: Path) -> Path:
    """The file the scheduler keeps beside ``run_dir`` while its process runs (not inside: run.py owns the dir)."""
    return run_dir.with_name(run_dir.name + RUNNING_SUFFIX)


def in_flight(run_dir: Path) -> bool:
    """Whether a scheduler's process is still training ``run_dir``: its summary may already say complete while
    the process still evaluates, exports and writes ``launch.json``, so it must not be recorded yet."""
    try:
        pid = int(running_marker(run_dir).read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False  # the process is gone (a scheduler that was killed): the run is as it is
    except PermissionError:
        return True
    return True


def dataset_label(dataset: str, scenario: Any = None) -> str:
    """The dataset as a run's directory and record name it: ``planted_noise`` for a planted scenario, else itself."""
    return f"{dataset}_{scenario}" if isinstance(scenario, str) and scenario not in ("", "none") else dataset


def planted_scenario(cfg: dict[str, Any]) -> str | None:
    """The run's ``dataset.planted.scenario`` when structure was planted (None for every other run)."""
    scenario = ((cfg.get("dataset") or {}).get("planted") or {}).get("scenario")
    return scenario if isinstance(scenario, str) and scenario != "none" else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("cannot read %s (%s): ignored", path, exc)
        return None


def hydra_choices(run_dir: Path) -> dict[str, str]:
    """Hydra's config-group choices of a run (``.hydra/hydra.yaml``), or those its record kept."""
    record = run_dir / RECORD_FILE
    if record.exists():
        meta = _read_json(record)
        return dict(meta.get("choices") or {}) if isinstance(meta, dict) else {}
    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.exists():
        return {}
    try:
        choices = (yaml.safe_load(path.read_text()) or {}).get("hydra", {}).get("runtime", {}).get("choices", {})
    except yaml.YAMLError:
        return {}
    return {k: str(v) for k, v in choices.items() if v is not None}


def _read_metrics(run_dir: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """(the last ``eval`` record, the mean of each ``mixer/time_*`` over the train records) of ``metrics.jsonl``."""
    last: dict[str, Any] = {}
    sums: dict[str, list[float]] = {}
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return last, {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if record.get("kind") == "eval":
            last = record
        elif record.get("kind") == "train":
            for key in TIMINGS:
                if isinstance(record.get(key), int | float):
                    sums.setdefault(key, []).append(float(record[key]))
    return last, {f"mean_{k.split('/')[-1]}": sum(v) / len(v) for k, v in sums.items() if v}


@functools.cache
def method_of_target(target: str) -> str:
    """The registered name (``Mixer.name``) of the mixer class ``target`` names: runs made without Hydra.

    A target that no longer imports keeps the old reading, its module's last part.
    """
    if not target:
        return "?"
    if target in FORMER_TARGETS:
        return FORMER_TARGETS[target]
    module, _, attr = target.rpartition(".")
    try:
        name = getattr(getattr(importlib.import_module(module), attr), "name", "")
    except (ImportError, AttributeError, ValueError):
        name = ""
    return name if isinstance(name, str) and name else target.rsplit(".", 2)[-2]


def read_run(run_dir: Path) -> dict[str, Any] | None:
    """One index row for ``run_dir`` (None when ``run_info.json`` is unreadable)."""
    info = _read_json(run_dir / "run_info.json")
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        return None
    cfg = info["config"]
    choices = hydra_choices(run_dir)
    mixer = cfg.get("mixer") or {}
    target = str(mixer.get("_target_", ""))
    launch = _read_json(run_dir / LAUNCH_FILE) if (run_dir / LAUNCH_FILE).exists() else None
    row: dict[str, Any] = {
        "run_dir": str(run_dir),
        "source": "record" if (run_dir / RECORD_FILE).exists() else "run",
        "method": choices.get("mixer") or method_of_target(target),
        "model": choices.get("model", "?"),
        "dataset": choices.get("dataset", (cfg.get("dataset") or {}).get("name", "?")),
        "objective": choices.get("objective", "?"),
        "trainer": choices.get("trainer", "?"),
        "m": cfg.get("m"),
        "seed": cfg.get("seed"),
        "tags": ",".join(cfg.get("tags") or []),
        "max_steps": (cfg.get("trainer") or {}).get("max_steps"),
        "parameters": info.get("parameters"),
        "fingerprint": info.get("fingerprint"),
        "overrides": info.get("overrides"),
        "wall_s": launch.get("wall_s") if isinstance(launch, dict) else None,
    }
    if (scenario := planted_scenario(cfg)) is not None:  # no column at all for the other runs (index.csv unchanged)
        row["scenario"] = scenario
    variants = [t[len(VARIANT_TAG):] for t in cfg.get("tags") or [] if str(t).startswith(VARIANT_TAG)]
    if variants:  # likewise: only a study's variant runs have the column
        row["variant"] = variants[0]
    last_eval, timings = _read_metrics(run_dir)
    row.update(timings)
    summary = _read_json(run_dir / "summary.json") if (run_dir / "summary.json").exists() else None
    if isinstance(summary, dict) and summary.get("status") == "complete":
        row.update(status="complete", steps=summary.get("steps"), tokens_seen=summary.get("tokens_seen"),
                   completed_at=_completed_at(run_dir / "summary.json", summary),
                   **{key: summary.get(key) for key in TIMES})
        final = summary.get("final_eval") or {}
        row["mean_ess"] = (summary.get("weights") or {}).get("mean_ess", 1.0)
    else:
        row.update(status="incomplete")
        final = last_eval
    row.update({k: v for k, v in final.items() if k.startswith("val/")})
    stages = _read_json(run_dir / "stages.json") if (run_dir / "stages.json").exists() else None
    stages = stages if isinstance(stages, list) else []
    row["stages"] = len(stages)
    row["stage_time_s"] = float(sum(float(s.get("wall_time_s", 0.0)) for s in stages))
    if row.get("train_time_s") is not None:
        row["total_time_s"] = float(row["train_time_s"]) + row["stage_time_s"]
    scores = _read_json(run_dir / "eval" / "scores.json") if (run_dir / "eval" / "scores.json").exists() else None
    row["has_downstream"] = isinstance(scores, dict)
    if isinstance(scores, dict):
        row["downstream/setting"] = eval_setting(scores)
        for task, entry in (scores.get("tasks") or {}).items():
            row[f"downstream/{task}/score"] = entry.get("score")
            row[f"downstream/{task}/stderr"] = entry.get("stderr")
            row[f"downstream/{task}/metric"] = entry.get("metric")
        row["downstream/avg"] = scores.get("average")
    return row


def _completed_at(path: Path, summary: dict[str, Any]) -> float:
    """When the run completed (Unix seconds): ``completed_at``, or the file's time for a summary without it."""
    try:
        return datetime.fromisoformat(str(summary["completed_at"])).timestamp()
    except (KeyError, ValueError):
        return path.stat().st_mtime


def eval_setting(scores: dict[str, Any]) -> str:
    """What downstream scores were made with: their task set, shots and item limit (scores of two settings
    are never averaged into one cell)."""
    tasks = ",".join(sorted(scores.get("tasks") or {}))
    limit = scores.get("limit", "?")
    return f"tasks={tasks}; num_fewshot={scores.get('num_fewshot', '?')}; limit={'all' if limit is None else limit}"


def find_run_dirs(roots: Iterable[Path]) -> list[Path]:
    """Directories holding ``run_info.json`` under ``roots``, stage runs (under ``stages/``) excluded."""
    found: set[Path] = set()
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for info in root.rglob("run_info.json"):
            if "stages" not in info.relative_to(root).parts[:-1]:
                found.add(info.parent)
    return sorted(found)


def build_index(roots: Iterable[Path]) -> pd.DataFrame:
    """Every run and record under ``roots`` as one row (see the module docstring for the columns)."""
    rows = _merge_records([row for d in find_run_dirs(roots) if (row := read_run(d)) is not None])
    frame = pd.DataFrame(rows)
    if frame.empty:
        kept = [c for c in IDENTITY if c not in OPTIONAL_IDENTITY]  # columns only some runs have (module docstring)
        frame = pd.DataFrame(columns=["run_dir", "status", *kept, "fingerprint"])
    return frame


def _merge_records(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop a record whose run is also here live (same fingerprint, same completion), naming it on the live row."""
    live = {(r.get("fingerprint"), r.get("completed_at")): r for r in rows
            if r["source"] == "run" and r["status"] == "complete"}
    out = []
    for row in rows:
        twin = live.get((row.get("fingerprint"), row.get("completed_at"))) if row["source"] == "record" else None
        if twin is not None:
            twin["record"] = row["run_dir"]
            if twin.get("wall_s") is None:
                twin["wall_s"] = row.get("wall_s")
            continue
        out.append(row)
    return out


def complete(index: pd.DataFrame) -> pd.DataFrame:
    """The finished runs only."""
    return index[index["status"] == "complete"] if len(index) else index


def domains_of(index: pd.DataFrame) -> list[str]:
    """Human domains with a validation loss column, in column order."""
    return [c.split("/")[1] for c in index.columns
            if c.startswith("val/") and c.endswith("/loss") and c.count("/") == 2 and "avg" not in c]
