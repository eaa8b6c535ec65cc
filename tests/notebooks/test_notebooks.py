"""Runs every notebooks/*.ipynb top to bottom and checks each is in sync with its .py pair."""

import importlib.util
import json
import pathlib
import sys

import nbformat
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def _load_sync():
    spec = importlib.util.spec_from_file_location("notebook_sync", NOTEBOOK_DIR / "sync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_matches_its_py_pair_and_has_no_outputs(path):
    script = path.with_suffix(".py")
    assert script.exists(), f"{path.name} has no percent-format pair {script.name}"
    committed = nbformat.read(path, as_version=4)
    expected = _load_sync().notebook_from_percent(script)
    got = [(c.cell_type, c.source) for c in committed.cells]
    want = [(c.cell_type, c.source) for c in expected.cells]
    assert got == want, f"{path.name} differs from {script.name}: run `python notebooks/sync.py`"
    for i, cell in enumerate(committed.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{path.name} cell {i} has outputs; strip them (python notebooks/sync.py)"
            )


def _kernel_manager(tmp_path):
    """A kernel on this interpreter (sys.executable), whatever python3 kernelspecs exist."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    spec_dir = tmp_path / "kernels" / "jaxlm-test"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "jaxlm test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name="jaxlm-test", kernel_spec_manager=specs)


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    # Jupyter runs a notebook in its own folder; so does this test.
    client = NotebookClient(
        nb,
        km=_kernel_manager(tmp_path),
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        client.execute()
    except CellExecutionError as e:
        if "CorpusUnavailable" in str(e):
            pytest.skip(f"corpus unavailable: {str(e).splitlines()[-1]}")
        raise
