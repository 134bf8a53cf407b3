"""Runs per hour on this machine: one run at a time with every core vs several single-threaded runs side by side.

The cpu scale (``conf/reproduce/cpu.yaml``) is many small independent runs. On a 2-core machine
one run with 2 torch threads may use the cores worse than 2 runs with 1 thread each (small
matrices, Python overhead, the data pipeline and the mixer's serial work). This script trains the
same real runs (``run.py`` with the cpu scale's overrides, fewer steps) both ways in one
invocation and prints runs/hour of each and their ratio; the faster way is the cpu scale's
default (``jobs`` in ``conf/reproduce/cpu.yaml``).

    python -m benchmarks.cpu_jobs                 # uniform + dograph, 100 steps each (about 5 minutes)
    python -m benchmarks.cpu_jobs --steps 50 --methods uniform

For each method of ``--methods``, ``--jobs`` runs (seeds 0, 1, ...; default: the core count) are
trained both ways: ``sequential`` one after another with ``--jobs`` torch threads each,
``parallel`` all at once with 1 thread each; the order of the two ways alternates per method.
Runs write into a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def overrides(method: str, seed: int, steps: int, root: Path, tag: str) -> list[str]:
    """The cpu scale's overrides of one run, shortened to ``steps`` steps (validation at the end only)."""
    from experiments.scale import load_scale

    scale = load_scale("cpu")
    common = [o for o in scale.common if not o.startswith(("trainer.max_steps", "trainer.eval_every",
                                                           "trainer.ckpt_every"))]
    return [f"mixer={method}", "model=gpt2_tiny", "dataset=embedded", f"seed={seed}", *common,
            f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", f"trainer.ckpt_every={steps}",
            *scale.method_overrides.get(method, []), f"paths.output_root={root}",
            f"hydra.run.dir={root / tag / method}", "overwrite=true"]


def launch(method: str, seed: int, threads: int, steps: int, root: Path, tag: str) -> subprocess.Popen:
    env = {**os.environ, "DOGRAPH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1"}
    log = open(root / f"{tag}-{method}-{seed}.log", "w")  # noqa: SIM115 (closed with the process)
    command = [sys.executable, str(REPO / "run.py"), *overrides(method, seed, steps, root, f"{tag}-{seed}")]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)


def wait_all(processes: list[subprocess.Popen], root: Path) -> None:
    for process in processes:
        if process.wait() != 0:
            raise SystemExit(f"a benchmark run failed (exit {process.returncode}); logs in {root}")


def sequential(method: str, jobs: int, steps: int, root: Path) -> float:
    started = time.perf_counter()
    for seed in range(jobs):
        wait_all([launch(method, seed, jobs, steps, root, "sequential")], root)
    return time.perf_counter() - started


def parallel(method: str, jobs: int, steps: int, root: Path) -> float:
    started = time.perf_counter()
    wait_all([launch(method, seed, 1, steps, root, "parallel") for seed in range(jobs)], root)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["uniform", "dograph"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs per way (= threads of one "
                        "sequential run)")
    args = parser.parse_args(argv)
    print(f"machine: {os.cpu_count()} cores; {args.jobs} runs of gpt2_tiny, {args.steps} steps, the cpu scale's "
          f"overrides, per method: one after another with {args.jobs} threads vs side by side with 1 thread each",
          flush=True)
    totals = {"sequential": 0.0, "parallel": 0.0}
    with tempfile.TemporaryDirectory(prefix="dograph-cpu-jobs-") as tmp:
        root = Path(tmp)
        for i, method in enumerate(args.methods):
            took = {}
            for way in (["sequential", "parallel"] if i % 2 == 0 else ["parallel", "sequential"]):
                took[way] = (sequential if way == "sequential" else parallel)(method, args.jobs, args.steps, root)
                totals[way] += took[way]
            seq, par = took["sequential"], took["parallel"]
            print(f"  {method:<16} sequential {seq:7.1f} s, parallel {par:7.1f} s: runs/hour "
                  f"{3600 * args.jobs / seq:6.1f} vs {3600 * args.jobs / par:6.1f} "
                  f"(parallel/sequential x{seq / par:.2f})", flush=True)
    runs = args.jobs * len(args.methods)
    seq, par = totals["sequential"], totals["parallel"]
    print(f"all: runs/hour sequential {3600 * runs / seq:.1f}, parallel {3600 * runs / par:.1f}; "
          f"parallel/sequential = x{seq / par:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
