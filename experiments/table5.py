"""Paper Table 5: the methods' downstream accuracy and validation loss at another setting of the paper."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.common import Column, metric, write_downstream_table
from experiments.scale import RunRequest, Scale, method_requests

NAME = "table5"
TITLE = "Table 5: downstream accuracy and validation loss per method (paper: GPT-2 Small, SlimPajama-6B)"
SETTING = "slimpajama_small"


def requests(scale: Scale) -> list[RunRequest]:
    return method_requests(scale, SETTING)


def build(index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
    return write_downstream_table(NAME, TITLE, SETTING, index, scale, out_dir,
                                  extra=[Column("Val loss (avg)", metric("val/avg_loss"), 3)])
