"""Builds every notebook of this folder from its percent-format source.

Each ``NN_name.py`` here is the source of ``NN_name.ipynb``, in the percent format that
jupytext and VS Code read: ``# %%`` starts a code cell, ``# %% [markdown]`` a markdown cell
whose lines are comments (``# `` stripped), and anything before the first marker (the
module docstring) is not part of the notebook. IPython magics are written commented out
(``# %matplotlib inline``), as jupytext does, and restored in the notebook. The sources are
plain Python, linted by ruff like the rest of the repository.

The ``.ipynb`` files are generated, without outputs, so diffs stay small: edit the ``.py``
source and run ``python notebooks/make_notebooks.py`` (``tests/test_notebooks.py`` checks
that the two agree and executes every notebook). No jupytext is needed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
SOURCES = sorted(HERE.glob("[0-9][0-9]_*.py"))
MARKER = re.compile(r"^# %%(?P<md> \[markdown\])?[ \t]*$")
MAGIC = re.compile(r"^# (?=%(?!%)\w)")    # "# %matplotlib inline" -> "%matplotlib inline"


def notebook_name(source: Path) -> str:
    """``01_quick_tour.py`` -> ``01_quick_tour.ipynb``."""
    return source.with_suffix(".ipynb").name


def _markdown_line(line: str, source: Path, lineno: int) -> str:
    if line == "#" or line.startswith("# "):
        return line[2:]
    if not line.strip():
        return ""
    raise ValueError(f"{source.name}:{lineno}: a markdown cell line must be a comment")


def parse_cells(text: str, source: Path = Path("<source>")) -> list[tuple[str, str]]:
    """``[(kind, text), ...]`` (kind ``"md"`` or ``"code"``) of a percent-format source."""
    cells: list[tuple[str, list[str]]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        match = MARKER.match(line)
        if match:
            cells.append(("md" if match["md"] else "code", []))
        elif cells and cells[-1][0] == "md":
            cells[-1][1].append(_markdown_line(line, source, lineno))
        elif cells:
            cells[-1][1].append(MAGIC.sub("", line))
    if not cells:
        raise ValueError(f"{source.name}: no '# %%' cell marker")
    return [(kind, "\n".join(lines).strip("\n")) for kind, lines in cells]


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A v4 notebook (python3 kernel) without outputs from ``[(kind, text), ...]``."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, (kind, text) in enumerate(cells):
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
    """``(notebook file name, notebook JSON text)`` generated from ``source``."""
    cells = parse_cells(source.read_text(encoding="utf-8"), source)
    return notebook_name(source), nbformat.writes(build(cells)) + "\n"


def main() -> None:
    """Regenerates every notebook of this folder."""
    for source in SOURCES:
        name, text = render(source)
        (HERE / name).write_text(text)
        print("wrote", HERE / name, file=sys.stderr)


if __name__ == "__main__":
    main()
