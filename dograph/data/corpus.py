"""The corpus a ``dataset`` config describes: the embedded corpus, jsonl files or a Hugging Face dataset,
with structure planted in it unless ``dataset.planted.scenario`` is none.

The one module that knows every source (``sources`` for jsonl, ``embedded``, ``hub``, ``planted``), so
none of them imports another's entry point.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dograph.config import DataConfig
from dograph.data.planted import ensure_planted_corpus, read_planted_corpus
from dograph.data.sources import Corpus, jsonl_corpus, jsonl_directory_corpus


def embedded_corpus(cfg: DataConfig, cache_dir: Path) -> Corpus:
    from dograph.data.embedded import ensure_embedded_corpus

    directory = ensure_embedded_corpus(Path(cache_dir), min_domains=cfg.min_domains)
    return jsonl_directory_corpus(cfg, directory, f"embedded corpus {directory}")


def base_corpus(cfg: DataConfig, cache_dir: Path) -> Corpus:
    """The corpus ``dataset.source`` names, before any structure is planted in it."""
    if cfg.source == "embedded":
        return embedded_corpus(cfg, cache_dir)
    if cfg.source == "jsonl":
        return jsonl_corpus(cfg)
    from dograph.data.hub import hf_corpus

    return hf_corpus(cfg)


def planted_directory(cfg: DataConfig, cache_dir: Path) -> Path:
    """The cached directory of the planted corpus (built from the base corpus on first use).

    Evaluation code reads the hidden labels and fresh documents from it (``dograph.data.planted.hidden``).
    """
    base = base_corpus(replace(cfg, natural_mixture=None), cache_dir)  # dataset.natural_mixture names planted domains
    return ensure_planted_corpus(cfg, Path(cache_dir), base)


def build_corpus(cfg: DataConfig, cache_dir: Path) -> Corpus:
    """The corpus a ``dataset`` config describes."""
    if cfg.planted.active:
        return read_planted_corpus(cfg, planted_directory(cfg, cache_dir))
    return base_corpus(cfg, cache_dir)
