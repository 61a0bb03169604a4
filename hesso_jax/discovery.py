"""Zero-invariant group discovery from a model's jaxpr.

`discover_groups` traces the forward pass, follows every axis of every parameter through
the graph, and returns the `Groups` whose removal provably leaves the outputs unchanged.

The analysis has three stages, all on the traced jaxpr (`hesso_jax.jaxpr.Interpreter`):

1. **Structure** (`hesso_jax.jaxpr.axes`). Each axis of each value is a node. Index-
   preserving operations (the aligned axes of elementwise ops, residual adds, per-channel
   BatchNorm, bias adds, the free and batch axes of ``dot_general``/``conv``, the pairs of
   contracted axes, transposes, pooling over other axes) join nodes in a union-find: a
   *class* is a set of axes that share one channel index. Other index maps are recorded as
   relations between classes: ``concatenate``/``split``/``slice`` embed one class into a
   segment of another, and a ``reshape`` that merges (or splits) axes makes a class the
   row-major *product* of its factor classes. Axes that an operation treats non-uniformly
   (model inputs and outputs, convolution windows, ``max``/``argmax``/``sort``/``cumsum``
   reductions, indexed gather axes, primitives without a rule) are *blocked*.
   **Constants** (values computed from literals and closed-over arrays only) never join
   axes: every use of a constant reads a fresh copy, so one ``head_mask`` whose row ``i``
   scales layer ``i`` does not tie the layers' heads. A copy's axes along which the
   constant may vary (``iota``, anything computed non-uniformly, every axis of a
   closed-over array, whose shape is fixed) are blocked at that use; uniform constants
   (``jnp.ones``, ``jnp.full``, their slices and reshapes) block nothing, and as
   multiplicands they preserve zeros. A **grouped convolution** with ``G`` groups of
   ``k`` in- and ``m`` out-channels is a product too: in-channels ``(G, k)``, with ``k``
   contracted against the kernel's in axis, out-channels ``(G, m)``, with the group
   factor ``G`` shared (whole conv-groups are prunable, or, where they are not, channel
   ``j`` of every group); ``feature_group_count = C_in / k`` stays valid either way.
2. **Channel spaces** (`hesso_jax.jaxpr.spaces`). Embeddings are resolved by interval
   refinement: every class is cut at the boundaries of every segment embedded in it (and
   vice versa) until stable, and equal intervals are joined. The resulting atomic
   intervals are the candidate families (*spaces*); a product class is not a space itself,
   its channels are the product of its factors'. Each space knows its occurrences: on
   which class, at which ``offset``, ``block``, ``repeat`` and ``stride`` (a head of
   ``(H, D)`` merged to ``H*D`` is a block of ``D``; a channel ``C`` flattened from
   ``(h, w, C)`` recurs every ``C`` rows). A factor cut into intervals (RoPE's
   rotate-half slices ``head_dim`` in halves; partial rotary cuts it into rotary and
   pass-through parts) stays a factor, as the composite of its intervals: the heads
   remain a space, and each interval recurs in every head.
3. **Zero invariance** (`hesso_jax.jaxpr.zeros`). With every trainable producer slice of a
   space set to zero (parameter axes that are not only contracted), a forward pass over
   the recorded operations tracks, per value and axis, the set of spaces whose channel
   slices are *exactly* zero (``x·0 = 0``, ``0+0 = 0``, ``f(0) = 0`` for
   relu/gelu/silu/tanh, per-channel BatchNorm with zero scale and shift, ...). A space is
   a family iff it is never blocked, every contraction over it (``dot_general``, ``conv``
   in-channels, ``reduce_sum``) has an operand that is zero on it — so deleting the
   channel removes a zero term — and no contraction result over it is scaled by a constant
   equal to its length ``n``, ``√n``, ``1/n`` or ``1/√n`` (a mean or RMS over the axis:
   LayerNorm/RMSNorm statistics, which change when the axis shrinks). Where a merged axis
   has several prunable factors, or one parameter would hold members of two families on
   different axes, the outer factor (lower axis) wins (heads over head_dim).

Members of a family are its trainable, not-only-contracted parameter axes; dependents are
contracted axes (consumer in-channels) and non-trainable state (BatchNorm statistics).
Anything the analysis cannot prove safe stays out of the result, with a `DiscoveryWarning`
naming the primitive, or the closed-over arrays (shape, dtype, first use), and the
parameter paths it blocked; a discovery that finds nothing says why (the rejection
reasons of its candidates, or that the function ignores its parameters).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hesso_jax.costs import CostWarning, GroupCosts, costs_from_jaxpr
from hesso_jax.groups import (
    GroupFamily,
    Groups,
    Member,
    Path,
    format_path,
    structure_fingerprint,
    tree_paths,
)
from hesso_jax.jaxpr.axes import AxisTracer
from hesso_jax.jaxpr.interpreter import source_line
from hesso_jax.jaxpr.spaces import Pattern, Spaces
from hesso_jax.jaxpr.trace import trace_call
from hesso_jax.jaxpr.views import leaf_axes
from hesso_jax.jaxpr.zeros import ZeroAnalysis

__all__ = ["DiscoveryWarning", "discover_groups"]


class DiscoveryWarning(UserWarning):
    """Parameters left non-prunable because the analysis could not prove them safe."""


# ---------------------------------------------------------------------------- driver
def _trace(fn: Callable, state: Any, args: tuple, kwargs: dict) -> tuple[Any, int]:
    """Closed jaxpr of ``fn(state, *args, **kwargs)`` with non-array leaves made static.

    `hesso_jax.jaxpr.trace.trace_call`, as the cost model and the fingerprint trace; also
    returns the number of state leaves (the jaxpr's leading inputs).
    """
    return trace_call(fn, state, args, kwargs), len(jax.tree.leaves(state))


def _analyse(closed: Any, paths: list[Path], trainable: list[bool],
             shapes: list[tuple[int, ...]], warn: bool,
             defined_at: str | None = None) -> list[GroupFamily]:
    """The families of a traced ``fn(state, *inputs)`` (``paths``: the state's leaves).

    ``defined_at``: where the traced function is defined, for warnings that no equation
    of the trace explains (nothing found, unused parameters).
    """
    an = _Analysis(closed, paths, trainable)
    families = an.families(shapes)
    if warn:
        an.warn(found=bool(families), defined_at=defined_at)
    return families


def _at(source_info: Any) -> str:
    """`` at file:line (function)`` of an equation's ``source_info`` ('' if unknown)."""
    line = source_line(source_info) if source_info is not None else None
    return f" at {line}" if line else ""


def _defined_at(fn: Any) -> str | None:
    """``file:line (name)`` of a function's (or a module's ``__call__``'s) definition."""
    target = type(fn).__call__ if isinstance(fn, nnx.Module) else fn
    target = inspect.unwrap(getattr(target, "__func__", target))
    try:
        file, line = inspect.getsourcefile(target), inspect.getsourcelines(target)[1]
    except (TypeError, OSError):
        return None
    return f"{file}:{line} ({getattr(target, '__qualname__', '?')})" if file else None


class _Analysis:
    """One discovery run: stage 1 on construction, stages 2-3 and the choice of families.

    Steps: `_trace` (stage 1), `_candidates` (spaces with a member that reach a computed
    value), `_zero` (stage 3), `_blocks` (spaces touching a blocked class), `_resolve`
    (outer factor and lower axis win), then `families` and `warn`.
    """

    def __init__(self, closed: Any, paths: list[Path], trainable: list[bool]):
        self.paths, self.trainable = paths, trainable
        self.tr = tr = AxisTracer()
        self._trace(closed)
        self.sp = Spaces(tr)
        self.find = tr.uf.find
        self.class_params: dict[int, list[tuple[int, int]]] = {}
        for leaf, dims in enumerate(self.param_dims):
            for axis, d in enumerate(dims):
                self.class_params.setdefault(self.find(d), []).append((leaf, axis))
        self.invalid: dict[int, str] = {}
        self.occ = self._candidates()
        self.sites: dict[int, Any] = {}  # space -> source_info of its rejection
        self.zero_invalid = self._zero()
        self.invalid.update(self.zero_invalid)
        self.blamed = self._blocks()
        self.valid = {s for s in self.occ if s not in self.invalid}
        self._resolve()

    def _trace(self, closed: Any) -> None:
        tr, n_state = self.tr, len(self.paths)
        self.invals = []
        for i, v in enumerate(closed.jaxpr.invars):
            shape = tuple(v.aval.shape) if hasattr(v.aval, "shape") else ()
            val = tr.new_val(shape)
            if i < n_state:
                val.pdims = leaf_axes(i, len(shape))
            else:
                for d in val.dims:
                    tr.block(d, "model input")
            self.invals.append(val)
        self.param_dims = [self.invals[i].dims for i in range(n_state)]
        outs = tr.run_closed(closed, self.invals)
        tr.site = None
        for o in outs:
            for d in o.dims:
                tr.block(d, "model output")

    def is_member(self, leaf: int, axis: int) -> bool:
        """Trainable float parameter axes that are not only contracted."""
        key = (leaf, axis)
        return self.trainable[leaf] and (key in self.tr.produced
                                         or key not in self.tr.contracted)

    def _candidates(self) -> dict[int, list[tuple[int, Pattern]]]:
        # a space must reach some computed value: axes that live only in parameters (an
        # unused parameter, a kernel axis no rule ties to anything) are not channels
        n_param_dims = sum(len(d) for d in self.param_dims)
        computed = {self.find(d) for d in range(n_param_dims, len(self.tr.size))}
        occ: dict[int, list[tuple[int, Pattern]]] = {}
        for space in self.sp.atoms:
            o = self.sp.occurrences(space)
            if o is None:
                self.invalid[space] = "its channels cannot be written as one slice pattern"
                continue
            if not any(self.is_member(*la) for cls, _ in o
                       for la in self.class_params.get(cls, [])):
                continue
            if any(cls in computed for cls, _ in o):
                occ[space] = o
        return occ

    def _zero(self) -> dict[int, str]:
        class_spaces: dict[int, set[int]] = {}
        for space, o in self.occ.items():
            for cls, _ in o:
                class_spaces.setdefault(cls, set()).add(space)
        z = ZeroAnalysis({c: frozenset(s) for c, s in class_spaces.items()}, self.find)
        for leaf, dims in enumerate(self.param_dims):
            z.put(self.invals[leaf], [z.spaces(d) if self.is_member(leaf, a) else frozenset()
                                      for a, d in enumerate(dims)])
        z.run(self.tr.events)
        self.sites.update(z.sites)
        return z.invalid

    def _blocks(self) -> dict[str, set[int]]:
        """Spaces on a blocked class become invalid; returns primitive -> spaces it blocked."""
        blamed: dict[str, set[int]] = {}
        for space, o in self.occ.items():
            for cls, _ in o:
                if cls in self.sp.blocked:
                    reason, prim = self.sp.blocked[cls]
                    if space not in self.invalid:
                        self.invalid[space] = reason
                        self.sites[space] = self.sp.block_sites.get(cls)
                    if prim is not None:
                        blamed.setdefault(prim, set()).add(space)
        return blamed

    def members_of(self, space: int) -> list[tuple[int, int, Pattern]]:
        return [(leaf, axis, pat) for cls, pat in self.occ[space]
                for leaf, axis in self.class_params.get(cls, []) if self.is_member(leaf, axis)]

    def _drop(self, space: int, why: str) -> bool:
        if space not in self.valid:
            return False
        self.valid.discard(space)
        self.invalid[space] = why
        return True

    def _resolve(self) -> None:
        """The outer factor of a merged axis, and the lower axis of a parameter, win."""
        changed = True
        while changed:
            changed = False
            for factors, _sizes in self.sp.product.values():
                live = [[a for a in self.sp.factor_atoms(f) if a in self.valid]
                        for f in factors]
                for lost in [x for x in live if x][1:]:
                    for a in lost:
                        changed |= self._drop(a, "inner factor of a merged axis whose outer "
                                                 "factor is pruned")
            by_leaf: dict[int, dict[int, set[int]]] = {}
            for space in self.valid:
                for leaf, axis, _ in self.members_of(space):
                    by_leaf.setdefault(leaf, {}).setdefault(axis, set()).add(space)
            for axes in by_leaf.values():
                for axis in sorted(axes)[1:]:
                    for space in axes[axis]:
                        changed |= self._drop(space, "a parameter holds a family on a "
                                                     "lower axis")

    def families(self, shapes: list[tuple[int, ...]]) -> list[GroupFamily]:
        """The valid spaces as families, in forward (first-use) order."""
        first_use = self.tr.first_use
        families = []
        for space in self.valid:
            members, dependents = [], []
            for cls, pat in self.occ[space]:
                for leaf, axis in self.class_params.get(cls, []):
                    m = Member(self.paths[leaf], axis, pat.block, pat.offset, pat.repeat,
                               pat.stride)
                    (members if self.is_member(leaf, axis) else dependents).append(
                        (leaf, axis, m))
            members.sort(key=lambda t: (first_use.get(t[0], 1 << 30), t[0], t[1]))
            dependents.sort(key=lambda t: (first_use.get(t[0], 1 << 30), t[0], t[1]))
            order = min(first_use.get(leaf, 1 << 30) for leaf, _a, _m in members)
            name = _family_name([m.path for _l, _a, m in members],
                                [len(shapes[leaf]) for leaf, _a, _m in members])
            families.append((order, name, GroupFamily(
                self.sp.node_len[space], tuple(m for _l, _a, m in members),
                tuple(m for _l, _a, m in dependents), name)))
        families.sort(key=lambda t: (t[0], t[1]))
        return [f for _o, _n, f in families]

    # ------------------------------------------------------------------ explanations
    def hit(self, spaces: Any) -> list[str]:
        """Formatted paths of the members of ``spaces``."""
        return sorted({format_path(self.paths[leaf]) for s in spaces
                       for leaf, _a, _p in self.members_of(s)})

    def warn(self, found: bool, defined_at: str | None = None) -> None:
        """`DiscoveryWarning`s: what blocked which parameters, and why nothing was found.

        Each names the user's source line: of the equation that blocked, of a closed-over
        array's first use, of a parameter's first use, else (``defined_at``) the traced
        function's definition.
        """
        fallback = f" (traced function defined at {defined_at})" if defined_at else ""
        messages = []
        for prim, spaces in sorted(self.blamed.items()):
            if hit := self.hit(spaces):
                where = _at(self.tr.primitive_sites.get(prim)) or fallback
                messages.append(f"discover_groups: primitive {prim!r}{where} could not be "
                                f"proven safe; these parameters are not pruned along the "
                                f"axes it touches: {hit}")
        for s, why in self.invalid.items():
            if s in self.occ and "slice pattern" in why:
                where = self._used_at([s]) or fallback
                messages.append(f"discover_groups: not pruning {self.hit([s])}{where}: {why}")
        for msg, located in (self._const_message(), self._nothing_message(found)):
            if msg:
                messages.append(msg if located else msg + fallback)
        for msg in messages:
            warnings.warn(msg, DiscoveryWarning, stacklevel=4)

    def _used_at(self, spaces: Any) -> str:
        """`` at file:line`` of the first use of the first member of ``spaces``."""
        leaves = {leaf for s in spaces for leaf, _a, _p in self.members_of(s)}
        first = min(leaves, key=lambda leaf: self.tr.first_use.get(leaf, 1 << 30),
                    default=None)
        return "" if first is None else _at(self.tr.use_sites.get(first))

    def _reason_at(self, spaces: set[int]) -> str:
        """`` at file:line`` of the first located rejection among ``spaces``."""
        for s in sorted(spaces):
            if (where := _at(self.sites.get(s))):
                return where
        return ""

    def _const_message(self) -> tuple[str | None, bool]:
        """Closed-over arrays that alone keep otherwise valid spaces from being families.

        Returns ``(message or None, whether every array's first use is located)``.
        """
        sp, by_const = self.sp, {}
        for space, o in self.occ.items():
            if space in self.zero_invalid or space in self.valid:
                continue
            classes = {cls for cls, _ in o if cls in sp.blocked}
            if not classes or classes & sp.other_blocked:
                continue
            for cls in classes:
                for k in sp.const_blocked.get(cls, ()):
                    by_const.setdefault(k, set()).add(space)
        if not by_const:
            return None, True
        sites = {k: _at(self.tr.const_sites.get(k)) for k in by_const}
        lines = [f"  #{k} {self.tr.consts[k]} (first used by "
                 f"{self.tr.const_users.get(k, '?')!r}{sites[k]}) blocks {self.hit(spaces)}"
                 for k, spaces in sorted(by_const.items())]
        return ("discover_groups: the traced function closes over arrays that touch "
                "prunable axes; a closed-over array is a constant of fixed shape, so these "
                "parameters are not pruned:\n" + "\n".join(lines) + "\nPass these arrays "
                "in as part of the parameter tree instead (non-trainable: under a "
                "'batch_stats' key, or select the trainable leaves with trainable=...), so "
                "that they become dependents and are sliced with the parameters.",
                all(sites.values()))

    def _nothing_message(self, found: bool) -> tuple[str | None, bool]:
        """Why no family was found: unused parameters, or each candidate's reason.

        Returns ``(message, whether it names a source line)``; ``(None, True)`` if found.
        """
        tr = self.tr
        if found:
            return None, True
        closes = (f" It closes over {len(tr.consts)} array(s): "
                  f"{', '.join(tr.consts[:6])}{', …' if len(tr.consts) > 6 else ''}; if "
                  f"those are the model's parameters, pass them as the first argument."
                  if tr.consts else "")
        if not tr.first_use:
            return ("discover_groups found no prunable groups: the function does not use "
                    "its parameters (the first argument, or the module's state)." + closes,
                    False)
        reasons: dict[str, set[int]] = {}
        for space in self.occ:
            reasons.setdefault(self.invalid.get(space, "not provably zero-invariant"),
                               set()).add(space)
        if not reasons:
            return ("discover_groups found no prunable groups: no axis of a trainable "
                    "parameter reaches a computed value other than through contractions."
                    + closes, False)
        ranked = sorted(reasons.items(), key=lambda kv: -len(kv[1]))
        sites = [self._reason_at(spaces) for _why, spaces in ranked[:6]]
        lines = [f"  {why}{where}: {self.hit(spaces)[:4]}"
                 for (why, spaces), where in zip(ranked[:6], sites, strict=True)]
        return ("discover_groups found no prunable groups; the candidate channels were "
                "rejected because:\n" + "\n".join(lines) + closes, any(sites))


def _family_name(paths: list[Path], ndims: list[int]) -> str:
    """The modules of a family's kernels (members with 2+ axes), e.g. ``'stem+block/conv2'``."""
    kernels = [p for p, n in zip(paths, ndims, strict=True) if n >= 2] or paths[:1]
    modules: list[str] = []
    for p in kernels:
        name = format_path(p[:-1] if len(p) > 1 else p)
        if name not in modules:
            modules.append(name)
    return "+".join(modules[:3]) + ("+…" if len(modules) > 3 else "")


def _check_not_bound_method(fn: Any) -> None:
    """``discover_groups(model.__call__, x)`` would trace the module's arrays as constants."""
    owner = getattr(fn, "__self__", None)
    if inspect.ismethod(fn) and isinstance(owner, nnx.Module):
        raise TypeError(
            f"discover_groups got the bound method {type(owner).__name__}."
            f"{fn.__name__} of an nnx.Module: its parameters would be closed-over "
            f"constants and nothing could be pruned. Pass the module itself: "
            f"discover_groups(model, *inputs); or a pure fn(state, *inputs) with "
            f"graphdef, state = nnx.split(model).")


def discover_groups(model_or_fn: Any, *args: Any, trainable: Callable[[Path], bool] | None
                    = None, wrt: Any = None, warn: bool = True, **kwargs: Any) -> Groups:
    """Zero-invariant groups of a model, found from its jaxpr (see the module docstring).

    Two forms:

    * ``discover_groups(model, *args, wrt=nnx.Param, **kwargs)`` for a
      ``flax.nnx.Module``: traces ``model(*args, **kwargs)`` in the model's current
      train/eval mode. Paths are those of the whole ``nnx.state(model)``; the variables
      that the nnx filter ``wrt`` selects (as in ``nnx.Optimizer(model, tx, wrt=...)``;
      ``nnx.Param`` by default) are trainable, the others (BatchNorm statistics, frozen
      embeddings of a custom ``nnx.Variable`` type, ...) are inputs that are never pruned
      themselves: they can only be dependents.
    * ``discover_groups(fn, params, *args, **kwargs)`` for a pure ``fn(params, *args,
      **kwargs)`` (a linen ``apply``, any JAX function). Every floating-point leaf of
      ``params`` is trainable unless ``trainable(path)`` says otherwise (by default leaves
      under a ``'batch_stats'`` key are not).

    Arguments that are not arrays are treated as static. Model inputs and outputs are
    never pruned.

    Args:
      model_or_fn: an ``nnx.Module`` or a callable.
      *args: example inputs (after ``params`` for the pure-function form); arrays or
        ``jax.ShapeDtypeStruct``.
      trainable: pure-function form only: predicate on a leaf path.
      wrt: ``nnx.Module`` form only: an nnx filter (a ``Variable`` type, a tuple of
        filters, ``nnx.PathContains(...)``, ...) selecting the trainable variables.
      warn: emit `DiscoveryWarning` for parameters left unprunable by primitives without
        a rule, by closed-over arrays (named by shape, dtype and first use) or by index
        patterns a `Member` cannot describe, and one explaining an empty result; each
        names the user's source line.
      **kwargs: keyword inputs of the model / function.

    Returns:
      `Groups`: families in forward (first-use) order, named after their first member's
      module path; ``groups.example_inputs = (args, kwargs)`` records the example call.

    Raises:
      TypeError: if ``model_or_fn`` is neither an ``nnx.Module`` nor callable, is a bound
        method of an ``nnx.Module`` (``model.__call__``: pass the module), the
        pure-function form gets no ``params`` or ``wrt=``, the module form gets
        ``trainable=`` (use ``wrt=``), or ``wrt`` is not an nnx filter.
      ValueError: if ``wrt`` selects no variable of the module.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import hesso_jax as hj
      >>> class Mlp(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.fc1 = nnx.Linear(4, 8, rngs=rngs)
      ...         self.fc2 = nnx.Linear(8, 2, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.fc2(nnx.relu(self.fc1(x)))
      >>> groups = hj.discover_groups(Mlp(nnx.Rngs(0)), jnp.ones((1, 4)))
      >>> [(f.name, f.size) for f in groups.families]
      [('fc1', 8)]
      >>> fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
      >>> params = {"w1": jnp.ones((4, 3)), "w2": jnp.ones((3, 2))}
      >>> hj.discover_groups(fn, params, jnp.ones((1, 4))).num_groups
      3
    """
    _check_not_bound_method(model_or_fn)
    if isinstance(model_or_fn, nnx.Module):
        fn, state, is_trainable = _module_form(model_or_fn, trainable, wrt)
        counted = list(is_trainable)
    elif callable(model_or_fn):
        if not args:
            raise TypeError("discover_groups(fn, params, *args): the pure-function form needs "
                            "the parameter pytree as its second argument")
        if wrt is not None:
            raise TypeError("discover_groups(fn, params, ...): wrt= is an nnx filter for the "
                            "nnx.Module form; select the trainable leaves of a pure "
                            "function's params with trainable=predicate(path)")
        fn, state, args = model_or_fn, args[0], args[1:]
        pred = trainable or (lambda p: "batch_stats" not in p)
        is_trainable = [bool(pred(p)) for p in tree_paths(state)]
        counted = ["batch_stats" not in p for p in tree_paths(state)]  # as hj.group_costs
    else:
        raise TypeError(f"discover_groups takes an nnx.Module or a callable, got "
                        f"{type(model_or_fn).__name__}")
    paths, leaves = tree_paths(state), jax.tree.leaves(state)
    for i, x in enumerate(leaves):
        dtype = getattr(x, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            is_trainable[i] = counted[i] = False
    closed, _n = _trace(fn, state, args, kwargs)
    shapes = [tuple(getattr(x, "shape", ())) for x in leaves]
    where = _defined_at(model_or_fn)
    families = _analyse(closed, paths, is_trainable, shapes, warn, where)
    groups = Groups.from_families(families,
                                  fingerprint=structure_fingerprint(fn, state, *args, **kwargs))
    # the example call, for surgery to verify masked == shrunk by running it
    groups.example_inputs = (tuple(args), dict(kwargs))
    groups.costs = _costs(closed, state, groups, counted, warn, where)
    return groups


def _module_form(model: nnx.Module, trainable: Any,
                 wrt: Any) -> tuple[Callable[..., Any], Any, list[bool]]:
    """``(fn(state, *a, **k), state, trainable per leaf)`` of an NNX module.

    The leaves that the nnx filter ``wrt`` (default ``nnx.Param``) selects are trainable.
    """
    if trainable is not None:
        raise TypeError("discover_groups(model, ...): trainable= is a path predicate for the "
                        "pure-function form; select an nnx.Module's trainable variables "
                        "with an nnx filter, wrt=nnx.Param (the default), a Variable type "
                        "or nnx.PathContains(...), as nnx.Optimizer(model, tx, wrt=...)")
    graphdef, state = nnx.split(model)
    try:
        selected = nnx.state(model, nnx.Param if wrt is None else wrt)
    except Exception as err:  # noqa: BLE001 - flax raises various errors for bad filters
        raise TypeError(f"discover_groups(model, ..., wrt=...): wrt must be an nnx filter "
                        f"(a Variable type, a tuple of filters, nnx.PathContains(...), a "
                        f"predicate (path, variable) -> bool), got {wrt!r} "
                        f"({type(err).__name__}: {err})") from err
    chosen = set(tree_paths(selected))
    if wrt is not None and not chosen:
        kinds = sorted({type(v).__name__ for _p, v in nnx.iter_graph(model)
                        if isinstance(v, nnx.Variable)})
        raise ValueError(f"discover_groups(model, ..., wrt={wrt!r}): the filter selects no "
                         f"variable of {type(model).__name__} (its variable types: {kinds})")

    def fn(st: Any, *a: Any, **k: Any) -> Any:
        return nnx.merge(graphdef, st)(*a, **k)

    return fn, state, [p in chosen for p in tree_paths(state)]


def _costs(closed: Any, state: Any, groups: Groups, counted: list[bool], warn: bool,
           defined_at: str | None = None) -> GroupCosts | None:
    """The groups' `GroupCosts` from the jaxpr discovery traced (None if it fails).

    A failure of the cost model never fails discovery: it is reported as a
    `DiscoveryWarning` (``hj.Budget`` then needs ``costs=``). The cost model's own
    `CostWarning` (``cond``/``while`` bounds) is left to ``hj.group_costs``, so discovery
    warns about what it always warned about. ``defined_at``: where the traced function is
    defined (named in the warning).
    """
    if not groups.families:  # nothing to budget
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CostWarning)
        try:
            return costs_from_jaxpr(closed, state, groups, counted)
        except Exception as err:  # noqa: BLE001 - costs are an optional extra
            if warn:
                where = f" (traced function defined at {defined_at})" if defined_at else ""
                warnings.warn(f"discover_groups: no costs recorded{where} "
                              f"({type(err).__name__}: {err}); pass "
                              f"costs=hj.group_costs(...) for a Budget",
                              DiscoveryWarning, stacklevel=3)
            return None
