"""A tiny DoGraph run that looks like one ``run.py`` made, for the figure and notebook tests.

The ablation setting's DoGraph run at the default m (11) and objective, two checkpoints
(steps 4 and 8), a buffer small enough that K-means refreshes twice. It is trained with the
overrides :func:`tiny_scale` asks for, under a Hydra job config as ``run.py`` would have, so its
``run_info.json`` carries the fingerprint the results index matches; ``run_training`` makes no
``.hydra/`` directory, so the Hydra choices the index reads are written by hand.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import yaml
from conftest import compose_config
from helpers import REPO
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from dograph.config import to_run_config
from dograph.runs.app import run_training
from experiments.run_files import ablation_dograph_request
from experiments.scale import Scale, load_scale, request_overrides

MODEL, DATASET = "gpt2_tiny", "jsonl"
RUN_OVERRIDES = ("mixer.buffer_size=24", "trainer.batch_size=8", "trainer.seq_len=32", "trainer.max_steps=8",
                 "trainer.ckpt_every=4")


@contextlib.contextmanager
def hydra_job(run_dir: Path, overrides: list[str]) -> Iterator[None]:
    """Hydra's job config as ``python run.py OVERRIDES hydra.run.dir=RUN_DIR`` sets it; cleared afterwards."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    try:
        yield
    finally:
        HydraConfig.instance().cfg = None


def tiny_scale(runs_root: Path, results_dir: Path, corpus: Path) -> Scale:
    """The smoke scale with the ablation setting pointed at the tiny run's model, dataset and overrides."""
    scale = load_scale("smoke", runs_root=runs_root, results_dir=results_dir)
    common = [f"dataset.path={corpus}", "dataset.val_fraction=0.1", "dataset.val_sequences_per_domain=4",
              "trainer=debug", "logger=disabled", "trainer.device=cpu", *RUN_OVERRIDES]
    return replace(scale, settings={**scale.settings, "ablation": {"model": MODEL, "dataset": DATASET}},
                   common=common, method_overrides={})


def train_tiny_dograph(run_dir: Path, corpus: Path, cache_dir: Path, *extra: str) -> Path:
    """Train the run into ``run_dir`` (gpt2_tiny on the local 3-domain corpus, about 5 s on 2 cores).

    ``run_dir`` is ``<runs root>/runs/dograph/seed0``; ``extra`` overrides make it another run than the scale's.
    """
    scale = tiny_scale(run_dir.parents[2], run_dir.parents[2] / "results", corpus)
    overrides = [o for o in request_overrides(ablation_dograph_request(scale), scale) if not o.startswith("hydra.")]
    overrides += [f"paths.cache_dir={cache_dir}", *extra]
    with hydra_job(run_dir, overrides):
        run_training(to_run_config(compose_config(overrides)), run_dir)
    choices = {"mixer": "dograph", "model": MODEL, "dataset": DATASET, "objective": "uncertainty", "trainer": "debug"}
    (run_dir / ".hydra").mkdir(exist_ok=True)
    (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    return run_dir
