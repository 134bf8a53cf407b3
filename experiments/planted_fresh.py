"""A duplicates run's loss on the fresh documents, re-scored from its final checkpoint (issue 18).

Runs write this loss into ``summary.json`` themselves (``dograph.eval.planted``). Runs made before the
fresh windows were spread over the documents (their ``fresh`` entry has no ``sample``) packed the first
fresh documents one after another, which on the embedded corpus scored two passages; for those, this
rebuilds the model from the checkpoint of the run's last step and scores the same windows a run makes
now (:func:`dograph.eval.planted.fresh_windows`), with validation's own scoring
(:func:`dograph.train.validation.evaluate`), in float32 on the CPU: the same computation as the run's only
for a run trained on the CPU (``run_info.json`` ``device``), so a run trained elsewhere (bf16 autocast
on a GPU) is not re-scored here and its table cell stays empty, named. The row is kept in
the run's ``derived/`` and its record (``experiments.run_files.checkpoint_points``), so a record alone
rebuilds the table. Heavy (torch, the corpus, a model rebuild): imported only when a duplicates table
needs it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pandas as pd
import torch

from dograph.data.builder import corpus_tokenizer
from dograph.data.corpus import build_corpus, planted_directory
from dograph.distributed import DistContext
from dograph.eval.planted import FRESH_SAMPLE, fresh_windows
from dograph.train.checkpoint import model_weights
from dograph.train.validation import evaluate
from experiments.run_files import checkpoints_of, load_run_config, rebuild_model

FRESH_FILE = "planted_fresh"  # derived/<this>.csv
COLUMNS = ["step", "windows", "documents", "sample", "loss"]


def fresh_from_checkpoint(run_dir: Path) -> pd.DataFrame | None:
    """One row (:data:`COLUMNS`) scored on the checkpoint of the run's last step; None when the run is no
    duplicates run or kept no checkpoint of its last step."""
    kept = checkpoints_of(run_dir)
    if not kept:
        return None  # a record, or a run that kept none
    if json.loads((run_dir / "run_info.json").read_text()).get("device", "cpu") != "cpu":
        return None  # scored in bf16 or on another device: a CPU float32 score would not be the run's
    cfg = load_run_config(run_dir)
    last = [path for step, path in kept if step == cfg.trainer.max_steps]
    if cfg.dataset.planted.scenario != "duplicates" or not last:
        return None
    cache = Path(cfg.paths.cache_dir)
    corpus = build_corpus(cfg.dataset, cache)
    tokenizer = corpus_tokenizer(cfg.dataset, corpus, cfg.tokenizer, cache)
    windows, documents = fresh_windows(planted_directory(cfg.dataset, cache), tokenizer, cfg.trainer.seq_len)
    model = rebuild_model(cfg, tokenizer, model_weights(last[0]))
    with torch.no_grad():
        scores = evaluate(model, [windows], ["fresh"], [1.0], batch_size=cfg.trainer.eval_batch_size,
                          device=torch.device("cpu"), dist=DistContext(), autocast=contextlib.nullcontext)
    return pd.DataFrame([{"step": cfg.trainer.max_steps, "windows": len(windows), "documents": documents,
                          "sample": FRESH_SAMPLE, "loss": float(scores["val/fresh/loss"])}], columns=COLUMNS)
