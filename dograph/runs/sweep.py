"""Proxy sweeps: N small training runs, one per mixture, for the regression methods (docs/design.md section 3.1).

RegMix and Data Mixing Laws choose a mixture from many proxy runs. A method declares its
sweep (``Mixer.plan_sweep``: the mixtures, the proxies' stage settings, a minimum number of
successes); each proxy is an ordinary pipeline stage (``dograph.runs.pipeline``) whose mixer
samples that mixture, in ``${paths.output_root}/stages/<method>/<name>-<key>/``, so

* a finished proxy is never retrained (its key covers its mixture and settings, so two
  sweeps that share a mixture share the proxy), and an interrupted sweep trains only the
  proxies it lacks (an interrupted proxy resumes from its checkpoint);
* a proxy that fails is reported (``failed.json`` in its directory, a warning, a row of
  ``mixtures.csv``) and left out; the sweep refuses to continue with fewer successes than
  its minimum;
* a proxy paused by ``stop_after_steps`` is not a failure: it stops the sweep with one line
  (:class:`~dograph.runs.pipeline.StageIncomplete`; ``paused.json`` tells a launcher's jobs apart)
  and the same command resumes it;
* main runs that share a sweep (seeds under a parallel launcher) serialise on the sweep
  directory's lock (``<sweep dir>/.lock``) while they train what it lacks and write its files,
  and every file is written under a temporary name of its own, then renamed.

The launcher is the user's (``mixer.launcher``): ``basic`` (default) trains the missing
proxies one after another in this process, as Hydra's basic launcher would; any other
Hydra launcher (``joblib`` for local parallelism, ``submitit_slurm`` or the example
``conf/hydra/launcher/slurm.yaml`` for a cluster) runs them as a Hydra multirun of
``python -m dograph.runs.sweep_job`` with ``mixer.launcher_overrides`` (e.g.
``[hydra.launcher.n_jobs=2]``). Results are always read from the proxies' own files
(``stage.json``: the final validation of every domain), never from W&B, into
``<sweep dir>/mixtures.csv``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dograph.config import RunConfig
from dograph.distributed import DistContext, barrier, from_main
from dograph.errors import ConfigError, DataError
from dograph.runs.pipeline import (
    StageEnvironment,
    StageIncomplete,
    StageResult,
    StageSpec,
    TrainFn,
    locate_stage,
    note_other_commit,
    read_marker,
    run_stage,
    stage_config,
    stage_environment,
    stage_lock,
    stage_result,
    write_text_atomically,
)

log = logging.getLogger(__name__)

FAILED = "failed.json"
PAUSED = "paused.json"  # a proxy stopped by stop_after_steps (written before the pause is raised)
BASIC = "basic"


@dataclass(frozen=True)
class SweepSpec:
    """A method's proxy sweep: one stage per mixture (over the dataset's domains, in its order)."""

    name: str  # stage name of every proxy, e.g. "proxy"
    mixer: dict[str, Any]  # the proxies' mixer node; each gets its own "mixture"
    mixtures: list[list[float]]
    settings: dict[str, Any]  # stage settings shared by every proxy (model, trainer, max_steps, seed, ...)
    min_success: int = 1
    launcher: str = BASIC
    launcher_overrides: tuple[str, ...] = ()

    def proxy(self, index: int) -> StageSpec:
        return StageSpec(self.name, {**self.mixer, "mixture": list(self.mixtures[index])}, dict(self.settings))


@dataclass
class ProxyOutcome:
    index: int
    mixture: list[float]
    run_dir: Path
    result: StageResult | None = None
    error: str | None = None
    paused: str | None = None  # the pause's one line: the sweep stops, the same command resumes it

    @property
    def ok(self) -> bool:
        return self.result is not None


@dataclass
class SweepResult:
    """What a sweep produced: every proxy's outcome, and where its table is."""

    method: str
    name: str
    domains: list[str]
    directory: Path
    outcomes: list[ProxyOutcome] = field(default_factory=list)

    @property
    def successful(self) -> list[ProxyOutcome]:
        return [o for o in self.outcomes if o.ok]

    @property
    def table(self) -> Path:
        return self.directory / "mixtures.csv"

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(mixtures [n, D], per-domain validation losses [n, D]) of the successful proxies."""
        ok = self.successful
        mixtures = np.array([o.mixture for o in ok], dtype=np.float64).reshape(len(ok), len(self.domains))
        losses = np.array([[o.result.final_eval.get(f"val/{d}/loss", np.nan) for d in self.domains] for o in ok],
                          dtype=np.float64).reshape(len(ok), len(self.domains))
        return mixtures, losses

    def wall_time_s(self) -> float:
        return float(sum(o.result.wall_time_s for o in self.successful))


def check_sweep(spec: SweepSpec, domains: Sequence[str]) -> None:
    """One-line errors for a sweep that cannot work."""
    if not spec.mixtures:
        raise ConfigError(f"the {spec.name} sweep has no mixtures")
    bad = [i for i, m in enumerate(spec.mixtures) if len(m) != len(domains)]
    if bad:
        raise ConfigError(f"sweep mixture {bad[0]} has {len(spec.mixtures[bad[0]])} entries; the dataset has "
                          f"{len(domains)} domains")
    if not 1 <= spec.min_success <= len(spec.mixtures):
        raise ConfigError(f"mixer.min_proxies must be in [1, {len(spec.mixtures)}] (the number of proxies), "
                          f"got {spec.min_success}")


def sweep_directory(main: RunConfig, method: str, spec: SweepSpec, keys: list[str]) -> Path:
    digest = hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:12]
    return Path(main.paths.output_root) / "stages" / method / f"{spec.name}-sweep-{digest}"


def sweep_lock(directory: Path, dist: DistContext) -> contextlib.AbstractContextManager[None]:
    """The sweep directory's lock (``.lock`` inside it, so globs of sibling sweeps never meet it)."""
    return stage_lock(directory, dist, what="sweep", lock_file=directory / ".lock")


def record_failure(run_dir: Path, index: int, exc: BaseException, name: str = FAILED) -> str:
    """Write ``failed.json`` (or ``paused.json``) next to the proxy's files; returns the one-line reason."""
    reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
    write_text_atomically(run_dir / name, json.dumps({"index": index, "error": reason,
                                                      "traceback": traceback.format_exc()}, indent=2))
    return reason


def sweep_environment(main: RunConfig, method: str, spec: SweepSpec, dist: DistContext) -> StageEnvironment:
    return stage_environment(main, dist, [stage_config(main, method, spec.proxy(0))])


def train_proxy(main: RunConfig, method: str, spec: SweepSpec, index: int, dist: DistContext,
                train: TrainFn, env: StageEnvironment | None = None) -> ProxyOutcome:
    """Reuse, resume or train one proxy; a failure is recorded, not raised (single process).

    A pause (``stop_after_steps``) is raised, not recorded as a failure: the sweep stops and the
    same command resumes it (``paused.json`` says so to a launcher's caller).
    """
    env = env or sweep_environment(main, method, spec, dist)
    proxy = spec.proxy(index)
    _, _, run_dir = locate_stage(main, method, proxy, {}, env)
    if dist.is_main:
        (run_dir / PAUSED).unlink(missing_ok=True)
    try:
        result = run_stage(main, method, proxy, {}, dist, train, env=env, quiet=True)
    except StageIncomplete as exc:
        if dist.is_main:
            record_failure(run_dir, index, exc, PAUSED)
        raise
    except Exception as exc:  # a failed proxy is reported and left out, the sweep goes on
        if dist.enabled:
            raise  # the other ranks would wait forever: under torchrun a failure stops the job
        reason = record_failure(run_dir, index, exc)
        log.warning("%s proxy %d failed (%s): left out of the fit; its files are in %s", method, index, reason,
                    run_dir)
        return ProxyOutcome(index, spec.mixtures[index], run_dir, error=reason)
    if dist.is_main:
        (run_dir / FAILED).unlink(missing_ok=True)
    return ProxyOutcome(index, spec.mixtures[index], run_dir, result=result)


def _launch_multirun(main: RunConfig, method: str, spec: SweepSpec, missing: list[int], directory: Path,
                     env: StageEnvironment) -> None:
    """Train ``missing`` proxies as a Hydra multirun of ``dograph.runs.sweep_job`` (under the sweep's lock).

    The jobs get this run's stage environment (``sweep.json``), so they compute the keys it computed
    and train on the device type it resolved.
    """
    job_file = directory / "sweep.json"
    write_text_atomically(job_file, json.dumps({"main": asdict(main), "method": method, "spec": asdict(spec),
                                                "environment": env.to_dict()}, default=str))
    command = [sys.executable, "-m", "dograph.runs.sweep_job", "--multirun", f"job.file={job_file}",
               f"job.index={','.join(str(i) for i in missing)}", f"hydra/launcher={spec.launcher}",
               f"hydra.sweep.dir={directory / 'multirun'}", *spec.launcher_overrides]
    log.info("%s: %d proxies through Hydra's %s launcher: %s", method, len(missing), spec.launcher, " ".join(command))
    logfile = directory / "launcher.log"
    with open(logfile, "a") as out:  # every launch's output, one after another (the sweep lock is held)
        out.write(f"==== {time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()}: {' '.join(command)}\n")
        out.flush()
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ}, check=False)
    if proc.returncode != 0:
        tail = logfile.read_text().strip().splitlines()[-1:] or ["(no output)"]
        log.warning("the %s launcher exited with status %d (%s; see %s): the proxies it completed are kept",
                    spec.launcher, proc.returncode, tail[0], logfile)


def _read_outcome(run_dir: Path) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """(stage record, pause, failure) of a proxy from its own files."""
    record = read_marker(run_dir)
    if record is not None:
        return record, None, None
    paused, failed = run_dir / PAUSED, run_dir / FAILED
    if paused.exists():
        return None, json.loads(paused.read_text()).get("error", "paused"), None
    return None, None, json.loads(failed.read_text()).get("error", "failed") if failed.exists() else "did not complete"


def _gather(method: str, spec: SweepSpec, located: list[tuple[RunConfig, str, Path]], trained: list[int],
            env: StageEnvironment, dist: DistContext) -> list[ProxyOutcome]:
    """Every proxy's outcome from its own files (read on rank 0, shared)."""
    found = from_main(dist, lambda: [_read_outcome(run_dir) for _, _, run_dir in located])
    outcomes, other_commits = [], []
    for i, ((_, key, run_dir), (record, paused, error)) in enumerate(zip(located, found, strict=True)):
        if record is None:
            outcomes.append(ProxyOutcome(i, spec.mixtures[i], run_dir, error=error, paused=paused))
            continue
        result = stage_result(method, spec.proxy(i), key, run_dir, record, reused=i not in trained)
        outcomes.append(ProxyOutcome(i, spec.mixtures[i], run_dir, result=result))
        if result.reused and (record.get("git") or {}).get("commit") != env.git.get("commit"):
            other_commits.append(record)
    if other_commits:  # one line for the sweep
        others = f" (and {len(other_commits) - 1} other reused proxies)" if len(other_commits) > 1 else ""
        note_other_commit(f"{method} proxy {other_commits[0].get('key')}{others}", other_commits[0], env)
    return outcomes


def write_table(result: SweepResult, settings: dict[str, Any]) -> None:
    """``mixtures.csv``: one row per proxy: status, mixture, per-domain validation loss, steps, seed, directory."""
    header = ["index", "status", *(f"w:{d}" for d in result.domains), *(f"loss:{d}" for d in result.domains),
              "val_avg_loss", "steps", "seed", "wall_time_s", "run_dir", "error"]
    rows = []
    for o in result.outcomes:
        evals = o.result.final_eval if o.ok else {}
        status = "ok" if o.ok else "paused" if o.paused else "failed"
        rows.append([o.index, status, *o.mixture,
                     *(evals.get(f"val/{d}/loss", "") for d in result.domains), evals.get("val/avg_loss", ""),
                     o.result.steps if o.ok else "", settings.get("seed", 0),
                     o.result.wall_time_s if o.ok else "", str(o.run_dir), o.paused or o.error or ""])
    text = io.StringIO(newline="")
    csv.writer(text).writerows([header, *rows])
    write_text_atomically(result.table, text.getvalue())


def run_sweep(main: RunConfig, method: str, spec: SweepSpec, domains: Sequence[str], dist: DistContext,
              train: TrainFn) -> SweepResult:
    """Train the proxies a sweep lacks (with its launcher), then gather every proxy's result.

    Under the sweep directory's lock: main runs that share the sweep take turns (the second
    finds the proxies complete), so its files are never written by two at once.
    """
    check_sweep(spec, domains)
    env = sweep_environment(main, method, spec, dist)
    located = [locate_stage(main, method, spec.proxy(i), {}, env) for i in range(len(spec.mixtures))]
    keys = [key for _, key, _ in located]
    directory = sweep_directory(main, method, spec, keys)
    with sweep_lock(directory, dist):
        records = from_main(dist, lambda: [read_marker(run_dir) for _, _, run_dir in located])
        missing = [i for i, record in enumerate(records) if record is None]
        log.info("%s: %d proxies, %d to train (%s launcher)", method, len(keys), len(missing), spec.launcher)
        if missing and spec.launcher != BASIC:
            if dist.enabled:
                raise ConfigError(f"mixer.launcher={spec.launcher} cannot be used under torchrun: run the sweep "
                                  "without torchrun (or with mixer.launcher=basic)")
            _launch_multirun(main, method, spec, missing, directory, env)
        elif missing:
            for number, index in enumerate(missing, 1):
                log.info("%s: proxy %d (%d of %d to train)", method, index, number, len(missing))
                train_proxy(main, method, spec, index, dist, train, env)  # a pause stops the sweep here
        barrier(dist)
        result = SweepResult(method, spec.name, list(domains), directory,
                             _gather(method, spec, located, missing, env, dist))
        if dist.is_main:
            write_table(result, spec.settings)
    paused = [o for o in result.outcomes if o.paused]
    if paused:  # a launcher's jobs paused (stop_after_steps)
        raise StageIncomplete(f"{len(paused)} of {len(keys)} {method} proxies stopped before their last step "
                              f"(stop_after_steps), the first in {paused[0].run_dir}: run the same command again "
                              "to resume them")
    failed = [o for o in result.outcomes if not o.ok]
    if failed:
        log.warning("%s: %d of %d proxies failed and are left out (%s)", method, len(failed), len(keys),
                    "; ".join(f"{o.index}: {o.error}" for o in failed[:3]))
    if len(result.successful) < spec.min_success:
        raise DataError(f"only {len(result.successful)} of {len(keys)} {method} proxies succeeded; the fit needs at "
                        f"least {spec.min_success} (mixer.min_proxies); see {result.table}")
    return result
