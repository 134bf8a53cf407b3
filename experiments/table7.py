"""Paper Table 7: the Pile's domain proportions, measured from the data (bytes, documents, tokens)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.scale import RunRequest, Scale, model_tokenizer
from experiments.table6 import build_proportions

NAME = "table7"
TITLE = "Table 7: domain proportions of the training corpus (paper: the Pile)"
SETTING = "pile_llama_1b"


def requests(scale: Scale) -> list[RunRequest]:
    return []


def build(index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
    return build_proportions(NAME, TITLE, scale.corpora[NAME], model_tokenizer(scale.setting(SETTING)["model"]),
                             scale, out_dir)
