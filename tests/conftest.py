"""Fixtures: the real config composed and shrunk (gpt2_tiny, a small local corpus, a few steps)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import REPO, build_local_corpus

from dograph.config import RunConfig, register_configs, to_run_config

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
register_configs()


@pytest.fixture(scope="session")
def local_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_local_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared across tests so the BPE tokenizer is trained once."""
    return tmp_path_factory.mktemp("cache")


def compose_config(overrides: list[str]):
    """Compose conf/config.yaml with overrides, as `python run.py ...` would."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture
def tiny_overrides(local_corpus: Path, cache_dir: Path) -> list[str]:
    return ["model=gpt2_tiny", "dataset=jsonl", f"dataset.path={local_corpus}", "dataset.val_fraction=0.1",
            "dataset.val_sequences_per_domain=4", "trainer=debug", "logger=disabled",
            f"paths.cache_dir={cache_dir}", "trainer.device=cpu"]


@pytest.fixture
def make_config(tiny_overrides: list[str]):
    def make(*extra: str) -> RunConfig:
        return to_run_config(compose_config([*tiny_overrides, *extra]))

    return make
