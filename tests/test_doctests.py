"""The docstring examples of the library run, and every public name has one.

Each module of ``hesso_jax`` is imported and its docstrings (module, classes, functions,
methods) are run with `doctest` (NORMALIZE_WHITESPACE, ELLIPSIS). Modules that need an
optional extra that is not installed are skipped with the reason.
"""

import doctest
import importlib
import inspect
import pkgutil

import pytest

import hesso_jax as hj

FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
# Records a call returns (nobody constructs them by hand): their fields are documented,
# and the examples of the functions that return them show them in use.
RECORDS = {"CricResult", "DiscoveryWarning", "GroupCosts", "HessoState", "HessoStatus",
           "SnowsReport", "SCORES"}


def _module_names():
    names = ["hesso_jax"]
    for info in pkgutil.walk_packages(hj.__path__, "hesso_jax."):
        names.append(info.name)
    return sorted(names)


def _tests_of(name):
    try:
        module = importlib.import_module(name)
    except ImportError as err:  # an optional extra (equinox, tokenizers, ...) is missing
        pytest.skip(f"{name} needs an extra that is not installed: {err}")
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [t for t in finder.find(module, name) if t.examples]


@pytest.mark.parametrize("name", _module_names())
def test_module_examples_run(name):
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in _tests_of(name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"


def _all_example_sources():
    sources = []
    for name in _module_names():
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):
            sources += [ex.source for ex in test.examples]
    return sources


def test_every_public_name_has_an_example():
    sources = _all_example_sources()
    assert sum(len(s.splitlines()) for s in sources) >= 15
    missing = []
    for name in hj.__all__:
        obj = getattr(hj, name)
        if name in RECORDS or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if not any(f"hj.{name}" in s or f"{name}(" in s for s in sources):
            missing.append(name)
    assert not missing, f"public names without a docstring example: {missing}"


def _documented():
    from hesso_jax.jaxpr import axes, interpreter, views

    return [(f, 1) for f in (axes.register_rule, axes.elementwise_rule, axes.def_elementwise,
                             axes.def_identity, axes.def_source, axes.def_blocked,
                             axes.default_rule, interpreter.source_line, views.leaf_axes,
                             views.reshape_groups, views.view_axes, hj.discover_groups)
            ] + [(hj.hesso, 5), (hj.hesso_status, 5)]


@pytest.mark.parametrize("fn,least", _documented(), ids=lambda v: getattr(v, "__name__", ""))
def test_extension_points_and_hesso_carry_examples(fn, least):
    """These docstrings must keep their examples (run above with their modules)."""
    tests = doctest.DocTestFinder(exclude_empty=True).find(fn, fn.__name__, globs={})
    assert sum(len(t.examples) for t in tests) >= least
