"""Shared helpers of the benchmark scripts: device, machine description, timing, configs, data, tables.

Timing rules (project guide): ratios are measured side by side in one run, variants interleaved
block by block (the order rotates every repeat so none always runs first), warm-up calls are
excluded, and each variant reports the median over repeats of a block's seconds per call. On CUDA
every block is bracketed by ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from dograph.config import DataConfig, LoggerConfig, ModelConfig, TrainerConfig  # noqa: E402
from dograph.data.builder import RunData, build_run_data  # noqa: E402
from dograph.data.sampler import Batch  # noqa: E402
from dograph.data.tokenizer import tokenizer_vocab_size  # noqa: E402
from dograph.distributed import DistContext  # noqa: E402
from dograph.host_allocator import tune_host_allocator  # noqa: E402
from dograph.mixing import Mixer  # noqa: E402
from dograph.models import build_model  # noqa: E402
from dograph.train.metrics import MetricsWriter  # noqa: E402
from dograph.train.trainer import Trainer  # noqa: E402

GPU_DEFAULTS = {"model": "gpt2_small", "batch": 48, "seq": 512}
CPU_DEFAULTS = {"model": "gpt2_tiny", "batch": 16, "seq": 128}


# ---- device and machine ------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without CUDA is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def fill_shape_defaults(args: Any, device: torch.device) -> None:
    """``--model/--batch/--seq`` left unset take the device's defaults (gpt2_tiny on CPU, gpt2_small on GPU)."""
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def configure_process(args: Any) -> None:
    """``--threads`` and the host allocator (dograph/host_allocator.py), as ``run.py`` sets them up.

    Records the allocator in ``args.host_allocator`` (printed with the arguments): ``heap`` when the
    glibc settings are applied, ``system`` otherwise.
    """
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    args.host_allocator = "heap" if tune_host_allocator() else "system"


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_lines(device: torch.device) -> list[str]:
    """What the numbers were measured on, printed at the top of every benchmark."""
    import transformers

    lines = [f"CPU: {cpu_model_name()} ({os.cpu_count()} logical cores); torch threads "
             f"{torch.get_num_threads()} (inter-op {torch.get_num_interop_threads()})",
             f"torch {torch.__version__}, transformers {transformers.__version__}, Python "
             f"{sys.version.split()[0]}, {platform.platform()}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"GPU: {torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB, "
                     f"sm_{props.major}{props.minor}), CUDA {torch.version.cuda}")
    else:
        lines.append("GPU: none used (device cpu)")
    load = os.getloadavg()
    lines.append(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
                 "(other jobs on the same cores inflate and scatter every timing)")
    return lines


def print_header(title: str, device: torch.device, args: Any) -> None:
    print(f"# {title}")
    for line in machine_lines(device):
        print(line)
    print("arguments: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    print(flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_factory(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """The trainer's rule: bf16 autocast for ``bf16``, or ``auto`` on CUDA; fp32 otherwise."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")

    def make() -> contextlib.AbstractContextManager:
        if not bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    return make


def precision_name(device: torch.device, precision: str) -> str:
    return "bf16 autocast" if precision == "bf16" or (precision == "auto" and device.type == "cuda") else "fp32"


# ---- timing ---------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Seconds per call of each timed block (one entry per repeat)."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    def quantile(self, q: float) -> float:
        if not self.samples:
            return float("nan")
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def spread(self) -> str:
        """``min-max`` of the repeats, for judging the noise."""
        if not self.samples:
            return "n/a"
        return f"{min(self.samples) * 1e3:.1f}-{max(self.samples) * 1e3:.1f} ms"


def time_block(fn: Callable[[], Any], calls: int, device: torch.device) -> float:
    """Seconds per call of ``calls`` back-to-back calls, synchronised at both ends."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def time_interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int, repeats: int, calls: int,
                     device: torch.device, after_block: Callable[[str], None] | None = None) -> dict[str, Timing]:
    """Time every function side by side: ``warmup`` untimed calls each, then ``repeats`` rounds in
    which each function runs one block of ``calls`` calls (order rotated every round).

    ``after_block(name)`` runs after each timed block, outside the timing (e.g. to flush metrics).
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
        if after_block is not None:
            after_block(name)
    out = {name: Timing() for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out[name].samples.append(time_block(fns[name], calls, device))
            if after_block is not None:
                after_block(name)
    sync(device)
    return out


def rss_high_water_bytes() -> int:
    """The process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Yields a dict filled on exit with ``bytes`` and ``label``.

    CUDA: ``torch.cuda.max_memory_allocated`` during the block minus the allocation before it.
    CPU: the increase of the process's RSS high-water mark (0 when the block stayed under an
    earlier peak, so it is only a lower bound of what the block needed).
    """
    result: dict[str, float] = {}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        sync(device)
        result["bytes"] = float(torch.cuda.max_memory_allocated(device) - base)
        result["label"] = "CUDA peak allocated above the baseline"
    else:
        base = rss_high_water_bytes()
        yield result
        result["bytes"] = float(rss_high_water_bytes() - base)
        result["label"] = "RSS high-water increase (lower bound; 0 = under an earlier peak)"


# ---- configs, models, data ------------------------------------------------------------------------
def load_yaml(path: Path) -> dict[str, Any]:
    with open(path) as handle:
        return yaml.safe_load(handle) or {}


def load_model_config(name: str) -> ModelConfig:
    """``conf/model/<name>.yaml`` as a validated ModelConfig, so the printed name is the shape used."""
    path = CONF / "model" / f"{name}.yaml"
    if not path.exists():
        choices = ", ".join(sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
        raise SystemExit(f"no model config {path} (choose from {choices})")
    return ModelConfig(**load_yaml(path))


def describe_model(name: str, cfg: ModelConfig, vocab: int, n_params: int) -> str:
    return (f"model {name}: {cfg.family}, {cfg.n_layer} layers x {cfg.d_model}, {cfg.n_head} heads, ffn {cfg.d_ff}, "
            f"vocabulary {vocab}: {n_params / 1e6:.1f}M parameters")


def make_model(cfg: ModelConfig, vocab: int, device: torch.device, *, eos_id: int = 0,
               seed: int = 0) -> torch.nn.Module:
    """A freshly initialised model (same seed, same weights) on ``device``, in train mode."""
    model = build_model(cfg, vocab, bos_id=eos_id, eos_id=eos_id, seed=seed).to(device)
    model.train()
    return model


@dataclass
class BenchData:
    """The token source: a real RunData (local or embedded corpus) or None for random tokens."""

    kind: str
    vocab: int
    eos_id: int
    run_data: RunData | None
    description: str


def build_local_corpus(directory: Path, **kwargs: Any) -> Path:
    """The tests' corpus of 3 real domains from files on this machine (``tests/helpers.build_local_corpus``).

    Loaded from its file, as ``tests/`` is no package: the benchmarks measure on the data the tests train on.
    """
    spec = importlib.util.spec_from_file_location("benchmarks.test_helpers", REPO / "tests" / "helpers.py")
    assert spec is not None and spec.loader is not None
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    return helpers.build_local_corpus(directory, **kwargs)


def prepare_data(kind: str, tokenizer: str, seq_len: int, seed: int, workdir: Path,
                 cache_dir: str | None) -> BenchData:
    """``local``: tests/helpers.build_local_corpus (3 real domains from files on this machine) in
    ``workdir``; ``embedded``: the offline corpus (cached under ``cache_dir``, default .cache/dograph);
    ``random``: uniform random token ids (no corpus, no tokenizer)."""
    if kind == "random":
        vocab = tokenizer_vocab_size(tokenizer)
        return BenchData(kind, vocab, 0, None, f"random token ids (vocabulary {vocab})")
    if kind == "local":
        corpus_dir = build_local_corpus(workdir / "corpus")
        data_cfg = DataConfig(source="jsonl", path=str(corpus_dir), val_fraction=0.1, val_sequences_per_domain=4)
        cache = Path(cache_dir) if cache_dir else workdir / "cache"
    else:
        data_cfg = DataConfig(source="embedded")
        cache = Path(cache_dir) if cache_dir else REPO / ".cache" / "dograph"
    run_data = build_run_data(data_cfg, tokenizer_name=tokenizer, seq_len=seq_len, cache_dir=cache, seed=seed,
                              dist=DistContext())
    tok = run_data.tokenizer
    description = (f"{run_data.corpus.description}: domains {', '.join(run_data.corpus.domains)}; "
                   f"tokenizer {tokenizer} ({len(tok)} entries)")
    return BenchData(kind, len(tok), tok.eos_token_id, run_data, description)


def precompute_batches(data: BenchData, count: int, batch: int, seq_len: int, device: torch.device,
                       seed: int = 0) -> list[Batch]:
    """``count`` batches already on ``device`` (drawn from the real sampler, or random ids)."""
    if data.run_data is None:
        generator = torch.Generator().manual_seed(seed)
        out = []
        for i in range(count):
            tokens = torch.randint(0, data.vocab, (batch, seq_len + 1), generator=generator)
            domain = (torch.arange(batch) + i) % 3
            out.append(Batch(tokens[:, :-1], tokens[:, 1:], domain).to(device))
        return out
    return [data.run_data.sampler.next_batch(batch).to(device) for _ in range(count)]


class FixedSampler:
    """A stand-in for MixtureSampler that cycles through precomputed device batches (no data pipeline)."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches, self.position = batches, 0

    def next_batch(self, batch: int, *, pin: bool = False) -> Batch:
        """The next precomputed batch (already on the device, so ``pin`` has nothing to do)."""
        out = self.batches[self.position % len(self.batches)]
        if len(out) != batch:
            raise ValueError(f"precomputed batches hold {len(out)} sequences, the trainer asked for {batch}")
        self.position += 1
        return out

    def set_mixture(self, mixture: Any) -> None:
        """The mixture is ignored: the batches are fixed."""

    def set_prefetch(self, windows: int) -> None:
        """Nothing to prepare ahead: the batches are precomputed."""

    def close(self) -> None:
        """No prefetch thread to stop."""

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}


def trainer_config(args: Any, device: torch.device, weighted_update: str = "fast") -> TrainerConfig:
    """The trainer settings of a benchmark: the CLI's batch and sequence length, no logging or evaluation."""
    lr = getattr(args, "lr", 5e-4)
    return TrainerConfig(max_steps=10**9, batch_size=args.batch, seq_len=args.seq, lr=lr, min_lr=min(lr, 1e-4),
                         warmup_steps=1,
                         eval_every=0, ckpt_every=0, precision=args.precision, device=device.type,
                         weighted_update=weighted_update, export_hf=False, progress=False,
                         micro_batch_size=getattr(args, "micro_batch", None),
                         parallelism=getattr(args, "parallelism", "ddp"),
                         activation_checkpointing=getattr(args, "activation_checkpointing", False))


RANDOM_DOMAINS = ("d0", "d1", "d2")  # the domain labels precompute_batches gives random batches
RANDOM_MIXTURE = (1 / 3, 1 / 3, 1 / 3)


def random_corpus() -> Any:
    """What a Trainer reads of a corpus (domain names, natural mixture) when the batches are random ids."""
    return SimpleNamespace(domains=list(RANDOM_DOMAINS), natural_mixture=list(RANDOM_MIXTURE),
                           description="random token ids")


def make_trainer(args: Any, device: torch.device, model: torch.nn.Module, mixer: Mixer, sampler: Any,
                 workdir: Path, *, weighted_update: str = "fast", run_data: RunData | None = None,
                 dist: DistContext | None = None) -> Trainer:
    """A real dograph Trainer around ``model`` and ``mixer``; ``sampler`` replaces the data sampler.

    ``dist``: the process group's context under torchrun (default: one process on ``device``)."""
    data = RunData(corpus=run_data.corpus if run_data else random_corpus(),
                   tokenizer=run_data.tokenizer if run_data else None, sampler=sampler, validation=[])
    run_dir = Path(tempfile.mkdtemp(dir=workdir, prefix="run-"))
    writer = MetricsWriter(run_dir, LoggerConfig(mode="disabled"), enabled=False, config={}, run_name="bench")
    return Trainer(trainer_config(args, device, weighted_update), model, data, mixer,
                   dist=dist or DistContext(device=device), run_dir=run_dir, writer=writer)


# ---- output -----------------------------------------------------------------------------------------
def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "n/a"
    ms = seconds * 1e3
    return f"{ms:.3f} ms" if ms < 1 else f"{ms:.2f} ms" if ms < 100 else f"{ms:.0f} ms"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")


def paired_ratio(numerator: Timing, denominator: Timing) -> float:
    """Median over rounds of ``numerator / denominator``; rounds are adjacent in time, so drift cancels."""
    pairs = [a / b for a, b in zip(numerator.samples, denominator.samples, strict=True) if b > 0]
    return statistics.median(pairs) if pairs else float("nan")


def print_load_at_end() -> None:
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def make_parser(doc: str, data_help: str) -> Any:
    """The argument parser every benchmark starts from: device, shape, precision, data source, cache."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_shared_arguments(parser)
    parser.add_argument("--data", choices=["local", "embedded", "random"], default="local", help=data_help)
    parser.add_argument("--cache-dir", default=None, help="tokenizer/corpus cache (default: a temporary dir)")
    return parser


def add_shared_arguments(parser: Any) -> None:
    """Device, model shape, batch and precision options every benchmark takes."""
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--model", default=None, help="conf/model/<name>.yaml (default gpt2_tiny CPU, gpt2_small GPU)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 16 CPU, 48 GPU)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 128 CPU, 512 GPU)")
    parser.add_argument("--tokenizer", default=None, help="default: the model config's tokenizer")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto = bf16 autocast on CUDA, fp32 on CPU (the trainer's rule)")
