"""Assemble the data side of a run: corpus -> tokenizer -> training sampler -> validation set."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

from torch import Tensor

from dograph.config import DataConfig
from dograph.data.corpus import build_corpus
from dograph.data.packing import (
    HOLDOUT_CEILING,
    DomainHoldout,
    DomainPacker,
    HoldoutSpec,
    document_u,
    pack_validation_windows,
    plan_domain_holdout,
)
from dograph.data.sampler import MixtureSampler
from dograph.data.sources import Corpus, text_digest
from dograph.data.tokenizer import load_tokenizer
from dograph.distributed import DistContext, barrier
from dograph.errors import DataError

log = logging.getLogger(__name__)
TOKENIZER_TRAIN_BYTES_PER_DOMAIN = 2_000_000  # our choice: equal share per domain, ~3 s of training
# Names the tokenizer's training sample in its cache key; change it when the sample changes
# (v2: skips every document that may be held out, u < max(val_fraction, 0.5)).
TOKENIZER_SAMPLE_VERSION = "sample-v2"
MAX_SPLIT_VALIDATION_DOCS = 100_000  # documents read from a separate validation split, at most


@dataclass
class RunData:
    corpus: Corpus
    tokenizer: Any
    sampler: MixtureSampler
    validation: list[Tensor]  # per domain [n_d, T+1] int64, identical on every rank


def _may_be_held_out(cfg: DataConfig, corpus: Corpus, domain: str) -> Callable[[int], bool] | None:
    """Documents that some hold-out could take (None with a separate validation split)."""
    if corpus.validation is not None:  # a separate split validates; train keeps every document
        return None
    return partial(_below, domain, cfg.val_seed, max(cfg.val_fraction, HOLDOUT_CEILING))


def _below(domain: str, seed: int, ceiling: float, index: int) -> bool:
    return document_u(domain, index, seed) < ceiling


def tokenizer_cache_key(corpus: Corpus) -> str:
    """The corpus fingerprint joined with the training-sample version (no stale cached BPE)."""
    return text_digest(f"{corpus.fingerprint}:{TOKENIZER_SAMPLE_VERSION}")


def _training_sample(cfg: DataConfig, corpus: Corpus) -> Iterator[str]:
    """Up to TOKENIZER_TRAIN_BYTES_PER_DOMAIN of text from every domain, none of it ever held out."""
    for domain, source in zip(corpus.domains, corpus.train, strict=True):
        held_out, used = _may_be_held_out(cfg, corpus, domain), 0
        for index, text in enumerate(source.documents()):
            if held_out is not None and held_out(index):
                continue
            yield text
            used += len(text)
            if used >= TOKENIZER_TRAIN_BYTES_PER_DOMAIN:
                break


def _log_holdout(holdout: DomainHoldout, spec: HoldoutSpec) -> None:
    log.info(holdout.describe(spec))
    if len(holdout.windows) < spec.count:
        log.warning("domain %r gives only %d of the %d validation windows (dataset.val_sequences_per_domain): "
                    "at most half of its documents are held out", spec.domain, len(holdout.windows), spec.count)


def plan_holdouts(cfg: DataConfig, corpus: Corpus, tokenizer: Any, seq_len: int) -> list[DomainHoldout] | None:
    """Every domain's hold-out, fixed by dataset.val_seed (None with a separate validation split)."""
    if corpus.validation is not None:
        return None
    holdouts = []
    for domain, source in zip(corpus.domains, corpus.train, strict=True):
        spec = HoldoutSpec(domain, cfg.val_fraction, cfg.val_seed, seq_len, cfg.val_sequences_per_domain)
        holdout = plan_domain_holdout(source, tokenizer, spec)
        _log_holdout(holdout, spec)
        holdouts.append(holdout)
    return holdouts


def _split_validation(cfg: DataConfig, corpus: Corpus, tokenizer: Any, seq_len: int) -> list[Tensor]:
    """Windows of the corpus's separate validation split."""
    sets = []
    for domain, source in zip(corpus.domains, corpus.validation or [], strict=True):
        docs = islice(source.documents(), MAX_SPLIT_VALIDATION_DOCS)
        windows = pack_validation_windows(docs, tokenizer, seq_len, cfg.val_sequences_per_domain)
        if len(windows) == 0:
            raise DataError(f"the validation split of domain {domain!r} has no text of {seq_len + 1} tokens")
        sets.append(windows)
    return sets


def build_validation(cfg: DataConfig, corpus: Corpus, tokenizer: Any, seq_len: int,
                     holdouts: list[DomainHoldout] | None = None) -> list[Tensor]:
    """The fixed validation windows of every domain (same on every rank, any mixture)."""
    if corpus.validation is not None:
        return _split_validation(cfg, corpus, tokenizer, seq_len)
    if holdouts is None:
        holdouts = plan_holdouts(cfg, corpus, tokenizer, seq_len) or []
    return [holdout.windows for holdout in holdouts]


def corpus_tokenizer(cfg: DataConfig, corpus: Corpus, tokenizer_name: str, cache_dir: Path) -> Any:
    """The tokenizer a run on ``corpus`` uses (a BPE trained on its training text is cached by corpus)."""
    return load_tokenizer(tokenizer_name, cache_dir, corpus_fingerprint=tokenizer_cache_key(corpus),
                          training_texts=_training_sample(cfg, corpus))


def load_corpus(cfg: DataConfig, *, cache_dir: Path, dist: DistContext) -> Corpus:
    """The corpus alone (domains, natural mixture), built on rank 0 first so caches are written once."""
    for turn in ("main", "others"):
        if (turn == "main") == dist.is_main:
            corpus = build_corpus(cfg, cache_dir)
        barrier(dist)
    return corpus


def build_run_data(cfg: DataConfig, *, tokenizer_name: str, seq_len: int, cache_dir: Path, seed: int,
                   dist: DistContext) -> RunData:
    """Everything the trainer reads, built on rank 0 first so caches are written once."""
    for turn in ("main", "others"):
        if (turn == "main") == dist.is_main:
            corpus = build_corpus(cfg, cache_dir)
            tokenizer = corpus_tokenizer(cfg, corpus, tokenizer_name, cache_dir)
        barrier(dist)
    holdouts = plan_holdouts(cfg, corpus, tokenizer, seq_len)
    rules = [None] * len(corpus.domains) if holdouts is None else [h.rule for h in holdouts]
    packers = [DomainPacker(src, tokenizer, seq_len, holdout=rule, rank=dist.rank, world=dist.world_size)
               for src, rule in zip(corpus.train, rules, strict=True)]
    sampler = MixtureSampler(packers, corpus.natural_mixture, seed=seed, rank=dist.rank, world=dist.world_size)
    validation = build_validation(cfg, corpus, tokenizer, seq_len, holdouts)
    return RunData(corpus, tokenizer, sampler, validation)
