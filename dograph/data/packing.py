"""Tokenise documents on the fly and pack them into fixed-length windows within a domain.

Each document's tokens are followed by EOS and concatenated; windows of ``seq_len + 1``
tokens overlap by one token, so every token is predicted exactly once (inputs are
``window[:-1]``, targets ``window[1:]``). A window never mixes domains, so it keeps its
domain label. Which documents are held out for validation is a pure function of
(validation seed, domain, document index): fixed by seed and independent of the training
mixture (our choice: a hash split, since streamed sources have no fixed size).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dograph.errors import DataError

READ_AHEAD_DOCS = 16  # documents tokenised per call (batch encoding is faster)


def is_validation_doc(domain: str, index: int, fraction: float, seed: int) -> bool:
    """True for the held-out share ``fraction`` of documents, fixed by ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{domain}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < fraction


def encode_documents(tokenizer: Any, docs: list[str]) -> np.ndarray:
    """Token ids of ``docs``, each followed by EOS, concatenated (int32)."""
    if not docs:
        return np.empty(0, dtype=np.int32)
    eos = tokenizer.eos_token_id
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    parts = [np.asarray([*ids, eos], dtype=np.int32) for ids in encoded]
    return np.concatenate(parts)


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

    def state_dict(self) -> dict[str, Any]:
        return {"next_doc": self.next_doc, "epoch": self.epoch, "docs_this_epoch": self.docs_this_epoch,
                "buffer": self.buffer.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_doc, self.epoch = int(state["next_doc"]), int(state["epoch"])
        self.docs_this_epoch = int(state["docs_this_epoch"])
        self.buffer = np.asarray(state["buffer"], dtype=np.int32)
        self._stream = None


def pack_validation_windows(documents: Iterator[str], tokenizer: Any, seq_len: int, count: int) -> Tensor:
    """Up to ``count`` windows [n, seq_len + 1] (int64) from the given documents."""
    buffer = np.empty(0, dtype=np.int32)
    need = count * seq_len + 1
    batch: list[str] = []
    for text in documents:
        batch.append(text)
        if len(batch) == READ_AHEAD_DOCS:
            buffer = np.concatenate([buffer, encode_documents(tokenizer, batch)])
            batch = []
            if len(buffer) >= need:
                break
    buffer = np.concatenate([buffer, encode_documents(tokenizer, batch)])
    n = min(count, (len(buffer) - 1) // seq_len) if len(buffer) > 1 else 0
    windows = [buffer[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)]
    return torch.from_numpy(np.stack(windows).astype(np.int64)) if windows else torch.empty(0, seq_len + 1,
                                                                                          dtype=torch.int64)
