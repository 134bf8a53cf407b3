"""Consistency of a short DoGraph run on a device with the same run on the CPU (fp32).

Two runs of ``Trainer.train_step`` with the DoGraph mixer (conf/mixer/dograph.yaml, a buffer of a
few batches so that clustering, the objective solve and the weighted update run within the first
steps), one on ``--device`` and one on the CPU: same initial weights (built on the CPU with one
seed, then moved), same precomputed batches (drawn on the CPU, then moved), fp32 without autocast.
The per-step losses are compared (max absolute and relative difference; pass when the relative
difference of every compared step is within ``--tol`` and both runs weighed the same number of
steps, at least one), and so are the mixer's cluster weights and assignments (reported only: a
cluster assignment can flip on a near-tie between devices).

    python -m benchmarks.consistency --device cuda          # gpt2_tiny, batch 8 x 64, 8 steps
    python -m benchmarks.consistency --device cpu --steps 4  # CPU vs CPU: identical, checks the plumbing
"""

from __future__ import annotations

import argparse
import gc
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    FixedSampler,
    add_shared_arguments,
    configure_process,
    load_model_config,
    make_model,
    make_trainer,
    precompute_batches,
    prepare_data,
    resolve_device,
    write_json,
)
from benchmarks.step_time import OBJECTIVES, build_mixer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_shared_arguments(parser)
    parser.set_defaults(model="gpt2_tiny", batch=8, seq=64, precision="fp32")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps of each run")
    parser.add_argument("--compare", type=int, default=None, help="first steps whose losses decide (default all)")
    parser.add_argument("--buffer-batches", type=int, default=3, help="mixer buffer N in batches (warm-up steps)")
    parser.add_argument("--m", type=int, default=4, help="number of clusters")
    parser.add_argument("--objective", choices=OBJECTIVES, default="uncertainty")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--tol", type=float, default=1e-3, help="largest relative loss difference that passes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    args.data, args.cache_dir = "random", None  # no tokenizer, no corpus: identical batches anywhere
    args.buffer_size = args.buffer_batches * args.batch
    return args


def train(args: argparse.Namespace, device: torch.device, workdir: Path) -> dict[str, Any]:
    """``args.steps`` DoGraph steps on ``device``; the losses and what the mixer did."""
    cfg = load_model_config(args.model)
    data = prepare_data("random", args.tokenizer, args.seq, args.seed, workdir, None)
    batches = [b.to(device) for b in precompute_batches(data, 4, args.batch, args.seq, torch.device("cpu"),
                                                          seed=args.seed)]
    torch.manual_seed(args.seed)
    model = make_model(cfg, data.vocab, torch.device("cpu"), eos_id=data.eos_id, seed=args.seed).to(device)
    mixer = build_mixer(args, device, data)
    trainer = make_trainer(args, device, model, mixer, FixedSampler(batches), workdir, weighted_update="fast")
    losses, warmup = [], []
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
        metrics = trainer.accumulator.flush()
        losses.append(float(metrics["train/loss"]))
        warmup.append(float(metrics.get("mixer/warmup", math.nan)))
    seconds = time.perf_counter() - start
    history = mixer.history
    out = {"device": str(device), "losses": losses, "mixer_warmup": warmup, "seconds": seconds,
           "weighted_steps": list(history.steps), "weights": [list(w) for w in history.weights],
           "assignments": [a.tolist() for a in history.assignments], "fallbacks": list(history.fallbacks),
           "backend": history.refreshes[-1].get("backend") if history.refreshes else None}
    del trainer, model, mixer, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def compare(args: argparse.Namespace, target: dict[str, Any], cpu: dict[str, Any]) -> dict[str, Any]:
    """Loss differences (decide), weight and assignment differences (reported)."""
    n = min(args.compare or args.steps, len(target["losses"]), len(cpu["losses"]))
    a, b = np.asarray(target["losses"][:n]), np.asarray(cpu["losses"][:n])
    abs_diff = np.abs(a - b)
    rel_diff = abs_diff / np.maximum(np.abs(b), 1e-12)
    same_weighted = target["weighted_steps"] == cpu["weighted_steps"]
    out: dict[str, Any] = {
        "compared_steps": n, "abs_diff": abs_diff.tolist(), "rel_diff": rel_diff.tolist(),
        "max_abs_diff": float(abs_diff.max()) if n else math.nan,
        "max_rel_diff": float(rel_diff.max()) if n else math.nan,
        "first_loss_rel_diff": float(rel_diff[0]) if n else math.nan,
        "weighted_steps": len(cpu["weighted_steps"]), "same_weighted_steps": same_weighted}
    if same_weighted and cpu["weights"]:
        w_t, w_c = np.asarray(target["weights"]), np.asarray(cpu["weights"])
        out["weights_max_abs_diff"] = float(np.abs(w_t - w_c).max())
        agree = [float(np.mean(np.asarray(x) == np.asarray(y)))
                 for x, y in zip(target["assignments"], cpu["assignments"], strict=True)]
        out["assignment_agreement_min"] = min(agree)
    out["passed"] = bool(n > 0 and np.all(np.isfinite(a)) and out["max_rel_diff"] <= args.tol
                         and same_weighted and len(cpu["weighted_steps"]) > 0)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    configure_process(args)
    device = resolve_device(args.device)
    args.tokenizer = args.tokenizer or load_model_config(args.model).tokenizer
    args.device_used = str(device)
    print(f"# Consistency: DoGraph {args.model}, batch {args.batch} x {args.seq}, {args.steps} steps, fp32, "
          f"buffer {args.buffer_size}, m = {args.m}: {device} vs cpu", flush=True)
    with tempfile.TemporaryDirectory(prefix="dograph-consistency-") as tmp:
        target = train(args, device, Path(tmp))
        cpu = train(args, torch.device("cpu"), Path(tmp))
    result = compare(args, target, cpu)
    for i, (x, y) in enumerate(zip(target["losses"], cpu["losses"], strict=True)):
        print(f"  step {i}: {device} {x:.6f}   cpu {y:.6f}   |diff| {abs(x - y):.2e}"
              + ("" if i in target["weighted_steps"] else "   (mixer warm-up)"))
    verdict = "PASS" if result["passed"] else "FAIL"
    print(f"max |diff| {result['max_abs_diff']:.3e}, max rel {result['max_rel_diff']:.3e} (tolerance {args.tol:g}); "
          f"weighted steps {result['weighted_steps']} (same on both: {result['same_weighted_steps']}); "
          f"cluster weights max |diff| {result.get('weights_max_abs_diff', math.nan):.2e}, "
          f"min assignment agreement {result.get('assignment_agreement_min', math.nan):.2f}: {verdict}", flush=True)
    return {"benchmark": "consistency", "args": vars(args), "target": target, "cpu": cpu, **result}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    write_json(args.out, run(args))


if __name__ == "__main__":
    main()
