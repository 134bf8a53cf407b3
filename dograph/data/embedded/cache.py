"""The public entry point: the cached corpus directory, verified against its manifest or built anew."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dograph.data.embedded import build
from dograph.data.embedded.common import (
    CORPUS_VERSION,
    DEFAULT_DOMAINS,
    DEFAULT_MAX_BYTES_PER_DOMAIN,
    MAX_DOC_CHARS,
    publish_build,
    sha256_file,
)
from dograph.errors import ConfigError, DataError


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
        build._build_corpus(tmp, names, max_bytes_per_domain, need, log)  # via the module: patchable
        os.chmod(tmp, 0o755)
        publish_build(tmp, target)
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
        if not path.is_file() or path.stat().st_size != size or sha256_file(path) != digest:
            raise DataError(f"{path} is missing or does not match the sha256 in {mpath}; {hint}")
    if len(entries) < need:
        raise DataError(f"{target} holds {len(entries)} domains, fewer than the {need} required; {hint}")
    return manifest
