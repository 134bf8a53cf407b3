"""After a run on a planted corpus: which domain holds the structure; the loss on a duplicated domain's fresh text.

Evaluation only (docs/design.md section 4.5): the composition root calls :func:`planted_report`
after training, never the trainer or a mixer. What it returns goes into ``summary.json`` as
``planted``, so the planted tables (``experiments/planted_measures.py``) rebuild from a run record:

* ``scenario``, ``domain`` (the planted domain: ``noise``, ``books-dup``, ``code+latex``) and its
  natural ``share`` (of the text bytes, the corpus manifest's);
* duplicates: ``fresh``, the replaced domain's documents that were never trained on
  (``fresh/<domain>.jsonl``): :data:`FRESH_DOCUMENTS` of them, evenly spaced through the file, one
  window from the start of each (:func:`fresh_windows`), and their mean token loss under the final
  model (``score``: the trainer's own evaluation of extra windows). ``sample`` names this rule: runs
  made before it (no ``sample``) packed the first documents one after another, which on the embedded
  corpus scored two passages (Genesis 1 and the start of *Emma*); ``experiments.planted_fresh``
  re-scores those from their final checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from dograph.config import DataConfig
from dograph.data.corpus import planted_directory
from dograph.data.packing import evenly_spaced, is_blank, spread_windows
from dograph.data.planted import fresh_source, load_manifest
from dograph.errors import DataError

FRESH_DOCUMENTS = 128  # our choice (docs/design.md section 4.5): enough documents that no few passages dominate
FRESH_SAMPLE = (f"{FRESH_DOCUMENTS} windows, one from the start of each of {FRESH_DOCUMENTS} fresh documents evenly "
                "spaced through the file (more from each when there are fewer)")


def fresh_windows(directory: Path, tokenizer: Any, seq_len: int,
                  documents: int = FRESH_DOCUMENTS) -> tuple[Tensor, int]:
    """Up to ``documents`` windows [n, seq_len + 1] of a duplicates corpus's fresh documents, one from the start of
    each of ``documents`` documents evenly spaced through the file (``spread_windows``: more from each when there
    are fewer; a document too short for a window gives none), and how many documents gave any."""
    texts = [t for t in fresh_source(directory).documents() if not is_blank(t)]
    windows, used = spread_windows(evenly_spaced(texts, documents), tokenizer, seq_len, documents)
    if len(windows) == 0:
        raise DataError(f"the fresh documents of {directory} hold no text of {seq_len + 1} tokens to evaluate")
    return windows, used


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
        windows, documents = fresh_windows(directory, tokenizer, seq_len)
        report["fresh"] = {"domain": planted["replaced"], "windows": len(windows), "documents": documents,
                           "sample": FRESH_SAMPLE, "loss": float(score(windows))}
    return report
