"""Paper Table 8: model shapes and parameter counts, computed from conf/model/*.yaml (so names cannot lie).

Models are built on the meta device: no memory is allocated and nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
import yaml

from dograph.config import ModelConfig
from dograph.data.tokenizer import tokenizer_vocab_size
from dograph.models import build_model, count_parameters, format_count
from experiments.render import Table
from experiments.scale import REPO, RunRequest, Scale

NAME = "table8"
TITLE = "Table 8: model shapes and parameter counts (from conf/model/*.yaml)"


def requests(scale: Scale) -> list[RunRequest]:
    return []


def parameter_count(model: str) -> int:
    """Parameters of ``conf/model/<model>.yaml`` (built on the meta device)."""
    cfg = ModelConfig(**yaml.safe_load((REPO / "conf" / "model" / f"{model}.yaml").read_text()))
    with torch.device("meta"):
        return count_parameters(build_model(cfg, tokenizer_vocab_size(cfg.tokenizer)))


def shape_rows() -> list[list[str]]:
    rows = []
    for path in sorted((REPO / "conf" / "model").glob("*.yaml")):
        cfg = ModelConfig(**yaml.safe_load(path.read_text()))
        vocab = tokenizer_vocab_size(cfg.tokenizer)
        n = parameter_count(path.stem)
        rows.append([str(x) for x in (path.stem, cfg.family, cfg.n_layer, cfg.d_model, cfg.n_head,
                                      cfg.n_kv_head or cfg.n_head, cfg.d_ff, f"{vocab} ({cfg.tokenizer})",
                                      "yes" if cfg.tie_embeddings else "no", f"{n:,} ({format_count(n)})")])
    return rows


def build(index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
    header = ["config", "family", "layers", "d_model", "heads", "kv heads", "ffn", "vocabulary", "tied", "parameters"]
    return Table(NAME, TITLE, header, shape_rows()).write(out_dir)
