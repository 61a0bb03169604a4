"""Atomic channel spaces and their occurrences on axis classes: stage 2 of discovery.

`Spaces` reads the axis classes, embeddings (slices, concatenations) and products
(reshapes) recorded by `hesso_jax.jaxpr.axes.AxisTracer` and resolves them into atomic
channel spaces, each with its occurrences (class, `Pattern`). See `hesso_jax.discovery`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from hesso_jax.jaxpr.axes import AxisTracer
from hesso_jax.jaxpr.values import UnionFind

__all__ = ["Pattern", "Spaces"]


@dataclasses.dataclass(frozen=True)
class Pattern:
    """Channel ``i`` of a space ↦ ``offset + r*stride + i*block + [0, block)``, r < repeat."""

    offset: int = 0
    block: int = 1
    repeat: int = 1
    stride: int = 0

    def shift(self, by: int) -> Pattern:
        """The pattern moved by ``by`` rows."""
        return dataclasses.replace(self, offset=self.offset + by)

    def within(self, outer: Pattern) -> Pattern | None:
        """The pattern seen through ``outer``, the containing space's own pattern."""
        block = self.block * outer.block
        offset = outer.offset + self.offset * outer.block
        stride_in = self.stride * outer.block
        if self.repeat == 1:
            return Pattern(offset, block, outer.repeat, outer.stride)
        if outer.repeat == 1:
            return Pattern(offset, block, self.repeat, stride_in)
        if outer.stride == self.repeat * stride_in:
            return Pattern(offset, block, self.repeat * outer.repeat, stride_in)
        return None


class Spaces:
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
        self.block_sites: dict[int, Any] = {}  # class -> source_info of its block
        for d, why in tr.blocked.items():
            r = find(d)
            if r not in self.blocked:
                self.blocked[r] = why
                self.block_sites[r] = tr.block_sites.get(d)
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
        self.direct: dict[int, list[tuple[int, Pattern]]] = {}
        self.node_len: dict[int, int] = {}
        for r, ivs in self.intervals.items():
            for lo, hi in ivs:
                n = find(self.node[(r, lo)])
                self.direct.setdefault(n, []).append((r, Pattern(lo)))
                self.node_len[n] = hi - lo
        self._occ: dict[int, list[tuple[int, Pattern]] | None] = {}
        self.atoms = [k for k in self.direct if k not in self.product]

    def _uplinks(self, space: int) -> list[tuple[int, Pattern]]:
        """(containing node, pattern of ``space`` within it): products and composites."""
        ups = []
        for parent, j in self.parents.get(space, []):
            sizes = self.product[parent][1]
            inner = int(np.prod(sizes[j + 1:], dtype=np.int64))
            outer = int(np.prod(sizes[:j], dtype=np.int64))
            ups.append((parent, Pattern(0, inner, outer, sizes[j] * inner) if outer > 1
                        else Pattern(0, inner)))
        ups += [(c, Pattern(lo)) for c, lo in self.containers.get(space, [])]
        return ups

    def occurrences(self, space: int) -> list[tuple[int, Pattern]] | None:
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
