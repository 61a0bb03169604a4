"""Verify by running: the shrunk model must compute what the masked model computes.

Surgery is a static analysis; every model entry point (`hesso_jax.shrink_model` for NNX,
equinox and linen) checks its result numerically on an example input and raises instead of
returning a model that is silently wrong or crashes on its first call.

*Masked* model: the original model with the member slices of every removed group set to
exactly 0 (the function surgery promises to preserve; equal to the original when its
removed groups are already zero). *Shrunk* model: the result. Both run eagerly on the
example input; their outputs are compared leaf by leaf.

Tolerance: ``max |shrunk - masked| <= rtol * max |masked|`` per output leaf, with
``rtol = max(1e-5, 4 * eps(dtype))`` (1e-5 for float32, 0.03 for bfloat16). Removing
exact-zero terms only reorders float sums, whose error is a few ulps of the largest
partial sum, so the bound is relative to the output's scale, not elementwise (an element
that is a cancellation of large terms may legitimately differ by more than its own size
times eps). Integer and boolean outputs must be equal; NaNs must be in the same places.

Locating the failure (only when the outputs differ, so the check itself costs one masked
and one shrunk forward pass): both models run again with every submodule's ``__call__``
recorded (a framework-specific recorder, see `Tape`), and the first submodule (in order
of completion, so the innermost one) whose output differs is named. Intermediate outputs
of the shrunk model lack the removed channels: an axis whose length changed is aligned
through the plan's keep masks of that length (the module's own variables' masks first);
an output that cannot be aligned is skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hesso_jax.groups import Groups, Path, format_path, tree_paths
from hesso_jax.surgery import KeepPlan, _channel_keep

__all__ = ["Tape", "compiled_call", "keep_by_path", "masked_tree", "materialise", "max_rel_error",
           "patched_calls", "Runner", "first_difference", "resolve_example", "tolerance", "verify"]

RTOL = 1e-5
"""Relative tolerance for float32 outputs (see the module docstring)."""

KeepMasks = dict[Path, dict[int, np.ndarray]]
"""``{variable path: {axis: bool[old length]}}``: channels kept on every touched axis."""


def tolerance(dtype: Any) -> float:
    """``max(1e-5, 4 * eps(dtype))`` for a float dtype, 0 for others (exact)."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        return 0.0
    return max(RTOL, 4.0 * float(jnp.finfo(dtype).eps))


def keep_by_path(tree: Any, groups: Groups, plan: KeepPlan) -> KeepMasks:
    """The channels ``plan`` keeps on each axis it touches, by variable path.

    Example:
      >>> import numpy as np, hesso_jax as hj
      >>> from hesso_jax.frameworks.verify import keep_by_path
      >>> g = hj.Groups.from_families([hj.GroupFamily(3, (hj.Member(("w",), 0),))])
      >>> keep_by_path({"w": np.ones((3, 2))}, g, hj.KeepPlan((3,), ((0, 2),)))
      {('w',): {0: array([ True, False,  True])}}
    """
    paths = tree_paths(tree)
    keep: KeepMasks = {}
    for (leaf, axis), mask in _channel_keep(tree, groups, plan, "present").items():
        keep.setdefault(paths[leaf], {})[axis] = mask
    return keep


def masked_tree(tree: Any, groups: Groups, plan: KeepPlan) -> Any:
    """``tree`` with every member slice of the groups ``plan`` removes set to exactly 0."""
    return groups.mask(tree, plan.keep_mask())


def _is_shape_struct(x: Any) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def materialise(example: Any, seed: int = 0) -> Any:
    """Arrays for every ``jax.ShapeDtypeStruct`` in ``example`` (other leaves unchanged).

    Floats are standard normal, integers are in ``{0, 1}`` (valid token ids and masks),
    booleans are fair coin flips; all from ``jax.random.key(seed)``, so a recorded input
    always gives the same arrays.

    Example:
      >>> import jax
      >>> from hesso_jax.frameworks.verify import materialise
      >>> materialise((jax.ShapeDtypeStruct((2, 3), "int32"),))[0].shape
      (2, 3)
    """
    leaves, treedef = jax.tree_util.tree_flatten(example, is_leaf=_is_shape_struct)
    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    out = []
    for key, x in zip(keys, leaves, strict=False):
        if not _is_shape_struct(x):
            out.append(x)
        elif jnp.issubdtype(x.dtype, jnp.floating):
            out.append(jax.random.normal(key, x.shape, x.dtype))
        elif jnp.issubdtype(x.dtype, jnp.integer):
            out.append(jax.random.randint(key, x.shape, 0, 2, x.dtype))
        elif x.dtype == jnp.bool_:
            out.append(jax.random.bernoulli(key, 0.5, x.shape))
        else:
            raise TypeError(f"cannot make an example array of dtype {x.dtype}")
    return jax.tree_util.tree_unflatten(treedef, out)


def resolve_example(groups: Groups, inputs: tuple[Any, ...], example: Any
                    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The example call arguments ``(args, kwargs)``, or None when there are none.

    Explicit ``inputs`` (positional) or ``example`` (a tuple of positional arguments or one
    array) win; otherwise the input discovery recorded on ``groups`` as
    ``groups.example_inputs = (args, kwargs)`` (arrays or ``jax.ShapeDtypeStruct``, made
    concrete by `materialise`).

    Raises:
      TypeError: if both ``inputs`` and ``example`` are given.
    """
    if inputs and example is not None:
        raise TypeError("pass the example input either positionally or as example=, not both")
    if inputs:
        return materialise(tuple(inputs)), {}
    if example is not None:
        args = example if isinstance(example, tuple) else (example,)
        return materialise(args), {}
    recorded = getattr(groups, "example_inputs", None)
    if recorded is None:
        return None
    args, kwargs = recorded
    return materialise(tuple(args)), dict(materialise(dict(kwargs)))


# ----------------------------------------------------------------------- comparison


def max_rel_error(want: Any, got: Any) -> float:
    """``max |got - want| / max |want|`` over one array pair (inf if shapes differ).

    Integer and boolean arrays give 0 when equal and inf otherwise; NaNs must match.
    """
    want, got = np.asarray(want), np.asarray(got)
    if want.shape != got.shape:
        return float("inf")
    if not want.size:
        return 0.0
    if not np.issubdtype(want.dtype, np.inexact):
        return 0.0 if np.array_equal(want, got) else float("inf")
    w, g = want.astype(np.float64), got.astype(np.float64)
    if not np.array_equal(np.isnan(w), np.isnan(g)):
        return float("inf")
    w, g = np.nan_to_num(w, nan=0.0), np.nan_to_num(g, nan=0.0)
    scale = max(float(np.max(np.abs(w))), np.finfo(np.float32).tiny)
    return float(np.max(np.abs(g - w))) / scale


LeafError = Callable[[Any, Any], "tuple[float, float] | None"]


def _worst(want: Any, got: Any, leaf_error: LeafError) -> tuple[float, float]:
    """The leaf pair whose ``error − tolerance`` is largest; error inf if structures differ.

    ``leaf_error(w, g)`` gives ``(error, tolerance)`` of one pair, or None to skip it.
    """
    wl, wdef = jax.tree_util.tree_flatten(want)
    gl, gdef = jax.tree_util.tree_flatten(got)
    if wdef != gdef:
        return float("inf"), 0.0
    worst = (0.0, RTOL)
    for w, g in zip(wl, gl, strict=True):
        found = leaf_error(w, g)
        if found is not None and found[0] - found[1] > worst[0] - worst[1]:
            worst = found
    return worst


def _tree_error(want: Any, got: Any) -> tuple[float, float]:
    """``(error, tolerance)`` of the worst leaf pair; error inf if the structures differ."""
    return _worst(want, got, lambda w, g: (max_rel_error(w, g), tolerance(np.asarray(w).dtype)))


# ------------------------------------------------------------------------ running


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _compiled(fn: Callable[..., Any], treedef: Any, static: tuple[tuple[int, Any], ...],
              tree: Any, *arrays: Any) -> Any:
    fixed, rest = dict(static), iter(arrays)
    leaves = [fixed[i] if i in fixed else next(rest)
              for i in range(len(static) + len(arrays))]
    args, kwargs = jax.tree_util.tree_unflatten(treedef, leaves)
    return fn(tree, *args, **kwargs)


def compiled_call(fn: Callable[..., Any], tree: Any, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> Any:
    """``fn(tree, *args, **kwargs)``, compiled (array leaves traced, other leaves static).

    One compilation is far cheaper than an eager run of a new model (every eager
    operation compiles for its shapes), and it is cached across calls when ``fn`` is
    hashable and equal for equal models. Falls back to the eager call when ``fn`` cannot
    be traced or hashed (Python control flow on an input, unhashable flags).
    """
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    is_array = [isinstance(x, jax.Array | np.ndarray) for x in leaves]
    static = tuple((i, x) for i, (x, a) in enumerate(zip(leaves, is_array, strict=True))
                   if not a)
    arrays = [x for x, a in zip(leaves, is_array, strict=True) if a]
    try:
        return _compiled(fn, treedef, static, tree, *arrays)
    except (jax.errors.JAXTypeError, TypeError, ValueError):
        return fn(tree, *args, **kwargs)


# ------------------------------------------------------------------------ recording


@dataclasses.dataclass
class Tape:
    """The submodule calls of one run.

    Attributes:
      calls: ``(path, type name, output)`` per completed ``__call__``, in order of
        completion (a submodule before the module that called it).
      stack: the calls in progress.
      failed_at: ``(path, type name)`` of the innermost call that raised, if any.
    """

    calls: list[tuple[Path, str, Any]] = dataclasses.field(default_factory=list)
    stack: list[tuple[Path, str]] = dataclasses.field(default_factory=list)
    failed_at: tuple[Path, str] | None = None

    def call(self, where: tuple[Path, str], fn: Callable[[], Any]) -> Any:
        """Runs ``fn()`` as the call of the module at ``where`` and records its output."""
        self.stack.append(where)
        try:
            out = fn()
        except BaseException:
            if self.failed_at is None:
                self.failed_at = where
            raise
        self.stack.pop()
        self.calls.append((*where, out))
        return out


Recorder = Callable[[Tape], contextlib.AbstractContextManager]
"""``recorder(tape)``: a context inside which the model's submodule calls go to ``tape``."""


@contextlib.contextmanager
def patched_calls(items: list[tuple[Path, Any]], tape: Tape) -> Iterator[None]:
    """Records the ``__call__`` of every ``(path, object)`` in ``items`` on ``tape``.

    Every class in the objects' MROs that defines ``__call__`` itself is patched for the
    duration of the context (and restored after); calls on other instances pass through.
    This is how NNX and equinox modules are recorded: both call their submodules as
    ordinary Python objects. An object reachable by several paths is named by the first.
    """
    where: dict[int, tuple[Path, str]] = {}
    originals: dict[type, Any] = {}
    for path, obj in items:
        where.setdefault(id(obj), (tuple(path), type(obj).__name__))
        for cls in type(obj).__mro__:
            if cls is not object and "__call__" in cls.__dict__ and cls not in originals:
                originals[cls] = cls.__dict__["__call__"]

    def patch(orig: Any) -> Callable[..., Any]:
        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N807
            at = where.get(id(self))
            if at is None:
                return orig(self, *args, **kwargs)
            return tape.call(at, lambda: orig(self, *args, **kwargs))
        return __call__

    try:
        for cls, orig in originals.items():
            type.__setattr__(cls, "__call__", patch(orig))
        yield
    finally:
        for cls, orig in originals.items():
            type.__setattr__(cls, "__call__", orig)


# ------------------------------------------------------------------------ alignment


def _candidates(keep: KeepMasks, path: Path, n: int, m: int) -> list[np.ndarray]:
    """Keep masks of length ``n`` keeping ``m``: the module's own first, else any."""
    def pick(own: bool) -> list[np.ndarray]:
        seen: dict[bytes, np.ndarray] = {}
        for p, axes in keep.items():
            if own != (p[:len(path)] == path):
                continue
            for mask in axes.values():
                if len(mask) == n and int(mask.sum()) == m:
                    seen.setdefault(mask.tobytes(), mask)
        return list(seen.values())
    return pick(True) or pick(False)


def _aligned(want: np.ndarray, shape: tuple[int, ...], keep: KeepMasks, path: Path
             ) -> list[np.ndarray]:
    """``want`` cut to ``shape`` through keep masks (at most 16 ways; [] if impossible)."""
    if want.ndim != len(shape):
        return []
    options = [want]
    for axis, (n, m) in enumerate(zip(want.shape, shape, strict=True)):
        if n == m:
            continue
        masks = _candidates(keep, path, n, m) if m < n else []
        if not masks:
            return []
        options = [np.compress(k, o, axis=axis) for o in options for k in masks][:16]
    return options


def _call_error(want: Any, got: Any, keep: KeepMasks, path: Path) -> tuple[float, float]:
    """Worst ``(error, tolerance)`` of one recorded call's output (aligned where needed)."""

    def leaf_error(w: Any, g: Any) -> tuple[float, float] | None:
        if isinstance(w, jax.core.Tracer) or isinstance(g, jax.core.Tracer):
            return None  # recorded inside a transform (scan over time steps): not comparable
        if not hasattr(w, "shape") or not hasattr(g, "shape"):
            return None
        w, g = np.asarray(w), np.asarray(g)
        options = [w] if w.shape == g.shape else _aligned(w, g.shape, keep, path)
        if not options:
            return None
        return min(max_rel_error(o, g) for o in options), tolerance(w.dtype)

    return _worst(want, got, leaf_error)


def first_difference(masked: Tape, small: Tape, keep: KeepMasks) -> str | None:
    """The first call of ``small`` (in completion order) whose output differs, described."""
    index: dict[tuple[Path, int], Any] = {}
    count: dict[Path, int] = {}
    for path, _name, out in masked.calls:
        index[(path, count.get(path, 0))] = out
        count[path] = count.get(path, 0) + 1
    count = {}
    for path, name, out in small.calls:
        k = count.get(path, 0)
        count[path] = k + 1
        if (path, k) not in index:
            continue
        err, tol = _call_error(index[(path, k)], out, keep, path)
        if err > tol:
            return f"{name} at {format_path(path) or '<root>'!r} (relative error {err:.3g})"
    return None


# ------------------------------------------------------------------------- verify


@dataclasses.dataclass(frozen=True)
class Runner:
    """One model on the example input.

    Attributes:
      run: ``run() -> output`` (compiled, see `compiled_call`).
      eager: the same call, run eagerly on the model's own module objects (so that
        ``record`` sees their calls).
      record: a `Recorder` for this model's submodule calls.
    """

    run: Callable[[], Any]
    eager: Callable[[], Any]
    record: Recorder


def verify(what: str, masked: Runner, small: Runner, keep: KeepMasks) -> float:
    """Raises unless ``small`` computes what ``masked`` does; returns the relative error.

    Args:
      what: the entry point's name, for the messages.
      masked: the model with its removed groups zeroed.
      small: the shrunk model.
      keep: the plan's keep masks by variable path (to align intermediate outputs).

    Raises:
      ValueError: naming the first submodule whose output differs (or that raised).
    """
    want = masked.run()
    try:
        got = small.run()
    except Exception as exc:
        tape = Tape()
        with contextlib.suppress(Exception), small.record(tape):
            small.eager()
        where = "" if tape.failed_at is None else (
            f" in {tape.failed_at[1]} at {format_path(tape.failed_at[0]) or '<root>'!r}")
        raise ValueError(f"{what}: the shrunk model fails on the example input{where}: "
                         f"{type(exc).__name__}: {exc}") from exc
    err, tol = _tree_error(want, got)
    if err <= tol:
        return err
    tapes = Tape(), Tape()
    for runner, tape in zip((masked, small), tapes, strict=True):
        with contextlib.suppress(Exception), runner.record(tape):
            runner.eager()
    first = first_difference(*tapes, keep) or "none of the submodules (only the model output)"
    raise ValueError(
        f"{what}: the shrunk model's output differs from the masked model's (relative "
        f"error {err:.3g} > {tol:g}); first layer whose output differs: {first}. A static "
        "size attribute of that layer probably does not match its new parameter shapes; "
        "pass verify=False to get the model anyway")
