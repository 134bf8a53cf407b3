"""Regenerate paper artifacts at a scale: ``python -m experiments.reproduce table1 figure2 ... --scale smoke``.

For the named artifacts of ``experiments.paper`` (``paper`` = all of them) it gathers the runs they
need, finds them in the results index of the scale's runs root, trains the missing ones (scales
with ``launch: train``) or prints the Hydra multiruns that make them (``launch: print``), then
builds every artifact from the runs that exist into ``results/<scale>/`` and writes the index
there (``index.csv``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from experiments.artifact import Artifact, NothingToPlot
from experiments.index import build_index
from experiments.paper import ARTIFACTS
from experiments.runs import describe_missing, missing_runs, relative, train_missing
from experiments.scale import SCALES, RunRequest, Scale, load_scale


def artifacts_named(names: list[str]) -> list[Artifact]:
    """The entries of ``experiments.paper.ARTIFACTS`` for ``names`` (``paper``: all of them), in order."""
    if "paper" in names:
        return list(ARTIFACTS.values())
    unknown = [n for n in names if n not in ARTIFACTS]
    if unknown:
        raise ValueError(f"unknown artifact {unknown[0]!r}: choose from {', '.join(ARTIFACTS)} or paper")
    return [ARTIFACTS[n] for n in dict.fromkeys(names)]


def needed_runs(artifacts: list[Artifact], scale: Scale) -> list[RunRequest]:
    """Every run the artifacts read, once, in the order they first ask for it."""
    out: list[RunRequest] = []
    for artifact in artifacts:
        out += [r for r in artifact.requests(scale) if r not in out]
    return out


def reproduce(artifacts: list[Artifact], scale: Scale, *, train: bool | None = None) -> dict[str, list[Path]]:
    """Build ``artifacts`` at ``scale``; returns the files written per artifact name (an empty list: not built)."""
    started = time.time()
    requests = needed_runs(artifacts, scale)
    missing = missing_runs(build_index([scale.runs_root]), requests)
    print(f"scale {scale.name}: {len(artifacts)} artifacts need {len(requests)} runs; {len(missing)} missing "
          f"(runs root {relative(scale.runs_root)})", flush=True)
    if missing and (scale.launch == "train" if train is None else train):
        failed = train_missing(missing, scale)
        if failed:
            print(f"{len(failed)} runs failed; their artifacts show them as not available:", flush=True)
            for request, log_path in failed.items():
                print(f"  {request.label()}: {log_path}")
    elif missing:
        print("these runs are missing; the artifacts are built from the runs that exist:")
        print(describe_missing(missing, scale))
    index = build_index([scale.runs_root])
    out_dir = scale.results_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    index.to_csv(out_dir / "index.csv", index=False)
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
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", help=f"paper, or any of {', '.join(ARTIFACTS)}")
    parser.add_argument("--scale", default="smoke", choices=SCALES)
    parser.add_argument("--runs-root", help="where the runs are (default: the scale's runs_root)")
    parser.add_argument("--results-dir", help="where the artifacts go (default: results/<scale>)")
    train = parser.add_mutually_exclusive_group()
    train.add_argument("--train", dest="train", action="store_true", default=None, help="train missing runs")
    train.add_argument("--no-train", dest="train", action="store_false", help="only print the missing runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        artifacts = artifacts_named(args.artifacts)
        scale = load_scale(args.scale, runs_root=args.runs_root, results_dir=args.results_dir)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    reproduce(artifacts, scale, train=args.train)
    return 0


if __name__ == "__main__":
    sys.exit(main())
