"""Regenerate paper artifacts at a scale: ``python -m experiments.reproduce table1 figure2 ... --scale smoke``.

For the named artifacts (``paper`` = all of them) it gathers the runs they need, finds them in the
results index of the scale's runs root, trains the missing ones (scales with ``launch: train``) or
prints the Hydra multiruns that make them (``launch: print``), then builds every artifact from the
runs that exist into ``results/<scale>/`` and writes the index there (``index.csv``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path
from types import ModuleType

from experiments.artifact import NothingToPlot
from experiments.index import build_index
from experiments.runs import describe_missing, missing_runs, relative, train_missing
from experiments.scale import SCALES, RunRequest, Scale, load_scale

TABLES = [f"table{i}" for i in range(1, 11)]
FIGURES = [f"figure{i}" for i in range(1, 6)]
ARTIFACTS = TABLES + FIGURES


def artifact_module(name: str) -> ModuleType:
    if name not in ARTIFACTS:
        raise ValueError(f"unknown artifact {name!r}: choose from {', '.join(ARTIFACTS)} or paper")
    return importlib.import_module(f"experiments.{name}")


def needed_runs(modules: list[ModuleType], scale: Scale) -> list[RunRequest]:
    out: list[RunRequest] = []
    for module in modules:
        out += [r for r in module.requests(scale) if r not in out]
    return out


def reproduce(names: list[str], scale: Scale, *, train: bool | None = None) -> dict[str, list[Path]]:
    """Build ``names`` at ``scale``; returns the files written per artifact (an empty list: not built)."""
    started = time.time()
    modules = [artifact_module(n) for n in names]
    requests = needed_runs(modules, scale)
    missing = missing_runs(build_index([scale.runs_root]), requests)
    print(f"scale {scale.name}: {len(names)} artifacts need {len(requests)} runs; {len(missing)} missing "
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
    for name, module in zip(names, modules, strict=True):
        lacking = missing_runs(index, module.requests(scale))
        try:
            written[name] = module.build(index, scale, out_dir)
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
    names = ARTIFACTS if "paper" in args.artifacts else list(dict.fromkeys(args.artifacts))
    try:
        for name in names:
            artifact_module(name)
        scale = load_scale(args.scale, runs_root=args.runs_root, results_dir=args.results_dir)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    reproduce(names, scale, train=args.train)
    return 0


if __name__ == "__main__":
    sys.exit(main())
