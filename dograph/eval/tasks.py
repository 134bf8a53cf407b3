"""Downstream tasks the project builds from its own held-out text (no hub download).

lm-eval's standard tasks (``paper9``) need their hub datasets. These local tasks need only
the run's corpus, so a tiny model on a machine with no network still gets a downstream
number that moves with training:

* ``dograph_continuation`` (lm-eval ``multiple_choice``, metrics acc and acc_norm): the
  first part of a held-out passage; choose its true continuation among four. The three
  distractors are true continuations of other items (other documents, mostly other
  domains), so every ending is as often right as wrong and only the match between context
  and ending scores.
* ``dograph_continuation_acc``: the same items scored with ``acc`` only (exercises the
  acc fallback of the score rule, as lambada_openai does in ``paper9``).
* ``dograph_domain_rolling`` (``loglikelihood_rolling``, as lm-eval's wikitext): held-out
  documents; word_perplexity, byte_perplexity, bits_per_byte.

Source text: documents of the validation hold-out (``dograph.data.packing``), chosen so
that no training window ever contains them, whatever the hold-out was extended to.
A build is deterministic (text, sizes and seed fix it) and cached: a directory that holds
``manifest.json`` is reused as it is.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import yaml

from dograph.atomic import publish_directory
from dograph.config import DataConfig
from dograph.data.packing import document_u, is_blank
from dograph.data.sources import Corpus, text_digest

LOCAL_TASKS = ("dograph_continuation", "dograph_continuation_acc", "dograph_domain_rolling")
TASKS_VERSION = "v2"  # part of the cache key; change it when the items change
CONTEXT_CHARS = 240  # our choice: with the ending ~80-100 tokens, inside the default 128-token context
ENDING_CHARS = 80
ROLLING_CHARS = 2000  # held-out documents are cut to this many characters (a few 128-token windows)
NUM_CHOICES = 4


def held_out_documents(cfg: DataConfig, corpus: Corpus, max_docs: int) -> dict[str, list[str]]:
    """Up to ``max_docs`` non-blank held-out documents per domain, never trained on.

    With a separate validation split, its first documents. Otherwise the documents of the
    hash share ``u < dataset.val_fraction`` with the lowest ``(u, index)``, at most half of
    the domain: ``plan_domain_holdout`` always holds out this prefix of its (u, index) order
    (it may hold out more, never less), and the tokenizer sample skips every u < 0.5.
    """
    out: dict[str, list[str]] = {}
    if corpus.validation is not None:
        for domain, source in zip(corpus.domains, corpus.validation, strict=True):
            out[domain] = list(islice((t for t in source.documents() if not is_blank(t)), max_docs))
        return out
    for domain, source in zip(corpus.domains, corpus.train, strict=True):
        share: dict[int, tuple[float, str]] = {}
        documents = 0
        for index, text in enumerate(source.documents()):
            if is_blank(text):
                continue
            documents += 1
            u = document_u(domain, index, cfg.val_seed)
            if u < cfg.val_fraction:
                share[index] = (u, text)
        lowest = sorted((u, index) for index, (u, _) in share.items())[: min(max_docs, documents // 2)]
        out[domain] = [share[index][1] for index in sorted(index for _, index in lowest)]
    return out


def _cut(text: str, start: int, length: int) -> tuple[str, int]:
    """``text[start:]`` up to ``length`` characters, ended at whitespace; and where it ended."""
    end = min(len(text), start + length)
    if end < len(text):
        space = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
        end = space if space > start + length // 2 else end
    return text[start:end].strip(), end


def _segments(text: str, context_chars: int, ending_chars: int) -> Iterable[tuple[str, str]]:
    """(context, ending) pairs from consecutive non-overlapping pieces of a document."""
    start = 0
    while start + context_chars + ending_chars <= len(text):
        context, end = _cut(text, start, context_chars)
        ending, end = _cut(text, end, ending_chars)
        if context and ending:
            yield context, ending
        start = end
        while start < len(text) and not text[start].isspace():  # the next piece starts at a word
            start += 1


def continuation_items(texts_by_domain: dict[str, list[str]], n_items: int, seed: int, *,
                       context_chars: int = CONTEXT_CHARS, ending_chars: int = ENDING_CHARS) -> list[dict[str, Any]]:
    """Up to ``n_items`` items per domain (round-robin over its documents), each with 4 choices."""
    rng = random.Random(seed)
    raw: list[tuple[str, int, str, str]] = []  # (domain, document id, context, ending)
    doc_id = 0
    for domain, docs in texts_by_domain.items():
        pools = []
        for text in docs:
            pools.append([(doc_id, c, e) for c, e in _segments(text, context_chars, ending_chars)])
            doc_id += 1
        picked: list[tuple[int, str, str]] = []
        while len(picked) < n_items and any(pools):
            for pool in pools:
                if pool and len(picked) < n_items:
                    picked.append(pool.pop(0))
        raw += [(domain, d, c, e) for d, c, e in picked]
    items = []
    for i, (domain, doc, context, ending) in enumerate(raw):
        others = [j for j, other in enumerate(raw) if other[1] != doc]
        if len(others) < NUM_CHOICES - 1:
            continue
        choices = [raw[j][3] for j in rng.sample(others, NUM_CHOICES - 1)]
        label = rng.randrange(NUM_CHOICES)
        choices.insert(label, ending)
        items.append({"id": i, "domain": domain, "context": context, "choices": choices, "label": label})
    return items


def rolling_items(texts_by_domain: dict[str, list[str]], n_items: int) -> list[dict[str, Any]]:
    return [{"domain": domain, "text": _cut(text, 0, ROLLING_CHARS)[0]}
            for domain, docs in texts_by_domain.items() for text in docs[:n_items]]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _task_yamls(data_dir: Path) -> dict[str, dict[str, Any]]:
    """lm-eval task configs (keys as in lm-eval's own piqa.yaml and wikitext.yaml; the aggregations
    are the defaults lm-eval assigns to these metrics, written out so it does not warn)."""
    def data(name: str) -> dict[str, Any]:
        return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_dir / name)}},
                "test_split": "test", "num_fewshot": 0}  # zero-shot by construction: there is no training split

    def metric(name: str, aggregation: str = "mean", higher: bool = True) -> dict[str, Any]:
        return {"metric": name, "aggregation": aggregation, "higher_is_better": higher}

    choice = {**data("continuation.jsonl"), "output_type": "multiple_choice", "doc_to_text": "{{context}}",
              "doc_to_choice": "choices", "doc_to_target": "label"}
    return {
        "dograph_continuation": {"task": "dograph_continuation", **choice,
                                 "metric_list": [metric("acc"), metric("acc_norm")], "metadata": {"version": 1.0}},
        "dograph_continuation_acc": {"task": "dograph_continuation_acc", **choice,
                                     "metric_list": [metric("acc")], "metadata": {"version": 1.0}},
        "dograph_domain_rolling": {
            "task": "dograph_domain_rolling", **data("rolling.jsonl"), "output_type": "loglikelihood_rolling",
            "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [metric("word_perplexity", "weighted_perplexity", False),
                            metric("byte_perplexity", "weighted_perplexity", False),
                            metric("bits_per_byte", "bits_per_byte", False)],
            "metadata": {"version": 1.0}},
    }


def build_local_tasks(out_dir: Path, texts_by_domain: dict[str, list[str]], *, n_items: int = 40,
                      seed: int = 0, context_chars: int = CONTEXT_CHARS, ending_chars: int = ENDING_CHARS) -> Path:
    """Write the local tasks' JSONL data and lm-eval YAMLs into ``out_dir``; returns it.

    ``n_items`` bounds the items of each domain (per task); a continuation item takes
    ``context_chars + ending_chars`` characters of a document. A directory that already holds
    ``manifest.json`` is returned untouched (the caller keys the directory by its inputs);
    the build is published atomically, so a crashed build is never reused.
    """
    out_dir = Path(out_dir).resolve()
    if (out_dir / "manifest.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        continuation = continuation_items(texts_by_domain, n_items, seed, context_chars=context_chars,
                                          ending_chars=ending_chars)
        rolling = rolling_items(texts_by_domain, n_items)
        _write_jsonl(tmp / "continuation.jsonl", continuation)
        _write_jsonl(tmp / "rolling.jsonl", rolling)
        for name, config in _task_yamls(out_dir).items():  # paths name the final directory
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        manifest = {"version": TASKS_VERSION, "seed": seed, "n_items": n_items, "tasks": list(LOCAL_TASKS),
                    "items": {"continuation": len(continuation), "rolling": len(rolling)},
                    "domains": {d: len(docs) for d, docs in texts_by_domain.items()}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_directory(tmp, out_dir, marker="manifest.json")  # another process's build may have won the race
    return out_dir


def local_tasks_dir(cfg: DataConfig, corpus: Corpus, cache_dir: Path, *, n_items: int, seed: int = 0) -> Path:
    """The cached build for this corpus and hold-out (built on first use)."""
    key = text_digest(json.dumps([TASKS_VERSION, corpus.fingerprint, cfg.val_fraction, cfg.val_seed, n_items, seed,
                                  CONTEXT_CHARS, ENDING_CHARS, ROLLING_CHARS]))[:16]
    out_dir = Path(cache_dir) / "lm_eval_tasks" / key
    if (out_dir / "manifest.json").is_file():
        return out_dir.resolve()
    return build_local_tasks(out_dir, held_out_documents(cfg, corpus, n_items), n_items=n_items, seed=seed)
