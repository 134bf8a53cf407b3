"""Corpora with planted structure, derived deterministically from a base corpus (``dataset=planted``).

Three scenarios (``dataset.planted.scenario``, ``none`` for the corpus as it is; docs/data.md,
docs/design.md section 4.5):

* ``noise``: one more domain, ``noise``, of words drawn independently from the base corpus's word
  frequencies (``words``), making ``share`` (0.25) of the text bytes.
* ``duplicates``: the domain ``duplicate_domain`` (books) replaced by ``<domain>-dup``: a few
  (``duplicate_documents``, 8) of its documents repeated to ``share`` (0.20) of the text bytes; its
  other documents go to ``fresh/<domain>.jsonl``, for evaluation only.
* ``hidden_split``: the domains ``merge_domains`` (code, latex) merged under one label
  (``code+latex``); each document keeps its own in the field ``hidden_domain``, for evaluation only.

Built once per (scenario, share, seed, the scenario's keys, base fingerprint) and cached with a
manifest (``build``); the scenarios are plans over the base corpus (``scenarios``); what the mixer
must not see is read back for evaluation by ``hidden``.
"""

from __future__ import annotations

from dograph.data.planted.build import (
    PLANTED_VERSION,
    ensure_planted_corpus,
    load_manifest,
    planted_key,
    read_planted_corpus,
)
from dograph.data.planted.hidden import HiddenSplit, fresh_source, hidden_split, hidden_token_labels
from dograph.data.planted.scenarios import DUPLICATE_SUFFIX, FRESH_DIR, HIDDEN_FIELD, NOISE_DOMAIN

__all__ = ["DUPLICATE_SUFFIX", "FRESH_DIR", "HIDDEN_FIELD", "NOISE_DOMAIN", "PLANTED_VERSION", "HiddenSplit",
           "ensure_planted_corpus", "fresh_source", "hidden_split", "hidden_token_labels", "load_manifest",
           "planted_key", "read_planted_corpus"]
