"""Regenerate paper artifacts at a scale: ``python -m experiments.reproduce table1 figure2 ... --scale smoke``.

For the named artifacts of ``experiments.paper`` (``paper`` = all of them; or of ``experiments.planted``,
``planted`` = all of them, at ``--scale planted``) it gathers the runs they
need, finds them in the results index of the scale's runs root and its committed run records
(``results/<scale>/runs/``), trains the missing ones in priority order (scales with ``launch:
train``; ``--jobs`` side by side, ``--budget`` bounds the time and the same command continues) or
prints the Hydra multiruns that make them (``launch: print``), records each run that completes,
then builds every artifact from the runs that exist into ``results/<scale>/`` and writes the runs
it read there (``index.csv``). The last line says how many of the runs exist.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from experiments.artifact import Artifact, NothingToPlot
from experiments.index import IDENTITY, build_index, complete
from experiments.paper import ARTIFACTS, TRAINING_PRIORITY
from experiments.pays import PAYS_ARTIFACTS
from experiments.planted import PLANTED_ARTIFACTS
from experiments.records import portable, record_missing, records_root, stale_records, write_record
from experiments.runs import describe_missing, missing_runs, relative, train_missing
from experiments.scale import SCALES, RunRequest, Scale, load_scale, rows_for

UNKNOWN_RUN_S = 900.0  # the estimate of a run with no measured run of its model yet (15 minutes)
LOCAL_COLUMNS = ("source", "record", "overrides")  # index columns that depend on where the runs are read from


GROUPS: dict[str, dict[str, Artifact]] = {"paper": ARTIFACTS, "planted": PLANTED_ARTIFACTS, "pays": PAYS_ARTIFACTS}


def artifacts_named(names: list[str]) -> list[Artifact]:
    """The artifacts ``names`` names, in order: entries of a registry (``experiments.paper.ARTIFACTS``,
    ``experiments.planted.PLANTED_ARTIFACTS``, ``experiments.pays.PAYS_ARTIFACTS``), or a whole registry by its
    group name (``paper``, ``planted``, ``pays``)."""
    known: dict[str, Artifact] = {name: a for registry in GROUPS.values() for name, a in registry.items()}
    unknown = [n for n in names if n not in known and n not in GROUPS]
    if unknown:
        choices = "; ".join(f"{', '.join(registry)} or {group}" for group, registry in GROUPS.items())
        raise ValueError(f"unknown artifact {unknown[0]!r}: choose from {choices}")
    chosen = [a for group, registry in GROUPS.items() if group in names for a in registry.values()]
    return chosen + [known[n] for n in dict.fromkeys(names) if n not in GROUPS and known[n] not in chosen]


def group_of(artifact: Artifact) -> str:
    return next(group for group, registry in GROUPS.items() if artifact.name in registry)


def check_scale(artifacts: list[Artifact], scale: Scale) -> None:
    """Each registry's artifacts are built at the scales of its group (``group:`` in the scale's yaml): the paper's
    at smoke, cpu or paper, the planted study's at planted, the pays study's at pays."""
    for artifact in artifacts:
        group = group_of(artifact)
        if group != scale.group:
            at = [name for name in SCALES if load_scale(name).group == group]
            raise ValueError(f"{artifact.name} is a {group} artifact: build it at {' or '.join(at)} (--scale), not "
                             f"at the {scale.name} scale (its artifacts: {', '.join(GROUPS[scale.group])} or "
                             f"{scale.group})")


def needed_runs(artifacts: list[Artifact], scale: Scale) -> list[RunRequest]:
    """Every run the artifacts read, once, in training priority: the artifacts of :data:`TRAINING_PRIORITY` first
    (in its order), then the rest in table order; within an artifact seed by seed (every method at seed 0 first),
    so a partial study already compares every method."""
    rank = {name: i for i, name in enumerate(TRAINING_PRIORITY)}
    ordered = sorted(artifacts, key=lambda a: rank.get(a.name, len(rank)))
    out: list[RunRequest] = []
    for artifact in ordered:
        asked = artifact.requests(scale)
        by_seed = sorted(range(len(asked)), key=lambda i: (asked[i].seed, i))
        out += [r for r in (asked[i] for i in by_seed) if r not in out]
    return out


def parse_budget(text: str) -> float:
    """``100m``, ``2h``, ``90s`` or a bare number of minutes, as seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise ValueError(f"cannot read the budget {text!r}: write minutes (100), or 100m, 2h, 90s")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "": 60}[match.group(2)]


def estimate_run_s(roots: list[Path], scale: Scale) -> Callable[[RunRequest], float]:
    """Seconds a missing run should take, from the measured runs and records of the scale: the median process
    time (``wall_s``) of runs of its method and model (else of its model, else :data:`UNKNOWN_RUN_S`), plus the
    median cost of the method's earlier stages when none of them is complete under the runs root yet.

    The index is read again at every call, so a run that completed during this invocation informs the next
    estimate."""

    def estimate(request: RunRequest) -> float:
        done = complete(build_index(roots))
        timed = done[done["wall_s"].notna()] if "wall_s" in done.columns else done.iloc[0:0]
        same = timed[(timed["method"] == request.method) & (timed["model"] == request.model)]
        pool = same if not same.empty else timed[timed["model"] == request.model]
        seconds = float(pool["wall_s"].median()) if not pool.empty else UNKNOWN_RUN_S
        staged = done[(done["method"] == request.method) & (done["stages"] > 0)] if "stages" in done else done[:0]
        if not staged.empty and not any((scale.runs_root / "stages" / request.method).glob("*/stage.json")):
            seconds += float(staged["stage_time_s"].median())
        return seconds

    return estimate


def index_roots(scale: Scale) -> list[Path]:
    """Where the scale's runs are read from: its runs root and records, then those of the scales it ``reads``
    (their runs made with the same overrides have the same fingerprint, so they are the same runs)."""
    roots = [scale.runs_root, records_root(scale)]
    for name in scale.reads:
        other = load_scale(name)
        roots += [other.runs_root, records_root(other)]
    return roots


def made_elsewhere(scale: Scale) -> dict[str, str]:
    """``{fingerprint: scale name}`` of the runs the scales ``scale`` reads ask for: they are made there, once."""
    out: dict[str, str] = {}
    for name in scale.reads:
        other = load_scale(name)
        for artifact in GROUPS[other.group].values():
            out.update({r.fingerprint: name for r in artifact.requests(other) if r.fingerprint not in out})
    return out


def reproduce(artifacts: list[Artifact], scale: Scale, *, train: bool | None = None, jobs: int | None = None,
              budget_s: float | None = None) -> dict[str, list[Path]]:
    """Build ``artifacts`` at ``scale``; returns the files written per artifact name (an empty list: not built).

    Training (``train``, default: the scale's ``launch``) runs the missing runs in priority order,
    ``jobs`` side by side (default: the scale's), within ``budget_s`` seconds when given; each run
    that completes is recorded into ``results/<scale>/runs/`` at once (:mod:`experiments.records`).
    The last line printed says how many of the runs exist.
    """
    started = time.time()
    requests = needed_runs(artifacts, scale)
    roots = index_roots(scale)
    index = build_index(roots)
    for where, why in stale_records(index, requests, scale):
        print(f"stale record (not read): {where}: {why}")
    missing = missing_runs(index, requests)
    print(f"scale {scale.name}: {len(artifacts)} artifacts need {len(requests)} runs; {len(missing)} missing "
          f"(runs root {relative(scale.runs_root)}, records {relative(records_root(scale))})", flush=True)
    elsewhere = made_elsewhere(scale)
    for name in dict.fromkeys(elsewhere[r.fingerprint] for r in missing if r.fingerprint in elsewhere):
        count = sum(elsewhere.get(r.fingerprint) == name for r in missing)
        print(f"{count} of the missing runs are the {name} scale's: not trained here (they count once made there: "
              f"python -m experiments.reproduce {load_scale(name).group} --scale {name})", flush=True)
    missing = [r for r in missing if r.fingerprint not in elsewhere]
    if missing and (scale.launch == "train" if train is None else train):
        def record(request: RunRequest, run_dir: Path) -> None:
            print(f"      record: {relative(write_record(run_dir, records_root(scale)))}", flush=True)

        outcome = train_missing(missing, scale, jobs=jobs or scale.jobs, budget_s=budget_s,
                                estimate_s=estimate_run_s(roots, scale), on_done=record)
        if outcome.failed:
            print(f"{len(outcome.failed)} runs failed; their artifacts show them as not available:", flush=True)
            for request, log_path in outcome.failed.items():
                print(f"  {request.label()}: {log_path}")
    elif missing:
        print("these runs are missing; the artifacts are built from the runs that exist:")
        print(describe_missing(missing, scale))
    index = build_index(roots)
    for path in record_missing(index, requests, records_root(scale), scale.runs_root):
        print(f"record: {relative(path)} (a run made earlier)")
    index = build_index(roots)
    out_dir = scale.results_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    write_index_csv(index, requests, out_dir / "index.csv")
    written: dict[str, list[Path]] = {}
    for artifact in artifacts:
        name = artifact.name
        lacking = missing_runs(index, artifact.requests(scale))
        try:
            written[name] = artifact.build(index, scale, out_dir)
        except NothingToPlot as exc:
            written[name] = []
            print(f"{name}: not built ({exc})")
            print(describe_missing(lacking, scale))
            continue
        files = ", ".join(p.name for p in written[name])
        print(f"{name}: {files}" + (f" ({len(lacking)} of its runs missing: not available)" if lacking else ""))
    print(f"done in {time.time() - started:.0f} s: {relative(out_dir)}/ ({sum(len(v) for v in written.values())} "
          "files, index.csv)")
    left = len(missing_runs(index, requests))
    print(f"{len(requests) - left} of {len(requests)} runs done"
          + ("; run the same command to continue" if left else ""))
    return written


def write_index_csv(index: pd.DataFrame, requests: list[RunRequest], path: Path) -> None:
    """The runs the artifacts read, one row per request, as ``index.csv``: machine-independent (each run named by
    its record when it has one, relative to the file's folder, else by its directory relative to the
    repository; no local-only columns), so a rebuild from the records alone writes the same file."""
    rows = rows_for(index, requests).copy()
    if not rows.empty:
        named = rows["record"] if "record" in rows.columns else pd.Series(None, index=rows.index)
        rows["run_dir"] = [_name_from(path.parent, r if isinstance(r, str) else d)
                           for r, d in zip(named, rows["run_dir"], strict=True)]
    rows = rows.drop(columns=[c for c in LOCAL_COLUMNS if c in rows.columns])
    lead = [c for c in ("run_dir", *IDENTITY) if c in rows.columns]
    rows = rows[lead + sorted(c for c in rows.columns if c not in lead)]  # the order of reading must not show
    rows.to_csv(path, index=False)


def _name_from(folder: Path, run_dir: str) -> str:
    try:
        return str(Path(run_dir).resolve().relative_to(folder.resolve()))
    except ValueError:
        return portable(run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", help=f"paper, or any of {', '.join(ARTIFACTS)}; planted "
                        f"(--scale planted), or any of {', '.join(PLANTED_ARTIFACTS)}")
    parser.add_argument("--scale", default="smoke", choices=SCALES)
    parser.add_argument("--runs-root", help="where the runs are (default: the scale's runs_root)")
    parser.add_argument("--results-dir", help="where the artifacts go (default: results/<scale>)")
    train = parser.add_mutually_exclusive_group()
    train.add_argument("--train", dest="train", action="store_true", default=None, help="train missing runs")
    train.add_argument("--no-train", dest="train", action="store_false", help="only print the missing runs")
    parser.add_argument("--jobs", type=int, help="runs side by side, the cores shared out (default: the scale's jobs)")
    parser.add_argument("--budget", help="train only what fits in this time (100m, 2h, 90s; bare number: minutes), "
                        "in priority order; the same command continues")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        artifacts = artifacts_named(args.artifacts)
        scale = load_scale(args.scale, runs_root=args.runs_root, results_dir=args.results_dir)
        check_scale(artifacts, scale)
        budget_s = parse_budget(args.budget) if args.budget else None
        if args.jobs is not None and args.jobs < 1:
            raise ValueError(f"--jobs {args.jobs}: give 1 or more")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    reproduce(artifacts, scale, train=args.train, jobs=args.jobs, budget_s=budget_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
