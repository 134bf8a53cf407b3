"""Dependency rules of the layout, checked on the import graph of the source (tests/import_graph.py).

``dograph/`` top level: the contract (``mixing``) and what every layer shares (``config``,
``settings``, ``errors``, ``models``, ``distributed``, ``parallel``, ``mixer_history``, ``reporting``).
Above it, in order: ``data/`` (knows nothing of training), ``step/`` (how a step uses a mixer),
``method/`` (DoGraph's parts: the contract and ``step/`` only), ``train/`` (the loop: names no
mixer), ``eval/`` (downstream evaluation), ``runs/`` (the composition root: may use them all).
The library never imports ``baselines`` or ``experiments``; baselines import only the contract
side. No module imports a private name from another package.
"""

from __future__ import annotations

import ast
from pathlib import Path

from import_graph import REPO, all_edges, edges_of, project_modules

TOP_LEVEL = ("dograph.config", "dograph.settings", "dograph.errors", "dograph.mixing", "dograph.models",
             "dograph.distributed", "dograph.parallel", "dograph.mixer_history", "dograph.reporting",
             "dograph.atomic", "dograph.host_allocator")
MIXER_NAMES = ("DoGraph", "Uniform", "DoReMi", "DoGE", "RegMix", "loss_based", "LossBased", "DataMixingLaw")


def imported_names(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` of ``path`` names (external ones included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def modules_under(prefix: str) -> list[str]:
    return [m for m in project_modules() if m == prefix or m.startswith(prefix + ".")]


def within(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def offenders(sources: list[str], allowed: tuple[str, ...]) -> list[str]:
    return [f"{e.source}:{e.line} imports {e.target}" for s in sources for e in edges_of(s)
            if not within(e.target, *allowed)]


def test_top_level_is_the_layout_of_the_readme() -> None:
    top = sorted(m for m in modules_under("dograph") if m.count(".") == 1 and m not in {"dograph.__init__"})
    packages = {"dograph.data", "dograph.eval", "dograph.method", "dograph.runs", "dograph.step", "dograph.train"}
    assert set(top) == set(TOP_LEVEL) | packages


def test_top_level_imports_only_the_top_level() -> None:
    # the contract names the stage and sweep specs and the projector in annotations only (TYPE_CHECKING)
    typed_only = ("dograph.runs.pipeline", "dograph.runs.sweep", "dograph.step.projection")
    bad = [f"{e.source}:{e.line} imports {e.target}" for s in TOP_LEVEL for e in edges_of(s)
           if not within(e.target, *TOP_LEVEL)
           and not (s == "dograph.mixing" and e.type_checking and e.target in typed_only)]
    assert bad == []


def test_data_layer_knows_nothing_of_training() -> None:
    # the data pipeline (prefetch thread included) is driven by the trainer, never the other way round
    assert offenders(modules_under("dograph.data"), ("dograph.data", "dograph.config", "dograph.distributed",
                                                     "dograph.errors", "dograph.atomic")) == []
    prefetch = {e.target for e in edges_of("dograph.data.prefetch")}
    source = (REPO / "dograph" / "data" / "prefetch.py").read_text()
    assert "import torch" not in source and prefetch <= {"dograph.data.packing"}  # the worker touches no tensors


def test_step_never_imports_the_method_the_trainer_or_runs() -> None:
    assert offenders(modules_under("dograph.step"), (*TOP_LEVEL, "dograph.step", "dograph.data")) == []


def test_runners_never_import_the_projected_step() -> None:
    # build.py picks between them; the runners are the base the projected step builds on
    assert "dograph.step.projected" not in {e.target for e in edges_of("dograph.step.runners")}


def test_method_imports_only_the_contract_and_step() -> None:
    assert offenders(modules_under("dograph.method"), (*TOP_LEVEL, "dograph.step", "dograph.method")) == []


def test_train_never_imports_a_method_runs_or_eval() -> None:
    assert offenders(modules_under("dograph.train"), (*TOP_LEVEL, "dograph.step", "dograph.data",
                                                      "dograph.train")) == []


def code_words(path: Path) -> set[str]:
    """The identifiers and non-docstring strings of a module's code (its docs may tell of a method)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    words: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.alias):
            words.add(node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.add(node.value)
    return words


def test_trainer_and_step_name_no_mixer() -> None:
    for module in [*modules_under("dograph.train"), *modules_under("dograph.step")]:
        words = code_words(project_modules()[module])
        named = sorted({name for name in MIXER_NAMES for word in words if name in word})
        assert named == [], (module, named)


def test_eval_never_imports_the_step_the_method_or_runs() -> None:
    assert offenders(modules_under("dograph.eval"), (*TOP_LEVEL, "dograph.data", "dograph.eval",
                                                     "dograph.train.metrics")) == []


def test_library_never_imports_baselines_or_experiments() -> None:
    assert offenders(modules_under("dograph"), ("dograph",)) == []


def test_library_never_reads_a_dictconfig() -> None:
    # converts the composed config; the Hydra entry of sweep jobs; reads a finished run's saved config
    allowed = {"dograph.config", "dograph.runs.sweep_job", "dograph.eval.cli"}
    bad = [m for m in modules_under("dograph") if m not in allowed
           and any(name.startswith("omegaconf") for name in imported_names(project_modules()[m]))]
    assert bad == []


def test_baselines_import_only_the_contract_side_of_the_library() -> None:
    allowed = (*TOP_LEVEL, "dograph.step.projection", "dograph.runs.pipeline", "dograph.runs.sweep", "baselines")
    assert offenders(modules_under("baselines"), allowed) == []


def test_no_private_name_is_imported_across_packages() -> None:
    def package(module: str) -> str:
        path = project_modules()[module]
        return module if path.name == "__init__.py" else module.rpartition(".")[0]

    bad = [f"{e.source}:{e.line} imports {e.target}.{name}" for e in all_edges() for name in e.names
           if name.startswith("_") and not name.startswith("__") and package(e.source) != package(e.target)
           and f"{e.target}.{name}" not in project_modules()]
    assert bad == []
