"""The embedded corpus: built offline from the local stdlib (code domain); real downloads are `slow`."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest

from dograph.data import embedded
from dograph.data.embedded import MAX_DOC_CHARS, ensure_embedded_corpus
from dograph.data.embedded import build as embedded_build
from dograph.data.embedded import common as embedded_common
from dograph.data.embedded import fetch as embedded_fetch
from dograph.data.embedded import licences as embedded_licences
from dograph.data.embedded import rdata as embedded_rdata
from dograph.data.embedded import readers as embedded_readers
from dograph.data.embedded import text as embedded_text
from dograph.errors import ConfigError, DataError

CAP = 200_000


def _build(root: Path, logs: list[str] | None = None, **kwargs) -> Path:
    kwargs.setdefault("domains", ["code"])
    kwargs.setdefault("max_bytes_per_domain", CAP)
    kwargs.setdefault("min_domains", 1)
    return ensure_embedded_corpus(root, log=(logs.append if logs is not None else lambda _: None), **kwargs)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def code_corpus(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("cache"))


def test_code_domain_schema(code_corpus: Path):
    assert code_corpus.parent.name == "embedded"
    assert sorted(p.name for p in code_corpus.iterdir()) == ["code.jsonl", "manifest.json"]
    lines = (code_corpus / "code.jsonl").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    records = [json.loads(line) for line in lines[:-1]]
    assert len(records) > 5
    for record in records:
        assert set(record) == {"text", "source"}
        assert isinstance(record["text"], str) and record["text"].strip()
        assert len(record["text"]) <= MAX_DOC_CHARS
        assert record["source"].startswith("python-stdlib:") and record["source"].endswith(".py")
    assert not any("/test/" in r["source"] or "/tests/" in r["source"] for r in records)


def test_code_domain_manifest(code_corpus: Path):
    manifest = json.loads((code_corpus / "manifest.json").read_text())
    assert manifest["corpus_version"] == embedded.CORPUS_VERSION and manifest["build_date"]
    assert list(manifest["domains"]) == ["code"]
    entry = manifest["domains"]["code"]
    path = code_corpus / entry["file"]
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert entry["sha256"] == _sha256(path)
    assert entry["file_bytes"] == path.stat().st_size
    assert entry["documents"] == len(records)
    assert entry["text_bytes"] == sum(len(r["text"].encode()) for r in records)
    assert CAP * 0.8 < entry["text_bytes"] <= CAP
    (source,) = entry["sources"]
    assert source["name"] == "python-stdlib" and source["text_bytes"] == entry["text_bytes"]
    (package,) = source["packages"]
    assert package["package"] == "python-stdlib" and package["licence"] == "PSF-2.0"
    assert package["version"] and len(package["sha256"]) == 64


def test_second_call_reuses_cache(tmp_path: Path, monkeypatch):
    first = _build(tmp_path)

    def no_build(*args, **kwargs):
        raise AssertionError("the cached corpus should have been reused")

    monkeypatch.setattr(embedded_build, "_build_corpus", no_build)
    logs: list[str] = []
    assert _build(tmp_path, logs) == first
    assert any("reusing" in line for line in logs)


def test_two_builds_are_identical(tmp_path: Path, code_corpus: Path):
    other = _build(tmp_path)
    assert other.name == code_corpus.name
    assert _sha256(other / "code.jsonl") == _sha256(code_corpus / "code.jsonl")


def test_other_parameters_get_their_own_directory(tmp_path: Path, code_corpus: Path):
    smaller = _build(tmp_path, max_bytes_per_domain=50_000)
    assert smaller.name != code_corpus.name
    assert json.loads((smaller / "manifest.json").read_text())["domains"]["code"]["text_bytes"] <= 50_000


def test_corrupted_file_is_named(tmp_path: Path):
    corpus = _build(tmp_path)
    path = corpus / "code.jsonl"
    data = bytearray(path.read_bytes())
    data[10] = ord("#") if data[10] != ord("#") else ord("!")
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"code\.jsonl.*delete"):
        _build(tmp_path)
    path.unlink()
    with pytest.raises(DataError, match=r"code\.jsonl"):
        _build(tmp_path)


def test_failed_sources_below_min_domains_raise(tmp_path: Path, monkeypatch):
    def offline(keys, dl_dir):
        raise DataError("no network")

    monkeypatch.setattr(embedded_fetch, "_fetch_remote", offline)
    logs: list[str] = []
    with pytest.raises(DataError, match=r"qa: .*no network"):
        _build(tmp_path, logs, domains=["code", "qa"], min_domains=2)
    assert any("skipping domain qa" in line for line in logs)
    assert not (tmp_path / "embedded").exists() or not any((tmp_path / "embedded").iterdir())


def test_failed_sources_are_skipped_when_enough_domains_remain(tmp_path: Path, monkeypatch):
    def offline(keys, dl_dir):
        raise DataError("no network")

    monkeypatch.setattr(embedded_fetch, "_fetch_remote", offline)
    corpus = _build(tmp_path, domains=["code", "qa"], min_domains=1)
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert list(manifest["domains"]) == ["code"]
    assert "no network" in " ".join(manifest["problems"]["qa"])
    assert not (corpus / "qa.jsonl").exists()


def test_unknown_domain_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="nosuch"):
        _build(tmp_path, domains=["nosuch"])


# ------------------------------------------------------------------ helpers


def test_chunks_split_at_paragraphs():
    paragraphs = [f"paragraph {i} " + "x" * 90 for i in range(50)]
    chunks = embedded_text._chunks("\n\n".join(paragraphs), 1000)
    assert all(len(c) <= 1000 for c in chunks) and len(chunks) > 1
    assert "\n\n".join(chunks).split("\n\n") == paragraphs
    assert embedded_text._chunks("a" * 2500, 1000) == ["a" * 1000, "a" * 1000, "a" * 500]
    assert embedded_text._chunks(" \n\n \n", 1000) == []


def test_select_is_byte_fair_and_capped():
    doc = embedded_common._Doc
    big = [doc("a", "x" * 100, 100) for _ in range(20)]
    small = [doc("b", "y" * 10, 10) for _ in range(500)]
    chosen = embedded_build._select([big, small], 1000)
    taken = [sum([big, small][i][j].nbytes for i2, j in chosen if i2 == i) for i in (0, 1)]
    assert sum(taken) <= 1000 and abs(taken[0] - taken[1]) <= 100


def test_strip_wiki_markup():
    text = ("'''Foo''' is a {{cite|x={{y}}}} [[bar|baz]] and [[qux]].<ref>note</ref> "
            "[[File:a.png|thumb|a [[b]] c]][http://x.org Site]\n== Head ==\n[[de:Foo]]")
    assert embedded_readers._strip_wiki(text) == "Foo is a  baz and qux. Site\nHead"


def _xdr_ints(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def _xdr_chars(text: str) -> bytes:
    data = text.encode()
    return _xdr_ints(0x00040009, len(data)) + data


def test_r_xdr_reader_reads_strings_and_named_lists():
    header = b"X\n" + _xdr_ints(3, 0x040201, 0x030500, 5) + b"UTF-8"
    strings = header + _xdr_ints(16, 2) + _xdr_chars("EMMA") + _xdr_ints(9, -1)
    assert embedded_rdata._RXdr(strings).item() == ["EMMA", None]
    named = (header + _xdr_ints(0x213, 1, 13, 2, 5, 7) + _xdr_ints(0x402, 1) + _xdr_chars("names")
             + _xdr_ints(16, 1) + _xdr_chars("emma") + _xdr_ints(254))
    assert embedded_rdata._RXdr(named).item() == {"emma": [5, 7]}


def test_dictd_base64_numbers():
    assert embedded_readers._dict_b64("B") == 1
    assert embedded_readers._dict_b64("BA") == 64
    assert embedded_readers._dict_b64("Gb9L") == ((6 * 64 + 27) * 64 + 61) * 64 + 11


def test_dep5_licence_and_hand_fallback(tmp_path: Path):
    dep5 = tmp_path / "dep5"
    dep5.write_text("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
                    "Upstream-Name: x\n\nFiles: *\nCopyright: 2020 A\nLicense: MIT\n\n"
                    "Files: debian/*\nLicense: GPL-2+\n")
    assert embedded_licences._deb_licence("anything", dep5)[0] == "MIT"
    free = tmp_path / "free"
    free.write_text("This package was debianized by someone.\n")
    assert embedded_licences._deb_licence("jargon-text", free)[0] == "public-domain"
    assert embedded_licences._deb_licence("unknown-pkg", free)[0] == "unknown"


def test_rst_sections_split_at_titles():
    text = ("=====\nFAQ\n=====\n\nIntro\n\nQuestion one?\n-------------\n\n" + "Answer one. " * 30
            + "\n\nQuestion two?\n-------------\n\n" + "Answer two. " * 30)
    units = embedded_readers._rst_sections(text)
    assert len(units) == 2
    assert "Question one?" in units[0] and units[1].startswith("Question two?")


def test_apt_update_once_then_per_package_fallback(tmp_path: Path, monkeypatch):
    calls: list[list[str]] = []

    def fake_run(cmd, timeout, cwd=None):
        calls.append(list(cmd))
        if cmd[:2] == ["apt-get", "update"]:
            return b""
        if len(calls) == 1 or "missing-pkg" in cmd:  # lists missing at first; one package never exists
            raise embedded_fetch._CommandFailed(cmd, 100, "E: Unable to locate package missing-pkg")
        for name in cmd[2:]:
            (Path(cwd) / f"{name}_1.0_all.deb").write_bytes(b"deb")
        return b""

    monkeypatch.setattr(embedded_fetch, "_run", fake_run)
    monkeypatch.setattr(embedded_fetch.os, "geteuid", lambda: 0)
    debs = embedded_fetch._download_debs(["good-pkg", "missing-pkg"], tmp_path)
    assert [c[:2] for c in calls].count(["apt-get", "update"]) == 1
    assert debs["good-pkg"] == tmp_path / "good-pkg_1.0_all.deb"
    assert "Unable to locate package" in debs["missing-pkg"]


# ------------------------------------------------------------------ real downloads


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
                    reason="needs apt-get and dpkg-deb")
def test_real_download_informal_and_wiki(tmp_path: Path):
    logs: list[str] = []
    corpus = _build(tmp_path, logs, domains=["wiki", "informal"], min_domains=2,
                    max_bytes_per_domain=300_000)
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert set(manifest["domains"]) == {"wiki", "informal"}, logs
    for entry in manifest["domains"].values():
        assert 200_000 < entry["text_bytes"] <= 300_000
        assert len(entry["sources"]) == 2, entry["sources"]
        for source in entry["sources"]:
            assert source["documents"] > 0
            for package in source["packages"]:
                assert package["version"] and package["licence"] != "unknown"
                assert len(package["sha256"]) == 64
    sources = {json.loads(line)["source"].split(":")[0] for line in (corpus / "wiki.jsonl").open()}
    assert sources == {"gensim", "dict-foldoc"}
