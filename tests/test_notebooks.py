"""Every notebook in notebooks/ runs top to bottom without an error (nbclient, a kernel of this interpreter via
ipykernel, the repository root as working directory) and is committed without outputs. Notebook-specific checks
reuse the same execution (`executed`)."""

import functools
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@functools.cache
def executed(name: str, timeout: int = 300):
    """Run notebooks/NAME in a fresh kernel of this Python (once per test session); returns the executed notebook.
    A failing cell raises nbclient's CellExecutionError, which names the cell and shows its traceback."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import NATIVE_KERNEL_NAME

    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    # the repository first on the kernel's path (as in the tests), and few threads
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p))
    env.setdefault("OMP_NUM_THREADS", "1")
    client = nbclient.NotebookClient(notebook, timeout=timeout, kernel_name=NATIVE_KERNEL_NAME,
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute(env=env)
    return notebook


def outputs(notebook, output_type: str | None = None) -> list[dict]:
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
            if output_type is None or o.get("output_type") == output_type]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_clean(path):
    import nbformat

    assert not outputs(nbformat.read(path, as_version=4)), f"{path.name} is committed with outputs; clear them"
    notebook = executed(path.name)
    assert not outputs(notebook, "error")
    assert outputs(notebook), f"{path.name} shows nothing"


@pytest.mark.slow
def test_quickstart_shows_images_and_numbers():
    notebook = executed("quickstart.ipynb")
    shown = [o for o in outputs(notebook) if "image/png" in o.get("data", {})]
    assert len(shown) >= 3  # the first samples, the reward plot, the last samples
    text = "".join(o.get("text", "") for o in outputs(notebook, "stream"))
    assert "trainable parameters:" in text and "'reward_mean':" in text and "images: 8 (" in text


@pytest.mark.slow
def test_reward_playground_shows_its_plots():
    outputs_ = outputs(executed("reward_playground.ipynb"))
    assert sum("image/png" in o.get("data", {}) for o in outputs_) >= 4  # three image grids and the histograms
