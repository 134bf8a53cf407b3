"""Table 8: model shapes and parameter counts, computed from conf/model/*.yaml (so names cannot lie).

Usage: ``python experiments/table8_shapes.py [--out outputs/tables/table8_shapes.md]``
Models are built on the meta device: no memory is allocated and nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from dograph.config import ModelConfig
from dograph.data.tokenizer import tokenizer_vocab_size
from dograph.models import build_model, count_parameters, format_count
from dograph.reporting import markdown_table

REPO = Path(__file__).resolve().parent.parent


def shape_rows() -> list[list[object]]:
    rows = []
    for path in sorted((REPO / "conf" / "model").glob("*.yaml")):
        cfg = ModelConfig(**yaml.safe_load(path.read_text()))
        vocab = tokenizer_vocab_size(cfg.tokenizer)
        with torch.device("meta"):
            n = count_parameters(build_model(cfg, vocab))
        rows.append([path.stem, cfg.family, cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head or cfg.n_head,
                     cfg.d_ff, f"{vocab} ({cfg.tokenizer})", "yes" if cfg.tie_embeddings else "no",
                     f"{n:,} ({format_count(n)})"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "tables" / "table8_shapes.md")
    args = parser.parse_args()
    table = markdown_table(["config", "family", "layers", "d_model", "heads", "kv heads", "ffn", "vocabulary",
                            "tied", "parameters"], shape_rows())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    print(table)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
