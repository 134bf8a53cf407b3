"""Files and directories written whole or not at all (dograph/atomic.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dograph.atomic import open_atomically, publish_directory, replace_atomically, write_text_atomically


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    write_text_atomically(target, "one")
    write_text_atomically(target, "two", durable=True)
    assert target.read_text() == "two" and [p.name for p in target.parent.iterdir()] == ["a.json"]


@pytest.mark.parametrize("how", ["path", "handle"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, how: str) -> None:
    target = tmp_path / "a.csv"
    target.write_text("old")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        if how == "path":
            replace_atomically(target, broken)
        else:
            with open_atomically(target, "w") as handle:
                handle.write("half")
                raise RuntimeError("disk full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.csv"]


def test_temporaries_are_unique_per_call(tmp_path: Path) -> None:
    seen: list[str] = []
    for _ in range(2):
        replace_atomically(tmp_path / "x", lambda tmp: (seen.append(tmp.name), tmp.write_text("x")))
    assert len(set(seen)) == 2 and all(name.startswith(".x.") for name in seen)


def test_publishing_a_directory_yields_to_a_complete_one_and_replaces_when_asked(tmp_path: Path) -> None:
    target = tmp_path / "cache"
    first = tmp_path / ".first"
    first.mkdir()
    (first / "manifest.json").write_text("{}")
    publish_directory(first, target, marker="manifest.json")
    assert (target / "manifest.json").is_file() and not first.exists()
    late = tmp_path / ".late"
    (late / "more").mkdir(parents=True)  # a non-empty target cannot be replaced: the other build won
    (target / "data").write_text("x")
    publish_directory(late, target, marker="manifest.json")
    assert not late.exists() and (target / "data").is_file()
    broken = tmp_path / ".broken"
    (broken / "more").mkdir(parents=True)
    (target / "manifest.json").unlink()  # no marker: the target is no complete build, the failure is real
    with pytest.raises(OSError):
        publish_directory(broken, target, marker="manifest.json")
    again = tmp_path / ".again"
    again.mkdir()
    (again / "record.json").write_text("new")
    publish_directory(again, target, replace=True)
    assert [p.name for p in target.iterdir()] == ["record.json"]
