"""The three planted structures, each a plan of the planted corpus's domains from the base corpus.

A plan names, per domain, a function giving that domain's records in order (``{"text", "source"}``
plus, for a merged domain, the hidden label), and the evaluation-only files beside them. Records are
produced lazily, so the base corpus is streamed, never held in memory as a whole. Every random choice
comes from ``dataset.planted.seed`` (numpy's PCG64), never from the run seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from dograph.config import PlantedConfig
from dograph.data.packing import is_blank
from dograph.data.planted.words import WordSalad, WordStatistics
from dograph.data.sources import Corpus
from dograph.errors import ConfigError, DataError

NOISE_DOMAIN = "noise"
DUPLICATE_SUFFIX = "-dup"  # the duplicated domain's name: books -> books-dup
HIDDEN_FIELD = "hidden_domain"  # hidden_split: each merged document's own domain (evaluation only)
FRESH_DIR = "fresh"  # duplicates: the replaced domain's other documents, never trained on

Records = Callable[[], Iterator[dict[str, Any]]]


@dataclass
class Plan:
    """What a scenario makes of the base corpus."""

    domains: dict[str, Records]  # training domains, in the base's order
    planted: str  # the domain carrying the structure
    evaluation: dict[str, Records] = field(default_factory=dict)  # relative path -> records, never trained on
    details: dict[str, Any] = field(default_factory=dict)  # for the manifest


def utf8_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def _copy(corpus: Corpus, domain: str) -> Iterator[dict[str, Any]]:
    source = corpus.train[corpus.domains.index(domain)]
    for index, text in enumerate(source.documents()):
        yield {"text": text, "source": f"{domain}:{index}"}


def _copies(corpus: Corpus, skip: set[str] = frozenset()) -> dict[str, Records]:
    return {d: partial(_copy, corpus, d) for d in corpus.domains if d not in skip}


def _domain_bytes(corpus: Corpus, domain: str) -> int:
    return sum(utf8_bytes(text) for text in corpus.train[corpus.domains.index(domain)].documents())


def _bytes_for_share(share: float, rest: int) -> int:
    """Bytes a domain needs to make ``share`` of a corpus whose other domains hold ``rest`` bytes."""
    return round(share / (1.0 - share) * rest)


def _require_domains(corpus: Corpus, names: list[str], key: str) -> None:
    missing = [name for name in names if name not in corpus.domains]
    if missing:
        raise ConfigError(f"{key} names {missing}, not a domain of the base corpus ({corpus.description}); "
                          f"its domains: {', '.join(corpus.domains)}")


def _require_free(corpus: Corpus, name: str, why: str) -> None:
    if name in corpus.domains:
        raise ConfigError(f"the base corpus already has a domain {name!r}, the name {why}; drop it with "
                          "dataset.domains")


# ---- noise ----------------------------------------------------------------------------------------------


def noise(corpus: Corpus, planted: PlantedConfig) -> Plan:
    """One more domain of words drawn independently from the base corpus's word frequencies."""
    _require_free(corpus, NOISE_DOMAIN, "of the noise domain")
    statistics, total = WordStatistics(), 0
    for source in corpus.train:
        for text in source.documents():
            total += utf8_bytes(text)
            statistics.add(text)
    if not statistics.counts:
        raise DataError(f"the base corpus ({corpus.description}) has no words to draw the noise domain from")
    target = _bytes_for_share(planted.target_share, total)

    def records() -> Iterator[dict[str, Any]]:
        for text in WordSalad(statistics, planted.seed).documents(target):
            yield {"text": text, "source": NOISE_DOMAIN}

    details = {"vocabulary": len(statistics.counts), "base_words": sum(statistics.counts.values()),
               "word": "a maximal run of non-whitespace characters", "target_bytes": target}
    return Plan({**_copies(corpus), NOISE_DOMAIN: records}, NOISE_DOMAIN, details=details)


# ---- duplicates -----------------------------------------------------------------------------------------


def _distinct_documents(corpus: Corpus, domain: str) -> list[tuple[int, str, int]]:
    """(index, text digest, bytes) of the domain's first document of each distinct non-blank text."""
    seen: dict[str, tuple[int, str, int]] = {}
    for index, text in enumerate(corpus.train[corpus.domains.index(domain)].documents()):
        if not is_blank(text):
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            seen.setdefault(digest, (index, digest, utf8_bytes(text)))
    return list(seen.values())


def _copy_order(sizes: list[int], target: int, rng: np.random.Generator) -> list[int]:
    """Positions into ``sizes``: whole shuffled rounds of all of them, then the closest stop to ``target`` bytes."""
    order: list[int] = []
    total = 0
    while True:
        for position in rng.permutation(len(sizes)):
            complete = len(order) >= len(sizes)
            if complete and abs(total + sizes[position] - target) >= abs(total - target):
                return order
            order.append(int(position))
            total += sizes[position]


def duplicates(corpus: Corpus, planted: PlantedConfig) -> Plan:
    """One domain replaced by a few of its documents repeated; its other documents kept apart as fresh text."""
    domain, count = planted.duplicate_domain, planted.duplicate_documents
    _require_domains(corpus, [domain], "dataset.planted.duplicate_domain")
    name = domain + DUPLICATE_SUFFIX
    _require_free(corpus, name, "of the duplicated domain")
    distinct = _distinct_documents(corpus, domain)
    if len(distinct) < count:
        raise DataError(f"domain {domain!r} has {len(distinct)} distinct documents, fewer than "
                        f"dataset.planted.duplicate_documents={count}")
    rng = np.random.default_rng(planted.seed)
    chosen = [distinct[i] for i in sorted(rng.choice(len(distinct), size=count, replace=False))]
    rest = sum(_domain_bytes(corpus, d) for d in corpus.domains if d != domain)
    target = _bytes_for_share(planted.target_share, rest)
    order = _copy_order([size for _, _, size in chosen], target, rng)
    source = corpus.train[corpus.domains.index(domain)]
    indices = {index for index, _, _ in chosen}
    texts = {index: text for index, text in enumerate(source.documents()) if index in indices}
    digests = {digest for _, digest, _ in chosen}

    def repeated() -> Iterator[dict[str, Any]]:
        for position in order:
            index = chosen[position][0]
            yield {"text": texts[index], "source": f"{domain}:{index}"}

    def fresh() -> Iterator[dict[str, Any]]:
        for index, text in enumerate(source.documents()):
            if not is_blank(text) and hashlib.sha256(text.encode("utf-8")).hexdigest() not in digests:
                yield {"text": text, "source": f"{domain}:{index}"}

    domains = {(name if d == domain else d): (repeated if d == domain else partial(_copy, corpus, d))
               for d in corpus.domains}
    details = {"replaced": domain, "documents": [index for index, _, _ in chosen], "copies": len(order),
               "target_bytes": target, "fresh": f"{FRESH_DIR}/{domain}.jsonl"}
    return Plan(domains, name, evaluation={f"{FRESH_DIR}/{domain}.jsonl": fresh}, details=details)


# ---- hidden_split ---------------------------------------------------------------------------------------


def hidden_split(corpus: Corpus, planted: PlantedConfig) -> Plan:
    """Domains merged under one label, in a seeded random interleaving; each document keeps its own label."""
    names = planted.merge_domains
    _require_domains(corpus, names, "dataset.planted.merge_domains")
    merged = planted.merged_domain
    _require_free(corpus, merged, "of the merged domain")
    sources = [corpus.train[corpus.domains.index(d)] for d in names]
    counts = [sum(1 for _ in source.documents()) for source in sources]
    rng = np.random.default_rng(planted.seed)
    order = rng.permutation(np.repeat(np.arange(len(names)), counts))

    def records() -> Iterator[dict[str, Any]]:
        streams = [enumerate(source.documents()) for source in sources]
        for label in order:
            index, text = next(streams[label])
            yield {"text": text, "source": f"{names[label]}:{index}", HIDDEN_FIELD: names[label]}

    domains: dict[str, Records] = {}
    for d in corpus.domains:
        if d == names[0]:
            domains[merged] = records
        elif d not in names:
            domains[d] = partial(_copy, corpus, d)
    details = {"merged": names, "documents": dict(zip(names, counts, strict=True)), "hidden_field": HIDDEN_FIELD}
    return Plan(domains, merged, details=details)


SCENARIOS: dict[str, Callable[[Corpus, PlantedConfig], Plan]] = {
    "noise": noise, "duplicates": duplicates, "hidden_split": hidden_split}
