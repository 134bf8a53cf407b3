"""Training throughput: the project's step with mixer=uniform vs a plain PyTorch loop (docs/design.md section 5).

Three loops over the same model shape (same initial weights, one copy each), measured side by side
in one run, interleaved block by block:

1. ``plain``: a hand-written PyTorch loop: forward, mean token cross-entropy, backward, clip, AdamW.
2. ``trainer``: ``dograph.train.trainer.Trainer.train_step`` with ``baselines.uniform.UniformMixer`` (so the
   runner is ``PlainStep``: no mixer code in the step), fed the *same precomputed device batches*
   through a stand-in sampler: the data pipeline is excluded from both 1 and 2.
3. ``trainer + data``: ``Trainer.train_step`` with the real ``MixtureSampler`` over tokenized text
   (packing, tokenization, host-to-device copy included): the demo's tokens/s.

Target: ``trainer`` tokens/s >= ``plain`` tokens/s, i.e. a ratio of about 1.0 or more within noise.

    python -m benchmarks.throughput              # CPU: gpt2_tiny, batch 16 x 128 (about 1 minute)
    python -m benchmarks.throughput --quick      # about 30 s
    python -m benchmarks.throughput --device cuda  # GPU: gpt2_small, batch 48 x 512, bf16 autocast
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from baselines.uniform import UniformMixer
from benchmarks.common import (
    BenchData,
    FixedSampler,
    Timing,
    autocast_factory,
    configure_process,
    describe_model,
    fill_shape_defaults,
    load_model_config,
    make_model,
    make_parser,
    make_trainer,
    markdown_table,
    paired_ratio,
    precision_name,
    precompute_batches,
    prepare_data,
    print_header,
    resolve_device,
    time_interleaved,
    write_json,
)
from dograph.data.sampler import Batch
from dograph.models import count_parameters
from dograph.train.trainer import Trainer

LABELS = {"plain": "plain PyTorch loop (precomputed batches)",
          "trainer": "Trainer.train_step, mixer=uniform (same precomputed batches)",
          "trainer+data": "Trainer.train_step, mixer=uniform, real sampler (data pipeline included)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser(__doc__, "local: tests/helpers.build_local_corpus; embedded: the offline corpus (cached); "
                                  "random: random ids (no data-pipeline row)")
    parser.add_argument("--repeats", type=int, default=9, help="timed blocks per loop (median reported)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per timed block")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per loop before timing")
    parser.add_argument("--batches", type=int, default=8, help="distinct precomputed batches cycled through")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 repeats of 2 steps, 1 warm-up step (~30 s on CPU)")
    parser.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.warmup = 3, 2, 1
    return args


def plain_loop(model: torch.nn.Module, batches: list[Batch], args: argparse.Namespace,
               autocast: Callable[[], Any]) -> Callable[[], None]:
    """One step of a plain loop: forward, mean CE, backward, clip, AdamW (fused on CUDA, as the trainer's)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01,
                                  fused=True if next(model.parameters()).is_cuda else None)
    cycle = itertools.cycle(batches)

    def step() -> None:
        batch = next(cycle)
        with autocast():
            logits = model(input_ids=batch.input_ids).logits
            loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def build_loops(args: argparse.Namespace, device: torch.device, data: BenchData,
                workdir: Path) -> tuple[dict[str, Callable[[], None]], dict[str, Trainer]]:
    """The loops to time, each on its own copy of the model (same initial weights)."""
    cfg = load_model_config(args.model)
    batches = precompute_batches(data, args.batches, args.batch, args.seq, device, seed=args.seed)
    loops: dict[str, Callable[[], None]] = {}
    trainers: dict[str, Trainer] = {}
    model = make_model(cfg, data.vocab, device, eos_id=data.eos_id, seed=args.seed)
    print(describe_model(args.model, cfg, data.vocab, count_parameters(model)))
    loops["plain"] = plain_loop(model, batches, args, autocast_factory(device, args.precision))
    samplers: dict[str, Any] = {"trainer": FixedSampler(batches)}
    if data.run_data is not None:
        samplers["trainer+data"] = data.run_data.sampler
    for name, sampler in samplers.items():
        model = make_model(cfg, data.vocab, device, eos_id=data.eos_id, seed=args.seed)
        trainer = make_trainer(args, device, model, UniformMixer(), sampler, workdir, run_data=data.run_data)
        print(f"{name}: step runner {type(trainer.runner).__name__}, "
              f"precision {precision_name(device, args.precision)}")
        loops[name], trainers[name] = trainer.train_step, trainer
    return loops, trainers


def report(args: argparse.Namespace, timings: dict[str, Timing]) -> dict[str, Any]:
    """Print tokens/s per loop, the ratio to the plain loop and the Markdown table; return the numbers."""
    tokens = args.batch * args.seq
    plain = timings["plain"]
    rows, numbers = [], {}
    for name, timing in timings.items():
        tok_s = tokens / timing.median
        ratio = paired_ratio(plain, timing)
        numbers[name] = {"seconds_per_step": timing.samples, "median_s": timing.median, "tokens_per_s": tok_s,
                         "ratio_vs_plain": ratio}
        print(f"{LABELS[name]}: {tok_s:,.0f} tokens/s (median {timing.median * 1e3:.1f} ms/step, "
              f"blocks {timing.spread()}), x{ratio:.3f} of plain")
    ratio = numbers["trainer"]["ratio_vs_plain"]
    verdict = "meets" if ratio >= 0.97 else "BELOW"
    print(f"\nproject/plain tokens/s ratio (median of per-round ratios): {ratio:.3f}  "
          f"(target >= ~1.0 within noise: {verdict})")
    for name, timing in timings.items():
        ratio_text = "1.000 (reference)" if name == "plain" else f"{numbers[name]['ratio_vs_plain']:.3f}"
        rows.append([LABELS[name], f"{numbers[name]['tokens_per_s']:,.0f}", f"{timing.median * 1e3:.1f}", ratio_text])
    print(f"\n### Throughput: {args.model}, batch {args.batch} x {args.seq}, "
          f"{args.repeats} x {args.steps} steps per loop (median), device {args.device_used}\n")
    print(markdown_table(["loop", "tokens/s", "ms/step", "tokens/s ratio vs plain"], rows))
    return numbers


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure and print; return the numbers ``--out`` writes (``benchmarks/gpu_report.py`` calls this)."""
    configure_process(args)
    device = resolve_device(args.device)
    fill_shape_defaults(args, device)
    args.device_used = str(device)
    args.tokenizer = args.tokenizer or load_model_config(args.model).tokenizer
    print_header("Throughput: dograph Trainer (mixer=uniform) vs a plain PyTorch loop", device, args)
    with tempfile.TemporaryDirectory(prefix="dograph-bench-") as tmp:
        data = prepare_data(args.data, args.tokenizer, args.seq, args.seed, Path(tmp), args.cache_dir)
        print(f"data: {data.description}")
        print("precomputed batches are on the device before timing for `plain` and `trainer` "
              "(data pipeline excluded from both); `trainer+data` draws from the real sampler")
        loops, trainers = build_loops(args, device, data, Path(tmp))
        print(f"timing: {args.warmup} warm-up steps per loop, then {args.repeats} interleaved rounds of "
              f"{args.steps} steps per loop\n", flush=True)
        timings = time_interleaved(loops, warmup=args.warmup, repeats=args.repeats, calls=args.steps, device=device,
                                   after_block=lambda name: trainers[name].accumulator.flush() if name in trainers
                                   else None)
        numbers = report(args, timings)
    return {"benchmark": "throughput", "args": vars(args), "results": numbers}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    write_json(args.out, run(args))


if __name__ == "__main__":
    main()
