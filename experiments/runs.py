"""The runs an artifact lacks: find them in the index, train them one after another, or print the commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pandas as pd

from experiments.index import LAUNCH_FILE, running_marker
from experiments.scale import REPO, RunRequest, Scale, find_run, request_overrides


def missing_runs(index: pd.DataFrame, requests: list[RunRequest]) -> list[RunRequest]:
    """The requests with no complete run of their fingerprint in ``index`` (in order, without repeats).

    A run made with other overrides (another ``max_steps``, an older ``common``) does not count.
    """
    seen: list[RunRequest] = []
    for request in requests:
        if request not in seen and find_run(index, request).empty:
            seen.append(request)
    return seen


def _fingerprint_in(run_dir: Path) -> str | None:
    """The fingerprint ``run_dir/run_info.json`` records (None when there is none or it is unreadable)."""
    try:
        return json.loads((run_dir / "run_info.json").read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def run_command(request: RunRequest, scale: Scale) -> list[str]:
    """``python run.py ...`` for one request: continues a run of the same overrides that stopped halfway (resume);
    starts over a run made with other overrides (an older ``common``) or one that never checkpointed."""
    run_dir = request.run_dir(scale)
    extra = []
    same = request.fingerprint is not None and _fingerprint_in(run_dir) == request.fingerprint
    if same and (run_dir / "checkpoints" / "latest").exists():
        extra = ["resume=true"]
    elif any((run_dir / name).exists() for name in ("run_info.json", "checkpoints")):
        extra = ["overwrite=true"]
    return [sys.executable, str(REPO / "run.py"), *request_overrides(request, scale), *extra]




@dataclass
class _Job:
    request: RunRequest
    process: subprocess.Popen
    log: IO[str]
    log_path: Path
    started: float


@dataclass
class TrainOutcome:
    """What :func:`train_missing` did: the runs it completed, those that failed (their logs), those left for later."""

    done: list[RunRequest] = field(default_factory=list)
    failed: dict[RunRequest, str] = field(default_factory=dict)
    not_started: list[RunRequest] = field(default_factory=list)


def threads_per_job(jobs: int) -> int:
    """Torch (and OpenMP) threads of each of ``jobs`` runs side by side: the cores shared out, at least 1."""
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def train_missing(requests: list[RunRequest], scale: Scale, *, jobs: int = 1, budget_s: float | None = None,
                  estimate_s: Callable[[RunRequest], float] | None = None,
                  on_done: Callable[[RunRequest, Path], None] | None = None) -> TrainOutcome:
    """Train ``requests`` in their order, ``jobs`` at a time (stdout and stderr to ``<runs_root>/logs/``).

    Each run gets ``threads_per_job(jobs)`` torch threads (``DOGRAPH_THREADS``, ``OMP_NUM_THREADS``).
    With ``budget_s``, a run starts only if ``estimate_s(request)`` seconds from now still fall
    inside the budget; the first run that does not fit ends the launching (the order is a
    priority), the runs already started finish. ``on_done`` is called for each run that completes
    (after ``launch.json`` is written into its directory).
    """
    logs = scale.runs_root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = threads_per_job(jobs)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DOGRAPH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    outcome = TrainOutcome()
    queue = list(requests)
    running: list[_Job] = []
    began = time.time()
    total = len(requests)
    try:
        while queue or running:
            while queue and len(running) < max(1, jobs):
                request = queue[0]
                needed = estimate_s(request) if estimate_s else 0.0
                if budget_s is not None and time.time() - began + needed > budget_s:
                    outcome.not_started = list(queue)
                    print(f"budget: {request.label()} (about {needed / 60:.0f} min) would not fit in the "
                          f"{max(0.0, budget_s - (time.time() - began)) / 60:.0f} min left; "
                          f"{len(queue)} runs left for the next invocation", flush=True)
                    queue = []
                    break
                queue.pop(0)
                log_path = logs / (request.label().replace(" ", "_").replace("=", "-") + ".log")
                number = total - len(queue)
                print(f"[{number}/{total}] training {request.label()} ({threads} threads; log: {relative(log_path)})",
                      flush=True)
                handle = open(log_path, "w")  # noqa: SIM115 (closed when the job ends)
                process = subprocess.Popen(run_command(request, scale), stdout=handle, stderr=subprocess.STDOUT,
                                           cwd=REPO, env=env)
                marker = running_marker(request.run_dir(scale))
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"{process.pid}\n")
                running.append(_Job(request, process, handle, log_path, time.time()))
            if not running:
                break
            time.sleep(1.0)
            for job in [j for j in running if j.process.poll() is not None]:
                running.remove(job)
                job.log.close()
                wall = time.time() - job.started
                code = job.process.returncode
                if code == 0:
                    run_dir = job.request.run_dir(scale)
                    (run_dir / LAUNCH_FILE).write_text(json.dumps(
                        {"wall_s": round(wall, 1), "threads": threads, "jobs": jobs,
                         "cores": os.cpu_count()}, indent=1) + "\n")
                running_marker(job.request.run_dir(scale)).unlink(missing_ok=True)
                if code == 0:
                    outcome.done.append(job.request)
                    print(f"      done: {job.request.label()} in {wall:.0f} s", flush=True)
                    if on_done is not None:
                        on_done(job.request, run_dir)
                else:
                    outcome.failed[job.request] = str(job.log_path)
                    print(f"      FAILED: {job.request.label()} (exit {code}; see {relative(job.log_path)})",
                          flush=True)
    except KeyboardInterrupt:
        for job in running:
            job.process.terminate()
        raise
    return outcome


def multirun_commands(requests: list[RunRequest], scale: Scale) -> list[str]:
    """Hydra multiruns that make ``requests``: one per sweep, model, dataset (and its scenario) and method-specific
    overrides.

    Seeds, methods, m and objectives that share the rest become comma lists (``seed=0,1,2``); a request with a
    variant (issue 19) is one ``python run.py`` line of its own. DoGraph has its own line: ``m`` and
    ``objective`` on another method's command line would change its fingerprint, and the run would not count
    for its request.
    """
    groups: dict[tuple, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    lines = [" ".join(_quote(p) for p in ["python run.py", *request_overrides(r, scale)])
             for r in requests if r.variant is not None]  # a variant's overrides replace common's: a line each
    for r in requests:
        if r.variant is not None:
            continue
        special = tuple(scale.method_overrides.get(r.method, []))
        own = bool(special) or r.method == "dograph"
        key = (r.sweep, r.model, r.dataset, tuple(r.dataset_overrides()), special if special else ("",),
               r.method if own else "")
        for name, value in (("mixer", r.method), ("seed", r.seed)):
            groups[key][name].add(value)
        if r.method == "dograph":
            groups[key]["m"].add(r.m)
            groups[key]["objective"].add(r.objective)
    for (sweep, model, dataset, dataset_options, special, _), values in groups.items():
        parts = ["python run.py -m", f"model={model}", f"dataset={dataset}", *dataset_options]
        parts += [f"{k}={','.join(str(v) for v in sorted(vs, key=_order))}" for k, vs in values.items()]
        parts += [*scale.common, *(s for s in special if s), f"paths.output_root={scale.runs_root}",
                  f"tags=[{sweep}]"]
        lines.append(" ".join(_quote(p) for p in parts))
    return lines


def _order(value: object) -> tuple:
    return (0, value, "") if isinstance(value, int) else (1, 0, str(value))


def _quote(part: str) -> str:
    return f"'{part}'" if any(c in part for c in "[]{}*? ") and not part.startswith("python") else part


def describe_missing(requests: list[RunRequest], scale: Scale) -> str:
    """Which runs are missing and the command(s) that make them."""
    shown = 8
    lines = [f"  missing: {r.label()}" for r in requests[:shown]]
    if len(requests) > shown:
        lines.append(f"  ... and {len(requests) - shown} more ({len(requests)} runs missing)")
    lines.append("  make them with:")
    lines += [f"    {c}" for c in multirun_commands(requests, scale)]
    return "\n".join(lines)


def relative(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)
