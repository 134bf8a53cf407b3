"""Paper Table 1: downstream accuracy of every method, GPT-2 Medium on SlimPajama (9 lm-eval tasks)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.common import write_downstream_table
from experiments.scale import RunRequest, Scale, method_requests

NAME = "table1"
TITLE = "Table 1: downstream accuracy per method (paper: GPT-2 Medium, SlimPajama-6B)"
SETTING = "slimpajama_medium"


def requests(scale: Scale) -> list[RunRequest]:
    return method_requests(scale, SETTING)


def build(index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
    return write_downstream_table(NAME, TITLE, SETTING, index, scale, out_dir)
