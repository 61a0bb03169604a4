"""Zero analysis over the recorded events: stage 3 of group discovery.

`ZeroAnalysis` runs the *events* that the rules of `hesso_jax.jaxpr.axes` recorded while
tracing: with every trainable producer slice of a candidate space set to zero, it tracks,
per value and axis, the set of spaces whose channel slices are exactly zero, and fails a
space where a contraction sums over it while it is not zero in any operand, or where a
contraction result over it is scaled by a constant that depends on its length (a mean or
RMS over the axis). See `hesso_jax.discovery` for the whole picture.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from hesso_jax.jaxpr.values import Value

__all__ = ["Event", "ZeroAnalysis"]


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
        self.scratch: dict[int, tuple[str, Any]] | None = None
        self.site: Any = None  # source_info of the equation whose event runs
        self.sites: dict[int, Any] = {}  # space -> where it failed first

    def spaces(self, dim: int) -> frozenset:
        """Candidate spaces on the class of axis node ``dim``."""
        return self.class_spaces.get(self.find(dim), frozenset())

    def get(self, v: Value) -> tuple[frozenset, ...]:
        """Per axis of ``v``, the spaces whose slices along it are exactly zero."""
        if self.is_allzero(v):
            return tuple(self.spaces(d) for d in v.dims)
        return self.sets.get(v.id) or tuple(frozenset() for _ in v.dims)

    def put(self, v: Value, sets: Sequence[frozenset], allzero: bool = False) -> None:
        """Sets the zero slices of ``v`` (and whether it is all zero)."""
        self.sets[v.id] = tuple(sets)
        if allzero:
            self.zero_vals.add(v.id)
        else:
            self.zero_vals.discard(v.id)

    def is_allzero(self, v: Value) -> bool:
        """Whether ``v`` is statically, or under the analysis, all zeros."""
        return v.allzero or v.id in self.zero_vals

    def set_allzero(self, v: Value) -> None:
        """Marks ``v`` all zero: every space on every axis is zero."""
        self.zero_vals.add(v.id)
        self.sets[v.id] = tuple(self.spaces(d) for d in v.dims)

    def fail(self, space: int, why: str, site: Any = None) -> None:
        """Rejects ``space`` (the first reason is kept; loop bodies collect in scratch)."""
        site = site if site is not None else self.site
        if self.scratch is not None:
            self.scratch.setdefault(space, (why, site))
        elif space not in self.invalid:
            self.invalid[space] = why
            self.sites[space] = site

    def copy(self, v: Value, out: Value) -> None:
        """``out`` is ``v`` unchanged (identity primitives)."""
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
        """Each contracted pair ``(a, b)``: its spaces must be zero in one operand."""
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
        """Runs recorded events in order."""
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
        for space, (why, site) in found.items():
            self.fail(space, why, site)


Event = Callable[[ZeroAnalysis], None]
"""A recorded step of the zero analysis: given it, updates the zero slices of outputs."""
