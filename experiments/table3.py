"""Paper Table 3: the methods' downstream accuracy and validation loss at another setting of the paper."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.common import Column, metric, write_downstream_table
from experiments.scale import RunRequest, Scale, method_requests

NAME = "table3"
TITLE = "Table 3: downstream accuracy and validation loss per method (paper: LLaMA-1.1B, the Pile)"
SETTING = "pile_llama_1b"


def requests(scale: Scale) -> list[RunRequest]:
    return method_requests(scale, SETTING)


def build(index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
    return write_downstream_table(NAME, TITLE, SETTING, index, scale, out_dir,
                                  extra=[Column("Val loss (avg)", metric("val/avg_loss"), 3)])
