"""Building the corpus: which sources make each domain, byte-fair capping, jsonl files and manifest."""

from __future__ import annotations

import hashlib
import json
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from dograph.data.embedded.common import CORPUS_VERSION, MAX_DOC_CHARS, _Artifact, _Doc, _reason, _Source
from dograph.data.embedded.fetch import _fetch_all
from dograph.data.embedded.readers import (
    _GENSIM,
    _read_austen,
    _read_bible,
    _read_debian_faq,
    _read_enwiki,
    _read_foldoc,
    _read_fortunes,
    _read_jargon,
    _read_perl_pods,
    _read_python_docs,
    _read_stdlib,
    _read_tex,
)
from dograph.data.embedded.text import _chunks, _clean
from dograph.errors import DataError


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
