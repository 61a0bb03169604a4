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
2. **Channel spaces.** Embeddings are resolved by interval refinement: every class is cut
   at the boundaries of every segment embedded in it (and vice versa) until stable, and
   equal intervals are joined. The resulting atomic intervals are the candidate families
   (*spaces*); a product class is not a space itself, its channels are the product of its
   factors'. Each space knows its occurrences: on which class, at which ``offset``,
   ``block``, ``repeat`` and ``stride`` (a head of ``(H, D)`` merged to ``H*D`` is a block
   of ``D``; a channel ``C`` flattened from ``(h, w, C)`` recurs every ``C`` rows). A
   factor cut into intervals (RoPE's rotate-half slices ``head_dim`` in halves; partial
   rotary cuts it into rotary and pass-through parts) stays a factor, as the composite of
   its intervals: the heads remain a space, and each interval recurs in every head.
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
Anything the analysis cannot prove safe stays out of the result, with a `DiscoveryWarning`
naming the primitive, or the closed-over arrays (shape, dtype, first use), and the
parameter paths it blocked; a discovery that finds nothing says why (the rejection
reasons of its candidates, or that the function ignores its parameters).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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
    """Stage 2: atomic channel spaces and their occurrences on axis classes.

    Steps: classes and their blocks (`_classes`); embeddings cut classes into intervals
    until stable (`_refine`); equal intervals are joined into nodes (`_interval_nodes`);
    reshapes define product nodes (`_products`); occurrences compose the patterns
    (`occurrences`).

    A reshape factor that is itself cut into intervals (``head_dim`` sliced in halves by
    RoPE's rotate-half, or into a rotary and a pass-through part) is a *composite* node:
    its parts are the interval nodes at their offsets, so an interval of ``head_dim``
    recurs in every head of the merged ``H*D`` axis, and the other factors (heads) stay
    atomic spaces of their own. Only the merged axis itself must be whole.
    """

    def __init__(self, tr: AxisTracer):
        self.find = tr.uf.find
        self._classes(tr)
        embeds = self._embeds(tr)
        bp = self._refine(embeds)
        self.uf = UnionFind()
        self._interval_nodes(bp, embeds)
        self.parts: dict[int, list[tuple[int, int]]] = {}  # composite -> (node, offset)
        self._composite: dict[int, int] = {}  # sliced class -> its composite node
        self._finish(self._products(tr))

    def _classes(self, tr: AxisTracer) -> None:
        find = self.find
        self.length: dict[int, int] = {}
        for d, n in enumerate(tr.size):
            self.length.setdefault(find(d), n)
        self.blocked: dict[int, tuple[str, str | None]] = {}
        self.const_blocked: dict[int, set[int]] = {}  # class -> closed-over arrays
        self.other_blocked: set[int] = set()  # classes blocked by anything else
        for d, why in tr.blocked.items():
            r = find(d)
            self.blocked.setdefault(r, why)
            if d in tr.const_blocks:
                self.const_blocked.setdefault(r, set()).update(tr.const_blocks[d])
            else:
                self.other_blocked.add(r)

    def _block(self, r: int, reason: str) -> None:
        self.blocked.setdefault(r, (reason, None))
        self.other_blocked.add(r)

    def _embeds(self, tr: AxisTracer) -> list[tuple[int, int, int]]:
        embeds = []
        for s, b, o in tr.embeds:
            rs, rb = self.find(s), self.find(b)
            if rs == rb and o == 0:
                continue
            if rs == rb or o + self.length[rs] > self.length[rb]:
                for r in (rs, rb):
                    self._block(r, "a slice or concatenation maps the axis onto itself at "
                                   "another offset")
                continue
            embeds.append((rs, rb, o))
        return embeds

    def _refine(self, embeds: list[tuple[int, int, int]]) -> dict[int, set[int]]:
        """Cut points of every class: each embedded segment's cuts appear in both."""
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
                    self._block(r, "slices and concatenations do not settle")
        return bp

    def _interval_nodes(self, bp: dict[int, set[int]],
                        embeds: list[tuple[int, int, int]]) -> None:
        self.intervals: dict[int, list[tuple[int, int]]] = {}
        self.node: dict[tuple[int, int], int] = {}
        for r in self.length:
            cuts = sorted(bp[r])
            self.intervals[r] = list(zip(cuts[:-1], cuts[1:], strict=True))
            for lo, _hi in self.intervals[r]:
                self.node[(r, lo)] = self.uf.add()
        for s, b, o in embeds:
            for lo, _hi in self.intervals[s]:
                if (b, o + lo) in self.node:
                    self.uf.union(self.node[(s, lo)], self.node[(b, o + lo)])

    def _factor(self, r: int) -> int:
        """The node of a reshape factor class: its interval, or a composite of its parts."""
        if len(self.intervals[r]) == 1:
            return self.uf.find(self.node[(r, 0)])
        if r not in self._composite:
            c = self.uf.add()
            self._composite[r] = c
            self.parts[c] = [(self.node[(r, lo)], lo) for lo, _hi in self.intervals[r]]
        return self._composite[r]

    def _join(self, a: int, b: int) -> bool:
        """Joins two factors of one merged axis reshaped twice (False if they differ)."""
        a, b = self.uf.find(a), self.uf.find(b)
        if a == b:
            return True
        pa, pb = self.parts.get(a), self.parts.get(b)
        if (pa is None) != (pb is None):
            return False
        if pa is not None:
            if [lo for _n, lo in pa] != [lo for _n, lo in pb]:
                return False
            for (x, _lo), (y, _lo2) in zip(pa, pb, strict=True):
                self.uf.union(x, y)
        self.uf.union(a, b)
        return True

    def _products(self, tr: AxisTracer) -> dict[int, tuple[list[int], list[int]]]:
        """Merged node -> (factor nodes, factor sizes), row-major."""
        prod: dict[int, tuple[list[int], list[int]]] = {}
        for m, factors in tr.products:
            rm, rf = self.find(m), [self.find(f) for f in factors]
            if len(self.intervals[rm]) != 1 or len(set(rf)) < len(rf) or rm in rf:
                for r in (rm, *rf):
                    self._block(r, "reshape of a sliced or concatenated axis, or of an "
                                   "axis with itself")
                continue
            key = self.uf.find(self.node[(rm, 0)])
            fr = [self._factor(r) for r in rf]
            sizes = [self.length[r] for r in rf]
            if key not in prod:
                prod[key] = (fr, sizes)
            elif prod[key][1] != sizes or not all(
                    self._join(a, b) for a, b in zip(prod[key][0], fr, strict=True)):
                for r in (rm, *rf):
                    self._block(r, "axis reshaped in two different ways")
        return prod

    def _finish(self, prod: dict[int, tuple[list[int], list[int]]]) -> None:
        """Re-roots products and composites after the factor unions; direct occurrences."""
        find = self.uf.find
        self.product: dict[int, tuple[list[int], list[int]]] = {}
        for key, (fr, sizes) in prod.items():
            self.product[find(key)] = ([find(f) for f in fr], sizes)
        parts: dict[int, list[tuple[int, int]]] = {}
        for c, ps in self.parts.items():
            parts.setdefault(find(c), [(find(n), lo) for n, lo in ps])
        self.parts = parts
        self.containers: dict[int, list[tuple[int, int]]] = {}
        for c, ps in parts.items():
            for n, lo in ps:
                self.containers.setdefault(n, []).append((c, lo))
        self.parents: dict[int, list[tuple[int, int]]] = {}
        for key, (fr, _sizes) in self.product.items():
            for j, f in enumerate(fr):
                self.parents.setdefault(f, []).append((key, j))
        self.direct: dict[int, list[tuple[int, _Pattern]]] = {}
        self.node_len: dict[int, int] = {}
        for r, ivs in self.intervals.items():
            for lo, hi in ivs:
                n = find(self.node[(r, lo)])
                self.direct.setdefault(n, []).append((r, _Pattern(lo)))
                self.node_len[n] = hi - lo
        self._occ: dict[int, list[tuple[int, _Pattern]] | None] = {}
        self.atoms = [k for k in self.direct if k not in self.product]

    def _uplinks(self, space: int) -> list[tuple[int, _Pattern]]:
        """(containing node, pattern of ``space`` within it): products and composites."""
        ups = []
        for parent, j in self.parents.get(space, []):
            sizes = self.product[parent][1]
            inner = int(np.prod(sizes[j + 1:], dtype=np.int64))
            outer = int(np.prod(sizes[:j], dtype=np.int64))
            ups.append((parent, _Pattern(0, inner, outer, sizes[j] * inner) if outer > 1
                        else _Pattern(0, inner)))
        ups += [(c, _Pattern(lo)) for c, lo in self.containers.get(space, [])]
        return ups

    def occurrences(self, space: int) -> list[tuple[int, _Pattern]] | None:
        """(class, pattern) pairs of ``space``; None if a pattern is not representable."""
        if space in self._occ:
            return self._occ[space]
        self._occ[space] = None  # a cycle of products is not representable
        occ = list(self.direct.get(space, []))
        for up_space, mine in self._uplinks(space):
            up = self.occurrences(up_space)
            if up is None:
                return None
            for cls, pat in up:
                composed = mine.within(pat)
                if composed is None:
                    return None
                occ.append((cls, composed))
        self._occ[space] = occ
        return occ

    def factor_atoms(self, space: int, depth: int = 0) -> list[int]:
        """Atomic spaces inside ``space`` (itself if atomic)."""
        if depth > 64:
            return []
        if space in self.product:
            inside = self.product[space][0]
        elif space in self.parts:
            inside = [n for n, _lo in self.parts[space]]
        else:
            return [space]
        return [a for f in inside for a in self.factor_atoms(f, depth + 1)]


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
        """Every space summed over must be zero in at least one operand.

        The result remembers each space with its length ``n`` and, for a sum over several
        axes, the total length ``N`` (a GroupNorm mean over ``(h, w, C/G)`` divides by
        ``N``, which changes with ``n``) for the mean/RMS check of `_scale_check`.
        """
        record = set()
        for v, axes in operands:
            zs = self.get(v)
            total = math.prod(v.shape[a] for a in axes)
            for a in axes:
                for space in self.spaces(v.dims[a]):
                    record.add((space, v.shape[a]))
                    record.add((space, total))
                    if space not in zs[a]:
                        self.fail(space, f"{what} sums over it where it is not zero")
        self.contracted[out.id] = frozenset(record)

    def contract_within(self, what: str, lhs: Value, lfeat: int, rhs: Value, rin: int,
                        out: Value) -> None:
        """A grouped convolution sums, within each group, over the kernel's in axis.

        Its spaces (channel ``i`` of every input group) must be zero in the kernel's in
        axis or on the input's feature axis (where they recur in every group).
        """
        zl, zr = self.get(lhs), self.get(rhs)
        record = set()
        for space in self.spaces(rhs.dims[rin]):
            record.add((space, rhs.shape[rin]))
            if space not in zr[rin] and space not in zl[lfeat]:
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
    """The families of a traced ``fn(state, *inputs)`` (``paths``: the state's leaves)."""
    an = _Analysis(closed, paths, trainable)
    families = an.families(shapes)
    if warn:
        an.warn(found=bool(families))
    return families


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
        self.sp = _Spaces(tr)
        self.find = tr.uf.find
        self.class_params: dict[int, list[tuple[int, int]]] = {}
        for leaf, dims in enumerate(self.param_dims):
            for axis, d in enumerate(dims):
                self.class_params.setdefault(self.find(d), []).append((leaf, axis))
        self.invalid: dict[int, str] = {}
        self.occ = self._candidates()
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
                val.pdims = tuple(frozenset({(i, a)}) for a in range(len(shape)))
            else:
                for d in val.dims:
                    tr.block(d, "model input")
            self.invals.append(val)
        self.param_dims = [self.invals[i].dims for i in range(n_state)]
        for o in tr.run_closed(closed, self.invals):
            for d in o.dims:
                tr.block(d, "model output")

    def is_member(self, leaf: int, axis: int) -> bool:
        """Trainable float parameter axes that are not only contracted."""
        key = (leaf, axis)
        return self.trainable[leaf] and (key in self.tr.produced
                                         or key not in self.tr.contracted)

    def _candidates(self) -> dict[int, list[tuple[int, _Pattern]]]:
        # a space must reach some computed value: axes that live only in parameters (an
        # unused parameter, a kernel axis no rule ties to anything) are not channels
        n_param_dims = sum(len(d) for d in self.param_dims)
        computed = {self.find(d) for d in range(n_param_dims, len(self.tr.size))}
        occ: dict[int, list[tuple[int, _Pattern]]] = {}
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
        return z.invalid

    def _blocks(self) -> dict[str, set[int]]:
        """Spaces on a blocked class become invalid; returns primitive -> spaces it blocked."""
        blamed: dict[str, set[int]] = {}
        for space, o in self.occ.items():
            for cls, _ in o:
                if cls in self.sp.blocked:
                    reason, prim = self.sp.blocked[cls]
                    self.invalid.setdefault(space, reason)
                    if prim is not None:
                        blamed.setdefault(prim, set()).add(space)
        return blamed

    def members_of(self, space: int) -> list[tuple[int, int, _Pattern]]:
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

    def warn(self, found: bool) -> None:
        """`DiscoveryWarning`s: what blocked which parameters, and why nothing was found."""
        messages = []
        for prim, spaces in sorted(self.blamed.items()):
            if hit := self.hit(spaces):
                messages.append(f"discover_groups: primitive {prim!r} could not be proven "
                                f"safe; these parameters are not pruned along the axes it "
                                f"touches: {hit}")
        for s, why in self.invalid.items():
            if s in self.occ and "slice pattern" in why:
                messages.append(f"discover_groups: not pruning {self.hit([s])}: {why}")
        if msg := self._const_message():
            messages.append(msg)
        if not found:
            messages.append(self._nothing_message())
        for msg in messages:
            warnings.warn(msg, DiscoveryWarning, stacklevel=4)

    def _const_message(self) -> str | None:
        """Closed-over arrays that alone keep otherwise valid spaces from being families."""
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
            return None
        lines = [f"  #{k} {self.tr.consts[k]} (first used by "
                 f"{self.tr.const_users.get(k, '?')!r}) blocks {self.hit(spaces)}"
                 for k, spaces in sorted(by_const.items())]
        return ("discover_groups: the traced function closes over arrays that touch "
                "prunable axes; a closed-over array is a constant of fixed shape, so these "
                "parameters are not pruned:\n" + "\n".join(lines) + "\nPass these arrays "
                "in as part of the parameter tree instead (non-trainable: under a "
                "'batch_stats' key, or select the trainable leaves with trainable=...), so "
                "that they become dependents and are sliced with the parameters.")

    def _nothing_message(self) -> str:
        """Why no family was found: unused parameters, or each candidate's reason."""
        tr = self.tr
        closes = (f" It closes over {len(tr.consts)} array(s): "
                  f"{', '.join(tr.consts[:6])}{', …' if len(tr.consts) > 6 else ''}; if "
                  f"those are the model's parameters, pass them as the first argument."
                  if tr.consts else "")
        if not tr.first_use:
            return ("discover_groups found no prunable groups: the function does not use "
                    "its parameters (the first argument, or the module's state)." + closes)
        reasons: dict[str, set[int]] = {}
        for space in self.occ:
            reasons.setdefault(self.invalid.get(space, "not provably zero-invariant"),
                               set()).add(space)
        if not reasons:
            return ("discover_groups found no prunable groups: no axis of a trainable "
                    "parameter reaches a computed value other than through contractions."
                    + closes)
        ranked = sorted(reasons.items(), key=lambda kv: -len(kv[1]))
        lines = [f"  {why}: {self.hit(spaces)[:4]}" for why, spaces in ranked[:6]]
        return ("discover_groups found no prunable groups; the candidate channels were "
                "rejected because:\n" + "\n".join(lines) + closes)


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
        a rule, by closed-over arrays (named by shape, dtype and first use) or by index
        patterns a `Member` cannot describe, and one explaining an empty result.
      **kwargs: keyword inputs of the model / function.

    Returns:
      `Groups`: families in forward (first-use) order, named after their first member's
      module path; ``groups.example_inputs = (args, kwargs)`` records the example call.

    Raises:
      TypeError: if ``model_or_fn`` is neither an ``nnx.Module`` nor callable, is a bound
        method of an ``nnx.Module`` (``model.__call__``: pass the module), or the
        pure-function form gets no ``params``.
    """
    _check_not_bound_method(model_or_fn)
    if isinstance(model_or_fn, nnx.Module):
        graphdef, state = nnx.split(model_or_fn)
        params_paths = set(tree_paths(nnx.state(model_or_fn, nnx.Param)))

        def fn(st: Any, *a: Any, **k: Any) -> Any:
            return nnx.merge(graphdef, st)(*a, **k)

        paths = tree_paths(state)
        is_trainable = [p in params_paths for p in paths]
        counted = list(is_trainable)
    elif callable(model_or_fn):
        if not args:
            raise TypeError("discover_groups(fn, params, *args): the pure-function form needs "
                            "the parameter pytree as its second argument")
        fn, state, args = model_or_fn, args[0], args[1:]
        paths = tree_paths(state)
        pred = trainable or (lambda p: "batch_stats" not in p)
        is_trainable = [bool(pred(p)) for p in paths]
        counted = ["batch_stats" not in p for p in paths]  # as hj.group_costs counts
    else:
        raise TypeError(f"discover_groups takes an nnx.Module or a callable, got "
                        f"{type(model_or_fn).__name__}")
    leaves = jax.tree.leaves(state)
    for i, x in enumerate(leaves):
        dtype = getattr(x, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            is_trainable[i] = counted[i] = False
    closed, _n = _trace(fn, state, args, kwargs)
    shapes = [tuple(getattr(x, "shape", ())) for x in leaves]
    groups = Groups.from_families(_analyse(closed, paths, is_trainable, shapes, warn),
                                  fingerprint=structure_fingerprint(fn, state, *args, **kwargs))
    # the example call, for surgery to verify masked == shrunk by running it
    groups.example_inputs = (tuple(args), dict(kwargs))
    groups.costs = _costs(closed, state, groups, counted, warn)
    return groups


def _costs(closed: Any, state: Any, groups: Groups, counted: list[bool],
           warn: bool) -> GroupCosts | None:
    """The groups' `GroupCosts` from the jaxpr discovery traced (None if it fails).

    A failure of the cost model never fails discovery: it is reported as a
    `DiscoveryWarning` (``hj.Budget`` then needs ``costs=``). The cost model's own
    `CostWarning` (``cond``/``while`` bounds) is left to ``hj.group_costs``, so discovery
    warns about what it always warned about.
    """
    if not groups.families:  # nothing to budget
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CostWarning)
        try:
            return costs_from_jaxpr(closed, state, groups, counted)
        except Exception as err:  # noqa: BLE001 - costs are an optional extra
            if warn:
                warnings.warn(f"discover_groups: no costs recorded ({type(err).__name__}: "
                              f"{err}); pass costs=hj.group_costs(...) for a Budget",
                              DiscoveryWarning, stacklevel=3)
            return None
