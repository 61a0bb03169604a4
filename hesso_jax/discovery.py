"""Zero-invariant group discovery from a model's jaxpr.

`discover_groups` traces the forward pass, follows every axis of every parameter through
the graph, and returns the `Groups` whose removal provably leaves the outputs unchanged.

The analysis has three stages, all on the traced jaxpr (`hesso_jax.jaxpr.Interpreter`):

1. **Structure.** Each axis of each value is a node. Index-preserving operations (the
   aligned axes of elementwise ops, residual adds, per-channel BatchNorm, bias adds, the
   free and batch axes of ``dot_general``/``conv``, the pairs of contracted axes,
   transposes, pooling over other axes) join nodes in a union-find: a *class* is a set of
   axes that share one channel index. Other index maps are recorded as relations between
   classes: ``concatenate``/``split``/``slice`` embed one class into a segment of
   another, and a ``reshape`` that merges (or splits) axes makes a class the row-major
   *product* of its factor classes. Axes that an operation treats non-uniformly (model
   inputs and outputs, convolution windows, ``max``/``argmax``/``sort``/``cumsum``
   reductions, indexed gather axes, constants, primitives without a rule) are *blocked*.
2. **Channel spaces.** Embeddings are resolved by interval refinement: every class is cut
   at the boundaries of every segment embedded in it (and vice versa) until stable, and
   equal intervals are joined. The resulting atomic intervals are the candidate families
   (*spaces*); a product class is not a space itself, its channels are the product of its
   factors'. Each space knows its occurrences: on which class, at which ``offset``,
   ``block``, ``repeat`` and ``stride`` (a head of ``(H, D)`` merged to ``H*D`` is a block
   of ``D``; a channel ``C`` flattened from ``(h, w, C)`` recurs every ``C`` rows).
3. **Zero invariance.** With every trainable producer slice of a space set to zero
   (parameter axes that are not only contracted), a forward pass over the recorded
   operations tracks, per value and axis, the set of spaces whose channel slices are
   *exactly* zero (``x·0 = 0``, ``0+0 = 0``, ``f(0) = 0`` for relu/gelu/silu/tanh, per-
   channel BatchNorm with zero scale and shift, ...). A space is a family iff it is never
   blocked, every contraction over it (``dot_general``, ``conv`` in-channels, ``reduce_sum``)
   has an operand that is zero on it — so deleting the channel removes a zero term — and
   no contraction result over it is scaled by a constant equal to its length ``n``,
   ``√n``, ``1/n`` or ``1/√n`` (a mean or RMS over the axis: LayerNorm/RMSNorm statistics,
   which change when the axis shrinks). Where a merged axis has several prunable factors,
   or one parameter would hold members of two families on different axes, the outer
   factor (lower axis) wins (heads over head_dim).

Members of a family are its trainable, not-only-contracted parameter axes; dependents are
contracted axes (consumer in-channels) and non-trainable state (BatchNorm statistics).
Anything the analysis cannot prove safe stays out of the result, with a `warnings.warn`
naming the primitive and the parameter paths it blocked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hesso_jax.groups import GroupFamily, Groups, Member, Path, format_path, tree_paths
from hesso_jax.jaxpr.interpreter import Interpreter

__all__ = ["DiscoveryWarning", "discover_groups"]


class DiscoveryWarning(UserWarning):
    """Parameters left non-prunable because the analysis could not prove them safe."""


# ---------------------------------------------------------------------------- values
@dataclasses.dataclass(eq=False)
class _Val:
    """Abstract value: one node id per axis, plus what is known statically."""

    id: int
    shape: tuple[int, ...]
    dims: tuple[int, ...]
    literal: float | None = None  # scalar literal / constant value
    allzero: bool = False  # statically all zeros (literal 0, zero constant)
    # per axis, the (leaf, axis) pairs of the parameter this value is a view of
    pdims: tuple[frozenset, ...] | None = None


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


Event = Callable[["_Zero"], None]

# primitives by zero behaviour (all are elementwise with numpy-style size-1 broadcasting)
_ZERO_FIRST = {
    "neg", "abs", "sign", "sin", "tan", "tanh", "atan", "asin", "sinh", "asinh", "atanh",
    "erf", "sqrt", "cbrt", "expm1", "log1p", "square", "real", "conj", "copy", "copy_p",
    "convert_element_type", "reduce_precision", "stop_gradient", "floor", "ceil", "round",
    "div", "rem", "imag",
}
_ZERO_NONE = {
    "exp", "exp2", "log", "cos", "cosh", "acos", "logistic", "rsqrt", "erf_inv", "erfc",
    "lgamma", "digamma", "is_finite", "not", "pow", "atan2", "eq", "ne", "lt", "gt", "le",
    "ge", "nextafter", "population_count", "clz", "shift_left", "shift_right_logical",
    "shift_right_arithmetic", "or", "xor", "igamma", "igammac", "random_gamma_grad",
    "bessel_i0e", "bessel_i1e", "regularized_incomplete_beta", "polygamma", "zeta", "clamp",
    "complex",
}
_ZERO_ANY = {"mul", "and"}
_ZERO_ALL = {"add", "sub", "max", "min", "add_any", "select_n"}
_TRANSPARENT = {"convert_element_type", "reshape", "transpose", "broadcast_in_dim", "squeeze",
                "copy", "copy_p", "reduce_precision", "mul", "div", "sharding_constraint"}
_VIEW = {"convert_element_type", "reshape", "transpose", "broadcast_in_dim", "squeeze",
         "copy", "copy_p", "reduce_precision", "slice", "sharding_constraint", "mesh_cast",
         "reshard", "pvary"}
_IDENTITY = {"sharding_constraint", "mesh_cast", "reshard", "pvary", "optimization_barrier"}
_RANDOM = {"random_bits", "random_seed", "random_wrap", "random_unwrap", "random_split",
           "random_fold_in", "threefry2x32", "rng_bit_generator", "rng_uniform",
           "random_clone"}
_BLOCK_REDUCED = {"reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
                  "reduce_xor", "argmax", "argmin"}
_CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}


# ---------------------------------------------------------------------------- stage 1
class _Structure(Interpreter):
    """Builds the axis classes, relations, blocks and the zero-analysis event list."""

    def __init__(self) -> None:
        super().__init__()
        self.uf = _UnionFind()
        self.size: list[int] = []
        self.n_vals = 0
        self.blocked: dict[int, tuple[str, str | None]] = {}  # dim -> (reason, primitive)
        self.embeds: list[tuple[int, int, int]] = []  # (small dim, big dim, offset)
        self.products: list[tuple[int, list[int]]] = []  # (merged dim, factor dims)
        self.events: list[Event] = []
        self.contracted: set[tuple[int, int]] = set()  # (leaf, axis) used as contraction
        self.produced: set[tuple[int, int]] = set()  # (leaf, axis) used otherwise
        self.first_use: dict[int, int] = {}
        self.n_uses = 0
        self.unknown: dict[str, set[int]] = {}  # primitive -> dims it blocked

    # -- values
    def new_dim(self, n: int) -> int:
        self.size.append(int(n))
        return self.uf.add()

    def new_val(self, shape: Sequence[int], dims: Sequence[int] | None = None, **kw: Any) -> _Val:
        shape = tuple(int(s) for s in shape)
        if dims is None:
            dims = tuple(self.new_dim(s) for s in shape)
        self.n_vals += 1
        return _Val(self.n_vals, shape, tuple(dims), **kw)

    def out_val(self, eqn: Any, i: int = 0) -> _Val:
        return self.new_val(eqn.outvars[i].aval.shape)

    def literal(self, value: Any, aval: Any) -> _Val:
        shape = tuple(getattr(aval, "shape", ()))
        arr = np.asarray(value)
        val = self.new_val(shape, allzero=bool(arr.size) and not np.any(arr))
        if not shape and arr.dtype.kind in "biuf":
            val.literal = float(arr)
        for d in val.dims:
            self.block(d, "a constant array has this axis")
        return val

    def const(self, value: Any) -> _Val:
        return self.literal(value, jax.typeof(value) if hasattr(jax, "typeof") else value)

    # -- relations
    def union(self, a: int, b: int) -> None:
        if self.size[a] != self.size[b]:
            raise RuntimeError(f"internal: joining axes of sizes {self.size[a]}, {self.size[b]}")
        self.uf.union(a, b)

    def block(self, dim: int, reason: str, primitive: str | None = None) -> None:
        if dim not in self.blocked:
            self.blocked[dim] = (reason, primitive)

    def event(self, fn: Event) -> None:
        self.events.append(fn)

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[Event]]:
        saved, self.events = self.events, []
        try:
            yield self.events
        finally:
            self.events = saved

    # -- parameter uses
    def use(self, v: _Val, contracted_axes: Sequence[int] = ()) -> None:
        """Records a non-view use of ``v``; ``contracted_axes`` are summed over."""
        if v.pdims is None:
            return
        self.n_uses += 1
        for axis, pairs in enumerate(v.pdims):
            for leaf, pax in pairs:
                self.first_use.setdefault(leaf, self.n_uses)
                if axis in contracted_axes:
                    self.contracted.add((leaf, pax))
                else:
                    self.produced.add((leaf, pax))

    def fallback(self, eqn: Any, invals: list[_Val]) -> Any:
        name = eqn.primitive.name
        dims = self.unknown.setdefault(name, set())
        for v in invals:
            self.use(v)
            for d in v.dims:
                self.block(d, f"primitive {name!r} has no discovery rule", name)
                dims.add(d)
        outs = [self.new_val(o.aval.shape) if hasattr(o.aval, "shape") else self.new_val(())
                for o in eqn.outvars]
        for v in outs:
            for d in v.dims:
                self.block(d, f"primitive {name!r} has no discovery rule", name)
        return outs if eqn.primitive.multiple_results else outs[0]

    def on_eqn(self, eqn: Any, invals: list[_Val], outvals: list[_Val]) -> None:
        """A view of a parameter (transpose, reshape, cast, ...) stays a view of it."""
        name = eqn.primitive.name
        src = invals[0] if invals else None
        if name not in _VIEW or src is None or src.pdims is None:
            return
        out = outvals[0]
        pd: list[frozenset] = [frozenset()] * len(out.shape)
        if name == "reshape":
            for ins, outs in _reshape_groups(src.shape, out.shape):
                pairs = frozenset().union(*(src.pdims[i] for i in ins))
                for o in outs:
                    pd[o] = pairs
        elif name == "transpose":
            pd = [src.pdims[p] for p in eqn.params["permutation"]]
        elif name == "broadcast_in_dim":
            for i, o in enumerate(eqn.params["broadcast_dimensions"]):
                pd[o] = src.pdims[i]
        elif name == "squeeze":
            dropped = {d % len(src.shape) for d in eqn.params["dimensions"]}
            pd = [p for i, p in enumerate(src.pdims) if i not in dropped]
        elif len(out.shape) == len(src.shape):
            pd = list(src.pdims)
        out.pdims = tuple(pd)


_RULES: dict[str, Callable[[_Structure, Any, list[_Val]], Any]] = {}


def _rule(*names: str) -> Callable:
    def register(fn: Callable) -> Callable:
        for n in names:
            _RULES[n] = fn
        return fn

    return register


_Structure.rules = _RULES


def _reshape_groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pairs of axis lists with equal products (size-1 axes skipped); [] if none exist."""
    a = [i for i, s in enumerate(src) if s != 1]
    b = [i for i, s in enumerate(dst) if s != 1]
    out: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        ga, gb = [a[i]], [b[j]]
        pa, pb = src[a[i]], dst[b[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i >= len(a):
                    return []
                ga.append(a[i])
                pa *= src[a[i]]
                i += 1
            else:
                if j >= len(b):
                    return []
                gb.append(b[j])
                pb *= dst[b[j]]
                j += 1
        out.append((ga, gb))
    return out if i == len(a) and j == len(b) else []


# -- elementwise
def _elementwise(tr: _Structure, eqn: Any, ins: list[_Val]) -> _Val:
    name = eqn.primitive.name
    out = tr.out_val(eqn)
    arrays = [v for v in ins if len(v.shape) == len(out.shape) and v.shape]
    for v in ins:
        tr.use(v)
    for v in arrays:
        for i, d in enumerate(v.dims):
            if v.shape[i] == out.shape[i]:
                tr.union(d, out.dims[i])
    if name in _ZERO_ANY:
        kind = "any"
    elif name in _ZERO_ALL:
        kind = "all"
    elif name in _ZERO_FIRST or (name == "integer_pow" and eqn.params["y"] > 0):
        kind = "first"
    else:
        kind = "none"
    operands = ins[1:] if name == "select_n" else ins
    tr.event(lambda z: z.elementwise(kind, name, operands, out))
    return out


for _name in (_ZERO_FIRST | _ZERO_NONE | _ZERO_ANY | _ZERO_ALL | {"integer_pow"}):
    _RULES[_name] = _elementwise


@_rule("bitcast_convert_type")
def _bitcast(tr: _Structure, eqn: Any, ins: list[_Val]) -> Any:
    if tuple(eqn.outvars[0].aval.shape) != ins[0].shape:
        return tr.fallback(eqn, ins)
    return _elementwise(tr, eqn, ins)


@_rule(*_IDENTITY)
def _identity(tr: _Structure, eqn: Any, ins: list[_Val]) -> Any:
    outs = []
    for v in ins:
        o = tr.new_val(v.shape)
        for a, b in zip(v.dims, o.dims, strict=True):
            tr.union(a, b)
        outs.append(o)
        tr.event(lambda z, v=v, o=o: z.copy(v, o))
    return outs if eqn.primitive.multiple_results else outs[0]


@_rule(*_RANDOM, "iota")
def _source(tr: _Structure, eqn: Any, ins: list[_Val]) -> Any:
    outs = [tr.out_val(eqn, i) for i in range(len(eqn.outvars))]
    if eqn.primitive.name == "iota":
        d = eqn.params["dimension"]
        tr.block(outs[0].dims[d], "iota (values depend on the index)")
    return outs if eqn.primitive.multiple_results else outs[0]


@_rule("broadcast_in_dim")
def _broadcast(tr: _Structure, eqn: Any, ins: list[_Val]) -> _Val:
    v, out = ins[0], tr.out_val(eqn)
    bd = eqn.params["broadcast_dimensions"]
    for i, o in enumerate(bd):
        if v.shape[i] == out.shape[o]:
            tr.union(v.dims[i], out.dims[o])

    def zero(z: _Zero) -> None:
        if z.is_allzero(v):
            z.set_allzero(out)
            return
        src = z.get(v)
        sets = [frozenset()] * len(out.shape)
        for i, o in enumerate(bd):
            if v.shape[i] == out.shape[o]:
                sets[o] = src[i]
        z.put(out, sets)
        z.contracted[out.id] = z.contracted.get(v.id, frozenset())

    tr.event(zero)
    return out


@_rule("reshape")
def _reshape(tr: _Structure, eqn: Any, ins: list[_Val]) -> _Val:
    v, out = ins[0], tr.out_val(eqn)
    groups = _reshape_groups(v.shape, out.shape)
    if eqn.params.get("dimensions") is not None or (not groups and v.shape and out.shape):
        for d in (*v.dims, *out.dims):
            tr.block(d, "reshape that reorders axes")
        groups = []
    for gi, go in groups:
        if len(gi) == 1 and len(go) == 1:
            tr.union(v.dims[gi[0]], out.dims[go[0]])
        elif len(gi) == 1:
            tr.products.append((v.dims[gi[0]], [out.dims[o] for o in go]))
        elif len(go) == 1:
            tr.products.append((out.dims[go[0]], [v.dims[i] for i in gi]))
        else:
            for d in [v.dims[i] for i in gi] + [out.dims[o] for o in go]:
                tr.block(d, "reshape mixing several axes into several axes")

    def zero(z: _Zero) -> None:
        if z.is_allzero(v):
            z.set_allzero(out)
            return
        src = z.get(v)
        sets = [frozenset()] * len(out.shape)
        for gi, go in groups:
            joined = frozenset().union(*(src[i] for i in gi))
            for o in go:
                sets[o] = joined & z.spaces(out.dims[o])
        z.put(out, sets)
        z.contracted[out.id] = z.contracted.get(v.id, frozenset())

    tr.event(zero)
    return out


@_rule("transpose")
def _transpose(tr: _Structure, eqn: Any, ins: list[_Val]) -> _Val:
    v, out = ins[0], tr.out_val(eqn)
    perm = eqn.params["permutation"]
    for i, p in enumerate(perm):
        tr.union(v.dims[p], out.dims[i])

    def zero(z: _Zero) -> None:
        src = z.get(v)
        z.put(out, [src[p] for p in perm], allzero=z.is_allzero(v))
        z.contracted[out.id] = z.contracted.get(v.id, frozenset())

    tr.event(zero)
    return out


def _keep_axes(tr: _Structure, v: _Val, out: _Val, dropped: Sequence[int]) -> list[int]:
    kept = [i for i in range(len(v.shape)) if i not in dropped]
    for i, o in zip(kept, out.dims, strict=True):
        tr.union(v.dims[i], o)
    return kept


@_rule("squeeze")
def _squeeze(tr: _Structure, eqn: Any, ins: list[_Val]) -> _Val:
    v, out = ins[0], tr.out_val(eqn)
    dims = [d % len(v.shape) for d in eqn.params["dimensions"]]
    kept = _keep_axes(tr, v, out, dims)
    tr.event(lambda z: z.map_axes(v, out, kept, transparent=True))
    return out


@_rule("reduce_sum", *_BLOCK_REDUCED)
def _reduce(tr: _Structure, eqn: Any, ins: list[_Val]) -> _Val:
    name = eqn.primitive.name
    v, out = ins[0], tr.out_val(eqn)
    axes = tuple(eqn.params["axes"])
    kept = _keep_axes(tr, v, out, axes)
    tr.use(v, axes if name == "reduce_sum" else ())
    if name != "reduce_sum":
        for a in axes:
            tr.block(v.dims[a], f"{name} over this axis")

    def zero(z: _Zero) -> None:
        z.map_axes(v, out, kept)
        if name == "reduce_sum":
            z.contract(f"reduce_sum over axes {axes}", [(v, list(axes))], out)
        elif name in ("argmax", "argmin"):
            z.put(out, [frozenset()] * len(out.shape))

    tr.event(zero)
    return out


@_rule(*_CUMULATIVE, "rev")
def _along_axis(tr: _Structure, eqn: Any, ins: list[_Val]) -> _Val:
    name = eqn.primitive.name
    v, out = ins[0], tr.out_val(eqn)
    axes = eqn.params.get("dimensions") or (eqn.params.get("axis"),)
    for i in range(len(v.shape)):
        tr.union(v.dims[i], out.dims[i])
    tr.use(v)
    for a in axes:
        tr.block(v.dims[a], f"{name} along this axis")
    tr.event(lambda z: z.map_axes(v, out, list(range(len(v.shape)))))
    return out


@_rule("sort")
def _sort(tr: _Structure, eqn: Any, ins: list[_Val]) -> list[_Val]:
    d = eqn.params["dimension"]
    outs = []
    for v in ins:
        tr.use(v)
        o = tr.new_val(v.shape)
        for i in range(len(v.shape)):
            tr.union(v.dims[i], o.dims[i])
        tr.block(v.dims[d], "sort along this axis")
        outs.append(o)
    tr.event(lambda z: [z.put(o, [frozenset()] * len(o.shape)) for o in outs])
    return outs


@_rule("top_k")
def _top_k(tr: _Structure, eqn: Any, ins: list[_Val]) -> list[_Val]:
    v = ins[0]
    tr.use(v)
    outs = [tr.out_val(eqn, i) for i in range(len(eqn.outvars))]
    for o in outs:
        for i in range(len(v.shape) - 1):
            tr.union(v.dims[i], o.dims[i])
    tr.block(v.dims[-1], "top_k along this axis")
    return outs


@_rule("reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window")
def _reduce_window(tr: _Structure, eqn: Any, ins: list[_Val]) -> Any:
    p = eqn.params
    n_in = len(ins) // 2 if eqn.primitive.name == "reduce_window" else len(ins)
    outs = [tr.out_val(eqn, i) for i in range(len(eqn.outvars))]
    kept = []
    for i in range(len(outs[0].shape)):
        plain = (p["window_dimensions"][i] == 1 and p["window_strides"][i] == 1
                 and tuple(p["padding"][i]) == (0, 0) and p["base_dilation"][i] == 1
                 and p["window_dilation"][i] == 1)
        for v in ins[:n_in]:
            if plain:
                tr.union(v.dims[i], outs[0].dims[i])
            else:
                tr.block(v.dims[i], "pooling window along this axis")
        if plain:
            kept.append(i)
            for o in outs[1:]:
                tr.union(outs[0].dims[i], o.dims[i])
        else:
            for o in outs:
                tr.block(o.dims[i], "pooling window along this axis")
    for v in ins:
        tr.use(v)
    generic = eqn.primitive.name == "reduce_window"

    def zero(z: _Zero) -> None:
        for v, o in zip(ins, outs, strict=False):
            if generic:
                z.put(o, [frozenset()] * len(o.shape))
            else:
                src = z.get(v)
                z.put(o, [src[i] if i in kept else frozenset() for i in range(len(o.shape))])

    tr.event(zero)
    return outs if eqn.primitive.multiple_results else outs[0]


@_rule("slice")
def _slice(tr: _Structure, eqn: Any, ins: list[_Val]) -> _Val:
    v, out = ins[0], tr.out_val(eqn)
    p = eqn.params
    strides = p["strides"] or (1,) * len(v.shape)
    for i in range(len(v.shape)):
        lo, hi, st = p["start_indices"][i], p["limit_indices"][i], strides[i]
        if lo == 0 and hi == v.shape[i] and st == 1:
            tr.union(v.dims[i], out.dims[i])
        elif st == 1:
            tr.embeds.append((out.dims[i], v.dims[i], lo))
        else:
            tr.block(v.dims[i], "strided slice along this axis")
            tr.block(out.dims[i], "strided slice along this axis")
    tr.event(lambda z: z.map_axes(v, out, list(range(len(v.shape))), filtered=True,
                                  transparent=True))
    return out


@_rule("split")
def _split(tr: _Structure, eqn: Any, ins: list[_Val]) -> list[_Val]:
    v = ins[0]
    axis = eqn.params["axis"] % len(v.shape)
    outs = [tr.out_val(eqn, i) for i in range(len(eqn.outvars))]
    offset = 0
    for o in outs:
        for i in range(len(v.shape)):
            if i == axis:
                tr.embeds.append((o.dims[i], v.dims[i], offset))
            else:
                tr.union(v.dims[i], o.dims[i])
        offset += o.shape[axis]
    tr.use(v)

    def zero(z: _Zero) -> None:
        for o in outs:
            z.map_axes(v, o, list(range(len(v.shape))), filtered=True)

    tr.event(zero)
    return outs


@_rule("concatenate")
def _concatenate(tr: _Structure, eqn: Any, ins: list[_Val]) -> _Val:
    out = tr.out_val(eqn)
    axis = eqn.params["dimension"]
    offset = 0
    for v in ins:
        tr.use(v)
        for i in range(len(out.shape)):
            if i == axis:
                tr.embeds.append((v.dims[i], out.dims[i], offset))
            else:
                tr.union(v.dims[i], out.dims[i])
        offset += v.shape[axis]

    def zero(z: _Zero) -> None:
        sets = []
        for i in range(len(out.shape)):
            if i != axis:
                sets.append(frozenset.intersection(*(z.get(v)[i] for v in ins)))
                continue
            ok = set(z.spaces(out.dims[i]))
            for v in ins:
                carried = z.spaces(v.dims[i])
                ok -= carried - z.get(v)[i]
            sets.append(frozenset(ok))
        z.put(out, sets, allzero=all(z.is_allzero(v) for v in ins))

    tr.event(zero)
    return out


@_rule("pad")
def _pad(tr: _Structure, eqn: Any, ins: list[_Val]) -> _Val:
    v, padval = ins
    out = tr.out_val(eqn)
    kept = []
    for i, cfg in enumerate(eqn.params["padding_config"]):
        if tuple(cfg) == (0, 0, 0):
            tr.union(v.dims[i], out.dims[i])
            kept.append(i)
        else:
            tr.block(v.dims[i], "padding along this axis")
            tr.block(out.dims[i], "padding along this axis")
    tr.use(v)

    def zero(z: _Zero) -> None:
        if z.is_allzero(padval):
            z.map_axes(v, out, kept)
        else:
            z.put(out, [frozenset()] * len(out.shape))

    tr.event(zero)
    return out


@_rule("dynamic_slice")
def _dynamic_slice(tr: _Structure, eqn: Any, ins: list[_Val]) -> _Val:
    v, out = ins[0], tr.out_val(eqn)
    kept = []
    for i in range(len(v.shape)):
        if out.shape[i] == v.shape[i]:
            tr.union(v.dims[i], out.dims[i])
            kept.append(i)
        else:
            tr.block(v.dims[i], "dynamic slice along this axis")
            tr.block(out.dims[i], "dynamic slice along this axis")
    tr.use(v)
    tr.event(lambda z: z.map_axes(v, out, kept))
    return out


@_rule("dynamic_update_slice")
def _dynamic_update_slice(tr: _Structure, eqn: Any, ins: list[_Val]) -> _Val:
    v, upd = ins[0], ins[1]
    out = tr.out_val(eqn)
    for i in range(len(v.shape)):
        tr.union(v.dims[i], out.dims[i])
        if upd.shape[i] == v.shape[i]:
            tr.union(upd.dims[i], out.dims[i])
        else:
            for d in (v.dims[i], upd.dims[i]):
                tr.block(d, "dynamic update along this axis")
    tr.use(v)
    tr.use(upd)

    def zero(z: _Zero) -> None:
        a, b = z.get(v), z.get(upd)
        z.put(out, [a[i] & b[i] if upd.shape[i] == v.shape[i] else frozenset()
                    for i in range(len(v.shape))])

    tr.event(zero)
    return out


@_rule("gather")
def _gather(tr: _Structure, eqn: Any, ins: list[_Val]) -> _Val:
    operand, indices = ins[0], ins[1]
    out = tr.out_val(eqn)
    dn = eqn.params["dimension_numbers"]
    sizes = eqn.params["slice_sizes"]
    tr.use(operand)
    skipped = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
    window = [d for d in range(len(operand.shape)) if d not in skipped]
    mapped = {}
    for d, o in zip(window, dn.offset_dims, strict=True):
        if sizes[d] == operand.shape[d] and d not in dn.start_index_map:
            tr.union(operand.dims[d], out.dims[o])
            mapped[o] = d
        else:
            tr.block(operand.dims[d], "gather indexes this axis")
            tr.block(out.dims[o], "gather indexes this axis")
    for d in skipped | set(dn.start_index_map):
        tr.block(operand.dims[d], "gather indexes this axis")
    batch_out = [o for o in range(len(out.shape)) if o not in dn.offset_dims]
    idx_axes = list(range(len(indices.shape) - 1))
    for o, i in zip(batch_out, idx_axes, strict=False):
        if indices.shape[i] == out.shape[o] and i not in dn.start_indices_batching_dims:
            tr.union(indices.dims[i], out.dims[o])
        else:
            tr.block(out.dims[o], "gather batch axis")
    for i in dn.start_indices_batching_dims:
        tr.block(indices.dims[i], "gather batch axis")

    def zero(z: _Zero) -> None:
        if z.is_allzero(operand):
            z.set_allzero(out)
            return
        src = z.get(operand)
        z.put(out, [src[mapped[o]] if o in mapped else frozenset()
                    for o in range(len(out.shape))])

    tr.event(zero)
    return out


@_rule("dot_general")
def _dot_general(tr: _Structure, eqn: Any, ins: list[_Val]) -> _Val:
    lhs, rhs = ins
    out = tr.out_val(eqn)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lf = [i for i in range(len(lhs.shape)) if i not in lc and i not in lb]
    rf = [i for i in range(len(rhs.shape)) if i not in rc and i not in rb]
    for k, (a, b) in enumerate(zip(lb, rb, strict=True)):
        tr.union(lhs.dims[a], out.dims[k])
        tr.union(rhs.dims[b], out.dims[k])
    for k, a in enumerate(lf):
        tr.union(lhs.dims[a], out.dims[len(lb) + k])
    for k, b in enumerate(rf):
        tr.union(rhs.dims[b], out.dims[len(lb) + len(lf) + k])
    for a, b in zip(lc, rc, strict=True):
        tr.union(lhs.dims[a], rhs.dims[b])
    tr.use(lhs, lc)
    tr.use(rhs, rc)

    def zero(z: _Zero) -> None:
        if z.is_allzero(lhs) or z.is_allzero(rhs):
            z.set_allzero(out)
            return
        zl, zr = z.get(lhs), z.get(rhs)
        sets = [zl[a] | zr[b] for a, b in zip(lb, rb, strict=True)]
        sets += [zl[a] for a in lf] + [zr[b] for b in rf]
        z.put(out, sets)
        z.contract_pairs("dot_general", lhs, rhs, list(zip(lc, rc, strict=True)), out)

    tr.event(zero)
    return out


@_rule("conv_general_dilated")
def _conv(tr: _Structure, eqn: Any, ins: list[_Val]) -> _Val:
    lhs, rhs = ins
    out = tr.out_val(eqn)
    p = eqn.params
    dn = p["dimension_numbers"]
    lb, lfeat, *lsp = dn.lhs_spec
    rout, rin, *rsp = dn.rhs_spec
    ob, ofeat, *osp = dn.out_spec
    tr.union(lhs.dims[lb], out.dims[ob])
    for d in [lhs.dims[i] for i in lsp] + [rhs.dims[i] for i in rsp] + [out.dims[i] for i in osp]:
        tr.block(d, "convolution window axis")
    fg, bg = p["feature_group_count"], p["batch_group_count"]
    c_in, k_in, c_out = lhs.shape[lfeat], rhs.shape[rin], rhs.shape[rout]
    mode = "dense" if fg == 1 and bg == 1 else (
        "depthwise" if bg == 1 and fg == c_in and k_in == 1 and c_out == c_in else "grouped")
    if mode == "dense":
        tr.union(lhs.dims[lfeat], rhs.dims[rin])
        tr.union(rhs.dims[rout], out.dims[ofeat])
        tr.use(lhs, (lfeat,))
        tr.use(rhs, (rin,))
    elif mode == "depthwise":
        tr.union(lhs.dims[lfeat], out.dims[ofeat])
        tr.union(rhs.dims[rout], out.dims[ofeat])
        tr.block(rhs.dims[rin], "in-channel axis of a depthwise kernel")
        tr.use(lhs)
        tr.use(rhs)
    else:
        for d in (lhs.dims[lfeat], rhs.dims[rin], rhs.dims[rout], out.dims[ofeat]):
            tr.block(d, f"grouped convolution (feature_group_count={fg}, "
                        f"batch_group_count={bg})", "conv_general_dilated")
        tr.use(lhs)
        tr.use(rhs)

    def zero(z: _Zero) -> None:
        if z.is_allzero(lhs) or z.is_allzero(rhs):
            z.set_allzero(out)
            return
        zl, zr = z.get(lhs), z.get(rhs)
        sets = [frozenset()] * len(out.shape)
        if mode == "dense":
            sets[ofeat] = zr[rout]
            z.put(out, sets)
            z.contract_pairs("conv_general_dilated", lhs, rhs, [(lfeat, rin)], out)
        elif mode == "depthwise":
            sets[ofeat] = zl[lfeat] | zr[rout]
            z.put(out, sets)
        else:
            z.put(out, sets)

    tr.event(zero)
    return out


@_rule("cond")
def _cond(tr: _Structure, eqn: Any, ins: list[_Val]) -> list[_Val]:
    ops = ins[1:]
    outs = [tr.out_val(eqn, i) for i in range(len(eqn.outvars))]
    branches = []
    for k, br in enumerate(eqn.params["branches"]):
        with tr.recording() as events:
            res = tr.enter(f"cond branch {k}", br, ops)
        branches.append((events, res))
        for r, o in zip(res, outs, strict=True):
            for a, b in zip(r.dims, o.dims, strict=True):
                tr.union(a, b)

    def zero(z: _Zero) -> None:
        per_branch = []
        for events, res in branches:
            z.run(events)
            per_branch.append([(z.get(r), z.is_allzero(r)) for r in res])
        for i, o in enumerate(outs):
            sets = [frozenset.intersection(*(pb[i][0][d] for pb in per_branch))
                    for d in range(len(o.shape))]
            z.put(o, sets, allzero=all(pb[i][1] for pb in per_branch))

    tr.event(zero)
    return outs


def _loop_vals(tr: _Structure, init: Sequence[_Val]) -> list[_Val]:
    """Loop-carried values: new values whose axes are joined with the initial ones."""
    carry = []
    for v in init:
        c = tr.new_val(v.shape, pdims=v.pdims)
        for a, b in zip(v.dims, c.dims, strict=True):
            tr.union(a, b)
        carry.append(c)
    return carry


@_rule("scan")
def _scan(tr: _Structure, eqn: Any, ins: list[_Val]) -> list[_Val]:
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    consts, init, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
    carry = _loop_vals(tr, init)
    slices = []
    for x in xs:
        s = tr.new_val(x.shape[1:], dims=x.dims[1:],
                       pdims=None if x.pdims is None else x.pdims[1:])
        tr.block(x.dims[0], "scan axis")
        slices.append(s)
    with tr.recording() as events:
        res = tr.enter("scan body", p["jaxpr"], [*consts, *carry, *slices])
    outs = [tr.out_val(eqn, i) for i in range(len(eqn.outvars))]
    for r, c, o in zip(res[:nk], carry, outs[:nk], strict=True):
        for a, b, d in zip(r.dims, c.dims, o.dims, strict=True):
            tr.union(a, b)
            tr.union(a, d)
    for r, o in zip(res[nk:], outs[nk:], strict=True):
        tr.block(o.dims[0], "scan axis")
        for a, b in zip(r.dims, o.dims[1:], strict=True):
            tr.union(a, b)

    def zero(z: _Zero) -> None:
        for x, s in zip(xs, slices, strict=True):
            z.put(s, z.get(x)[1:], allzero=z.is_allzero(x))
        z.fixpoint(init, carry, events, res[:nk])
        for r, o in zip(res, outs, strict=True):
            src = z.get(r)
            if len(o.shape) == len(r.shape):
                z.put(o, src, allzero=z.is_allzero(r))
            else:
                z.put(o, [frozenset(), *src], allzero=z.is_allzero(r))

    tr.event(zero)
    return outs


@_rule("while")
def _while(tr: _Structure, eqn: Any, ins: list[_Val]) -> list[_Val]:
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
    carry = _loop_vals(tr, init)
    with tr.recording() as events:
        tr.enter("while cond", p["cond_jaxpr"], [*cconsts, *carry])
        res = tr.enter("while body", p["body_jaxpr"], [*bconsts, *carry])
    outs = [tr.out_val(eqn, i) for i in range(len(eqn.outvars))]
    for r, c, o in zip(res, carry, outs, strict=True):
        for a, b, d in zip(r.dims, c.dims, o.dims, strict=True):
            tr.union(a, b)
            tr.union(a, d)

    def zero(z: _Zero) -> None:
        z.fixpoint(init, carry, events, res)
        for r, o in zip(res, outs, strict=True):
            z.put(o, z.get(r), allzero=z.is_allzero(r))

    tr.event(zero)
    return outs


# ---------------------------------------------------------------------------- stage 2
@dataclasses.dataclass(frozen=True)
class _Pattern:
    """Channel ``i`` of a space ↦ ``offset + r*stride + i*block + [0, block)``, r < repeat."""

    offset: int = 0
    block: int = 1
    repeat: int = 1
    stride: int = 0

    def shift(self, by: int) -> _Pattern:
        return dataclasses.replace(self, offset=self.offset + by)

    def within(self, outer: _Pattern) -> _Pattern | None:
        """The pattern seen through ``outer``, the containing space's own pattern."""
        block = self.block * outer.block
        offset = outer.offset + self.offset * outer.block
        stride_in = self.stride * outer.block
        if self.repeat == 1:
            return _Pattern(offset, block, outer.repeat, outer.stride)
        if outer.repeat == 1:
            return _Pattern(offset, block, self.repeat, stride_in)
        if outer.stride == self.repeat * stride_in:
            return _Pattern(offset, block, self.repeat * outer.repeat, stride_in)
        return None


class _Spaces:
    """Stage 2: atomic channel spaces and their occurrences on axis classes."""

    def __init__(self, tr: _Structure):
        find = tr.uf.find
        self.find = find
        self.length: dict[int, int] = {}
        for d, n in enumerate(tr.size):
            self.length.setdefault(find(d), n)
        self.blocked: dict[int, tuple[str, str | None]] = {}
        for d, why in tr.blocked.items():
            self.blocked.setdefault(find(d), why)
        embeds = []
        for s, b, o in tr.embeds:
            rs, rb = find(s), find(b)
            if rs == rb and o == 0:
                continue
            if rs == rb or o + self.length[rs] > self.length[rb]:
                for r in (rs, rb):
                    self.blocked.setdefault(r, ("a slice or concatenation maps the axis onto "
                                                "itself at another offset", None))
                continue
            embeds.append((rs, rb, o))
        bp: dict[int, set[int]] = {r: {0, n} for r, n in self.length.items()}
        changed, rounds = True, 0
        while changed and rounds < 64:
            changed, rounds = False, rounds + 1
            for s, b, o in embeds:
                n = self.length[s]
                for x in list(bp[s]):
                    if o + x not in bp[b]:
                        bp[b].add(o + x)
                        changed = True
                for x in list(bp[b]):
                    if o <= x <= o + n and x - o not in bp[s]:
                        bp[s].add(x - o)
                        changed = True
        if changed:  # did not settle: give up on every class that takes part
            for s, b, _ in embeds:
                for r in (s, b):
                    self.blocked.setdefault(r, ("slices and concatenations do not settle",
                                                None))
        # interval nodes: (class, lo, hi)
        self.intervals: dict[int, list[tuple[int, int]]] = {}
        node: dict[tuple[int, int], int] = {}
        uf = _UnionFind()
        for r in self.length:
            cuts = sorted(bp[r])
            self.intervals[r] = list(zip(cuts[:-1], cuts[1:], strict=True))
            for lo, _hi in self.intervals[r]:
                node[(r, lo)] = uf.add()
        for s, b, o in embeds:
            for lo, _hi in self.intervals[s]:
                if (b, o + lo) in node:
                    uf.union(node[(s, lo)], node[(b, o + lo)])
        # products: merged interval root -> factor interval roots
        prod: dict[int, tuple[list[int], list[int]]] = {}
        product_classes: set[int] = set()
        for m, factors in tr.products:
            rm, rf = find(m), [find(f) for f in factors]
            whole = [len(self.intervals[r]) == 1 for r in (rm, *rf)]
            if not all(whole):
                for r in (rm, *rf):
                    self.blocked.setdefault(r, ("reshape of a sliced or concatenated axis",
                                                None))
                continue
            key = uf.find(node[(rm, 0)])
            fr = [uf.find(node[(r, 0)]) for r in rf]
            sizes = [self.length[r] for r in rf]
            product_classes.add(rm)
            if key in prod:
                old_f, old_sizes = prod[key]
                if old_sizes != sizes:
                    for r in (rm, *rf):
                        self.blocked.setdefault(r, ("axis reshaped in two different ways",
                                                    None))
                    continue
                for a, b in zip(old_f, fr, strict=True):
                    uf.union(a, b)
            else:
                prod[key] = (fr, sizes)
        # re-root product definitions after the factor unions
        self.product: dict[int, tuple[list[int], list[int]]] = {}
        for key, (fr, sizes) in prod.items():
            self.product[uf.find(key)] = ([uf.find(f) for f in fr], sizes)
        self.parents: dict[int, list[tuple[int, int]]] = {}
        for key, (fr, _sizes) in self.product.items():
            for j, f in enumerate(fr):
                self.parents.setdefault(f, []).append((key, j))
        self.direct: dict[int, list[tuple[int, _Pattern]]] = {}
        for r, ivs in self.intervals.items():
            for lo, _hi in ivs:
                self.direct.setdefault(uf.find(node[(r, lo)]), []).append((r, _Pattern(lo)))
        self.node_len = {uf.find(node[(r, lo)]): hi - lo
                         for r, ivs in self.intervals.items() for lo, hi in ivs}
        self._occ: dict[int, list[tuple[int, _Pattern]] | None] = {}
        self.atoms = [k for k in self.direct if k not in self.product]
        self.product_classes = product_classes

    def occurrences(self, space: int) -> list[tuple[int, _Pattern]] | None:
        """(class, pattern) pairs of ``space``; None if a pattern is not representable."""
        if space in self._occ:
            return self._occ[space]
        occ: list[tuple[int, _Pattern]] | None = list(self.direct.get(space, []))
        for parent, j in self.parents.get(space, []):
            sizes = self.product[parent][1]
            inner = int(np.prod(sizes[j + 1:], dtype=np.int64))
            outer = int(np.prod(sizes[:j], dtype=np.int64))
            mine = _Pattern(0, inner, outer, sizes[j] * inner) if outer > 1 else _Pattern(
                0, inner)
            up = self.occurrences(parent)
            if up is None or occ is None:
                occ = None
                break
            for cls, pat in up:
                composed = mine.within(pat)
                if composed is None:
                    occ = None
                    break
                occ.append((cls, composed))
        self._occ[space] = occ
        return occ

    def factor_atoms(self, space: int) -> list[int]:
        """Atomic spaces inside ``space`` (itself if atomic)."""
        if space not in self.product:
            return [space]
        return [a for f in self.product[space][0] for a in self.factor_atoms(f)]


# ---------------------------------------------------------------------------- stage 3
class _Zero:
    """Stage 3: which spaces are exactly zero on which axes, with members zeroed."""

    def __init__(self, class_spaces: dict[int, frozenset], find: Callable[[int], int]):
        self.class_spaces = class_spaces
        self.find = find
        self.sets: dict[int, tuple[frozenset, ...]] = {}
        self.zero_vals: set[int] = set()
        self.contracted: dict[int, frozenset] = {}
        self.invalid: dict[int, str] = {}
        self.scratch: dict[int, str] | None = None

    def spaces(self, dim: int) -> frozenset:
        return self.class_spaces.get(self.find(dim), frozenset())

    def get(self, v: _Val) -> tuple[frozenset, ...]:
        if self.is_allzero(v):
            return tuple(self.spaces(d) for d in v.dims)
        return self.sets.get(v.id) or tuple(frozenset() for _ in v.dims)

    def put(self, v: _Val, sets: Sequence[frozenset], allzero: bool = False) -> None:
        self.sets[v.id] = tuple(sets)
        if allzero:
            self.zero_vals.add(v.id)
        else:
            self.zero_vals.discard(v.id)

    def is_allzero(self, v: _Val) -> bool:
        return v.allzero or v.id in self.zero_vals

    def set_allzero(self, v: _Val) -> None:
        self.zero_vals.add(v.id)
        self.sets[v.id] = tuple(self.spaces(d) for d in v.dims)

    def fail(self, space: int, why: str) -> None:
        target = self.scratch if self.scratch is not None else self.invalid
        target.setdefault(space, why)

    def copy(self, v: _Val, out: _Val) -> None:
        self.put(out, self.get(v), allzero=self.is_allzero(v))
        self.contracted[out.id] = self.contracted.get(v.id, frozenset())

    def map_axes(self, v: _Val, out: _Val, kept: Sequence[int], *, filtered: bool = False,
                 transparent: bool = False) -> None:
        """``out``'s axes are ``v``'s axes ``kept`` (in order); others are not zero."""
        if self.is_allzero(v):
            self.set_allzero(out)
            return
        src = self.get(v)
        sets = [src[i] for i in kept]
        if filtered:
            sets = [s & self.spaces(d) for s, d in zip(sets, out.dims, strict=True)]
        sets += [frozenset()] * (len(out.shape) - len(sets))
        self.put(out, sets)
        if transparent:
            self.contracted[out.id] = self.contracted.get(v.id, frozenset())

    def elementwise(self, kind: str, name: str, ins: Sequence[_Val], out: _Val) -> None:
        nd = len(out.shape)
        arrays = [v for v in ins if len(v.shape) == nd and nd]
        scalars = [v for v in ins if not (len(v.shape) == nd and nd)]
        zero = [self.is_allzero(v) for v in ins]
        if kind == "any" and any(zero):
            self.set_allzero(out)
            return
        if kind == "all" and all(zero):
            self.set_allzero(out)
            return
        if kind == "first" and zero[0]:
            self.set_allzero(out)
            return
        sets: list[frozenset] = []
        for i in range(nd):
            full = [v for v in arrays if v.shape[i] == out.shape[i]]
            if kind == "any":
                s = frozenset().union(*(self.get(v)[i] for v in full))
            elif kind == "all":
                others = [v for v in ins if v not in full and not self.is_allzero(v)]
                s = frozenset() if others else frozenset.intersection(
                    *(self.get(v)[i] for v in full)) if full else frozenset()
            elif kind == "first":
                v0 = ins[0]
                s = self.get(v0)[i] if v0 in full else frozenset()
            else:
                s = frozenset()
            sets.append(s)
        self.put(out, sets)
        if name in ("mul", "div", "convert_element_type", "reduce_precision", "copy"):
            self._scale_check(name, ins, scalars, out)

    def _scale_check(self, name: str, ins: Sequence[_Val], scalars: Sequence[_Val],
                     out: _Val) -> None:
        """A mean or RMS over a space changes when it shrinks: see the module docstring."""
        carried = frozenset().union(*(self.contracted.get(v.id, frozenset()) for v in ins))
        if name in ("mul", "div"):
            nonscalar = [v for v in ins if v.shape]
            if len(nonscalar) > 1:
                return
            for s in scalars:
                c = s.literal
                if c is None or c == 0 or not math.isfinite(c):
                    continue
                for space, n in carried:
                    if any(math.isclose(abs(c), t, rel_tol=1e-5)
                           for t in (n, math.sqrt(n), 1 / n, 1 / math.sqrt(n))):
                        self.fail(space, f"scaled by the constant {c:g}, a function of its "
                                         f"length {n} (a mean or RMS over the axis)")
        self.contracted[out.id] = carried

    def contract(self, what: str, operands: Sequence[tuple[_Val, Sequence[int]]],
                 out: _Val) -> None:
        """Every space summed over must be zero in at least one operand."""
        record = set()
        for v, axes in operands:
            zs = self.get(v)
            for a in axes:
                for space in self.spaces(v.dims[a]):
                    record.add((space, v.shape[a]))
                    if space not in zs[a]:
                        self.fail(space, f"{what} sums over it where it is not zero")
        self.contracted[out.id] = frozenset(record)

    def contract_pairs(self, what: str, lhs: _Val, rhs: _Val,
                       pairs: Sequence[tuple[int, int]], out: _Val) -> None:
        zl, zr = self.get(lhs), self.get(rhs)
        record = set()
        for a, b in pairs:
            for space in self.spaces(lhs.dims[a]):
                record.add((space, lhs.shape[a]))
                if space not in zl[a] and space not in zr[b]:
                    self.fail(space, f"{what} contracts it where neither operand is zero")
        self.contracted[out.id] = frozenset(record)

    def run(self, events: Sequence[Event]) -> None:
        for ev in events:
            ev(self)

    def fixpoint(self, init: Sequence[_Val], carry: Sequence[_Val],
                 events: Sequence[Event], res: Sequence[_Val]) -> None:
        """Loop carries: zero iff zero initially and after every iteration (greatest fixpoint)."""
        state = [(self.get(v), self.is_allzero(v)) for v in init]
        outer = self.scratch
        for _ in range(len(carry) + 2):
            for c, (sets, az) in zip(carry, state, strict=True):
                self.put(c, sets, allzero=az)
            self.scratch = {}
            self.run(events)
            new = []
            for (sets, az), r in zip(state, res, strict=True):
                rs = self.get(r)
                new.append((tuple(a & b for a, b in zip(sets, rs, strict=True)),
                            az and self.is_allzero(r)))
            if new == state:
                break
            state = new
        found, self.scratch = self.scratch, outer
        for space, why in found.items():
            self.fail(space, why)


# ---------------------------------------------------------------------------- driver
def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct | np.generic)


def _trace(fn: Callable, state: Any, args: tuple, kwargs: dict) -> tuple[Any, int]:
    """Closed jaxpr of ``fn(state, *args, **kwargs)`` with non-array leaves made static."""
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    dynamic = [i for i, x in enumerate(leaves) if _is_array(x)]

    def flat_fn(state: Any, *dyn: Any) -> Any:
        full = list(leaves)
        for i, x in zip(dynamic, dyn, strict=True):
            full[i] = x
        a, k = jax.tree_util.tree_unflatten(treedef, full)
        return fn(state, *a, **k)

    closed = jax.make_jaxpr(flat_fn)(state, *[leaves[i] for i in dynamic])
    return closed, len(jax.tree.leaves(state))


def _analyse(closed: Any, paths: list[Path], trainable: list[bool],
             shapes: list[tuple[int, ...]], warn: bool) -> list[GroupFamily]:
    tr = _Structure()
    n_state = len(paths)
    invals = []
    for i, v in enumerate(closed.jaxpr.invars):
        shape = tuple(v.aval.shape) if hasattr(v.aval, "shape") else ()
        val = tr.new_val(shape)
        if i < n_state:
            val.pdims = tuple(frozenset({(i, a)}) for a in range(len(shape)))
        else:
            for d in val.dims:
                tr.block(d, "model input")
        invals.append(val)
    param_dims = [invals[i].dims for i in range(n_state)]
    outs = tr.run_closed(closed, invals)
    for o in outs:
        for d in o.dims:
            tr.block(d, "model output")

    sp = _Spaces(tr)
    find = tr.uf.find
    # which (leaf, axis) are members: trainable float parameters not only contracted
    def is_member(leaf: int, axis: int) -> bool:
        key = (leaf, axis)
        return trainable[leaf] and (key in tr.produced or key not in tr.contracted)

    class_params: dict[int, list[tuple[int, int]]] = {}
    for leaf, dims in enumerate(param_dims):
        for axis, d in enumerate(dims):
            class_params.setdefault(find(d), []).append((leaf, axis))
    # a space must reach some computed value: axes that live only in parameters (an
    # unused parameter, a kernel axis no rule ties to anything) are not channels
    n_param_dims = sum(len(d) for d in param_dims)
    computed = {find(d) for d in range(n_param_dims, len(tr.size))}
    invalid: dict[int, str] = {}
    occ: dict[int, list[tuple[int, _Pattern]]] = {}
    for space in sp.atoms:
        o = sp.occurrences(space)
        if o is None:
            invalid[space] = "its channels cannot be written as one slice pattern"
            continue
        if not any(is_member(*la) for cls, _ in o for la in class_params.get(cls, [])):
            continue
        if not any(cls in computed for cls, _ in o):
            continue
        occ[space] = o
    class_spaces: dict[int, set[int]] = {}
    for space, o in occ.items():
        for cls, _ in o:
            class_spaces.setdefault(cls, set()).add(space)
    z = _Zero({c: frozenset(s) for c, s in class_spaces.items()}, find)
    for leaf, dims in enumerate(param_dims):
        val = invals[leaf]
        z.put(val, [z.spaces(d) if is_member(leaf, a) else frozenset()
                    for a, d in enumerate(dims)])
    z.run(tr.events)
    invalid.update(z.invalid)
    blamed: dict[str, set[int]] = {}
    for space, o in occ.items():
        for cls, _ in o:
            if cls in sp.blocked:
                reason, prim = sp.blocked[cls]
                invalid.setdefault(space, reason)
                if prim is not None:
                    blamed.setdefault(prim, set()).add(space)
    valid = {s for s in occ if s not in invalid}

    # the outer factor of a merged axis, and the lower axis of a parameter, win
    def members_of(space: int) -> list[tuple[int, int, _Pattern]]:
        return [(leaf, axis, pat) for cls, pat in occ[space]
                for leaf, axis in class_params.get(cls, []) if is_member(leaf, axis)]

    changed = True
    while changed:
        changed = False
        for factors, _sizes in sp.product.values():
            live = [[a for a in sp.factor_atoms(f) if a in valid] for f in factors]
            live = [x for x in live if x]
            for lost in live[1:]:
                for a in lost:
                    valid.discard(a)
                    invalid[a] = "inner factor of a merged axis whose outer factor is pruned"
                    changed = True
        by_leaf: dict[int, dict[int, set[int]]] = {}
        for space in valid:
            for leaf, axis, _ in members_of(space):
                by_leaf.setdefault(leaf, {}).setdefault(axis, set()).add(space)
        for _leaf, axes in by_leaf.items():
            if len(axes) > 1:
                for axis in sorted(axes)[1:]:
                    for space in axes[axis]:
                        if space in valid:
                            valid.discard(space)
                            invalid[space] = "a parameter holds a family on a lower axis"
                            changed = True

    if warn:
        for prim, spaces in sorted(blamed.items()):
            hit = sorted({format_path(paths[leaf]) for s in spaces
                          for leaf, _a, _p in members_of(s)})
            if hit:
                warnings.warn(
                    f"discover_groups: primitive {prim!r} could not be proven safe; these "
                    f"parameters are not pruned along the axes it touches: {hit}",
                    DiscoveryWarning, stacklevel=3)
        odd = [s for s, why in invalid.items() if s in occ and "slice pattern" in why]
        for s in odd:
            hit = sorted({format_path(paths[leaf]) for leaf, _a, _p in members_of(s)})
            warnings.warn(f"discover_groups: not pruning {hit}: {invalid[s]}",
                          DiscoveryWarning, stacklevel=3)

    families = []
    for space in valid:
        members, dependents = [], []
        for cls, pat in occ[space]:
            for leaf, axis in class_params.get(cls, []):
                m = Member(paths[leaf], axis, pat.block, pat.offset, pat.repeat, pat.stride)
                (members if is_member(leaf, axis) else dependents).append((leaf, axis, m))
        members.sort(key=lambda t: (tr.first_use.get(t[0], 1 << 30), t[0], t[1]))
        dependents.sort(key=lambda t: (tr.first_use.get(t[0], 1 << 30), t[0], t[1]))
        order = min(tr.first_use.get(leaf, 1 << 30) for leaf, _a, _m in members)
        name = _family_name([m.path for _l, _a, m in members],
                            [len(shapes[leaf]) for leaf, _a, _m in members])
        families.append((order, name, GroupFamily(
            sp.node_len[space], tuple(m for _l, _a, m in members),
            tuple(m for _l, _a, m in dependents), name)))
    families.sort(key=lambda t: (t[0], t[1]))
    return [f for _o, _n, f in families]


def _family_name(paths: list[Path], ndims: list[int]) -> str:
    """The modules of a family's kernels (members with 2+ axes), e.g. ``'stem+block/conv2'``."""
    kernels = [p for p, n in zip(paths, ndims, strict=True) if n >= 2] or paths[:1]
    modules: list[str] = []
    for p in kernels:
        name = format_path(p[:-1] if len(p) > 1 else p)
        if name not in modules:
            modules.append(name)
    return "+".join(modules[:3]) + ("+…" if len(modules) > 3 else "")


def discover_groups(model_or_fn: Any, *args: Any, trainable: Callable[[Path], bool] | None
                    = None, warn: bool = True, **kwargs: Any) -> Groups:
    """Zero-invariant groups of a model, found from its jaxpr (see the module docstring).

    Two forms:

    * ``discover_groups(model, *args, **kwargs)`` for a ``flax.nnx.Module``: traces
      ``model(*args, **kwargs)`` in the model's current train/eval mode. Paths are those
      of the whole ``nnx.state(model)``; ``nnx.Param`` leaves are trainable, other
      variables (BatchNorm statistics, ...) can only be dependents.
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
      trainable: optional predicate on a leaf path.
      warn: emit `DiscoveryWarning` for parameters left unprunable by primitives without
        a rule or by index patterns a `Member` cannot describe.
      **kwargs: keyword inputs of the model / function.

    Returns:
      `Groups`: families in forward (first-use) order, named after their first member's
      module path.

    Raises:
      TypeError: if ``model_or_fn`` is neither an ``nnx.Module`` nor callable, or the
        pure-function form gets no ``params``.
    """
    if isinstance(model_or_fn, nnx.Module):
        graphdef, state = nnx.split(model_or_fn)
        params_paths = set(tree_paths(nnx.state(model_or_fn, nnx.Param)))

        def fn(st: Any, *a: Any, **k: Any) -> Any:
            return nnx.merge(graphdef, st)(*a, **k)

        paths = tree_paths(state)
        is_trainable = [p in params_paths for p in paths]
    elif callable(model_or_fn):
        if not args:
            raise TypeError("discover_groups(fn, params, *args): the pure-function form needs "
                            "the parameter pytree as its second argument")
        fn, state, args = model_or_fn, args[0], args[1:]
        paths = tree_paths(state)
        pred = trainable or (lambda p: "batch_stats" not in p)
        is_trainable = [bool(pred(p)) for p in paths]
    else:
        raise TypeError(f"discover_groups takes an nnx.Module or a callable, got "
                        f"{type(model_or_fn).__name__}")
    leaves = jax.tree.leaves(state)
    for i, x in enumerate(leaves):
        dtype = getattr(x, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            is_trainable[i] = False
    closed, _n = _trace(fn, state, args, kwargs)
    shapes = [tuple(getattr(x, "shape", ())) for x in leaves]
    return Groups.from_families(_analyse(closed, paths, is_trainable, shapes, warn))
