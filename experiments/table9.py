"""Paper Table 9: the training settings, read from conf/trainer/paper.yaml and the paper-scale model configs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from experiments.render import Table
from experiments.scale import REPO, RunRequest, Scale
from experiments.table8 import parameter_count

NAME = "table9"
TITLE = "Table 9: training settings (conf/trainer/paper.yaml and conf/model/*)"
MODELS = ("gpt2_small", "gpt2_medium", "llama_1b", "llama_3b")
SETTINGS = (("max_steps", "Training steps"), ("batch_size", "Batch size (sequences)"),
            ("seq_len", "Sequence length"), ("lr", "Peak learning rate"), ("min_lr", "Final learning rate (cosine)"),
            ("warmup_steps", "Warm-up steps"), ("weight_decay", "Weight decay"), ("grad_clip", "Gradient clipping"),
            ("adam_beta1", "Adam beta1"), ("adam_beta2", "Adam beta2"))


def requests(scale: Scale) -> list[RunRequest]:
    return []


def _yaml(*parts: str) -> dict:
    return yaml.safe_load((REPO.joinpath("conf", *parts)).read_text()) or {}


def build(index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
    from dograph.config import TrainerConfig

    trainer = {**TrainerConfig().__dict__, **_yaml("trainer", "paper.yaml")}
    models = {m: _yaml("model", f"{m}.yaml") for m in MODELS}
    rows = [[label, *([str(trainer[key])] * len(MODELS))] for key, label in SETTINGS]
    rows += [["Parameters", *(f"{parameter_count(m) / 1e6:,.0f}M" for m in MODELS)],
             ["Layers x d_model", *(f"{models[m]['n_layer']} x {models[m]['d_model']}" for m in MODELS)],
             ["Context (max positions)", *(str(models[m]["max_position_embeddings"]) for m in MODELS)],
             ["Tokenizer", *(str(models[m]["tokenizer"]) for m in MODELS)]]
    notes = ["One trainer preset (trainer=paper) for every model: the paper's Table 9 gives one schedule; "
             "the LLaMA runs use it too (docs/design.md section 1)."]
    return Table(NAME, TITLE, ["Setting", *MODELS], rows, notes).write(out_dir)
