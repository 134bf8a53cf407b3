"""Every citation of the design document resolves to one of its headings (docs/design.md).

Code, configs and docs cite the design as ``docs/design.md`` (the whole document) or with
section numbers: ``docs/design.md section 2.4``, ``docs/design.md sections 2.3-2.4``,
``docs/design.md sections 2.1, 2.5 and 6``, ``docs/design.md 2.5``. Each cited number, and
both ends of a range, must be the number of a heading of docs/design.md (``## 2. The
method``, ``### 2.4 The four objectives``), so renumbering a section cannot leave dead
references behind. No file may cite a design or notes file that is not in the repository
(the old ``DESIGN 2.4`` / ``DESIGN.md`` forms pointed at one).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DESIGN_DOC = REPO / "docs" / "design.md"
THIS_FILE = Path(__file__).resolve()  # holds made-up citations and old forms as test data

SOURCE_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".ipynb", ".sh", ".toml"}
SOURCE_NAMES = {"Makefile"}
SKIP_DIRS = {".venv", "venv", ".git", "outputs", "multirun", ".cache", "build", "dist", "__pycache__",
             ".pytest_cache", ".ruff_cache", ".mypy_cache", ".ipynb_checkpoints", "wandb", "node_modules"}
REQUIRED_SECTIONS = ("1", "2", "2.1", "2.2", "2.3", "2.4", "2.5", "2.6", "3", "4", "5", "6")

_NUMBER = r"\d+(?:\.\d+)*"
_ITEM = rf"{_NUMBER}(?:\s*[-–]\s*{_NUMBER})?"  # a section or a range of sections
_SEPARATOR = r"(?:\s*,\s*(?:and\s+)?|\s+and\s+)"
CITATION = re.compile(
    r"docs/design\.md\)?"  # the path, possibly closing a Markdown link
    rf"(?:(?:,?\s+(?:§\s*|sections?\s+)|[ \t]+)(?P<sections>{_ITEM}(?:{_SEPARATOR}{_ITEM})*))?",
    re.IGNORECASE,
)
HEADING = re.compile(r"^#{1,6}[ \t]+(\d+(?:\.\d+)*)(?:\.|\s|$)")
FENCE = re.compile(r"^\s*(```|~~~)")

# Citations of documents outside the repository: the old forms ("DESIGN 2.4", "DESIGN section 6",
# "DESIGN.md", "DESIGN's", "(DESIGN)") and the other internal notes they sat next to.
OUTSIDE_REFERENCES = (
    re.compile(r"\b(?:DESIGN|ENVIRONMENT|BASELINES|ARCHITECTURE)\b"),
    re.compile(r"(?<!docs/)\bdesign\.md\b", re.IGNORECASE),
    re.compile(r"\.\./shared\b|\bshared/(?:DESIGN|ENVIRONMENT|BASELINES|ARCHITECTURE)|/work/shared\b"),
)


def cited_sections(text: str) -> list[tuple[int, list[str]]]:
    """(line, section numbers) of every design citation in ``text``; [] numbers: the whole document.

    A range ``2.3-2.4`` contributes both ends.
    """
    found = []
    for match in CITATION.finditer(text):
        numbers = re.findall(_NUMBER, match.group("sections") or "")
        found.append((text.count("\n", 0, match.start()) + 1, numbers))
    return found


def design_headings(markdown: str) -> set[str]:
    """Section numbers of the headings (``## 2. Title``, ``### 2.4 Title``), outside fenced code."""
    numbers, in_fence = set(), False
    for line in markdown.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence and (match := HEADING.match(line)):
            numbers.add(match.group(1))
    return numbers


def dead_citations(text: str, headings: set[str], where: str = "<text>") -> list[str]:
    """``where:line: docs/design.md section N`` for every cited number that is no heading."""
    return [f"{where}:{line}: docs/design.md section {number} has no heading"
            for line, numbers in cited_sections(text) for number in numbers if number not in headings]


def outside_references(text: str, where: str = "<text>") -> list[str]:
    """``where:line: 'text'`` for every mention of a document outside the repository."""
    hits = []
    for pattern in OUTSIDE_REFERENCES:
        for match in pattern.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            hits.append(f"{where}:{line}: {text.splitlines()[line - 1].strip()[:100]!r}")
    return hits


def source_files(root: Path = REPO) -> Iterator[Path]:
    """The repository's source and documentation files, without environments and run outputs."""
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(directory, name)
            if (path.suffix in SOURCE_SUFFIXES or name in SOURCE_NAMES) and path.resolve() != THIS_FILE:
                yield path


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


# ---- the repository ---------------------------------------------------------------------------


def test_design_doc_has_the_cited_sections() -> None:
    assert DESIGN_DOC.is_file(), "docs/design.md is missing"
    missing = [n for n in REQUIRED_SECTIONS if n not in design_headings(read(DESIGN_DOC))]
    assert missing == [], f"docs/design.md lacks the headings of sections {missing}"


def test_every_design_citation_resolves_to_a_heading() -> None:
    headings = design_headings(read(DESIGN_DOC))
    files = [p for p in source_files() if p.resolve() != DESIGN_DOC.resolve()]
    assert REPO / "README.md" in files and REPO / "dograph" / "method" / "mixer.py" in files  # the walk works
    dead = [hit for path in files for hit in dead_citations(read(path), headings, str(path.relative_to(REPO)))]
    assert dead == [], "dead design citations:\n" + "\n".join(dead)


def test_no_citation_of_a_document_outside_the_repository() -> None:
    hits = [hit for path in source_files() for hit in outside_references(read(path), str(path.relative_to(REPO)))]
    assert hits == [], ("cite docs/design.md (section N) instead of documents outside the repository:\n"
                        + "\n".join(hits))


def test_readme_lists_docs_in_what_is_inside() -> None:
    readme = read(REPO / "README.md")
    inside = readme.split("## What is inside", 1)
    assert len(inside) == 2, "README.md has no 'What is inside' section"
    block = inside[1].split("\n## ", 1)[0]
    assert re.search(r"^docs/", block, re.MULTILINE), "README's 'What is inside' does not list docs/"


# ---- the parsers themselves ---------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("see docs/design.md section 2.4.", [["2.4"]]),
    ("(docs/design.md sections 2.3-2.4)", [["2.3", "2.4"]]),
    ("docs/design.md sections 2.1, 2.5 and 6: traps", [["2.1", "2.5", "6"]]),
    ("docs/design.md sections 2.3, 2.4, 5, 6", [["2.3", "2.4", "5", "6"]]),
    ("a rule (docs/design.md 2.5); see also docs/design.md", [["2.5"], []]),
    ("the target (docs/design.md section 5), measured", [["5"]]),
    ("[docs/design.md](docs/design.md) section 2", [[], ["2"]]),
    ("wrapped (docs/design.md\n    section 2.2) over lines", [["2.2"]]),
    ("docs/design.md\n1. a numbered list is no citation", [[]]),
    ("nothing cited here: design, DoGraph 2.4", []),
])
def test_citation_parser(text: str, expected: list[list[str]]) -> None:
    assert [numbers for _, numbers in cited_sections(text)] == expected


def test_heading_parser() -> None:
    doc = ("# Title\n## 1. Claims\n### 1.2 Setting\n## 2. The method\n### 2.4 The four objectives\n"
           "```\n# 7 a comment in a code block\n```\n#### 5.1 How it is measured\n##no space 8\n")
    assert design_headings(doc) == {"1", "1.2", "2", "2.4", "5.1"}


def test_dead_citations_are_reported_with_their_line() -> None:
    headings = {"1", "2", "2.1", "2.4", "5"}
    assert dead_citations("ok: docs/design.md section 2.4", headings) == []
    assert dead_citations("line one\nsee docs/design.md section 9.9", headings, "x.py") == [
        "x.py:2: docs/design.md section 9.9 has no heading"]
    assert dead_citations("docs/design.md sections 2.1-2.9", headings) == [
        "<text>:1: docs/design.md section 2.9 has no heading"]
    assert dead_citations("docs/design.md sections 2, 3", headings) == [
        "<text>:1: docs/design.md section 3 has no heading"]


@pytest.mark.parametrize("text", [
    "weights (DESIGN 2.4)", "a trap (DESIGN section 6)", "DoGraph as built (DESIGN.md section 2)",
    "DESIGN's 1.3-1.4 prototype figure", '"< 2 ms (DESIGN), < 5 ms"', "see ../shared/DESIGN.md",
    "the files tiktoken checks (ENVIRONMENT.md)", "layout rules (ARCHITECTURE section 2.4)",
    "see design.md section 2",
])
def test_outside_references_are_caught(text: str) -> None:
    assert outside_references(text) != []


@pytest.mark.parametrize("text", [
    "weights (docs/design.md section 2.4)", "the design of the method", "environment.yml",
    "shared by all ranks", "DESIGN_NOTES = 1",
])
def test_in_repository_references_pass(text: str) -> None:
    assert outside_references(text) == []
