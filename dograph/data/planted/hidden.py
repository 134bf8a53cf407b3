"""Evaluation-only access to what a planted corpus keeps from the mixer: hidden labels and fresh documents.

hidden_split: every line of the merged domain's ``<a>+<b>.jsonl`` carries its own domain in the field
``hidden_domain``. The run's sources read only ``text``, so no sampler, batch or mixer sees it; line
``i`` is document ``i`` of the merged domain (the index the hold-out hashes). :func:`hidden_split`
reads the labels per document, and :func:`hidden_token_labels` gives the label of every token of the
merged domain's validation windows, packed exactly as the run packs them.

duplicates: the replaced domain's other documents are in ``fresh/<domain>.jsonl`` (:func:`fresh_source`),
never trained on: pack them with ``pack_validation_windows`` for the loss on fresh documents.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dograph.data.packing import READ_AHEAD_DOCS, is_blank, window_count
from dograph.data.planted.build import load_manifest
from dograph.data.planted.scenarios import HIDDEN_FIELD
from dograph.data.sources import JsonlDomainSource
from dograph.errors import DataError


@dataclass(frozen=True)
class HiddenSplit:
    """The merged domain of a hidden_split corpus and each of its documents' hidden label."""

    domain: str  # the one label the sampler and the mixer see, e.g. code+latex
    labels: list[str]  # the hidden labels, in dataset.planted.merge_domains order
    of_document: np.ndarray  # [documents] int64: index into ``labels`` of each document of the merged domain

    def label(self, document: int) -> str:
        return self.labels[int(self.of_document[document])]


def hidden_split(directory: Path) -> HiddenSplit:
    """The hidden labels of a planted hidden_split corpus (``dograph.data.corpus.planted_directory``)."""
    manifest = load_manifest(directory)
    planted = manifest["planted"]
    if planted["scenario"] != "hidden_split":
        raise DataError(f"{directory} is a planted {planted['scenario']} corpus: it has no hidden labels")
    labels = list(planted["merged"])
    ids = {label: i for i, label in enumerate(labels)}
    path = directory / manifest["domains"][planted["domain"]]["file"]
    with open(path, encoding="utf-8") as handle:
        of_document = np.array([ids[json.loads(line)[HIDDEN_FIELD]] for line in handle], dtype=np.int64)
    return HiddenSplit(planted["domain"], labels, of_document)


def hidden_token_labels(split: HiddenSplit, source: Any, held_out: Callable[[int], bool], tokenizer: Any,
                        seq_len: int, count: int) -> tuple[Tensor, Tensor]:
    """The merged domain's validation windows and the hidden label id of each of their tokens.

    ``source`` is the merged domain's training source and ``held_out`` its hold-out rule
    (``plan_holdouts(...)[i].rule``): the windows are packed from the held-out non-blank documents
    in index order, as ``pack_validation_windows`` packs them, so they equal the run's validation
    windows of that domain, and ``labels[n, t]`` is the label of the document token ``windows[n, t]``
    came from (its EOS included). Both [n, seq_len + 1] int64; a window may span documents of both labels.
    """
    ids, labels, batch = [], [], []
    need = count * seq_len + 1

    def encode(docs: list[tuple[int, str]]) -> int:
        if not docs:
            return 0
        encoded = tokenizer([text for _, text in docs], add_special_tokens=False)["input_ids"]
        for (index, _), tokens in zip(docs, encoded, strict=True):
            ids.append(np.asarray([*tokens, tokenizer.eos_token_id], dtype=np.int64))
            labels.append(np.full(len(tokens) + 1, split.of_document[index], dtype=np.int64))
        return sum(len(t) + 1 for t in encoded)

    tokens = 0
    for index, text in enumerate(source.documents()):
        if is_blank(text) or not held_out(index):
            continue
        batch.append((index, text))
        if len(batch) == READ_AHEAD_DOCS:
            tokens, batch = tokens + encode(batch), []
            if tokens >= need:
                break
    tokens += encode(batch)
    stream = np.concatenate(ids) if ids else np.empty(0, dtype=np.int64)
    label_stream = np.concatenate(labels) if labels else np.empty(0, dtype=np.int64)
    n = window_count(len(stream), seq_len, count)
    starts = [i * seq_len for i in range(n)]
    windows = [stream[s:s + seq_len + 1] for s in starts]
    window_labels = [label_stream[s:s + seq_len + 1] for s in starts]
    if not windows:
        empty = torch.empty(0, seq_len + 1, dtype=torch.int64)
        return empty, empty.clone()
    return torch.from_numpy(np.stack(windows)), torch.from_numpy(np.stack(window_labels))


def fresh_source(directory: Path) -> JsonlDomainSource:
    """duplicates: the replaced domain's documents that were not duplicated (never trained on)."""
    manifest = load_manifest(directory)
    planted = manifest["planted"]
    if planted["scenario"] != "duplicates":
        raise DataError(f"{directory} is a planted {planted['scenario']} corpus: it has no fresh documents")
    return JsonlDomainSource(f"{planted['replaced']} (fresh)", [directory / planted["fresh"]])
