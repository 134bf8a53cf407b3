"""The corpus a ``dataset`` config describes: the embedded corpus, jsonl files or a Hugging Face dataset.

The one module that knows every source (``sources`` for jsonl, ``embedded``, ``hub``), so none of
them imports another's entry point.
"""

from __future__ import annotations

from pathlib import Path

from dograph.config import DataConfig
from dograph.data.sources import Corpus, jsonl_corpus, jsonl_directory_corpus


def embedded_corpus(cfg: DataConfig, cache_dir: Path) -> Corpus:
    from dograph.data.embedded import ensure_embedded_corpus

    directory = ensure_embedded_corpus(Path(cache_dir), min_domains=cfg.min_domains)
    return jsonl_directory_corpus(cfg, directory, f"embedded corpus {directory}")


def build_corpus(cfg: DataConfig, cache_dir: Path) -> Corpus:
    """The corpus a ``dataset`` config describes."""
    if cfg.source == "embedded":
        return embedded_corpus(cfg, cache_dir)
    if cfg.source == "jsonl":
        return jsonl_corpus(cfg)
    from dograph.data.hub import hf_corpus

    return hf_corpus(cfg)
