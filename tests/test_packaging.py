"""The two commands and the environments: Makefile targets, CI entry, conda env == pyproject."""

from __future__ import annotations

import re
import tomllib

import yaml
from helpers import REPO


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!\[ ]", spec.strip(), maxsplit=1)[0].lower()


def test_environment_yml_names_the_same_packages_as_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {requirement_name(s) for s in project["dependencies"]}
    wanted |= {requirement_name(s) for s in project["optional-dependencies"]["gpu"]}
    wanted |= {requirement_name(s) for s in project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    conda = {requirement_name(d) for d in env["dependencies"] if isinstance(d, str)}
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {requirement_name(s) for s in pip if not s.startswith("-")}
    named = listed | conda | ({"torch"} if "pytorch-gpu" in conda else set())
    assert wanted - named == set(), wanted - named
    assert "-e ." in pip


def test_make_targets_and_ci() -> None:
    makefile = (REPO / "Makefile").read_text()
    for target in ("demo", "test", "test-all", "lint", "clean"):
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), target
    assert "torch==2.13.0" in makefile
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_readme_leads_with_the_two_commands() -> None:
    readme = (REPO / "README.md").read_text()
    first = readme[:1500]
    assert "make demo" in first and "make test" in first


def test_package_discovery_finds_every_package_of_the_project() -> None:
    from setuptools import find_packages

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set(find_packages(str(REPO), include=include))
    directories = {".".join(p.parent.relative_to(REPO).parts) for root in ("dograph", "baselines", "experiments")
                   for p in (REPO / root).rglob("*.py") if "__pycache__" not in p.parts}
    assert directories <= found, sorted(directories - found)  # a folder of modules without __init__.py is not shipped
    assert {"dograph.step", "dograph.method", "dograph.method.objectives", "dograph.train", "dograph.runs",
            "dograph.eval"} <= found
