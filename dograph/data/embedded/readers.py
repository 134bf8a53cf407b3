"""Per-source readers: each turns its unpacked artifacts into (source label, unit text) pairs.

A unit is a natural document (a chapter, an article, a source file, a dictionary entry, a fortune, a
FAQ entry); the builder cleans and chunks it afterwards.
"""

from __future__ import annotations

import bz2
import gzip
import html
import re
import textwrap
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator, Mapping

from dograph.data.embedded import fetch
from dograph.data.embedded.common import _Artifact
from dograph.data.embedded.rdata import _decompress_any, _rdb_record, _RXdr
from dograph.data.embedded.text import _decode, _files, _merge_short, _split_at, _stdlib_files

_GENSIM = "gensim==4.4.0"
_ENWIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s?(.*)$")


# --------------------------------------------------------------------------- books


def _read_bible(arts: Mapping[str, _Artifact]) -> Iterator[tuple[str, str]]:
    """KJV chapters, decoded by the package's own ``bible`` program (bible(1): ``-f``, one verse a line)."""
    program = arts["deb:bible-kjv"].root / "usr/bin/bible"
    data_dir = arts["deb:bible-kjv-text"].root / "usr/lib"
    out = fetch._run([str(program), "-p", str(data_dir), "-f", "Gen1:1-Rev22:21"], fetch._TIMEOUT_TOOL_S)
    chapters: dict[tuple[str, str], list[str]] = {}  # insertion-ordered: Genesis 1 .. Revelation 22
    last: list[str] | None = None
    for line in out.decode("utf-8", "replace").splitlines():
        verse = _VERSE.match(line)
        if verse:
            last = chapters.setdefault((verse[1], verse[2]), [])
            last.append(f"{verse[3]} {verse[4]}")
        elif last and line.strip():
            last[-1] += " " + line.strip()
    for (book, number), verses in chapters.items():
        yield f"bible-kjv-text:{book}{number}", f"{book} {number}\n\n" + "\n".join(verses)


def _read_austen(arts: Mapping[str, _Artifact]) -> Iterator[tuple[str, str]]:
    """Chapters of the six novels stored in janeaustenr's R lazy-load database (data/Rdata.rd[bx])."""
    data = arts["deb:r-cran-janeaustenr"].root / "usr/lib/R/site-library/janeaustenr/data"
    index = _RXdr(_decompress_any((data / "Rdata.rdx").read_bytes())).item()
    rdb = (data / "Rdata.rdb").read_bytes()
    for name, (offset, length) in index["variables"].items():
        lines = _RXdr(_rdb_record(rdb[offset:offset + length])).item()
        if isinstance(lines, list) and all(x is None or isinstance(x, str) for x in lines):
            for chapter in _austen_chapters([x or "" for x in lines]):
                yield f"r-cran-janeaustenr:{name}", chapter


def _austen_chapters(lines: list[str]) -> list[str]:
    heading = re.compile(r"^\s*(CHAPTER|Chapter)\s+([IVXLCDM]+|\d+)\b")
    return _merge_short(_split_at(lines, lambda i: bool(heading.match(lines[i]))))


# --------------------------------------------------------------------------- wiki


def _read_enwiki(arts: Mapping[str, _Artifact]) -> Iterator[tuple[str, str]]:
    """Articles (namespace 0, no redirects) of the Wikipedia dump excerpt in gensim's test data."""
    with zipfile.ZipFile(arts[f"wheel:{_GENSIM}"].root) as archive:
        xml = bz2.decompress(archive.read(_ENWIKI_MEMBER))
    root = ET.fromstring(xml)
    ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    for page in root.iter(f"{ns}page"):
        title = page.findtext(f"{ns}title") or ""
        text = page.findtext(f"{ns}revision/{ns}text") or ""
        if page.findtext(f"{ns}ns") == "0" and not text.lstrip().upper().startswith("#REDIRECT"):
            yield f"gensim:enwiki/{title}", f"{title}\n\n{_strip_wiki(text)}"


def _wiki_link(match: re.Match) -> str:
    inner = match.group(1)
    target, _, label = inner.partition("|")
    if re.match(r"\s*(File|Image|Category|Media)\s*:", target, re.I):
        return ""
    if not label and re.match(r"[a-z][a-z-]{1,11}:", target):  # interlanguage/interwiki link
        return ""
    return inner.rsplit("|", 1)[-1]


def _strip_wiki(text: str) -> str:
    """Rough MediaWiki markup removal: comments, refs, tables, templates, links, quotes, headings."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S | re.I)
    nested = ((r"\{\{[^{}]*\}\}", ""), (r"\{\|[^{}]*?\|\}", ""), (r"\[\[([^\[\]]*)\]\]", _wiki_link))
    for pattern, repl in nested:
        previous = None
        while previous != text:  # innermost first, until nothing nested is left
            previous, text = text, re.sub(pattern, repl, text, flags=re.S)
    text = re.sub(r"\[(?:https?|ftp)://\S+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = html.unescape(text)
    text = re.sub(r"'{2,5}", "", text)
    text = re.sub(r"(?m)^(=+)\s*(.*?)\s*\1\s*$", r"\2", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _dict_b64(value: str) -> int:
    """dictd index numbers are base-64 with the alphabet A-Za-z0-9+/ (dictd(8), 'index' format)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    number = 0
    for char in value:
        number = number * 64 + alphabet.index(char)
    return number


def _read_foldoc(arts: Mapping[str, _Artifact]) -> Iterator[tuple[str, str]]:
    """FOLDOC entries, located through the dictd index (``.dict.dz`` is dictzip, i.e. gzip)."""
    base = arts["deb:dict-foldoc"].root / "usr/share/dictd"
    data = gzip.decompress((base / "foldoc.dict.dz").read_bytes())
    spans = set()
    for line in (base / "foldoc.index").read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and not parts[0].startswith(("00-database", "00database")):
            spans.add((_dict_b64(parts[1]), _dict_b64(parts[2])))
    for offset, length in sorted(spans):
        first, _, body = data[offset:offset + length].decode("utf-8", "replace").partition("\n")
        body = re.sub(r"\{([^{}]*)\}", r"\1", textwrap.dedent(body))  # {cross-reference} -> text
        yield "dict-foldoc:foldoc.dict", f"{first}\n{body}"


# --------------------------------------------------------------------------- code, latex, docs


def _read_stdlib(arts: Mapping[str, _Artifact]) -> Iterator[tuple[str, str]]:
    root = arts["local:stdlib"].root
    for path in _stdlib_files(root):
        yield f"python-stdlib:{path.relative_to(root).as_posix()}", _decode(path.read_bytes())


def _read_tex(arts: Mapping[str, _Artifact]) -> Iterator[tuple[str, str]]:
    root = arts["deb:texlive-science-doc"].root
    for path in _files(root, r"\.tex(\.gz)?$"):
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
        yield f"texlive-science-doc:{path.relative_to(root / 'usr/share/doc').as_posix()}", _decode(data)


def _rst_sections(text: str) -> list[str]:
    """Split reStructuredText at section titles (a line underlined by a run of one punctuation char)."""
    lines = text.split("\n")
    underline = re.compile(r"([=\-~^\"'`#*+])\1{2,}")

    def is_title(i: int) -> bool:
        if i + 1 >= len(lines) or not lines[i].strip() or lines[i][0].isspace():
            return False
        below = lines[i + 1].rstrip()
        return bool(underline.fullmatch(below)) and len(below) >= len(lines[i].rstrip())

    return _merge_short(_split_at(lines, is_title))


def _read_python_docs(arts: Mapping[str, _Artifact], *, faq: bool) -> Iterator[tuple[str, str]]:
    """Python's reST sources: whole files for docs; for qa, each question of the FAQ."""
    root = arts["deb:python3.11-doc"].root
    for path in _files(root, r"usr/share/doc/python3[.\d]*/html/_sources/.+\.rst\.txt$"):
        rel = path.relative_to(root).as_posix().split("/_sources/", 1)[1]
        if rel.startswith("faq/") != faq:
            continue
        text = _decode(path.read_bytes())
        for unit in _rst_sections(text) if faq else [text]:
            yield f"python3.11-doc:{rel}", unit


def _read_perl_pods(arts: Mapping[str, _Artifact], *, faq: bool) -> Iterator[tuple[str, str]]:
    """Perl's POD pages: whole files for docs (FAQ excluded); for qa, each ``=head2`` of perlfaq1-9."""
    root = arts["deb:perl-doc"].root
    for path in _files(root, r"usr/share/perl/[^/]+/pod/[^/]+\.pod$"):
        is_faq = re.fullmatch(r"perlfaq\d+\.pod", path.name) is not None
        if (faq and not is_faq) or (not faq and path.name.startswith("perlfaq")):
            continue
        text = _decode(path.read_bytes())
        if faq:
            lines = text.split("\n")
            units = _merge_short(_split_at(lines, lambda i, ls=lines: ls[i].startswith("=head2 ")))
        else:
            units = [text]
        for unit in units:
            yield f"perl-doc:{path.name}", unit


# --------------------------------------------------------------------------- informal, qa


def _read_fortunes(arts: Mapping[str, _Artifact]) -> Iterator[tuple[str, str]]:
    """One fortune per document: files are separated by lines holding ``%`` (strfile(1) format)."""
    root = arts["deb:fortunes"].root
    for path in _files(root, r"^usr/share/games/fortunes/[^/]+$"):
        if path.suffix in (".dat", ".u8"):
            continue
        for fortune in re.split(r"(?m)^%[ \t]*$", _decode(path.read_bytes())):
            if fortune.strip():
                yield f"fortunes:{path.name}", fortune


def _index_like(unit: str) -> bool:
    """A table of contents or headword list: many lines, nearly all short."""
    lines = [line.strip() for line in unit.split("\n") if line.strip()]
    return len(lines) >= 20 and sum(len(line) < 40 for line in lines) >= 0.9 * len(lines)


def _read_jargon(arts: Mapping[str, _Artifact]) -> Iterator[tuple[str, str]]:
    """Jargon File entries (``   :word: ...`` lines) and chapters; contents and headword lists dropped."""
    path = arts["deb:jargon-text"].root / "usr/share/doc/jargon-text/jargon.txt.gz"
    start = re.compile(r"^(\S|  \S|   :[^:\s][^:]*:)")
    lines = _drop_contents(_decode(gzip.decompress(path.read_bytes())).split("\n"), start)
    units = _split_at(lines, lambda i: bool(start.match(lines[i])))[1:]
    for unit in units:
        if not re.match(r"  \S", unit) and not _index_like(unit):  # two-space lines head letter indexes
            yield "jargon-text:jargon.txt", unit


def _drop_contents(lines: list[str], start: re.Pattern) -> list[str]:
    """Remove each 'Table of Contents' block: up to the next unit start or prose line (>= 60 chars)."""
    out, inside = [], False
    for line in lines:
        if line.strip() == "Table of Contents":
            inside = True
            continue
        if inside and (start.match(line) or len(line.strip()) >= 60):
            inside = False
        if not inside:
            out.append(line)
    return out


def _read_debian_faq(arts: Mapping[str, _Artifact]) -> Iterator[tuple[str, str]]:
    """Questions of the Debian FAQ (plain-text edition), split at ``N.M.`` headings."""
    path = arts["deb:debian-faq"].root / "usr/share/doc/debian/FAQ/debian-faq.en.txt.gz"
    text = _decode(gzip.decompress(path.read_bytes())).replace("\xa0", " ")
    lines = [line for line in text.split("\n") if not re.match(r"Chapter \d+\. ", line)]
    units = _split_at(lines, lambda i: bool(re.match(r"\d+\.\d+\.(\d+\.)* ", lines[i])))[1:]
    for unit in _merge_short(units):
        yield "debian-faq:debian-faq.en.txt", unit
