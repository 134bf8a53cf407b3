"""Licence metadata of the Debian packages: DEP-5 parsing, with a hand-read table as fallback."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

# Licences of packages whose debian/copyright is free-form (read by hand from those files, bookworm).
_HAND_LICENCES: Mapping[str, tuple[str, str]] = MappingProxyType({
    "bible-kjv-text": ("public-domain", "KJV text (1611) is public domain; BRS packaging GPL-2+"),
    "bible-kjv": ("GPL-2+", "only its decoder program is used; no text comes from it"),
    "dict-foldoc": ("GFDL-1.1+", ""),
    "texlive-science-doc": ("various (LPPL-1.3c, GPL, public-domain; per TeX Live package)", ""),
    "python3.11-doc": ("PSF-2.0", ""),
    "fortunes": ("BSD-3-Clause", "fortune-mod; some cookie files carry their own notices"),
    "jargon-text": ("public-domain", "the Jargon File; Debian packaging GPL"),
    "debian-faq": ("permissive (SPI verbatim/modified-copies notice)", ""),
})
_NOTES: Mapping[str, str] = MappingProxyType({
    "gensim": "Wikipedia article text (gensim test data): CC BY-SA 3.0",
    "r-cran-janeaustenr": "the novels (1811-1818) are public domain",
})


def _deb_note(package: str) -> str:
    """The manifest note of a Debian package: its _NOTES entry, else the hand-read table's note."""
    return _NOTES.get(package, _HAND_LICENCES.get(package, ("", ""))[1])


def _deb_licence(package: str, copyright_file: Path) -> tuple[str, str]:
    """(short licence, where it came from): DEP-5 ``Files: *`` stanza, else the hand-read table."""
    try:
        text = copyright_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    # Machine-readable format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
    if text.startswith("Format:") and "copyright-format" in text.splitlines()[0]:
        for stanza in re.split(r"\n\s*\n", text):
            if re.search(r"(?m)^Files:\s*\*\s*$", stanza):
                found = re.search(r"(?m)^License:\s*(.+)$", stanza)
                if found:
                    return found.group(1).strip(), "debian/copyright (DEP-5, Files: *)"
    if package in _HAND_LICENCES:
        return _HAND_LICENCES[package][0], "debian/copyright (free-form; short name assigned by hand)"
    return "unknown", "debian/copyright not machine-readable"


def _wheel_licence(meta: str) -> str:
    """Core metadata: License-Expression (metadata 2.4) or the older free-text License field."""
    found = re.search(r"(?m)^License-Expression:\s*(.+)$", meta) or re.search(r"(?m)^License:\s*(.+)$", meta)
    return found.group(1).strip() if found else "unknown"
