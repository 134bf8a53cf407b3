"""Constants and record types shared by the embedded-corpus modules."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from dograph.atomic import publish_directory

DEFAULT_MAX_BYTES_PER_DOMAIN = 8_000_000
CORPUS_VERSION = "v1"
MAX_DOC_CHARS = 20_000
DEFAULT_DOMAINS = ("books", "wiki", "code", "latex", "docs", "informal", "qa")


class _Doc(NamedTuple):
    source: str
    text: str
    nbytes: int


@dataclass(frozen=True)
class _Artifact:
    """One fetched package: where it was unpacked and what the manifest says about it."""

    key: str
    package: str
    version: str
    licence: str
    licence_origin: str
    artifact: str
    sha256: str
    root: Path
    note: str = ""

    def record(self) -> dict[str, str]:
        out = asdict(self)
        del out["root"], out["key"]
        return out


@dataclass(frozen=True)
class _Source:
    """A named text source: the artifacts it needs and a reader yielding (source label, unit text)."""

    name: str
    needs: tuple[str, ...]
    read: Callable[[Mapping[str, _Artifact]], Iterable[tuple[str, str]]]


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def publish_build(tmp: Path, target: Path) -> None:
    """Atomically move a finished cache build into place (another process may have won the race)."""
    publish_directory(tmp, target, marker="manifest.json")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
