"""Every notebook in notebooks/ executes top to bottom without an error (nbclient, a fresh
kernel per notebook, one CPU device, a timeout per cell)."""
import os
from pathlib import Path

import pytest

from conftest import ROOT, one_device_env

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 120  # each notebook runs in seconds on CPU; a stuck cell fails, not hangs


def test_notebooks_exist():
  names = {p.name for p in NOTEBOOKS}
  assert {"01_architecture_tour.ipynb", "02_fp8_kv_cache.ipynb",
          "03_ablation_results.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, monkeypatch):
  # the kernel inherits this environment: one device (no 8-way fake mesh), repo importable
  monkeypatch.setenv("XLA_FLAGS", one_device_env()["XLA_FLAGS"])
  monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, errors
