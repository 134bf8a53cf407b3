"""After a run on a planted corpus: which domain holds the structure; the loss on a duplicated domain's fresh text.

Evaluation only (docs/design.md section 4.5): the composition root calls :func:`planted_report`
after training, never the trainer or a mixer. What it returns goes into ``summary.json`` as
``planted``, so the planted tables (``experiments/planted_measures.py``) rebuild from a run record:

* ``scenario``, ``domain`` (the planted domain: ``noise``, ``books-dup``, ``code+latex``) and its
  natural ``share`` (of the text bytes, the corpus manifest's);
* duplicates: ``fresh``, the replaced domain's documents that were never trained on
  (``fresh/<domain>.jsonl``), packed into windows as validation packs them, as many as a domain's
  validation set (``dataset.val_sequences_per_domain``), and their mean token loss under the final
  model (``score``: the trainer's own evaluation of extra windows).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from dograph.config import DataConfig
from dograph.data.corpus import planted_directory
from dograph.data.packing import pack_validation_windows
from dograph.data.planted import fresh_source, load_manifest
from dograph.errors import DataError


def fresh_windows(directory: Path, tokenizer: Any, seq_len: int, count: int) -> Tensor:
    """[n, seq_len + 1] windows of a duplicates corpus's fresh documents, in file order (n <= ``count``)."""
    windows = pack_validation_windows(fresh_source(directory).documents(), tokenizer, seq_len, count)
    if len(windows) == 0:
        raise DataError(f"the fresh documents of {directory} hold no text of {seq_len + 1} tokens to evaluate")
    return windows


def planted_report(cfg: DataConfig, cache_dir: Path, tokenizer: Any, seq_len: int,
                   score: Callable[[Tensor], float]) -> dict[str, Any] | None:
    """The run's ``summary.json`` entry ``planted`` (None when no structure was planted)."""
    if not cfg.planted.active:
        return None
    directory = planted_directory(cfg, cache_dir)
    manifest = load_manifest(directory)
    planted = manifest["planted"]
    report: dict[str, Any] = {"scenario": planted["scenario"], "domain": planted["domain"],
                              "share": manifest["domains"][planted["domain"]]["share"]}
    if planted["scenario"] == "duplicates":
        windows = fresh_windows(directory, tokenizer, seq_len, cfg.val_sequences_per_domain)
        report["fresh"] = {"domain": planted["replaced"], "windows": len(windows), "loss": float(score(windows))}
    return report
