"""Tokenise documents on the fly and pack them into fixed-length windows within a domain.

Each document's tokens are followed by EOS and concatenated; windows of ``seq_len + 1``
tokens overlap by one token, so every token is predicted exactly once (inputs are
``window[:-1]``, targets ``window[1:]``). A window never mixes domains, so it keeps its
domain label.

Validation hold-out (our choice: a hash split, since streamed sources have no fixed size).
Every document has a value ``u`` in [0, 1), a hash of (validation seed, domain, index), and
a domain holds out a prefix of its documents in ``(u, index)`` order, so the split is fixed
by seed and independent of the training mixture and the run seed. The prefix is the hash
share ``u < val_fraction``, extended when that share gives fewer than the requested
validation windows (``plan_domain_holdout``; docs/design.md section 4.3).
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dograph.errors import DataError

READ_AHEAD_DOCS = 16  # documents tokenised per call (batch encoding is faster)
HOLDOUT_CEILING = 0.5  # our choice: documents with u >= max(val_fraction, this) are never held out
Key = tuple[float, int]  # a document's place in its domain's hash order: (u, index)


def document_u(domain: str, index: int, seed: int) -> float:
    """The document's hash value in [0, 1), fixed by (seed, domain, index)."""
    digest = hashlib.blake2b(f"{seed}:{domain}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def is_validation_doc(domain: str, index: int, fraction: float, seed: int) -> bool:
    """True for the hash share ``fraction`` of documents (u < fraction), fixed by ``seed``."""
    return document_u(domain, index, seed) < fraction


def is_blank(text: str) -> bool:
    """A document with no visible text: never packed into validation windows."""
    return not text.strip()


@dataclass(frozen=True)
class HoldoutRule:
    """Document ``index`` is held out iff ``(u(index), index) <= (limit_u, limit_index)``.

    A cut in the domain's hash order: cheap, picklable and the same on every rank.
    """

    domain: str
    seed: int
    limit_u: float
    limit_index: int = sys.maxsize

    @classmethod
    def share(cls, domain: str, seed: int, fraction: float) -> HoldoutRule:
        """Exactly the documents with ``u < fraction`` (``is_validation_doc``)."""
        return cls(domain, seed, math.nextafter(fraction, 0.0))

    def __call__(self, index: int) -> bool:
        return (document_u(self.domain, index, self.seed), index) <= (self.limit_u, self.limit_index)


def encode_documents(tokenizer: Any, docs: list[str]) -> np.ndarray:
    """Token ids of ``docs``, each followed by EOS, concatenated (int32)."""
    if not docs:
        return np.empty(0, dtype=np.int32)
    eos = tokenizer.eos_token_id
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    parts = [np.asarray([*ids, eos], dtype=np.int32) for ids in encoded]
    return np.concatenate(parts)


def document_tokens(tokenizer: Any, docs: list[str]) -> list[int]:
    """Tokens each document adds to a packed stream (its ids and EOS)."""
    if not docs:
        return []
    return [len(ids) + 1 for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]


def window_count(tokens: int, seq_len: int, count: int) -> int:
    """Windows of ``seq_len + 1`` tokens (overlapping by one) in a stream of ``tokens``, at most ``count``."""
    return min(count, (tokens - 1) // seq_len) if tokens > 1 else 0


class DomainPacker:
    """An endless stream of training windows from one domain, for one rank.

    Rank ``r`` of ``world`` reads the training documents whose index is ``r`` mod
    ``world``, so ranks see disjoint data. The position (next document, epoch, leftover
    tokens) is the whole state: a resumed packer yields exactly what the original would.
    """

    def __init__(self, source: Any, tokenizer: Any, seq_len: int, *,
                 holdout: Callable[[int], bool] | None = None, rank: int = 0, world: int = 1) -> None:
        self.source, self.tokenizer, self.seq_len = source, tokenizer, seq_len
        self.holdout, self.rank, self.world = holdout, rank, world
        self.next_doc, self.epoch, self.docs_this_epoch = 0, 0, 0
        self.buffer = np.empty(0, dtype=np.int32)
        self._stream: Iterator[tuple[int, str]] | None = None

    def _keeps(self, index: int) -> bool:
        held_out = self.holdout is not None and self.holdout(index)
        return not held_out and index % self.world == self.rank

    def _read_documents(self) -> list[str]:
        docs: list[str] = []
        while len(docs) < READ_AHEAD_DOCS:
            if self._stream is None:
                self._stream = enumerate(self.source.documents(self.next_doc), start=self.next_doc)
            item = next(self._stream, None)
            if item is None:
                if self.docs_this_epoch == 0 and not docs:
                    raise DataError(f"domain {self.source.name!r} has no training documents for rank "
                                    f"{self.rank} of {self.world} (all held out for validation?)")
                self.next_doc, self.epoch, self.docs_this_epoch, self._stream = 0, self.epoch + 1, 0, None
                if docs:
                    break
                continue
            index, text = item
            self.next_doc = index + 1
            if self._keeps(index):
                docs.append(text)
                self.docs_this_epoch += 1
        return docs

    def next_window(self) -> np.ndarray:
        """The next ``seq_len + 1`` tokens of this domain."""
        while len(self.buffer) < self.seq_len + 1:
            self.buffer = np.concatenate([self.buffer, encode_documents(self.tokenizer, self._read_documents())])
        window = self.buffer[: self.seq_len + 1]
        self.buffer = self.buffer[self.seq_len:]
        return window

    def state_dict(self, copy: bool = True) -> dict[str, Any]:
        """The position; ``copy=False`` shares the leftover buffer (cheap, safe: buffers are never written).

        A prefetcher snapshots the state after every window it prepares, so the checkpoint can hold
        the position of what training consumed rather than of what was prepared ahead.
        """
        return {"next_doc": self.next_doc, "epoch": self.epoch, "docs_this_epoch": self.docs_this_epoch,
                "buffer": self.buffer.copy() if copy else self.buffer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_doc, self.epoch = int(state["next_doc"]), int(state["epoch"])
        self.docs_this_epoch = int(state["docs_this_epoch"])
        self.buffer = np.asarray(state["buffer"], dtype=np.int32)
        self._stream = None


def pack_validation_windows(documents: Iterable[str], tokenizer: Any, seq_len: int, count: int) -> Tensor:
    """Up to ``count`` windows [n, seq_len + 1] (int64) from the given documents (blank ones skipped)."""
    buffer = np.empty(0, dtype=np.int32)
    need = count * seq_len + 1
    batch: list[str] = []
    for text in documents:
        if is_blank(text):
            continue
        batch.append(text)
        if len(batch) == READ_AHEAD_DOCS:
            buffer = np.concatenate([buffer, encode_documents(tokenizer, batch)])
            batch = []
            if len(buffer) >= need:
                break
    buffer = np.concatenate([buffer, encode_documents(tokenizer, batch)])
    n = window_count(len(buffer), seq_len, count)
    windows = [buffer[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)]
    return torch.from_numpy(np.stack(windows).astype(np.int64)) if windows else torch.empty(0, seq_len + 1,
                                                                                          dtype=torch.int64)



def spread_windows(texts: Sequence[str], tokenizer: Any, seq_len: int, count: int) -> tuple[Tensor, int]:
    """Up to ``count`` windows [n, seq_len + 1], each inside one document: ``ceil(count / len(texts))`` from the
    start of each text in order (a text too short for one window gives none); and how many texts gave any.

    Unlike :func:`pack_validation_windows`, which packs the first documents one after another, this
    spreads a small sample over many documents (the planted study's measures: docs/design.md section 4.5).
    """
    per = -(-count // max(len(texts), 1))
    parts: list[Tensor] = []
    have = 0
    for text in texts:
        if have >= count:
            break
        windows = pack_validation_windows([text], tokenizer, seq_len, min(per, count - have))
        if len(windows):
            parts.append(windows)
            have += len(windows)
    if not parts:
        return torch.empty(0, seq_len + 1, dtype=torch.int64), 0
    return torch.cat(parts), len(parts)


def evenly_spaced(items: Sequence[Any], count: int) -> list[Any]:
    """``count`` items at evenly spaced positions from the first to the last (all of them when there are fewer)."""
    if count <= 0:
        return []
    if count >= len(items):
        return list(items)
    if count == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]

# ---- validation hold-out -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HoldoutSpec:
    """What a domain's hold-out is asked for (the dataset config and trainer.seq_len)."""

    domain: str
    fraction: float  # dataset.val_fraction
    seed: int  # dataset.val_seed
    seq_len: int
    count: int  # dataset.val_sequences_per_domain

    def windows(self, tokens: int) -> int:
        return window_count(tokens, self.seq_len, self.count)


@dataclass
class DomainHoldout:
    """A domain's validation hold-out: the rule training skips and the windows validation packs."""

    domain: str
    rule: HoldoutRule
    windows: Tensor  # [n, seq_len + 1] int64
    held_out: int  # non-blank documents held out (those read, when the domain was not read to its end)
    in_share: int  # of the non-blank documents read, those with u < val_fraction
    documents: int | None  # non-blank documents of the domain; None when not read to its end

    @property
    def extended(self) -> bool:
        return self.held_out > self.in_share

    def describe(self, spec: HoldoutSpec) -> str:
        """One log line: documents and windows held out, and why."""
        head = f"domain {self.domain!r}: {len(self.windows)} validation windows"
        if self.documents is None:
            return (f"{head}; holds out the hash share u < {spec.fraction} (not extended; read until its first "
                    f"{self.held_out} documents gave the windows)")
        if self.extended:
            why = f"extended beyond val_fraction={spec.fraction}, whose share holds {self.in_share}"
        elif self.held_out < self.in_share:
            why = f"capped at half the domain; the val_fraction={spec.fraction} share holds {self.in_share}"
        else:
            why = f"the hash share u < {spec.fraction}; not extended"
        return f"{head}; holds out {self.held_out} of {self.documents} non-blank documents ({why})"


@dataclass
class _Scan:
    """One pass over a domain in index order, blank documents skipped."""

    share: dict[int, tuple[float, str, int]] = field(default_factory=dict)  # index -> (u, text, tokens)
    candidates: list[Key] = field(default_factory=list)  # fraction <= u < ceiling
    share_tokens: int = 0  # tokens of the share read so far
    documents: int = 0  # non-blank documents read
    chars: int = 0  # their characters
    complete: bool = False  # read to the end

    def add_share(self, tokenizer: Any, pending: list[tuple[int, float, str]]) -> None:
        counts = document_tokens(tokenizer, [text for _, _, text in pending])
        for (index, u, text), tokens in zip(pending, counts, strict=True):
            self.share[index] = (u, text, tokens)
            self.share_tokens += tokens


def _scan(source: Any, tokenizer: Any, spec: HoldoutSpec) -> _Scan:
    """Read the domain, stopping early once its hash share gives all the windows."""
    scan, pending = _Scan(), []
    for index, text in enumerate(source.documents()):
        if is_blank(text):
            continue
        scan.documents, scan.chars = scan.documents + 1, scan.chars + len(text)
        u = document_u(spec.domain, index, spec.seed)
        if u < spec.fraction:
            pending.append((index, u, text))
            if len(pending) == READ_AHEAD_DOCS:
                scan.add_share(tokenizer, pending)
                pending = []
                if spec.windows(scan.share_tokens) == spec.count:
                    return scan
        elif u < HOLDOUT_CEILING:
            scan.candidates.append((u, index))
    scan.add_share(tokenizer, pending)
    scan.complete = True
    return scan


def _fetch(source: Any, indices: set[int]) -> dict[int, str]:
    """The texts of the documents ``indices`` (one pass, up to the largest)."""
    found: dict[int, str] = {}
    for index, text in enumerate(source.documents()):
        if index in indices:
            found[index] = text
            if len(found) == len(indices):
                break
    return found


def _walk(source: Any, tokenizer: Any, scan: _Scan, spec: HoldoutSpec) -> tuple[list[Key], dict[int, str], int]:
    """The held-out prefix of a fully read domain in (u, index) order, its texts and tokens.

    The share (u < fraction) first, at most half the non-blank documents; then candidates
    (u < ceiling) in order while windows are missing and the half is not reached (our choice).
    """
    cap = scan.documents // 2
    order = sorted((u, index) for index, (u, _, _) in scan.share.items())[:cap]
    texts = {index: scan.share[index][1] for _, index in order}
    tokens = sum(scan.share[index][2] for _, index in order)
    pool = sorted(scan.candidates)[: max(0, cap - len(order))]
    start, chunk = 0, READ_AHEAD_DOCS
    while start < len(pool) and spec.windows(tokens) < spec.count:
        keys = pool[start:start + chunk]
        fetched = _fetch(source, {index for _, index in keys})
        for key, n in zip(keys, document_tokens(tokenizer, [fetched[i] for _, i in keys]), strict=True):
            order.append(key)
            texts[key[1]], tokens = fetched[key[1]], tokens + n
            if spec.windows(tokens) == spec.count:
                break
        start, chunk = start + len(keys), chunk * 2
    return order, texts, tokens


def _cut(spec: HoldoutSpec, order: list[Key], in_share: int) -> HoldoutRule:
    """The rule for a held-out prefix: the plain share when it is exactly that, else its last key."""
    if len(order) == in_share:
        return HoldoutRule.share(spec.domain, spec.seed, spec.fraction)
    return HoldoutRule(spec.domain, spec.seed, *order[-1])


def _too_small(spec: HoldoutSpec, scan: _Scan, held: int, tokens: int) -> DataError:
    return DataError(
        f"domain {spec.domain!r} cannot give one validation window of {spec.seq_len + 1} tokens: it has "
        f"{scan.documents} non-blank documents ({scan.chars:,} characters); the {held} it may hold out (at most "
        f"half, only those with hash u < {max(spec.fraction, HOLDOUT_CEILING)}) give {tokens} tokens. Give the "
        "domain more text (at least two documents, a few times the window) or use a shorter trainer.seq_len")


def plan_domain_holdout(source: Any, tokenizer: Any, spec: HoldoutSpec) -> DomainHoldout:
    """The held-out documents and validation windows of one domain (our choice of rule).

    Documents are ordered by (u, index). A domain whose share ``u < fraction`` gives
    ``count`` windows holds out exactly that share, and is read only until it does. Otherwise
    the whole domain is read and the cut moves along the order until the windows are met,
    holding out at most half of the non-blank documents and none with u >= max(fraction,
    0.5) (the tokenizer never trains on those). DataError when not even one window results.
    """
    scan = _scan(source, tokenizer, spec)
    if not scan.complete:
        texts = [scan.share[index][1] for index in sorted(scan.share)]
        windows = pack_validation_windows(texts, tokenizer, spec.seq_len, spec.count)
        return DomainHoldout(spec.domain, HoldoutRule.share(spec.domain, spec.seed, spec.fraction), windows,
                             len(scan.share), len(scan.share), None)
    order, texts, tokens = _walk(source, tokenizer, scan, spec)
    windows = pack_validation_windows([texts[i] for i in sorted(texts)], tokenizer, spec.seq_len, spec.count)
    if len(windows) == 0:
        raise _too_small(spec, scan, len(order), tokens)
    return DomainHoldout(spec.domain, _cut(spec, order, len(scan.share)), windows, len(order), len(scan.share),
                         scan.documents)
