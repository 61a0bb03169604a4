"""Parameter views: which parameter axes each axis of a value covers.

A value computed from one parameter leaf by index-only primitives (a transpose, a
reshape, a cast, a squeeze, a broadcast) is a *view* of it: each of its axes covers a set
of ``(leaf, axis)`` pairs (`ParamAxes`). Group discovery (`hesso_jax.jaxpr.axes`, as
`Value.pdims`) and activation capture (`hesso_jax.jaxpr.capture`, as `Node.origin`)
follow parameters through views with the same `view_axes`; each client chooses which
primitives count as views.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["ParamAxes", "leaf_axes", "reshape_groups", "view_axes"]

ParamAxes = tuple[frozenset, ...]
"""Per axis of a value, the ``(leaf, axis)`` pairs of the parameters it covers."""


def leaf_axes(leaf: int, ndim: int) -> ParamAxes:
    """The `ParamAxes` of parameter leaf ``leaf`` itself: axis ``a`` covers ``(leaf, a)``.

    Examples:
      >>> leaf_axes(3, 2)
      (frozenset({(3, 0)}), frozenset({(3, 1)}))
    """
    return tuple(frozenset({(leaf, a)}) for a in range(ndim))


def reshape_groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pairs of axis lists with equal products (size-1 axes skipped); [] if none exist.

    Examples:
      >>> reshape_groups((2, 3, 4), (6, 1, 4))
      [([0, 1], [0]), ([2], [2])]
      >>> reshape_groups((6,), (4, 3))
      []
    """
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


def view_axes(eqn: Any, src: ParamAxes, src_shape: Sequence[int],
              out_shape: Sequence[int], *, split: bool = True) -> ParamAxes | None:
    """The `ParamAxes` of the output of view primitive ``eqn`` applied to ``src``.

    ``reshape``: each output axis covers its reshape group's input axes (size-1 axes
    cover nothing); ``transpose`` permutes; ``broadcast_in_dim`` maps the operand's axes
    (new axes cover nothing); ``squeeze`` drops; any other primitive of the same rank
    keeps the axes in place (casts, copies, slices), else nothing is covered.

    Args:
      eqn: the equation (its primitive name and params are read).
      src: the operand's `ParamAxes`.
      src_shape: the operand's shape.
      out_shape: the output's shape.
      split: whether a reshape may split an axis into several (or mix axes); if False
        such a reshape (and one with no axis correspondence) is not a view: None.

    Returns:
      The output's `ParamAxes`, or None (only with ``split=False``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> eqn = jax.make_jaxpr(lambda w: w.T)(jnp.ones((2, 3))).jaxpr.eqns[0]
      >>> view_axes(eqn, leaf_axes(0, 2), (2, 3), (3, 2))
      (frozenset({(0, 1)}), frozenset({(0, 0)}))
      >>> eqn = jax.make_jaxpr(lambda w: w.reshape(3, 2))(jnp.ones(6)).jaxpr.eqns[0]
      >>> view_axes(eqn, leaf_axes(0, 1), (6,), (3, 2), split=False) is None
      True
    """
    name, p = eqn.primitive.name, eqn.params
    out: list[frozenset] = [frozenset()] * len(out_shape)
    if name == "reshape":
        groups = reshape_groups(src_shape, out_shape)
        if not split and (any(len(go) > 1 for _gi, go in groups) or (
                not groups and any(n != 1 for n in (*src_shape, *out_shape)))):
            return None
        for ins, outs in groups:
            pairs = frozenset().union(*(src[i] for i in ins))
            for o in outs:
                out[o] = pairs
    elif name == "transpose":
        out = [src[i] for i in p["permutation"]]
    elif name == "broadcast_in_dim":
        for i, o in enumerate(p["broadcast_dimensions"]):
            out[o] = src[i]
    elif name == "squeeze":
        dropped = {d % len(src_shape) for d in p["dimensions"]}
        out = [s for i, s in enumerate(src) if i not in dropped]
    elif len(out_shape) == len(src_shape):
        out = list(src)
    return tuple(out)
