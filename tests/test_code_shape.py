"""The library stays made of short functions, and ``jaxpr/`` never imports its clients.

Counted per function: lines of code of its own body (not its docstring, comments, blank
lines or nested functions/classes, which are counted on their own).
"""

import ast
import pathlib

import hesso_jax

ROOT = pathlib.Path(hesso_jax.__file__).parent
LIMIT = 60


def _own_code_lines(lines, node):
    skip = set()
    for child in ast.walk(node):
        if child is not node and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef
                                            | ast.ClassDef):
            skip.update(range(child.lineno, child.end_lineno + 1))
    first = node.body[0]
    if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        skip.update(range(first.lineno, first.end_lineno + 1))
    return sum(1 for ln in range(node.lineno, node.end_lineno + 1)
               if ln not in skip and lines[ln - 1].strip()
               and not lines[ln - 1].strip().startswith("#"))


def _functions():
    for path in sorted(ROOT.rglob("*.py")):
        src = path.read_text()
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield path, node, _own_code_lines(src.splitlines(), node)


def test_the_counter_counts():
    src = ('def f():\n    """Doc."""\n    # note\n    a = 1\n\n'
           '    def g():\n        return 2\n    return a\n')
    node = ast.parse(src).body[0]
    assert _own_code_lines(src.splitlines(), node) == 3  # def line, a = 1, return a


def test_no_function_longer_than_the_limit():
    long = [f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({k} lines)"
            for p, n, k in _functions() if k > LIMIT]
    assert not long, f"functions over {LIMIT} lines of code: {long}"


def test_jaxpr_package_does_not_import_its_clients():
    clients = ("hesso_jax.discovery", "hesso_jax.costs", "hesso_jax.snows",
               "hesso_jax.hesso")
    bad = []
    for path in sorted((ROOT / "jaxpr").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.name} imports {n}" for n in names if n.startswith(clients)]
    assert not bad, bad
