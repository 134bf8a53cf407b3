"""Every notebook in notebooks/ runs top to bottom on a tiny DoGraph run, and is stored without outputs.

The notebooks take their inputs from environment variables (``DOGRAPH_RUN_DIR``,
``DOGRAPH_RUNS_ROOT``, ``DOGRAPH_RESULTS_DIR``), which the kernel inherits from this process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from figure_runs import train_tiny_dograph
from helpers import REPO
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, local_corpus: Path, cache_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("notebook_runs")
    return train_tiny_dograph(root / "runs" / "dograph" / "seed0", local_corpus, cache_dir)


def test_the_python3_kernel_is_this_interpreter() -> None:
    """The kernel must see this checkout's packages: its spec is this venv's, or ``python`` (run as sys.executable)."""
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.argv[0] in {"python", "python3", sys.executable}, spec.argv


def test_notebooks_are_stored_without_outputs() -> None:
    assert len(NOTEBOOKS) >= 2
    for path in NOTEBOOKS:
        cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in cells), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_without_errors(path: Path, tiny_run: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOGRAPH_RUN_DIR", str(tiny_run))
    monkeypatch.setenv("DOGRAPH_RUNS_ROOT", str(tiny_run.parent.parent.parent))
    monkeypatch.setenv("DOGRAPH_RESULTS_DIR", str(tmp_path / "results"))  # none built: Figure 1 is recomputed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure was drawn"
