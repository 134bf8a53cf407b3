"""Domain proportions measured from a corpus: bytes (UTF-8), documents and tokens per domain (Tables 6-7).

Counted over every training document of each domain with the tokenizer the runs use; the result
is cached next to the tables (``counts_<dataset>_<tokenizer>.json``) because a paper-scale corpus takes long.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm

from dograph.config import DataConfig, load_group_option
from dograph.data.builder import corpus_tokenizer
from dograph.data.corpus import build_corpus
from dograph.errors import DographError
from experiments.render import NOT_AVAILABLE, Table
from experiments.scale import Scale

BATCH = 256


def count_domains(cfg: DataConfig, tokenizer_name: str, cache_dir: Path, max_documents: int | None = None
                  ) -> dict[str, dict[str, float]]:
    """``{domain: {bytes, documents, tokens, natural_share}}`` of a dataset's training documents."""
    corpus = build_corpus(cfg, cache_dir)
    tokenizer = corpus_tokenizer(cfg, corpus, tokenizer_name, cache_dir)
    out: dict[str, dict[str, float]] = {}
    for domain, source, share in zip(corpus.domains, corpus.train, corpus.natural_mixture, strict=True):
        counts = {"bytes": 0, "documents": 0, "tokens": 0}
        batch: list[str] = []
        for text in tqdm(source.documents(), desc=f"counting {domain}", unit="doc", leave=False,
                         disable=not os.isatty(2)):
            batch.append(text)
            if len(batch) == BATCH:
                _add(counts, batch, tokenizer)
                batch = []
            if max_documents is not None and counts["documents"] + len(batch) >= max_documents:
                break
        _add(counts, batch, tokenizer)
        out[domain] = {**counts, "natural_share": share}
    return out


def _add(counts: dict[str, int], texts: list[str], tokenizer) -> None:
    if not texts:
        return
    counts["documents"] += len(texts)
    counts["bytes"] += sum(len(t.encode("utf-8")) for t in texts)
    counts["tokens"] += sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def proportions_table(name: str, title: str, counts: dict[str, dict[str, float]], notes: list[str]) -> Table:
    """Counts and shares per domain, and the configured natural mixture beside them."""
    totals = {k: sum(c[k] for c in counts.values()) or 1 for k in ("bytes", "documents", "tokens")}
    rows = [[domain, f"{int(c['bytes']):,}", f"{c['bytes'] / totals['bytes']:.3f}", f"{int(c['documents']):,}",
             f"{c['documents'] / totals['documents']:.3f}", f"{int(c['tokens']):,}",
             f"{c['tokens'] / totals['tokens']:.3f}", f"{c['natural_share']:.3f}"] for domain, c in counts.items()]
    rows.append(["total", f"{int(totals['bytes']):,}", "1.000", f"{int(totals['documents']):,}", "1.000",
                 f"{int(totals['tokens']):,}", "1.000", "1.000"])
    header = ["Domain", "Bytes", "Byte share", "Documents", "Doc share", "Tokens", "Token share", "Natural mixture"]
    return Table(name, title, header, rows, notes)


def cached_counts(path: Path, dataset: str, tokenizer_name: str, cache_dir: Path) -> dict[str, dict[str, float]]:
    """``count_domains`` once; later calls read ``path``."""
    key = {"dataset": dataset, "tokenizer": tokenizer_name}
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["counts"]
    counts = count_domains(DataConfig(**load_group_option("dataset", dataset)), tokenizer_name, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "counts": counts}, indent=2))
    return counts


def write_proportions(name: str, title: str, dataset: str, tokenizer: str, scale: Scale, out_dir: Path) -> list[Path]:
    """The table of ``dataset``'s domains, or a "not available" table saying why (e.g. no network)."""
    title = f"{title} - scale {scale.name}: dataset={dataset}, tokens by the {tokenizer} tokenizer"
    try:
        counts = cached_counts(out_dir / f"counts_{dataset}_{tokenizer}.json", dataset, tokenizer, scale.cache_dir)
    except DographError as exc:
        return Table(name, title, ["Domain", "Bytes", "Documents", "Tokens"], [[NOT_AVAILABLE] * 4],
                     [f"The corpus could not be read: {exc}"]).write(out_dir)
    return proportions_table(name, title, counts, ["Shares are of the training documents; the natural mixture is "
                                                   "the one configured in conf/dataset (what runs sample)."]
                             ).write(out_dir)
