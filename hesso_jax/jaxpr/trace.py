"""Tracing a model call for the static analyses: arrays are inputs, everything else static.

Discovery (`hesso_jax.discover_groups`), the cost model (`hesso_jax.group_costs`) and the
structure fingerprint (`hesso_jax.groups.structure_fingerprint`) all trace
``fn(state, *args, **kwargs)`` the same way: the leaves of ``(args, kwargs)`` that are
arrays (``jax.Array``, NumPy arrays and scalars, ``jax.ShapeDtypeStruct``) become jaxpr
inputs after ``state``'s leaves; every other leaf (a Python bool, int, string, ``None``)
is a constant of the trace, as ``jax.jit``'s static arguments are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = ["is_array", "trace_call"]


def is_array(x: Any) -> bool:
    """True for the leaves `trace_call` makes jaxpr inputs (arrays and their shapes)."""
    return isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct | np.generic)


def trace_call(fn: Callable[..., Any], state: Any, args: tuple, kwargs: dict) -> Any:
    """The closed jaxpr of ``fn(state, *args, **kwargs)``, non-array leaves static.

    Its inputs are ``state``'s leaves, then the array leaves of ``(args, kwargs)`` in
    flattening order.

    Example:
      >>> import jax.numpy as jnp
      >>> from hesso_jax.jaxpr.trace import trace_call
      >>> fn = lambda p, x, scale=1.0: p["w"] * x * scale
      >>> closed = trace_call(fn, {"w": jnp.ones(3)}, (jnp.ones(3),), {"scale": 2.0})
      >>> len(closed.jaxpr.invars)  # w and x; scale is a constant of the trace
      2
    """
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    dynamic = [i for i, x in enumerate(leaves) if is_array(x)]

    def flat_fn(st: Any, *dyn: Any) -> Any:
        full = list(leaves)
        for i, x in zip(dynamic, dyn, strict=True):
            full[i] = x
        a, k = jax.tree_util.tree_unflatten(treedef, full)
        return fn(st, *a, **k)

    return jax.make_jaxpr(flat_fn)(state, *[leaves[i] for i in dynamic])
