"""Paper Table 4: the methods' downstream accuracy and validation loss at another setting of the paper."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.common import Column, downstream_table_rows, metric
from experiments.render import Table
from experiments.scale import RunRequest, Scale, method_requests

NAME = "table4"
TITLE = "Table 4: downstream accuracy and validation loss per method (paper: LLaMA-3B, the Pile)"
SETTING = "pile_llama_3b"


def requests(scale: Scale) -> list[RunRequest]:
    return method_requests(scale, SETTING)


def build(index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
    where = scale.setting(SETTING)
    loss = Column("Val loss (avg)", metric("val/avg_loss"), 3)
    header, rows, notes = downstream_table_rows(index, requests(scale), scale.methods, extra=[loss])
    title = f"{TITLE} - scale {scale.name}: {where['model']} on {where['dataset']}"
    return Table(NAME, title, header, rows, notes).write(out_dir)
