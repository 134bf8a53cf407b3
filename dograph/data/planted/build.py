"""The cached planted corpus: its key, the build (jsonl files and manifest), verification and reading.

``cache_dir/planted/<scenario>-<key>/`` holds one ``<domain>.jsonl`` per training domain, the
evaluation-only files (``fresh/``) and ``manifest.json``. The key hashes the planting settings
(scenario, resolved share, seed and the scenario's own keys), the base corpus's fingerprint and
the fields that read it, so any change builds a new directory; an existing one is verified
against its manifest (size and sha256 of every file) and reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dograph.config import DataConfig, PlantedConfig
from dograph.data.embedded.common import publish_build, sha256_file
from dograph.data.planted.scenarios import SCENARIOS, Plan, Records, utf8_bytes
from dograph.data.sources import Corpus, jsonl_directory_corpus, text_digest
from dograph.errors import DataError

PLANTED_VERSION = "p1"  # part of the key: change it when a scenario builds different text
SHARE_TOLERANCE = 0.01  # the planted share is within 1% (relative) of its target, or the build fails


def planted_settings(planted: PlantedConfig) -> dict[str, Any]:
    """The settings the scenario reads (the share resolved to its default), for the key and the manifest."""
    settings: dict[str, Any] = {"scenario": planted.scenario, "seed": planted.seed}
    if planted.scenario == "noise":
        settings["share"] = planted.target_share
    if planted.scenario == "duplicates":
        settings.update(share=planted.target_share, duplicate_domain=planted.duplicate_domain,
                        duplicate_documents=planted.duplicate_documents)
    if planted.scenario == "hidden_split":
        settings["merge_domains"] = planted.merge_domains
    return settings


def planted_key(cfg: DataConfig, base: Corpus) -> str:
    """16 hex digits of what fixes the planted corpus's text."""
    identity = {"version": PLANTED_VERSION, "planted": planted_settings(_planted(cfg)), "base": base.fingerprint,
                "base_domains": base.domains, "text_field": cfg.text_field, "domain_field": cfg.domain_field}
    return text_digest(json.dumps(identity, sort_keys=True))[:16]


def _planted(cfg: DataConfig) -> PlantedConfig:
    if not cfg.planted.active:
        raise ValueError("dataset.planted.scenario is none: nothing to plant")
    return cfg.planted


def ensure_planted_corpus(cfg: DataConfig, cache_dir: Path, base: Corpus,
                          log: Callable[[str], None] = print) -> Path:
    """The directory of the planted corpus for ``cfg`` on ``base``, built and published atomically if missing."""
    planted = _planted(cfg)
    target = Path(cache_dir) / "planted" / f"{planted.scenario}-{planted_key(cfg, base)}"
    if target.exists():
        manifest = load_manifest(target)
        log(f"[planted] reusing {target} ({planted.scenario}: {_summary(manifest)})")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        manifest = _build(tmp, target.name, cfg, base)
        os.chmod(tmp, 0o755)
        publish_build(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"[planted] built {target} in {manifest['build_seconds']:.1f} s ({planted.scenario}: {_summary(manifest)})")
    return target


def _summary(manifest: dict[str, Any]) -> str:
    planted = manifest["planted"]
    share = manifest["domains"][planted["domain"]]["share"]
    return f"domain {planted['domain']!r} holds {share:.2%} of the text bytes"


def _build(out_dir: Path, key: str, cfg: DataConfig, base: Corpus) -> dict[str, Any]:
    """Write the planted corpus into ``out_dir``; its manifest (``key``: the directory it will be published as)."""
    start = time.perf_counter()
    planted = _planted(cfg)
    plan = SCENARIOS[planted.scenario](base, planted)
    domains = {domain: _write(out_dir, f"{domain}.jsonl", records) for domain, records in plan.domains.items()}
    total = sum(entry["text_bytes"] for entry in domains.values())
    for entry in domains.values():
        entry["share"] = entry["text_bytes"] / total
    evaluation = {path: _write(out_dir, path, records) for path, records in plan.evaluation.items()}
    _check_share(plan, planted, domains)
    manifest = {
        "corpus": "dograph-planted", "version": PLANTED_VERSION, "key": key,
        "build_date": datetime.now(UTC).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - start, 2),
        "base": {"description": base.description, "fingerprint": base.fingerprint, "domains": base.domains},
        "planted": {**planted_settings(planted), "domain": plan.planted, "share_unit": "UTF-8 bytes of document text",
                    **plan.details},
        "domains": domains, "evaluation": evaluation,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def _check_share(plan: Plan, planted: PlantedConfig, domains: dict[str, dict[str, Any]]) -> None:
    target = planted.target_share
    if target is None:
        return
    entry = domains[plan.planted]
    if abs(entry["share"] - target) > SHARE_TOLERANCE * target:
        raise DataError(f"the planted domain {plan.planted!r} holds {entry['share']:.2%} of the text bytes, not "
                        f"within 1% of dataset.planted.share={target}: its documents are too large for this base "
                        f"corpus ({entry['documents']} documents, {entry['text_bytes']:,} bytes)")


def _write(root: Path, relative: str, records: Records) -> dict[str, Any]:
    """Write the records as jsonl; the manifest entry (file, sha256, bytes, documents, text bytes)."""
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    digest, size, documents, text_bytes = hashlib.sha256(), 0, 0, 0
    with open(path, "wb") as handle:
        for record in records():
            if not record["text"]:
                continue  # sources yield no empty text; skipping keeps line i document i of the domain
            line = json.dumps(record, ensure_ascii=False)
            # U+2028/9 are legal raw in JSON but break str.splitlines(): escape them.
            data = (line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n").encode("utf-8")
            digest.update(data)
            handle.write(data)
            size, documents, text_bytes = size + len(data), documents + 1, text_bytes + utf8_bytes(record["text"])
    return {"file": relative, "sha256": digest.hexdigest(), "file_bytes": size, "documents": documents,
            "text_bytes": text_bytes}


def load_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a built planted corpus, after checking every file it lists (size and sha256)."""
    hint = f"delete {directory} to rebuild it"
    path = directory / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        entries = [*manifest["domains"].values(), *manifest["evaluation"].values()]
        files = [(directory / e["file"], int(e["file_bytes"]), e["sha256"]) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is missing or unreadable ({exc}); {hint}") from exc
    for file, size, digest in files:
        if not file.is_file() or file.stat().st_size != size or sha256_file(file) != digest:
            raise DataError(f"{file} is missing or does not match the sha256 in {path}; {hint}")
    return manifest


def planted_fingerprint(manifest: dict[str, Any]) -> str:
    """What the planted corpus holds (its settings and each file's sha256): the same on every host."""
    files = {e["file"]: e["sha256"] for e in [*manifest["domains"].values(), *manifest["evaluation"].values()]}
    content = {"version": manifest["version"], "planted": manifest["planted"], "files": files}
    return text_digest(json.dumps(content, sort_keys=True))


def read_planted_corpus(cfg: DataConfig, directory: Path) -> Corpus:
    """The planted corpus as the run reads it: its domains, and a natural mixture of their text bytes.

    ``dataset.domains`` selected the base's domains; ``dataset.natural_mixture``, if set, names the
    planted corpus's domains. Hidden labels and fresh documents are not part of the returned corpus.
    """
    manifest = load_manifest(directory)
    shares = {name: entry["share"] for name, entry in manifest["domains"].items()}
    reading = dataclasses.replace(cfg, source="jsonl", path=str(directory), domains=None, text_field="text",
                                  domain_field=None, natural_mixture=cfg.natural_mixture or shares,
                                  planted=PlantedConfig())
    planted = manifest["planted"]
    corpus = jsonl_directory_corpus(reading, directory, f"planted corpus ({planted['scenario']}, domain "
                                    f"{planted['domain']!r}) {directory} from {manifest['base']['description']}")
    return dataclasses.replace(corpus, fingerprint=planted_fingerprint(manifest))
