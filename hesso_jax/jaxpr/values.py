"""Abstract values of the axis domain: `Value` (one node id per axis) and `UnionFind`.

Shared by the axis tracer (`hesso_jax.jaxpr.axes`, stage 1 of group discovery), the
channel spaces (`hesso_jax.jaxpr.spaces`, stage 2) and the zero analysis
(`hesso_jax.jaxpr.zeros`, stage 3).
"""

from __future__ import annotations

import dataclasses

__all__ = ["UnionFind", "Value"]


@dataclasses.dataclass(eq=False)
class Value:
    """Abstract value: one node id per axis, plus what is known statically."""

    id: int
    shape: tuple[int, ...]
    dims: tuple[int, ...]
    literal: float | None = None  # scalar literal / constant value
    allzero: bool = False  # statically all zeros (literal 0, zero constant)
    # per axis, the (leaf, axis) pairs of the parameter this value is a view of
    pdims: tuple[frozenset, ...] | None = None
    # a constant: computed from literals and closed-over arrays only (no parameter, no
    # input). ``varying[a]``: its values may change along axis ``a`` (or its length is
    # fixed); ``sources``: indices of the closed-over arrays it is computed from
    const: bool = False
    varying: tuple[bool, ...] = ()
    sources: frozenset = frozenset()


class UnionFind:
    """Disjoint sets over integer ids."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self) -> int:
        """A new singleton set; returns its id."""
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        """Representative of ``a``'s set (with path compression)."""
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        """Joins the sets of ``a`` and ``b``."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
