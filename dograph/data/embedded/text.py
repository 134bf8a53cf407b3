"""Text helpers: cleaning, decoding, paragraph chunking, unit splitting and file listing."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

_MIN_UNIT_CHARS = 200  # FAQ/chapter units shorter than this (bare headings) are merged into the next
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _clean(text: str) -> str:
    """Unix newlines, overstrikes (``x\\b``) and control characters removed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", re.sub(r".\x08", "", text))


def _chunks(text: str, max_chars: int) -> list[str]:
    """Split at paragraph (blank-line) boundaries into pieces of at most ``max_chars``; no empty pieces."""
    text = re.sub(r"^(?:[ \t]*\n)+", "", text).rstrip()
    if not text.strip():
        return []
    if len(text) <= max_chars:
        return [text]
    out: list[str] = []
    current = ""
    for piece in _pieces(text, max_chars):
        if current and len(current) + 2 + len(piece) > max_chars:
            out.append(current)
            current = piece
        else:
            current = f"{current}\n\n{piece}" if current else piece
    out.append(current)
    return [c for c in out if c.strip()]


def _pieces(text: str, max_chars: int) -> Iterator[str]:
    """Paragraphs; one longer than ``max_chars`` is cut at line ends, a longer line at ``max_chars``."""
    for para in re.split(r"\n[ \t]*\n", text):
        if not para.strip():
            continue
        if len(para) <= max_chars:
            yield para
            continue
        current = ""
        for line in para.split("\n"):
            while len(line) > max_chars:
                yield line[:max_chars]
                line = line[max_chars:]
            if current and len(current) + 1 + len(line) > max_chars:
                yield current
                current = line
            else:
                current = f"{current}\n{line}" if current else line
        if current.strip():
            yield current


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _split_at(lines: list[str], is_start: Callable[[int], bool]) -> list[str]:
    """Units of lines, a new one at each index where ``is_start``; the first is the preamble."""
    units: list[list[str]] = [[]]
    for i, line in enumerate(lines):
        if is_start(i):
            units.append([])
        units[-1].append(line)
    return ["\n".join(u) for u in units]


def _merge_short(units: Iterable[str], min_chars: int = _MIN_UNIT_CHARS) -> list[str]:
    """Prepend units shorter than ``min_chars`` (bare headings) to the next unit."""
    out: list[str] = []
    carry = ""
    for unit in units:
        unit = f"{carry}\n\n{unit}" if carry else unit
        if len(unit.strip()) < min_chars:
            carry = unit
            continue
        out.append(unit)
        carry = ""
    if carry.strip() and out:
        out[-1] = f"{out[-1]}\n\n{carry}"
    elif carry.strip():
        out.append(carry)
    return out


def _files(root: Path, pattern: str) -> list[Path]:
    """Regular files (no symlinks) under ``root`` whose relative path matches ``pattern``, sorted."""
    regex = re.compile(pattern)
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if regex.search(rel) and path.is_file() and not path.is_symlink():
                found.append((rel, path))
    return [p for _, p in sorted(found)]


def _stdlib_files(root: Path) -> list[Path]:
    """The standard library's ``*.py`` files, without test directories and site-packages, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        found.extend(Path(dirpath, n) for n in filenames if n.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())
