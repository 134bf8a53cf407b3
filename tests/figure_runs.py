"""A tiny DoGraph run that looks like one ``run.py`` made, for the figure and notebook tests.

The ablation setting's DoGraph run at the default m (11) and objective, two checkpoints
(steps 4 and 8), a buffer small enough that K-means refreshes twice. ``run_training`` makes no
``.hydra/`` directory, so the Hydra choices the results index reads are written by hand.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import yaml
from conftest import compose_config

from dograph.app import run_training
from dograph.config import to_run_config
from experiments.scale import Scale, load_scale

MODEL, DATASET = "gpt2_tiny", "jsonl"
RUN_OVERRIDES = ("mixer=dograph", "mixer.buffer_size=24", "trainer.batch_size=8", "trainer.seq_len=32",
                 "trainer.max_steps=8", "trainer.ckpt_every=4")


def train_tiny_dograph(run_dir: Path, corpus: Path, cache_dir: Path, *extra: str) -> Path:
    """Train the run into ``run_dir`` (gpt2_tiny on the local 3-domain corpus, about 5 s on 2 cores)."""
    overrides = [f"model={MODEL}", f"dataset={DATASET}", f"dataset.path={corpus}", "dataset.val_fraction=0.1",
                 "dataset.val_sequences_per_domain=4", "trainer=debug", "logger=disabled",
                 f"paths.cache_dir={cache_dir}", "trainer.device=cpu", *RUN_OVERRIDES, *extra]
    run_training(to_run_config(compose_config(overrides)), run_dir)
    choices = {"mixer": "dograph", "model": MODEL, "dataset": DATASET, "objective": "uncertainty", "trainer": "debug"}
    (run_dir / ".hydra").mkdir(exist_ok=True)
    (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    return run_dir


def tiny_scale(runs_root: Path, results_dir: Path) -> Scale:
    """The smoke scale with the ablation setting pointed at the tiny run's model and dataset."""
    scale = load_scale("smoke", runs_root=runs_root, results_dir=results_dir)
    return replace(scale, settings={**scale.settings, "ablation": {"model": MODEL, "dataset": DATASET}})
