"""SlimPajama-6B and the Pile streamed from the Hugging Face hub with ``datasets``.

The same code reads a local directory with the hub dataset's schema (files named by split,
records with ``text`` and a ``meta`` dict naming the domain), which is how it is tested
without network. A hub that cannot be reached fails fast with a message that says what to
use instead.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dograph.config import DataConfig
from dograph.data.sources import NO_NETWORK_HINT, Corpus, HFDomainSource, get_field, mixture_from, text_digest
from dograph.errors import ConfigError, DataError

MEASURE_DOCS = 20_000  # documents read to measure domain shares when none are configured (our choice)


def _is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).exists()


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub endpoint, so a machine without network fails in seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def open_split(cfg: DataConfig, split: str) -> Any:
    """A streaming ``IterableDataset`` of one split, from the hub or a local directory."""
    from datasets import load_dataset

    path = str(cfg.path)
    if _is_local(path):
        local = Path(os.path.expanduser(path))
        if not local.is_dir():
            raise DataError(f"dataset.path={local} does not exist (a hub id or a local dataset directory)")
        path = str(local)
    elif not hub_reachable():
        raise DataError(f"cannot reach the Hugging Face hub for dataset {path!r}: {NO_NETWORK_HINT}")
    try:
        return load_dataset(path, name=cfg.hf_config, split=split, streaming=True)
    except (ValueError, KeyError) as exc:
        raise DataError(f"dataset {path!r} has no split {split!r} ({exc})") from exc
    except Exception as exc:  # datasets raises many types for an unreachable or malformed source
        raise DataError(f"cannot load dataset {path!r} split {split!r} ({type(exc).__name__}: {exc}); "
                        f"{NO_NETWORK_HINT}") from exc


def _domain_sizes(stream: Iterator[Any], cfg: DataConfig, limit: int) -> dict[str, float]:
    sizes: dict[str, float] = {}
    for example in islice(stream, limit):
        domain, text = get_field(example, str(cfg.domain_field)), get_field(example, cfg.text_field)
        if domain is not None and isinstance(text, str):
            sizes[str(domain)] = sizes.get(str(domain), 0.0) + len(text.encode("utf-8"))
    return sizes


def hf_corpus(cfg: DataConfig) -> Corpus:
    """Per-domain streams over one HF dataset, filtered by ``dataset.domain_field``."""
    if cfg.domain_field is None:
        raise ConfigError("dataset.domain_field must name the field holding each record's domain")
    first = open_split(cfg, cfg.split)  # fails fast when the source cannot be reached
    sizes: dict[str, float] | None = None
    if cfg.domains is None or cfg.natural_mixture is None:
        sizes = _domain_sizes(iter(first), cfg, MEASURE_DOCS)
    domains = list(cfg.domains) if cfg.domains is not None else sorted(sizes or {})
    if not domains:
        raise DataError(f"dataset {cfg.path!r}: no record has the domain field {cfg.domain_field!r}")
    mixture = mixture_from(cfg, domains, lambda: [float((sizes or {}).get(d, 0.0)) for d in domains])

    def sources(split: str) -> list[HFDomainSource]:
        return [HFDomainSource(d, lambda s=split: open_split(cfg, s), cfg.text_field, str(cfg.domain_field))
                for d in domains]

    validation = sources(cfg.val_split) if cfg.val_split else None
    if cfg.val_split:
        open_split(cfg, cfg.val_split)
    return Corpus(domains, sources(cfg.split), mixture, validation=validation,
                  description=f"HF dataset {cfg.path} ({cfg.split})",
                  fingerprint=text_digest(f"{cfg.path}:{cfg.hf_config}:{cfg.split}:{domains}"))
