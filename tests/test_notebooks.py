"""Notebooks run top to bottom with the venv's kernel, from the repository root (their asserts must hold)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reward_playground_runs():
    notebook = nbformat.read(ROOT / "notebooks" / "reward_playground.ipynb", as_version=4)
    # "python3" is the kernel of the Python running the tests (jupyter_client swaps in sys.executable)
    NotebookClient(notebook, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
                   ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4  # three image grids and the histograms
