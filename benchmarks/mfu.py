"""Uniform training throughput and model FLOPs utilisation (MFU) per model shape, with and without compile.

For each model (default gpt2_small and gpt2_medium on CUDA), a plain uniform step (forward, mean token
cross-entropy, backward, clip, fused AdamW) on random tokens of batch x seq, bf16 autocast on CUDA,
timed after warm-up; with ``--compile`` also ``torch.compile``d. Reports tokens/s, step time, CUDA
peak memory and MFU.

MFU = model FLOPs per token x tokens/s / peak FLOPs, with the PaLM accounting (Chowdhery et al.,
2022, appendix B): 6 N + 12 L d T FLOPs per token (N: non-embedding parameters + the output
layer, L layers, d model width, T sequence length). Peak: H100 SXM and H200 dense bf16 989.4 TFLOP/s
(NVIDIA datasheets); other cards: pass ``--peak-tflops``. On a CPU no MFU is computed.

    python -m benchmarks.mfu --device cuda                   # gpt2_small, gpt2_medium; 48 x 512; eager and compile
    python -m benchmarks.mfu --device cpu --quick            # gpt2_tiny, 4 x 32: proves the plumbing
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import load_model_config, make_model, markdown_table, resolve_device, sync, write_json
from dograph.data.tokenizer import tokenizer_vocab_size
from dograph.models import count_parameters

PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense bf16, NVIDIA datasheets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--models", nargs="+", default=None, help="default: gpt2_small gpt2_medium (CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="default 48 (CUDA), 4 (CPU)")
    parser.add_argument("--seq", type=int, default=None, help="default 512 (CUDA), 32 (CPU)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", choices=["both", "off", "on"], default="both")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak")
    parser.add_argument("--quick", action="store_true", help="gpt2_tiny, 4 x 32, 3 steps, eager only")
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def flops_per_token(model: torch.nn.Module, cfg: Any, seq: int) -> float:
    """6 N + 12 L d T (PaLM appendix B); N excludes the input embeddings (lookups are not FLOPs)."""
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    tied = cfg.tie_embeddings
    n = count_parameters(model) - embedding + (model.get_output_embeddings().weight.numel() if tied else 0)
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.d_model * seq


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def measure(name: str, device: torch.device, batch: int, seq: int, steps: int, warmup: int,
            compiled: bool) -> dict[str, Any]:
    cfg = load_model_config(name)
    vocab = tokenizer_vocab_size(cfg.tokenizer)
    model = make_model(cfg, vocab, device)
    step_model = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)
    bf16 = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = step_model(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    step_s = (time.perf_counter() - start) / steps
    out = {"model": name, "compile": compiled, "batch": batch, "seq": seq, "parameters": count_parameters(model),
           "step_s": step_s, "tokens_per_s": batch * seq / step_s, "warmup_s": warm_s,
           "flops_per_token": flops_per_token(model, cfg, seq),
           "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    models = args.models or (["gpt2_tiny"] if args.quick or not cuda else ["gpt2_small", "gpt2_medium"])
    batch = args.batch or (4 if args.quick or not cuda else 48)
    seq = args.seq or (32 if args.quick or not cuda else 512)
    steps = 3 if args.quick else args.steps
    modes = [False] if args.quick or args.compile == "off" else [True] if args.compile == "on" else [False, True]
    peak = peak_flops(device, args.peak_tflops)
    rows = []
    for name in models:
        for compiled in modes:
            try:
                r = measure(name, device, batch, seq, steps, 1 if args.quick else args.warmup, compiled)
            except Exception as exc:  # an OOM or a compile failure is a result, not the end of the report
                rows.append({"model": name, "compile": compiled, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            finally:
                gc.collect()  # the model and optimizer of this configuration go before the next is built
                if cuda:
                    torch.cuda.empty_cache()
            r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / peak if peak else None
            rows.append(r)
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (no peak for this device)"
            print(f"{name} compile={compiled}: {r['tokens_per_s']:,.0f} tokens/s, {r['step_s'] * 1e3:.1f} ms/step, "
                  f"MFU {mfu}", flush=True)
    table = markdown_table(["model", "compile", "tokens/s", "ms/step", "MFU", "peak memory"],
                           [[r["model"], r["compile"], f"{r.get('tokens_per_s', 0):,.0f}" if "error" not in r else
                             r["error"], f"{r['step_s'] * 1e3:.1f}" if "step_s" in r else "-",
                             f"{r['mfu']:.1%}" if r.get("mfu") else "n/a",
                             f"{r['peak_memory_bytes'] / 2**30:.1f} GiB" if r.get("peak_memory_bytes") else "n/a"]
                            for r in rows])
    print(table)
    result = {"device": str(device), "peak_flops": peak, "rows": rows, "target_mfu": 0.40}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    run(parse_args())
