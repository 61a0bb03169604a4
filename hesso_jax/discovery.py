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

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hesso_jax.groups import (
    GroupFamily,
    Groups,
    Member,
    Path,
    format_path,
    structure_fingerprint,
    tree_paths,
)
from hesso_jax.jaxpr.axes import AxisTracer, Event, UnionFind, Value

__all__ = ["DiscoveryWarning", "discover_groups"]


class DiscoveryWarning(UserWarning):
    """Parameters left non-prunable because the analysis could not prove them safe."""


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

    def __init__(self, tr: AxisTracer):
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
        uf = UnionFind()
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
def _shape_constant(c: float, n: int) -> bool:
    """Whether ``|c|`` is ``n``, ``√n``, ``1/n`` or ``1/√n`` (a length-derived constant)."""
    return any(math.isclose(abs(c), t, rel_tol=1e-5)
               for t in (n, math.sqrt(n), 1 / n, 1 / math.sqrt(n)))


def _neutral(name: str, v: Value) -> bool:
    """A constant that leaves a zero at zero under ``name`` (max with c ≤ 0, min with c ≥ 0)."""
    if v.literal is None:
        return False
    return (name == "max" and v.literal <= 0) or (name == "min" and v.literal >= 0)


class ZeroAnalysis:
    """Stage 3: which spaces are exactly zero on which axes, with members zeroed."""

    def __init__(self, class_spaces: dict[int, frozenset], find: Callable[[int], int]):
        self.class_spaces = class_spaces
        self.find = find
        self.sets: dict[int, tuple[frozenset, ...]] = {}
        self.zero_vals: set[int] = set()
        self.contracted: dict[int, frozenset] = {}
        self.scaled: dict[int, frozenset] = {}
        self.invalid: dict[int, str] = {}
        self.scratch: dict[int, str] | None = None

    def spaces(self, dim: int) -> frozenset:
        return self.class_spaces.get(self.find(dim), frozenset())

    def get(self, v: Value) -> tuple[frozenset, ...]:
        if self.is_allzero(v):
            return tuple(self.spaces(d) for d in v.dims)
        return self.sets.get(v.id) or tuple(frozenset() for _ in v.dims)

    def put(self, v: Value, sets: Sequence[frozenset], allzero: bool = False) -> None:
        self.sets[v.id] = tuple(sets)
        if allzero:
            self.zero_vals.add(v.id)
        else:
            self.zero_vals.discard(v.id)

    def is_allzero(self, v: Value) -> bool:
        return v.allzero or v.id in self.zero_vals

    def set_allzero(self, v: Value) -> None:
        self.zero_vals.add(v.id)
        self.sets[v.id] = tuple(self.spaces(d) for d in v.dims)

    def fail(self, space: int, why: str) -> None:
        target = self.scratch if self.scratch is not None else self.invalid
        target.setdefault(space, why)

    def copy(self, v: Value, out: Value) -> None:
        self.put(out, self.get(v), allzero=self.is_allzero(v))
        self.carry(v, out)

    def remap(self, v: Value, out: Value,
              per_axis: Callable[[Sequence[frozenset]], list[frozenset]]) -> None:
        """Zero slices of a view ``out`` of ``v`` (broadcast, reshape, transpose).

        They are ``per_axis(zero slices of v)``; ``out`` carries ``v``'s contractions along.
        """
        if self.is_allzero(v):
            self.set_allzero(out)
        else:
            self.put(out, per_axis(self.get(v)))
        self.carry(v, out)

    def map_axes(self, v: Value, out: Value, kept: Sequence[int], *, filtered: bool = False,
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
            self.carry(v, out)

    def elementwise(self, kind: str, name: str, ins: Sequence[Value], out: Value) -> None:
        """Zero slices of an elementwise op's output (``kind``: any/all/first/none).

        ``any``: zero where some input is (``x·y``); ``all``: zero where every input is
        (``x+y``, ``max``, ``select``); ``first``: zero where the first input is (``x/y``,
        ``f(x)`` with ``f(0) = 0``). For ``max``/``min`` a constant ``c`` counts as zero
        when ``max(0, c) = 0`` (``c ≤ 0``) / ``min(0, c) = 0`` (``c ≥ 0``): relu6.
        """
        nd = len(out.shape)
        arrays = [v for v in ins if len(v.shape) == nd and nd]
        zero = [self.is_allzero(v) or _neutral(name, v) for v in ins]
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
                others = [v for v, z in zip(ins, zero, strict=True) if v not in full and not z]
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
            self._scale_check(name, ins, out)

    def carry(self, v: Value, out: Value) -> None:
        """``out`` is ``v`` seen through a view: it keeps ``v``'s contraction/scale marks."""
        self.contracted[out.id] = self.contracted.get(v.id, frozenset())
        self.scaled[out.id] = self.scaled.get(v.id, frozenset())

    def _scale_check(self, name: str, ins: Sequence[Value], out: Value) -> None:
        """A mean, RMS or 1/√d scale over a space changes when it shrinks.

        A constant ``c ∈ {n, √n, 1/n, 1/√n}`` multiplying (or dividing) the result of a
        contraction over a space of length ``n`` (``Σ x / n``: a mean; LayerNorm/RMSNorm
        statistics) fails that space here; the same constant applied to an activation
        *before* it is contracted with another activation (``(q / √d) · k``, attention) is
        recorded in ``scaled`` and checked by `contract_pairs`. (Pre-scaled inputs of a
        layer with a parameter kernel are not checked: a mean-pooling divisor that happens
        to equal the channel count must not block the channels.)
        """
        carried = frozenset().union(*(self.contracted.get(v.id, frozenset()) for v in ins))
        scaled = frozenset().union(*(self.scaled.get(v.id, frozenset()) for v in ins))
        if name in ("mul", "div"):
            constants = [v for v in ins if v.literal is not None]
            if len(ins) - len(constants) > 1:
                return
            for const in constants:
                c = const.literal
                if c == 0 or not math.isfinite(c):
                    continue
                scaled |= {abs(c)}
                for space, n in carried:
                    if _shape_constant(c, n):
                        self.fail(space, f"scaled by the constant {c:g}, a function of its "
                                         f"length {n} (a mean or RMS over the axis)")
        self.contracted[out.id] = carried
        self.scaled[out.id] = scaled

    def _prescaled(self, v: Value, space: int, n: int, what: str) -> None:
        for c in self.scaled.get(v.id, ()):
            if _shape_constant(c, n):
                self.fail(space, f"{what} contracts it after a scale by {c:g}, a function "
                                 f"of its length {n}")

    def contract(self, what: str, operands: Sequence[tuple[Value, Sequence[int]]],
                 out: Value) -> None:
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

    def contract_pairs(self, what: str, lhs: Value, rhs: Value,
                       pairs: Sequence[tuple[int, int]], out: Value) -> None:
        zl, zr = self.get(lhs), self.get(rhs)
        record = set()
        for a, b in pairs:
            for space in self.spaces(lhs.dims[a]):
                record.add((space, lhs.shape[a]))
                if lhs.pdims is None and rhs.pdims is None:  # activation · activation
                    self._prescaled(lhs, space, lhs.shape[a], what)
                    self._prescaled(rhs, space, lhs.shape[a], what)
                if space not in zl[a] and space not in zr[b]:
                    self.fail(space, f"{what} contracts it where neither operand is zero")
        self.contracted[out.id] = frozenset(record)

    def run(self, events: Sequence[Event]) -> None:
        for ev in events:
            ev(self)

    def fixpoint(self, init: Sequence[Value], carry: Sequence[Value],
                 events: Sequence[Event], res: Sequence[Value]) -> None:
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
    tr = AxisTracer()
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
    z = ZeroAnalysis({c: frozenset(s) for c, s in class_spaces.items()}, find)
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
    return Groups.from_families(_analyse(closed, paths, is_trainable, shapes, warn),
                                fingerprint=structure_fingerprint(fn, state, *args, **kwargs))
