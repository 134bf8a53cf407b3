"""The README and docs/ stay navigable: relative links resolve, and the layout the README shows is the package.

Links carry no anchors (``page.md#heading``): a heading that is reworded would leave them dead without
any file going missing. The README's "What is inside" block is checked against the directory listing
of ``dograph/``, so a module that is added, moved or removed cannot leave the front page behind.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import REPO

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target "title"); not images
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:
FENCE = re.compile(r"^\s*(```|~~~)")
PY_NAME = re.compile(r"(?<![\w/.])(\w+\.py)\b")  # a bare module file name, not part of a longer path
DIR_NAME = re.compile(r"(?<![\w/.])(\w+)/(?![\w.])")  # a bare folder name, not a path into it
IGNORED = {"__init__.py", "__pycache__"}


def doc_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def prose(markdown: str) -> str:
    """The text outside fenced code blocks (a link inside a code block is an example, not a link)."""
    kept, in_fence = [], False
    for line in markdown.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            kept.append(line)
    return "\n".join(kept)


def relative_links(markdown: str) -> list[str]:
    return [t for t in LINK.findall(prose(markdown)) if not EXTERNAL.match(t) and not t.startswith("#")]


def bad_links(page: Path) -> list[str]:
    """``page: target (why)`` for every relative link that has an anchor or names no existing file."""
    bad = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        where = f"{page.relative_to(REPO)}: {target}"
        if "#" in target:
            bad.append(f"{where} (an anchor: link the page, name the section in words)")
        elif not (page.parent / target).resolve().exists():
            bad.append(f"{where} (no such file)")
    return bad


def listing(directory: Path) -> set[str]:
    """What ``ls`` shows, without ``__init__.py`` and caches; directories end in ``/``."""
    return {p.name + ("/" if p.is_dir() else "") for p in directory.iterdir()
            if p.name not in IGNORED and not p.name.startswith(".")}


def layout_entries(readme: str) -> dict[str, tuple[list[str], str]]:
    """The ``dograph/`` entries of README's "What is inside": first name -> (names, description).

    An entry is a line indented by exactly two spaces inside the code block: its names (one or more,
    single-spaced: ``errors.py models.py``), two or more spaces, then a description that deeper-indented
    lines continue.
    """
    section = readme.split("## What is inside", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    entries: dict[str, tuple[list[str], str]] = {}
    current = None
    for line in block.splitlines():
        if re.match(r"^  \S", line):
            names, _, description = line.strip().partition("  ")
            current = names.split()[0]
            entries[current] = (names.split(), description)
        elif current and re.match(r"^   +\S", line):
            names, description = entries[current]
            entries[current] = (names, description + "\n" + line.strip())
        else:
            current = None
    return entries


def named_in(description: str) -> set[str]:
    """The module files (``a.py``) and folders (``objectives/``) a description names."""
    return set(PY_NAME.findall(description)) | {d + "/" for d in DIR_NAME.findall(description)}


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve_without_anchors(page: Path) -> None:
    assert page.is_file()
    assert bad_links(page) == []


def test_readme_links_every_docs_page() -> None:
    linked = {(REPO / t).resolve() for t in relative_links((REPO / "README.md").read_text(encoding="utf-8"))}
    missing = [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked]
    assert missing == [], f"README.md does not link docs/{missing}"


def test_readme_layout_is_the_package_listing() -> None:
    entries = layout_entries((REPO / "README.md").read_text(encoding="utf-8"))
    shown = {name for names, _ in entries.values() for name in names}
    actual = listing(REPO / "dograph")
    assert shown == actual, f"README's dograph/: missing {sorted(actual - shown)}, not there {sorted(shown - actual)}"
    for package in sorted(n for n in actual if n.endswith("/")):
        named, files = named_in(entries[package][1]), listing(REPO / "dograph" / package)
        assert named == files, f"README's {package}: missing {sorted(files - named)}, not there {sorted(named - files)}"


# ---- the checks themselves ------------------------------------------------------------------------


def test_a_dead_link_and_an_anchor_are_reported(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    (tmp_path / "there.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md) [web](https://example.org) [gone](missing.md) [anchor](there.md#a)\n"
                    "```\n[in code](nowhere.md)\n```\n![image](also_missing.png)\n")
    assert bad_links(page) == ["page.md: missing.md (no such file)",
                               "page.md: there.md#a (an anchor: link the page, name the section in words)"]


def test_layout_entries_follow_the_indentation() -> None:
    readme = ("## What is inside\n\n```\ndograph/   the library\n  a.py       one\n  step/      b.py, c.py\n"
              "             d.py and e/\n  f.py g.py  shared\ntests/     tests\n```\n## Next\n")
    entries = layout_entries(readme)
    assert set(entries) == {"a.py", "step/", "f.py"}
    assert entries["f.py"] == (["f.py", "g.py"], "shared")
    assert named_in(entries["step/"][1]) == {"b.py", "c.py", "d.py", "e/"}
    assert named_in("see dograph/mixing.py and conf/mixer") == set()  # paths are not entries
