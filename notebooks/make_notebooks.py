"""Writes the notebooks of this folder from their cell lists (``_nb_*.py``).

The ``.ipynb`` files are generated, without outputs, so diffs stay small: edit the
``_nb_*.py`` cell lists and run ``python notebooks/make_notebooks.py``
(``tests/test_notebooks.py`` checks that the two agree and executes every notebook).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
SOURCES = sorted(HERE.glob("_nb_*.py"))


def load_cells(source: Path) -> tuple[str, list[tuple[str, str]]]:
    """``(notebook file name, [(kind, text), ...])`` of one ``_nb_*.py`` module."""
    spec = importlib.util.spec_from_file_location(source.stem, source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TITLE, module.CELLS


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A v4 notebook (python3 kernel) without outputs from ``[(kind, text), ...]``."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, (kind, text) in enumerate(cells):
        text = text.strip("\n")
        if kind == "md":
            cell = nbformat.v4.new_markdown_cell(text)
        elif kind == "code":
            cell = nbformat.v4.new_code_cell(text)
        else:
            raise ValueError(f"cell kind must be 'md' or 'code', got {kind!r}")
        cell.id = f"cell-{i:02d}"   # stable ids: regenerating changes nothing
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(source: Path) -> tuple[str, str]:
    """``(file name, notebook JSON text)`` generated from ``source``."""
    title, cells = load_cells(source)
    return title, nbformat.writes(build(cells)) + "\n"


def main() -> None:
    """Regenerates every notebook of this folder."""
    for source in SOURCES:
        title, text = render(source)
        (HERE / title).write_text(text)
        print("wrote", HERE / title, file=sys.stderr)


if __name__ == "__main__":
    main()
