"""Dependency rules of the layout, checked on the source.

The trainer names no mixer, the library never imports baselines nor reads a DictConfig, and
baselines import only the contract side of the library.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def library_files() -> list[Path]:
    return sorted((REPO / "dograph").rglob("*.py"))


def test_library_never_imports_baselines() -> None:
    offenders = [p.name for p in library_files() if any(m.startswith("baselines") for m in imported_modules(p))]
    assert offenders == []


def test_trainer_names_no_mixer() -> None:
    for name in ("trainer.py", "signals.py"):
        source = (REPO / "dograph" / name).read_text()
        imports = imported_modules(REPO / "dograph" / name)
        assert not any(m.startswith(("baselines", "dograph.dograph_mixer")) for m in imports), name
        for mixer_name in ("DoGraph", "Uniform", "DoReMi", "DoGE", "RegMix", "loss_based"):
            assert mixer_name not in source, (name, mixer_name)


def test_library_never_reads_a_dictconfig() -> None:
    # converts the composed config; the Hydra entry of sweep jobs; reads a finished run's saved config
    allowed = {"config.py", "sweep_job.py", "evaluate.py"}
    offenders = [p.name for p in library_files() if p.name not in allowed
                 and any(m.startswith("omegaconf") for m in imported_modules(p))]
    assert offenders == []


def test_baselines_import_only_the_contract_side_of_the_library() -> None:
    allowed = ("dograph.mixing", "dograph.distributed", "dograph.metrics", "dograph.errors", "dograph.config",
               "dograph.mixer_history", "dograph.pipeline", "dograph.projection", "dograph.reporting",
               "dograph.models", "dograph.sweep")
    for path in sorted((REPO / "baselines").rglob("*.py")):
        for module in imported_modules(path):
            if module.startswith("dograph"):
                assert module.startswith(allowed), (path.name, module)


def test_data_layer_knows_nothing_of_training() -> None:
    # the data pipeline (prefetch thread included) is driven by the trainer, never the other way round
    allowed = ("dograph.data", "dograph.config", "dograph.distributed", "dograph.errors")
    for path in sorted((REPO / "dograph" / "data").rglob("*.py")):
        for module in imported_modules(path):
            if module.startswith("dograph"):
                assert module.startswith(allowed), (path.name, module)
    prefetch = imported_modules(REPO / "dograph" / "data" / "prefetch.py")
    assert not any(m.startswith("torch") for m in prefetch)  # the worker thread touches no tensors or devices
