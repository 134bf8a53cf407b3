"""Data pipeline alone: tokens/s of tokenising, packing and sampling, prefetch off vs on, against an H100's need.

Sources (each built as a run builds it, ``dograph.data.builder.build_run_data``):

* ``embedded-bpe8k``: the offline embedded corpus with the default bpe8k tokenizer;
* ``embedded-gpt2``: the same corpus with the GPT-2 tokenizer;
* ``slimpajama-local``: a local directory in the SlimPajama hub schema (``train.jsonl`` and
  ``validation.jsonl``, records ``{"text", "meta": {"redpajama_set_name"}}``), written into a temp
  dir from the embedded corpus text and loaded as ``dataset=slimpajama_6b dataset.path=DIR`` loads a
  local copy (streamed by HF ``datasets``, filtered per domain), GPT-2 tokenizer;
* ``local-gpt2``: the tests' corpus from files on any machine (Python code, its docs, licences;
  ``tests/helpers.build_local_corpus``), GPT-2 tokenizer: what the GPU script measures, since the
  GPU machine has no embedded corpus.

Two measurements per source and prefetch setting, on the same windows (the sampler is rewound):

1. ``alone``: ``MixtureSampler.next_batch`` back to back: the pipeline's own tokens/s;
2. ``overlapped``: each batch is followed by a sleep of the H100 step time below (the training
   thread blocked on the GPU, GIL released): tokens/s the training loop would then reach, and the
   data stall per step (wall minus the simulated step). Prefetch helps here, not in 1.

The H100 figure is COMPUTED, not measured: GPT-2 Medium (294.5M parameters) in bf16 on one H100
takes an estimated ``6 * N * tokens / (989e12 * MFU 0.4)`` seconds for 48 x 512 = 24,576 tokens.

    python -m benchmarks.data_pipeline                  # all three sources (a few minutes on 2 cores)
    python -m benchmarks.data_pipeline --sources embedded-bpe8k --steps 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.common import CONF, REPO, build_local_corpus, load_yaml, markdown_table, print_load_at_end
from dograph.config import DataConfig
from dograph.data.builder import RunData, build_run_data, load_corpus
from dograph.data.sampler import MixtureSampler
from dograph.distributed import DistContext

SOURCES = ("embedded-bpe8k", "embedded-gpt2", "slimpajama-local", "local-gpt2")
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM
ASSUMED_MFU = 0.4
GPT2_MEDIUM_PARAMS = 294.5e6


def h100_step_seconds(tokens: int) -> float:
    """ESTIMATE (computed, not measured): 6 N tokens / (peak * MFU) for GPT-2 Medium in bf16 on one H100."""
    return 6 * GPT2_MEDIUM_PARAMS * tokens / (H100_BF16_PEAK * ASSUMED_MFU)


def slimpajama_records(cache: Path, docs_per_domain: int) -> Iterator[tuple[str, dict]]:
    """(split, record) pairs in the SlimPajama schema, from the embedded corpus text.

    Embedded domains are mapped onto the seven RedPajama set names in order (wrapping), so every
    set name has text; the first 40 documents of each domain go to the validation split.
    """
    names = load_yaml(CONF / "dataset" / "slimpajama_6b.yaml")["domains"]
    corpus = load_corpus(DataConfig(source="embedded"), cache_dir=cache, dist=DistContext())
    for i, source in enumerate(corpus.train):
        name = names[i % len(names)]
        for j, text in enumerate(source.documents()):
            if j >= docs_per_domain:
                break
            yield ("validation" if j < 40 else "train"), {"text": text, "meta": {"redpajama_set_name": name}}


def write_slimpajama_dir(out: Path, cache: Path, docs_per_domain: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w") as train, open(out / "validation.jsonl", "w") as val:
        for split, record in slimpajama_records(cache, docs_per_domain):
            (val if split == "validation" else train).write(json.dumps(record) + "\n")
    return out


def build(source: str, seq: int, cache: Path, workdir: Path, docs_per_domain: int) -> RunData:
    if source == "slimpajama-local":
        directory = write_slimpajama_dir(workdir / "slimpajama", cache, docs_per_domain)
        cfg = DataConfig(**{**load_yaml(CONF / "dataset" / "slimpajama_6b.yaml"), "path": str(directory)})
        tokenizer = "gpt2"
    elif source == "local-gpt2":
        directory = build_local_corpus(workdir / "local", bytes_per_domain=2_000_000)
        cfg, tokenizer = DataConfig(source="jsonl", path=str(directory), val_fraction=0.05), "gpt2"
    else:
        cfg, tokenizer = DataConfig(source="embedded"), source.split("-")[1]
    return build_run_data(cfg, tokenizer_name=tokenizer, seq_len=seq, cache_dir=cache, seed=0, dist=DistContext())


def run_variant(sampler: MixtureSampler, start: dict, prefetch_windows: int, batch: int, steps: int,
                warmup: int, step_s: float) -> float:
    """Seconds per step over ``steps`` steps after ``warmup``, from the same data position every time."""
    sampler.set_prefetch(prefetch_windows)
    sampler.load_state_dict(start)
    try:
        for _ in range(warmup):
            sampler.next_batch(batch)
            time.sleep(step_s)
        began = time.perf_counter()
        for _ in range(steps):
            sampler.next_batch(batch)
            if step_s:
                time.sleep(step_s)
        return (time.perf_counter() - began) / steps
    finally:
        sampler.close()


def measure(data: RunData, args: argparse.Namespace, step_s: float) -> dict[str, dict[str, float]]:
    """Median seconds per step of each (mode, prefetch) pair; variants alternate order every repeat."""
    sampler, start = data.sampler, data.sampler.state_dict()
    variants = [(mode, p) for mode in ("alone", "overlapped") for p in (0, args.prefetch)]
    times: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
    for repeat in range(args.repeats):
        order = variants if repeat % 2 == 0 else variants[::-1]
        for mode, prefetch in order:
            wait = step_s if mode == "overlapped" else 0.0
            times[(mode, prefetch)].append(run_variant(sampler, start, prefetch * args.batch, args.batch,
                                                       args.steps, args.warmup, wait))
    return {f"{mode}/prefetch={p}": {"s_per_step": statistics.median(t)} for (mode, p), t in times.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--prefetch", type=int, default=2, help="steps prepared ahead in the 'on' variant")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant and repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--docs-per-domain", type=int, default=3000, help="slimpajama-local: documents per set")
    parser.add_argument("--cache-dir", default=str(REPO / ".cache" / "dograph"),
                        help="corpus/tokenizer cache (the embedded corpus is built there on first use)")
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Measure every source; returns the estimate, the need and per source the (mode, prefetch) results."""

    tokens = args.batch * args.seq
    step_s = h100_step_seconds(tokens)
    need = tokens / step_s
    print(f"# data pipeline: batch {args.batch} x seq {args.seq} = {tokens:,} tokens per step, "
          f"prefetch 0 vs {args.prefetch} steps")
    print(f"H100 need (COMPUTED ESTIMATE, not measured): GPT-2 Medium {GPT2_MEDIUM_PARAMS / 1e6:.1f}M params, "
          f"bf16, MFU {ASSUMED_MFU}: step = 6*N*{tokens:,} / ({H100_BF16_PEAK:.3g} * {ASSUMED_MFU}) = "
          f"{step_s * 1e3:.1f} ms -> {need:,.0f} tokens/s consumed\n")
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        for source in args.sources:
            began = time.perf_counter()
            data = build(source, args.seq, Path(args.cache_dir), Path(tmp), args.docs_per_domain)
            print(f"{source}: {data.corpus.description}, {len(data.corpus.domains)} domains, "
                  f"tokenizer {len(data.tokenizer)} entries (built in {time.perf_counter() - began:.1f} s)")
            result = measure(data, args, step_s)
            results[source] = result
            for key, value in result.items():
                value["tokens_per_s"] = tokens / value["s_per_step"]
                value["ratio_to_h100_need"] = value["tokens_per_s"] / need
                stall = value["s_per_step"] - (step_s if key.startswith("overlapped") else 0.0)
                rows.append([source, key.split("/")[0], key.split("=")[1], f"{value['tokens_per_s']:,.0f}",
                             f"{need:,.0f} (est.)", f"{value['ratio_to_h100_need']:.2f}",
                             f"{max(stall, 0.0) * 1e3:.1f}" if key.startswith("overlapped") else "-"])
            for mode in ("alone", "overlapped"):
                off, on = result[f"{mode}/prefetch=0"], result[f"{mode}/prefetch={args.prefetch}"]
                print(f"  {mode}: prefetch on / off = {on['tokens_per_s'] / off['tokens_per_s']:.2f}x")
    print()
    print(markdown_table(["source", "mode", "prefetch (steps)", "tokens/s", "H100 GPT-2 Medium needs",
                          "ratio (pipeline / need)", "data stall per step (ms)"], rows))
    print("\n`alone`: the pipeline back to back. `overlapped`: a sleep of the estimated H100 step after each batch "
          "(the GPU busy, the GIL free); its stall is the time the step waited for data. The H100 need is computed, "
          "not measured.")
    print_load_at_end()
    report = {"h100_step_s_estimate": step_s, "need_tokens_per_s": need, "batch": args.batch, "seq": args.seq,
              "prefetch": args.prefetch, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    run(parse_args())


if __name__ == "__main__":
    main()
