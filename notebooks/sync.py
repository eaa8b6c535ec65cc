"""Writes each percent-format notebooks/*.py (`# %%` cells) to its .ipynb pair, without outputs.

Edit the .py, then run `python notebooks/sync.py`; the .ipynb is what Colab and Jupyter open.
"""

import pathlib
import re

import nbformat

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent
_CELL_MARKER = re.compile(r"^# %%(.*)$", re.MULTILINE)


def is_percent_script(path: pathlib.Path) -> bool:
    return bool(_CELL_MARKER.search(path.read_text()))


def notebook_from_percent(path: pathlib.Path) -> nbformat.NotebookNode:
    """Builds the notebook of a percent script; cell ids are fixed so reruns change nothing."""
    text = path.read_text()
    headers = _CELL_MARKER.findall(text)
    bodies = _CELL_MARKER.split(text)[2::2]  # split() interleaves [before, header, body, ...]
    cells = []
    for i, (header, body) in enumerate(zip(headers, bodies, strict=True)):
        body = body.strip("\n")
        if "[markdown]" in header:
            lines = [line.removeprefix("#").removeprefix(" ") for line in body.splitlines()]
            cell = nbformat.v4.new_markdown_cell("\n".join(lines))
        else:
            cell = nbformat.v4.new_code_cell(body)
        cell.id = f"cell-{i}"
        cells.append(cell)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "jupytext": {"formats": "ipynb,py:percent"},
    }
    return nb


def main() -> None:
    for path in sorted(NOTEBOOK_DIR.glob("*.py")):
        if is_percent_script(path):
            nbformat.write(notebook_from_percent(path), path.with_suffix(".ipynb"))
            print(f"wrote {path.with_suffix('.ipynb')}")


if __name__ == "__main__":
    main()
