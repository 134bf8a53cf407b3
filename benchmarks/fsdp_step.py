"""DoGraph's two weighted updates under FSDP2, side by side with the plain step (launched by torchrun).

Under ``trainer.parallelism=fsdp`` DoGraph can form its weighted update in one backward (``fast``:
whole weight gradients from the kept layer inputs and output-grads, reduce-scattered into the
shards by ``dograph.parallel.ShardedGradientReducer``) or in two passes (``two_pass``: the
capturing pass, then a second forward and an ordinary backward whose gradients FSDP
reduce-scatters). This times ``Trainer.train_step`` of uniform, DoGraph fast and DoGraph two-pass,
each on its own sharded copy of the model, interleaved, on the same per-rank random batches, and
reports what the fast path keeps alive until the step's weights are known (the inputs and
output-grads of every layer of every micro-batch: its extra memory) and, on CUDA, each variant's
peak allocated memory. The DoGraph mixers are past warm-up (their buffer filled at lr 0), so
assignment, statistics and the solve run every timed step.

    torchrun --nproc_per_node 2 -m benchmarks.fsdp_step --device cpu          # 2 gloo processes, gpt2_tiny
    torchrun --nproc_per_node 2 -m benchmarks.fsdp_step --device cpu --activation-checkpointing
    torchrun --nproc_per_node 8 -m benchmarks.fsdp_step --device cuda --model gpt2_medium

Rank 0 prints; every rank takes part in every step.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from baselines.uniform import UniformMixer
from benchmarks.common import (
    BenchData,
    FixedSampler,
    add_shared_arguments,
    fill_shape_defaults,
    fmt_bytes,
    fmt_ms,
    load_model_config,
    make_model,
    make_trainer,
    paired_ratio,
    peak_memory,
    precision_name,
    precompute_batches,
    time_interleaved,
    write_json,
)
from benchmarks.step_time import build_mixer, fill_buffer
from dograph.data.tokenizer import tokenizer_vocab_size
from dograph.distributed import init_distributed, shutdown
from dograph.models import count_parameters, per_sample_loss
from dograph.step.capture import GradientCapture

LABELS = {"uniform": "uniform (plain FSDP step)", "fast": "DoGraph one backward (fast)",
          "two_pass": "DoGraph two-pass"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_shared_arguments(parser)
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per rank per forward "
                        "(default: the whole per-rank batch, no accumulation)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="trainer.activation_checkpointing")
    parser.add_argument("--objective", default="uncertainty")
    parser.add_argument("--m", type=int, default=11)
    parser.add_argument("--buffer-size", type=int, default=None, help="default: conf/mixer/dograph.yaml")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timed block")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 repeats of 1 step, a buffer of 4 batches")
    parser.add_argument("--out", default=None, help="also write the numbers to this JSON file (rank 0)")
    args = parser.parse_args(argv)
    args.parallelism = "fsdp"
    if args.quick:
        args.repeats, args.steps, args.warmup = 3, 1, 1
    return args


class KeptBytes:
    """Wraps ``GradientCapture.apply_weights`` to add up what the capture kept for the update (per step)."""

    def __init__(self, capture: GradientCapture) -> None:
        self.per_step: list[int] = []
        apply = capture.apply_weights

        def counting(weights: list[torch.Tensor], *rest: Any, **kwargs: Any) -> None:
            seen: dict[int, int] = {}
            for micro_calls in capture.micro:
                for calls in micro_calls:
                    for call in calls:
                        for t in (*call.args, *call.kwargs.values(), call.output_grad):
                            if isinstance(t, torch.Tensor):
                                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            self.per_step.append(sum(seen.values()))
            apply(weights, *rest, **kwargs)

        capture.apply_weights = counting


def autograd_saved_bytes(trainer: Any, batch: Any) -> int:
    """Bytes autograd keeps for the backward of one plain forward (distinct storages of its saved tensors)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), trainer.autocast():
        loss = per_sample_loss(trainer.model, batch.input_ids, batch.targets).mean()
    loss.backward()  # completes FSDP's backward; the gradients are dropped
    trainer.optimizer.zero_grad(set_to_none=True)
    return sum(storages.values())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    dist = init_distributed(args.device)
    device = dist.device
    fill_shape_defaults(args, device)
    if args.quick and args.buffer_size is None:
        args.buffer_size = 4 * args.batch
    say = print if dist.is_main else (lambda *a, **k: None)
    cfg = load_model_config(args.model)
    vocab = tokenizer_vocab_size(args.tokenizer or cfg.tokenizer)
    per_rank = args.batch // dist.world_size
    micro = args.micro_batch or per_rank
    data = BenchData("random", vocab, 0, None, "random token ids")
    batches = precompute_batches(data, 8 * (per_rank // micro), micro, args.seq, device,
                                 seed=args.seed + 1000 * dist.rank)
    say(f"FSDP2 on {dist.world_size} ranks ({device.type}); {args.model}, global batch {args.batch} x {args.seq} "
        f"({per_rank} per rank, micro-batch {micro}); {precision_name(device, args.precision)}; "
        f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="fsdp-step-"))
    trainers, mixers, kept = {}, {}, None
    for name in LABELS:
        model = make_model(cfg, vocab, device, seed=args.seed)
        if name == "uniform":
            mixer = UniformMixer()
        else:
            mixer = mixers[name] = build_mixer(args, device, data, dist)
        trainers[name] = make_trainer(args, device, model, mixer, FixedSampler(batches), workdir,
                                      weighted_update="fast" if name == "fast" else "two_pass", dist=dist)
        if name == "fast":
            kept = KeptBytes(trainers[name].runner.capture)
    say(f"{count_parameters(trainers['uniform'].model) / 1e6:.2f} M parameters (sharded on dim 0)")
    fill_buffer(trainers["fast"], mixers["fast"], math.ceil(mixers["fast"].buffer_size / args.batch) + 5, frozen=True)
    mixers["two_pass"].load_state_dict(mixers["fast"].state_dict())
    saved = autograd_saved_bytes(trainers["uniform"], batches[0])
    memory: dict[str, float] = {}
    for name, trainer in trainers.items():  # one untimed step each, measured alone
        with peak_memory(device) as peak:
            trainer.train_step()
        memory[name] = peak["bytes"]
    timings = time_interleaved({n: t.train_step for n, t in trainers.items()}, warmup=args.warmup,
                               repeats=args.repeats, calls=args.steps, device=device)
    numbers: dict[str, Any] = {
        "world_size": dist.world_size, "device": device.type, "model": args.model, "batch": args.batch,
        "seq": args.seq, "micro_batch": micro,
        "activation_checkpointing": args.activation_checkpointing,
        "median_s": {n: t.median for n, t in timings.items()},
        "ratio_fast_uniform": paired_ratio(timings["fast"], timings["uniform"]),
        "ratio_two_pass_uniform": paired_ratio(timings["two_pass"], timings["uniform"]),
        "ratio_fast_two_pass": paired_ratio(timings["fast"], timings["two_pass"]),
        "fast_kept_bytes_per_rank": max(kept.per_step) if kept.per_step else 0,
        "plain_saved_bytes_per_micro_batch": saved,
        "peak_bytes": memory if device.type == "cuda" else None,
    }
    say()
    for name, timing in timings.items():
        say(f"{LABELS[name]}: median {fmt_ms(timing.median)}/step (blocks {timing.spread()})"
            + (f", peak {fmt_bytes(memory[name])} allocated above the model" if device.type == "cuda" else ""))
    say(f"fast/uniform x{numbers['ratio_fast_uniform']:.3f}   two-pass/uniform x{numbers['ratio_two_pass_uniform']:.3f}"
        f"   fast/two-pass x{numbers['ratio_fast_two_pass']:.3f}  (medians of per-round ratios, rank 0)")
    say(f"the fast path keeps {fmt_bytes(numbers['fast_kept_bytes_per_rank'])} per rank of layer inputs and "
        f"output-grads until the step is weighed (the two-pass update keeps none); a plain forward saves "
        f"{fmt_bytes(saved)} per micro-batch for its backward (autograd's saved tensors"
        + (", with activation checkpointing" if args.activation_checkpointing else "") + ")")
    if dist.is_main:
        write_json(args.out, numbers)
    for trainer in trainers.values():
        trainer.data.sampler.close()
    shutdown(dist)
    return numbers


if __name__ == "__main__":
    main()
