"""Paper Table 6: SlimPajama's domain proportions, measured from the data (bytes, documents, tokens)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dograph.errors import DographError
from experiments.proportions import cached_counts, proportions_table
from experiments.render import NOT_AVAILABLE, Table
from experiments.scale import RunRequest, Scale, model_tokenizer

NAME = "table6"
TITLE = "Table 6: domain proportions of the training corpus (paper: SlimPajama-6B)"
SETTING = "slimpajama_medium"


def requests(scale: Scale) -> list[RunRequest]:
    return []


def build(index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
    return build_proportions(NAME, TITLE, scale.corpora[NAME], model_tokenizer(scale.setting(SETTING)["model"]),
                             scale, out_dir)


def build_proportions(name: str, title: str, dataset: str, tokenizer: str, scale: Scale, out_dir: Path) -> list[Path]:
    """The table of ``dataset``'s domains, or a "not available" table saying why (e.g. no network)."""
    title = f"{title} - scale {scale.name}: dataset={dataset}, tokens by the {tokenizer} tokenizer"
    try:
        counts = cached_counts(out_dir / f"counts_{dataset}_{tokenizer}.json", dataset, tokenizer, scale.cache_dir)
    except DographError as exc:
        return Table(name, title, ["Domain", "Bytes", "Documents", "Tokens"], [[NOT_AVAILABLE] * 4],
                     [f"The corpus could not be read: {exc}"]).write(out_dir)
    return proportions_table(name, title, counts, ["Shares are of the training documents; the natural mixture is "
                                                   "the one configured in conf/dataset (what runs sample)."]
                             ).write(out_dir)
