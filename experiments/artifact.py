"""What ``reproduce`` needs of an artifact, the artifact with its own module, and the error for missing runs.

Every paper table and figure is an entry of ``experiments.paper.ARTIFACTS``: an object with a
``name`` ("table1"), a one-line ``title``, ``requests(scale)`` (the runs it reads, [] for none)
and ``build(index, scale, out_dir)`` (the files it writes). Most are data (a kind of
``experiments.tables`` or ``experiments.figures`` and its parameters); an artifact with logic of
its own is an :class:`OwnModule`, ``experiments/<name>.py`` defining ``TITLE``, ``requests`` and
``build``.

``build`` reads only complete runs from the index. A table writes "not available" cells where a
run is missing; a figure with nothing to plot raises :class:`NothingToPlot` (no empty figure).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import pandas as pd

    from experiments.scale import RunRequest, Scale


class NothingToPlot(Exception):
    """None of an artifact's runs exist yet: nothing is written (the caller lists the missing runs)."""


class Artifact(Protocol):
    """One paper table or figure: the runs it reads and how it is written from them."""

    @property
    def name(self) -> str: ...

    @property
    def title(self) -> str: ...

    def requests(self, scale: Scale) -> list[RunRequest]: ...

    def build(self, index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]: ...


@dataclass(frozen=True)
class OwnModule:
    """An artifact whose logic is its own: ``experiments/<name>.py``, imported when first used (some are heavy)."""

    name: str

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"experiments.{self.name}")

    @property
    def title(self) -> str:
        return str(self.module.TITLE)

    def requests(self, scale: Scale) -> list[RunRequest]:
        return self.module.requests(scale)

    def build(self, index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
        return self.module.build(index, scale, out_dir)
