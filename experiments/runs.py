"""The runs an artifact lacks: find them in the index, train them one after another, or print the commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd

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


def train_missing(requests: list[RunRequest], scale: Scale) -> dict[RunRequest, str]:
    """Train each request in turn (stdout and stderr to ``<runs_root>/logs/``); returns the failures' log paths."""
    logs = scale.runs_root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    failed: dict[RunRequest, str] = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for i, request in enumerate(requests, 1):
        log_path = logs / (request.label().replace(" ", "_").replace("=", "-") + ".log")
        print(f"[{i}/{len(requests)}] training {request.label()} (log: {log_path})", flush=True)
        started = time.time()
        with open(log_path, "w") as handle:
            code = subprocess.call(run_command(request, scale), stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
                                   env=env)
        status = "done" if code == 0 else f"FAILED (exit {code}; see the log)"
        print(f"      {status} in {time.time() - started:.0f} s", flush=True)
        if code != 0:
            failed[request] = str(log_path)
    return failed


def multirun_commands(requests: list[RunRequest], scale: Scale) -> list[str]:
    """Hydra multiruns that make ``requests``: one per sweep, model, dataset and method-specific overrides.

    Seeds, methods, m and objectives that share the rest become comma lists (``seed=0,1,2``). DoGraph has
    its own line: ``m`` and ``objective`` on another method's command line would change its fingerprint, and
    the run would not count for its request.
    """
    groups: dict[tuple, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for r in requests:
        special = tuple(scale.method_overrides.get(r.method, []))
        own = bool(special) or r.method == "dograph"
        key = (r.sweep, r.model, r.dataset, special if special else ("",), r.method if own else "")
        for name, value in (("mixer", r.method), ("seed", r.seed)):
            groups[key][name].add(value)
        if r.method == "dograph":
            groups[key]["m"].add(r.m)
            groups[key]["objective"].add(r.objective)
    lines = []
    for (sweep, model, dataset, special, _), values in groups.items():
        parts = ["python run.py -m", f"model={model}", f"dataset={dataset}"]
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
