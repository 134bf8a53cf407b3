"""Shared test utilities: a small real corpus from local files, a fake mixer, a 2-process runner."""

from __future__ import annotations

import json
import socket
import sysconfig
from pathlib import Path

import torch

from dograph.mixing import Mixer, MixerOutput, Signal, StepSignals

REPO = Path(__file__).resolve().parent.parent


def _stdlib_code(limit: int) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs, used = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append(text)
        used += len(text)
        if used >= limit:
            break
    return docs


def _python_docs(limit: int) -> list[str]:
    from pydoc_data.topics import topics  # the Python reference manual's text, on every machine

    docs, used = [], 0
    for name in sorted(topics):
        docs.append(topics[name])
        used += len(topics[name])
        if used >= limit:
            break
    return docs


def _licences(limit: int) -> list[str]:
    import site

    roots = [Path(p) for p in site.getsitepackages()]
    texts, used = [], 0
    for path in sorted(p for root in roots for p in root.glob("*.dist-info/licenses/*")):
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            texts.append(text)
            used += len(text)
        if used >= limit:
            break
    return texts


def _chunks(texts: list[str], size: int) -> list[str]:
    return [text[i:i + size] for text in texts for i in range(0, len(text), size) if text[i:i + size].strip()]


def build_local_corpus(directory: Path, bytes_per_domain: int = 200_000, doc_chars: int = 2000) -> Path:
    """Three real domains (Python code, Python docs, software licences) as DOMAIN.jsonl files.

    Documents are cut to ``doc_chars`` so each domain has ~100 of them and a 10% hash
    hold-out always finds validation text.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for domain, docs in (("code", _stdlib_code(bytes_per_domain)), ("docs", _python_docs(bytes_per_domain)),
                         ("licences", _licences(bytes_per_domain))):
        with open(directory / f"{domain}.jsonl", "w") as handle:
            for text in _chunks(docs, doc_chars)[: bytes_per_domain // doc_chars]:
                handle.write(json.dumps({"text": text}) + "\n")
    return directory


class FakeMixer(Mixer):
    """Fixed per-domain weights (normalised over the batch), for testing the plumbing."""

    requires = frozenset({Signal.DOMAIN})

    def __init__(self, domain_weights: list[float], **_) -> None:
        self.domain_weights = torch.tensor(domain_weights, dtype=torch.float64)
        self.calls = 0

    def weigh(self, signals: StepSignals) -> MixerOutput:
        self.calls += 1
        raw = self.domain_weights.to(signals.loss.device)[signals.domain].to(signals.loss.dtype)
        return MixerOutput(sample_weights=raw / raw.sum(), metrics={"mixer/calls": float(self.calls)})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- data-parallel tests (torch.multiprocessing.spawn with gloo) -----------------------------------

DDP_VOCAB = 97


def join_gloo(rank: int, world: int, port: int) -> None:
    """Join a ``world``-process gloo group (nothing for one process); one thread per process."""
    import torch.distributed as dist

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)


def leave_gloo(world: int) -> None:
    import torch.distributed as dist

    if world > 1:
        dist.destroy_process_group()


def ddp_model() -> torch.nn.Module:
    """The 2-layer GPT-2 every data-parallel test trains (same initial weights in every process)."""
    from dograph.config import ModelConfig
    from dograph.models import build_model

    return build_model(ModelConfig(n_layer=2, n_head=2, d_model=32, d_ff=64, max_position_embeddings=32),
                       DDP_VOCAB, seed=3)


def rank_batches(step: int, rank: int, world: int, micro: int = 1, num_domains: int = 1) -> list:
    """This rank's share of step ``step``'s fixed global batch of 8 (in ``micro`` micro-batches).

    Domains are drawn from ``range(num_domains)``, so a test can leave a domain out of a step.
    """
    from dograph.data.sampler import Batch

    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, DDP_VOCAB, (8, 13), generator=g)
    domain = torch.randint(0, num_domains, (8,), generator=g)
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    return [Batch(part[:, :-1], part[:, 1:], dom)
            for part, dom in zip(tokens[rows].chunk(micro), domain[rows].chunk(micro), strict=True)]


def assert_same_gradients(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], step: int) -> None:
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-7), (step, name)


def committed_records_scale(name: str, tmp_path: Path):
    """``(results/<name>/, a copy of its records' folder, the scale reading only that copy)``: a fresh clone's view of
    the committed records, for tests that rebuild the committed artifacts from them (skips without records)."""
    import shutil

    import pytest

    from experiments.scale import load_scale

    committed = REPO / "results" / name
    if not (committed / "runs").is_dir():
        pytest.skip(f"no committed {name} records")
    results = tmp_path / "results"
    shutil.copytree(committed / "runs", results / "runs")
    return committed, results, load_scale(name, runs_root=tmp_path / "no-runs-here", results_dir=results)
