"""Assemble the data side of a run: corpus -> tokenizer -> training sampler -> validation set."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

from torch import Tensor

from dograph.config import DataConfig
from dograph.data.packing import DomainPacker, is_validation_doc, pack_validation_windows
from dograph.data.sampler import MixtureSampler
from dograph.data.sources import Corpus, build_corpus
from dograph.data.tokenizer import load_tokenizer
from dograph.distributed import DistContext, barrier
from dograph.errors import DataError

log = logging.getLogger(__name__)
TOKENIZER_TRAIN_BYTES_PER_DOMAIN = 2_000_000  # our choice: equal share per domain, ~3 s of training


@dataclass
class RunData:
    corpus: Corpus
    tokenizer: Any
    sampler: MixtureSampler
    validation: list[Tensor]  # per domain [n_d, T+1] int64, identical on every rank


def _holdout(cfg: DataConfig, corpus: Corpus, domain: str):
    if corpus.validation is not None:  # a separate split validates; train keeps every document
        return None
    return partial(_is_held_out, domain, cfg.val_fraction, cfg.val_seed)


def _is_held_out(domain: str, fraction: float, seed: int, index: int) -> bool:
    return is_validation_doc(domain, index, fraction, seed)


def _training_sample(cfg: DataConfig, corpus: Corpus) -> Iterator[str]:
    """Up to TOKENIZER_TRAIN_BYTES_PER_DOMAIN of training text from every domain."""
    for domain, source in zip(corpus.domains, corpus.train, strict=True):
        held_out, used = _holdout(cfg, corpus, domain), 0
        for index, text in enumerate(source.documents()):
            if held_out is not None and held_out(index):
                continue
            yield text
            used += len(text)
            if used >= TOKENIZER_TRAIN_BYTES_PER_DOMAIN:
                break


def _validation_documents(cfg: DataConfig, corpus: Corpus, i: int) -> Iterator[str]:
    if corpus.validation is not None:
        return corpus.validation[i].documents()
    held_out = _holdout(cfg, corpus, corpus.domains[i])
    return (text for index, text in enumerate(corpus.train[i].documents()) if held_out(index))


def build_validation(cfg: DataConfig, corpus: Corpus, tokenizer: Any, seq_len: int) -> list[Tensor]:
    """The fixed held-out windows of every domain (same on every rank, any mixture)."""
    sets = []
    for i, domain in enumerate(corpus.domains):
        docs = islice(_validation_documents(cfg, corpus, i), 100_000)
        windows = pack_validation_windows(docs, tokenizer, seq_len, cfg.val_sequences_per_domain)
        if len(windows) == 0:
            raise DataError(f"domain {domain!r} has no validation text of {seq_len + 1} tokens; "
                            "raise dataset.val_fraction or give the domain more text")
        sets.append(windows)
    return sets


def build_run_data(cfg: DataConfig, *, tokenizer_name: str, seq_len: int, cache_dir: Path, seed: int,
                   dist: DistContext) -> RunData:
    """Everything the trainer reads, built on rank 0 first so caches are written once."""
    for turn in ("main", "others"):
        if (turn == "main") == dist.is_main:
            corpus = build_corpus(cfg, cache_dir)
            tokenizer = load_tokenizer(tokenizer_name, cache_dir, corpus_fingerprint=corpus.fingerprint,
                                       training_texts=_training_sample(cfg, corpus))
        barrier(dist)
    packers = [DomainPacker(src, tokenizer, seq_len, holdout=_holdout(cfg, corpus, d), rank=dist.rank,
                            world=dist.world_size) for d, src in zip(corpus.domains, corpus.train, strict=True)]
    sampler = MixtureSampler(packers, corpus.natural_mixture, seed=seed, rank=dist.rank, world=dist.world_size)
    validation = build_validation(cfg, corpus, tokenizer, seq_len)
    return RunData(corpus, tokenizer, sampler, validation)
