"""Per-domain document streams: a jsonl directory or file, the embedded corpus, or a HF dataset.

Every source yields, for one human domain, its documents in a fixed order, addressable by
index (``documents(start=i)``) so a resumed run reopens a stream where it stopped. Which
documents are held out for validation is decided downstream (``dograph.data.packing``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from dograph.config import DataConfig
from dograph.errors import ConfigError, DataError

log = logging.getLogger(__name__)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
NO_NETWORK_HINT = "no network: use dataset=embedded or dataset=jsonl dataset.path=DIR"


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def get_field(record: Any, dotted: str) -> Any:
    """``record["meta"]["x"]`` for ``dotted="meta.x"``; None when a part is missing."""
    for part in dotted.split("."):
        if not isinstance(record, dict) or part not in record:
            return None
        record = record[part]
    return record


@dataclass
class BadLineCounter:
    """Counts skipped corrupt lines per file (``dataset.skip_bad_lines=true``)."""

    skip: bool = False
    counts: dict[str, int] = field(default_factory=dict)

    def handle(self, path: Path, lineno: int, problem: str) -> None:
        if not self.skip:
            raise DataError(f"{path}:{lineno}: {problem} (set dataset.skip_bad_lines=true to skip such lines)")
        self.counts[str(path)] = self.counts.get(str(path), 0) + 1


def iter_jsonl_records(path: Path, bad: BadLineCounter) -> Iterator[tuple[int, dict]]:
    """(line number, record) of every valid JSON object line; corrupt lines go to ``bad``."""
    try:
        with _open_text(path) as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    bad.handle(path, lineno, f"invalid JSON ({exc.msg})")
                    continue
                if not isinstance(record, dict):
                    bad.handle(path, lineno, "line is not a JSON object")
                    continue
                yield lineno, record
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc


@dataclass
class JsonlDomainSource:
    """One domain's documents from jsonl files, optionally filtered by a domain field."""

    name: str
    paths: list[Path]
    text_field: str = "text"
    domain_field: str | None = None  # set when one file holds several domains
    bad: BadLineCounter = field(default_factory=BadLineCounter)

    def documents(self, start: int = 0) -> Iterator[str]:
        return islice(self._all_documents(), start, None)

    def _all_documents(self) -> Iterator[str]:
        for path in self.paths:
            for lineno, record in iter_jsonl_records(path, self.bad):
                if self.domain_field is not None and str(get_field(record, self.domain_field)) != self.name:
                    continue
                text = get_field(record, self.text_field)
                if not isinstance(text, str):
                    self.bad.handle(path, lineno, f"no string field {self.text_field!r}")
                    continue
                if text:
                    yield text


@dataclass
class HFDomainSource:
    """One domain of a Hugging Face dataset, streamed and filtered by its domain field."""

    name: str
    open_split: Callable[[], Any]  # returns a streaming IterableDataset
    text_field: str
    domain_field: str

    def documents(self, start: int = 0) -> Iterator[str]:
        stream = self.open_split().filter(lambda ex: str(get_field(ex, self.domain_field)) == self.name)
        for example in islice(_guard_network(stream), start, None):
            text = get_field(example, self.text_field)
            if isinstance(text, str) and text:
                yield text


def _guard_network(stream: Any) -> Iterator[Any]:
    try:
        yield from stream
    except (ConnectionError, OSError, TimeoutError) as exc:
        raise DataError(f"lost the dataset stream ({exc}); {NO_NETWORK_HINT}") from exc


@dataclass
class Corpus:
    """The domains of a dataset, their train (and optional validation) sources and natural mixture."""

    domains: list[str]
    train: list[Any]  # one source per domain
    natural_mixture: list[float]  # sums to 1
    validation: list[Any] | None = None  # sources of a separate validation split, if any
    description: str = ""
    fingerprint: str = ""  # identifies the text (tokenizer cache key)
    bad_lines: BadLineCounter = field(default_factory=BadLineCounter)


def _normalise(weights: list[float], domains: list[str], key: str) -> list[float]:
    total = float(sum(weights))
    if total <= 0:
        raise ConfigError(f"{key} has no positive weight for the domains {domains}")
    return [w / total for w in weights]


def mixture_from(cfg: DataConfig, domains: list[str], measured: Callable[[], list[float]]) -> list[float]:
    if cfg.natural_mixture is None:
        return _normalise(measured(), domains, "the measured domain sizes")
    missing = [d for d in domains if d not in cfg.natural_mixture]
    if missing:
        raise ConfigError(f"dataset.natural_mixture has no entry for domains {missing}")
    return _normalise([float(cfg.natural_mixture[d]) for d in domains], domains, "dataset.natural_mixture")


def _select_domains(available: list[str], requested: list[str] | None, where: str) -> list[str]:
    if requested is None:
        return sorted(available)
    unknown = [d for d in requested if d not in available]
    if unknown:
        raise ConfigError(f"dataset.domains names {unknown}, not found in {where}; available: {sorted(available)}")
    return list(requested)


def _domain_file_name(path: Path) -> str:
    name = path.name
    for suffix in JSONL_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _gz_size(path: Path) -> int:
    """Uncompressed size of a gzip file (its ISIZE trailer, mod 2**32)."""
    with open(path, "rb") as handle:
        handle.seek(-4, os.SEEK_END)
        return int.from_bytes(handle.read(4), "little")


def _file_text_bytes(path: Path) -> int:
    return _gz_size(path) if path.name.endswith(".gz") else path.stat().st_size


def jsonl_directory_corpus(cfg: DataConfig, directory: Path, description: str) -> Corpus:
    """One ``DOMAIN.jsonl`` (or ``.jsonl.gz``) per domain in ``directory``."""
    files = {_domain_file_name(p): p for p in sorted(directory.iterdir()) if p.name.endswith(JSONL_SUFFIXES)}
    if not files:
        raise DataError(f"{directory} holds no *.jsonl or *.jsonl.gz files (one per domain)")
    domains = _select_domains(list(files), cfg.domains, str(directory))
    bad = BadLineCounter(skip=cfg.skip_bad_lines)
    train = [JsonlDomainSource(d, [files[d]], cfg.text_field, bad=bad) for d in domains]
    mixture = mixture_from(cfg, domains, lambda: [float(_file_text_bytes(files[d])) for d in domains])
    fingerprint = json.dumps([[d, files[d].stat().st_size, files[d].stat().st_mtime_ns] for d in domains])
    return Corpus(domains, train, mixture, description=description, fingerprint=text_digest(fingerprint),
                  bad_lines=bad)


def jsonl_file_corpus(cfg: DataConfig, path: Path) -> Corpus:
    """A single jsonl file whose records name their domain in ``dataset.domain_field``."""
    if cfg.domain_field is None:
        raise ConfigError(f"dataset.path={path} is a single file: set dataset.domain_field to the field "
                          "naming each record's domain (or give a directory with one file per domain)")
    bad = BadLineCounter(skip=cfg.skip_bad_lines)
    sizes: dict[str, float] = {}
    for _, record in iter_jsonl_records(path, bad):
        text = get_field(record, cfg.text_field)
        domain = get_field(record, cfg.domain_field)
        if isinstance(text, str) and domain is not None:
            sizes[str(domain)] = sizes.get(str(domain), 0.0) + len(text.encode("utf-8"))
    domains = _select_domains(list(sizes), cfg.domains, str(path))
    train = [JsonlDomainSource(d, [path], cfg.text_field, cfg.domain_field, bad=bad) for d in domains]
    mixture = mixture_from(cfg, domains, lambda: [sizes[d] for d in domains])
    fingerprint = text_digest(json.dumps([str(path), path.stat().st_size, path.stat().st_mtime_ns, domains]))
    return Corpus(domains, train, mixture, description=f"jsonl file {path}", fingerprint=fingerprint,
                  bad_lines=bad)


def text_digest(text: str) -> str:
    """sha256 hex digest of a description (cache keys)."""
    return hashlib.sha256(text.encode()).hexdigest()


def jsonl_corpus(cfg: DataConfig) -> Corpus:
    path = Path(os.path.expanduser(str(cfg.path)))
    if not path.exists():
        raise DataError(f"dataset.path={path} does not exist (a directory with one DOMAIN.jsonl per domain, "
                        "or a jsonl file with dataset.domain_field)")
    if path.is_dir():
        return jsonl_directory_corpus(cfg, path, f"jsonl directory {path}")
    return jsonl_file_corpus(cfg, path)
