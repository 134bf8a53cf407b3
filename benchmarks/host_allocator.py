"""The host allocator's effect on a training step: glibc's default vs ``heap`` (dograph/host_allocator.py).

The setting is per process, so the two cannot share one: each round starts one child process per
mode (order alternating), each child times a block of steps of the real ``Trainer.train_step``
(uniform, and DoGraph's one-backward step past its warm-up, with
``--quick``'s small buffer) and counts the step's minor page faults
and kernel time; the parent prints the per-round ratios and their medians.

    python -m benchmarks.host_allocator              # CPU: gpt2_tiny, batch 16 x 128 (about 3 minutes)
    python -m benchmarks.host_allocator --rounds 2 --steps 4   # about 1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table, print_load_at_end, write_json

MODES = ("system", "heap")
VARIANTS = ("uniform", "dograph")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="child processes per mode")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant in each child")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant in each child")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the children")
    parser.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a child writes its numbers here
    return parser.parse_args(argv)


def child(args: argparse.Namespace) -> None:
    """One process: uniform and DoGraph steps under the allocator mode of its environment."""
    import torch

    from baselines.uniform import UniformMixer
    from benchmarks import step_time
    from benchmarks.common import (
        FixedSampler,
        load_model_config,
        make_model,
        make_trainer,
        precompute_batches,
        prepare_data,
    )

    options = step_time.parse_args(["--quick", "--data", "random"]
                                   + (["--threads", str(args.threads)] if args.threads else []))
    device = step_time.setup(options)  # applies $DOGRAPH_HOST_ALLOCATOR (benchmarks.common.configure_process)
    out: dict[str, Any] = {"allocator": options.host_allocator, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="dograph-bench-") as tmp:
        data = prepare_data(options.data, options.tokenizer, options.seq, options.seed, Path(tmp), None)
        batches = precompute_batches(data, 8, options.batch, options.seq, device, seed=options.seed)
        cfg = load_model_config(options.model)
        for variant in VARIANTS:
            model = make_model(cfg, data.vocab, device, eos_id=data.eos_id, seed=options.seed)
            mixer = step_time.build_mixer(options, device, data) if variant == "dograph" else UniformMixer()
            trainer = make_trainer(options, device, model, mixer, FixedSampler(batches), Path(tmp))
            if variant == "dograph":
                step_time.fill_buffer(trainer, mixer, mixer.buffer_size // options.batch + 5, frozen=True)
            for _ in range(args.warmup):
                trainer.train_step()
            before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step()
            seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
            out[variant] = {"ms_per_step": 1000 * seconds / args.steps,
                            "faults_per_step": (after.ru_minflt - before.ru_minflt) / args.steps,
                            "kernel_ms_per_step": 1000 * (after.ru_stime - before.ru_stime) / args.steps,
                            "user_ms_per_step": 1000 * (after.ru_utime - before.ru_utime) / args.steps}
            trainer.accumulator.flush()
    Path(args.child).write_text(json.dumps(out))


def run_child(mode: str, args: argparse.Namespace, path: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.host_allocator", "--child", str(path),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = {**os.environ, "DOGRAPH_HOST_ALLOCATOR": mode}
    subprocess.run(command, env=env, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    load = os.getloadavg()
    print("# Host allocator: glibc's default (system) vs heap, gpt2_tiny batch 16 x 128, fresh process per block")
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.rounds} rounds x "
          f"{args.warmup} + {args.steps} steps per variant and mode", flush=True)
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="dograph-alloc-") as tmp:
        for round_index in range(args.rounds):
            order = MODES if round_index % 2 == 0 else MODES[::-1]
            for mode in order:
                results[mode].append(run_child(mode, args, Path(tmp) / f"{mode}-{round_index}.json"))
                got = results[mode][-1]
                print(f"  round {round_index + 1} {mode} ({got['allocator']} applied): " + ", ".join(
                    f"{v} {got[v]['ms_per_step']:.0f} ms/step, {got[v]['faults_per_step']:.0f} faults, "
                    f"{got[v]['kernel_ms_per_step']:.0f} ms kernel" for v in VARIANTS), flush=True)
    rows, numbers = [], {"rounds": results}
    for variant in VARIANTS:
        ratios = [h[variant]["ms_per_step"] / s[variant]["ms_per_step"]
                  for s, h in zip(results["system"], results["heap"], strict=True)]
        numbers[f"{variant}_heap_over_system"] = statistics.median(ratios)

        def median(mode: str, key: str, variant: str = variant) -> float:
            return statistics.median(r[variant][key] for r in results[mode])

        rows.append([variant, *(f"{median(m, 'ms_per_step'):.0f}" for m in MODES),
                     f"x{statistics.median(ratios):.3f}",
                     *(f"{median(m, 'faults_per_step'):,.0f}" for m in MODES),
                     *(f"{median(m, 'kernel_ms_per_step'):.0f}" for m in MODES)])
    print()
    print(markdown_table(["step", "ms/step system", "ms/step heap", "heap/system (median of rounds)",
                          "faults/step system", "faults/step heap", "kernel ms/step system",
                          "kernel ms/step heap"], rows))
    print_load_at_end()
    write_json(args.out, numbers)


if __name__ == "__main__":
    main()
