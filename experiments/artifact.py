"""What every artifact module (``table1`` ... ``figure5``) provides, and the error for missing runs.

An artifact module defines::

    NAME: str                       # "table1"
    TITLE: str                      # one line, what the paper's artifact shows
    def requests(scale: Scale) -> list[RunRequest]     # the runs it reads ([] for none)
    def build(index: pandas.DataFrame, scale: Scale, out_dir: Path) -> list[Path]  # the files written

``build`` reads only complete runs from the index. A table writes "not available" cells where a
run is missing; a figure with nothing to plot raises :class:`NothingToPlot` (no empty figure).
"""

from __future__ import annotations


class NothingToPlot(Exception):
    """None of an artifact's runs exist yet: nothing is written (the caller lists the missing runs)."""
