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
