"""Convolutions in the layout XLA:CPU runs fast: a jaxpr rewrite to channels-last.

JAX differentiates ``conv_general_dilated`` into more convolutions whose *dimension
numbers* are permutations of the forward ones: the input gradient convolves with the
kernel in ``O, I`` order swapped (``dim_labels=b01f_01oi->b01f``), the kernel gradient
treats the input's channels as the batch (``f01b_i01o->01bf``). At the top level of a
program XLA:CPU canonicalises such convolutions to ``b01f_01io->b01f`` (batch, spatial,
feature / spatial, in, out) and runs them on its Eigen kernels. Inside ``lax.cond`` /
``lax.while_loop`` / ``lax.fori_loop`` bodies — where HESSO-CRIC computes its trial
gradients — they keep their layout and are compiled by the generic loop emitter (their
HLO carries an ``outer_dimension_partitions`` config, the canonical ones do not): the
digits CNN's gradient is 27–41× slower in a ``while_loop`` body than at the top level
(1.1× after this rewrite), and a CRIC period start 607× an ordinary step instead of 9×
(``benchmarks/cric_cost.py``).

`canonical_convs` fixes this for any function: it traces ``fn`` to a jaxpr and evaluates
it with every convolution written as

``conv(lhs, rhs) = Tₒ⁻¹( conv_c( T_l(lhs), T_r(rhs) ) )``

where ``T_l`` transposes the input to ``N, spatial…, C`` (its ``lhs_spec`` order), ``T_r``
the kernel to ``spatial…, I, O``, ``conv_c`` is the same convolution (same window strides,
padding, lhs/rhs dilation, ``feature_group_count``, ``batch_group_count``, precision) with
the canonical dimension numbers, and ``Tₒ⁻¹`` puts the output back in the original
``out_spec`` order. Strides, padding, dilations and group counts index *spatial
dimension i* and *the* feature/batch dimension, not array axes, so the two sides are the
same function exactly (an explicit transpose is a copy, not arithmetic): values agree bit
for bit on XLA:CPU in the tests. XLA keeps explicit transposes (it folds transposes into
dots, not into convolutions on CPU), so every convolution of the rewritten program is
canonical wherever it is.

The rewrite recurses into call-like primitives (inlined by `Interpreter`) and into the
bodies of ``cond``, ``while`` and ``scan`` (rebuilt with ``lax.switch`` /
``lax.while_loop`` / ``lax.scan``); other primitives are bound as they are. A function
without a non-canonical convolution is called unchanged. Apply it to the function that
is *run* (e.g. ``jax.value_and_grad(loss)``), since the point is the layout of the
gradient convolutions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from hesso_jax.jaxpr.interpreter import Interpreter, Rule, inner_jaxpr, make_closed_jaxpr

__all__ = ["CONV", "canonical_conv", "canonical_convs", "canonical_dimension_numbers",
           "conv_dimension_numbers", "is_canonical"]

CONV = "conv_general_dilated"
"""The JAX primitive rewritten."""


def canonical_dimension_numbers(num_spatial: int) -> lax.ConvDimensionNumbers:
    """Channels-last dimension numbers: ``N, spatial…, C`` / ``spatial…, I, O`` / same as lhs.

    Example:
      >>> canonical_dimension_numbers(2)  # NHWC, HWIO -> NHWC
      ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
    """
    if isinstance(num_spatial, bool) or not isinstance(num_spatial, int | np.integer) \
            or num_spatial < 0:
        raise ValueError(f"num_spatial must be an int >= 0, got {num_spatial!r}")
    n = int(num_spatial)
    act = (0, n + 1, *range(1, n + 1))
    return lax.ConvDimensionNumbers(act, (n + 1, n, *range(n)), act)


def is_canonical(dimension_numbers: lax.ConvDimensionNumbers) -> bool:
    """Whether a convolution's dimension numbers are already `canonical_dimension_numbers`.

    Example:
      >>> from jax import lax
      >>> dn = lax.conv_dimension_numbers((1, 8, 8, 3), (3, 3, 3, 4), ("NHWC", "HWIO", "NHWC"))
      >>> is_canonical(dn), is_canonical(lax.conv_dimension_numbers(
      ...     (1, 3, 8, 8), (4, 3, 3, 3), ("NCHW", "OIHW", "NCHW")))
      (True, False)
    """
    return tuple(dimension_numbers) == tuple(
        canonical_dimension_numbers(len(dimension_numbers.lhs_spec) - 2))


def _orders(dn: lax.ConvDimensionNumbers) -> tuple[tuple[int, ...], ...]:
    """Array axes of lhs, rhs and out in canonical order (canonical axis i = axis c[i])."""
    lhs, rhs, out = dn
    return ((lhs[0], *lhs[2:], lhs[1]), (*rhs[2:], rhs[1], rhs[0]),
            (out[0], *out[2:], out[1]))


def _transpose(x: jax.Array, perm: tuple[int, ...]) -> jax.Array:
    return x if perm == tuple(range(len(perm))) else jnp.transpose(x, perm)


def canonical_conv(lhs: jax.Array, rhs: jax.Array, **params: Any) -> jax.Array:
    """``conv_general_dilated_p.bind(lhs, rhs, **params)`` computed in canonical layout.

    ``params`` are the primitive's (an equation's ``params``: ``window_strides``,
    ``padding``, ``lhs_dilation``, ``rhs_dilation``, ``dimension_numbers``,
    ``feature_group_count``, ``batch_group_count``, ``precision``,
    ``preferred_element_type``). The operands are transposed to channels-last, the
    convolution runs with `canonical_dimension_numbers` and the result is transposed back:
    the same values (see the module docstring).

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax import lax
      >>> x, k = jnp.ones((2, 3, 8, 8)), jnp.ones((4, 3, 3, 3))    # NCHW, OIHW
      >>> eqn = jax.make_jaxpr(lambda x, k: lax.conv_general_dilated(
      ...     x, k, (2, 2), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")))(x, k).eqns[0]
      >>> y = canonical_conv(x, k, **eqn.params)
      >>> y.shape, bool(np.array_equal(y, eqn.primitive.bind(x, k, **eqn.params)))
      ((2, 4, 4, 4), True)
    """
    dn = params.get("dimension_numbers")
    if not isinstance(dn, lax.ConvDimensionNumbers):
        raise TypeError("canonical_conv needs the primitive's dimension_numbers "
                        f"(a lax.ConvDimensionNumbers), got {dn!r}")
    if is_canonical(dn):
        return lax.conv_general_dilated_p.bind(lhs, rhs, **params)
    cl, cr, co = _orders(dn)
    canon = canonical_dimension_numbers(len(cl) - 2)
    out = lax.conv_general_dilated_p.bind(_transpose(lhs, cl), _transpose(rhs, cr),
                                          **{**params, "dimension_numbers": canon})
    return _transpose(out, tuple(int(i) for i in np.argsort(co)))


# ------------------------------------------------------------------ the evaluator
class _Rewriter(Interpreter):
    """Evaluates a jaxpr on JAX values, binding every equation, convolutions canonical."""

    rules: dict[str, Rule] = {}

    def literal(self, value: Any, aval: Any) -> Any:
        """The literal's value."""
        return value

    def const(self, value: Any) -> Any:
        """The constant's value."""
        return value

    def fallback(self, eqn: Any, invals: list[Any]) -> Any:
        """Binds the equation unchanged (it holds no convolution to rewrite)."""
        return eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))


def _run(closed: Any, args: Any) -> list[Any]:
    return _Rewriter().run_closed(closed, list(args))


def _conv_rule(interp: Interpreter, eqn: Any, invals: list[Any]) -> Any:
    return canonical_conv(*invals, **eqn.params)


def _cond_rule(interp: Interpreter, eqn: Any, invals: list[Any]) -> list[Any]:
    """``cond``: ``lax.switch`` over the rewritten branches (index first)."""
    index, *ops = invals
    branches = [functools.partial(_run, br) for br in eqn.params["branches"]]
    return list(lax.switch(index, [lambda *a, f=f: f(a) for f in branches], *ops))


def _while_rule(interp: Interpreter, eqn: Any, invals: list[Any]) -> list[Any]:
    """``while``: ``lax.while_loop`` with rewritten cond and body (consts closed over)."""
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:nc], invals[nc:nc + nb], invals[nc + nb:]
    out = lax.while_loop(lambda c: _run(p["cond_jaxpr"], [*cconsts, *c])[0],
                         lambda c: _run(p["body_jaxpr"], [*bconsts, *c]), list(init))
    return list(out)


def _scan_rule(interp: Interpreter, eqn: Any, invals: list[Any]) -> list[Any]:
    """``scan``: ``lax.scan`` of the rewritten body over the same carry and slices."""
    p = eqn.params
    consts = invals[:p["num_consts"]]
    carry = invals[p["num_consts"]:p["num_consts"] + p["num_carry"]]
    xs = invals[p["num_consts"] + p["num_carry"]:]

    def body(c: list[Any], x: list[Any]) -> tuple[list[Any], list[Any]]:
        out = _run(p["jaxpr"], [*consts, *c, *x])
        return out[:p["num_carry"]], out[p["num_carry"]:]

    carry, ys = lax.scan(body, list(carry), list(xs), length=p["length"],
                         reverse=p["reverse"], unroll=p["unroll"])
    return [*carry, *ys]


_Rewriter.rules = {CONV: _conv_rule, "cond": _cond_rule, "while": _while_rule,
                   "scan": _scan_rule}


# ------------------------------------------------------------------ inspection
def _sub_jaxprs(eqn: Any) -> Iterator[Any]:
    inner = inner_jaxpr(eqn)
    if inner is not None:
        yield inner
    for value in eqn.params.values():
        items = value if isinstance(value, tuple | list) else (value,)
        for item in items:
            if isinstance(item, jcore.ClosedJaxpr | jcore.Jaxpr) and item is not inner:
                yield item


def conv_dimension_numbers(closed: Any) -> list[lax.ConvDimensionNumbers]:
    """Dimension numbers of every convolution in a jaxpr, nested jaxprs included.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax import lax
      >>> f = lambda x, k: jnp.sum(lax.conv_general_dilated(
      ...     x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
      >>> x, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
      >>> closed = jax.make_jaxpr(jax.grad(f, argnums=1))(x, k)
      >>> [is_canonical(dn) for dn in conv_dimension_numbers(closed)]  # forward, kernel grad
      [True, False]
    """
    found: list[lax.ConvDimensionNumbers] = []
    for eqn in make_closed_jaxpr(closed).jaxpr.eqns:
        if eqn.primitive.name == CONV:
            found.append(eqn.params["dimension_numbers"])
        for sub in _sub_jaxprs(eqn):
            found.extend(conv_dimension_numbers(sub))
    return found


def canonical_convs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with every convolution computed in channels-last layout (same values).

    Traces ``fn(*args)`` (pytrees of arrays) with ``jax.make_jaxpr`` on each call; when
    its jaxpr holds a convolution whose dimension numbers are not canonical (anywhere,
    nested bodies included), evaluates it with `canonical_conv` in their place, else
    calls ``fn`` itself. Jittable; meant for the function that is run, such as
    ``jax.value_and_grad(loss)`` inside a loop body.

    Args:
      fn: a function of arrays (pytrees of arrays) returning a pytree of arrays.

    Returns:
      A function with ``fn``'s signature and results.

    Raises:
      TypeError: if ``fn`` is not callable.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax import lax
      >>> def loss(k, x):
      ...     y = lax.conv_general_dilated(x, k, (2, 2), ((1, 0), (0, 1)), rhs_dilation=(2, 1),
      ...                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
      ...     return jnp.sum(jnp.tanh(y))
      >>> k, x = jnp.ones((3, 3, 2, 4)) / 9, jnp.ones((2, 9, 9, 2))
      >>> grad = canonical_convs(jax.grad(loss))
      >>> bool(np.allclose(grad(k, x), jax.grad(loss)(k, x), atol=1e-6))
      True
      >>> closed = jax.make_jaxpr(grad)(k, x)
      >>> all(is_canonical(dn) for dn in conv_dimension_numbers(closed))
      True
    """
    if not callable(fn):
        raise TypeError(f"canonical_convs needs a callable, got {type(fn).__name__}")

    @functools.wraps(fn)
    def wrapped(*args: Any) -> Any:
        flat, tree = jax.tree.flatten(args)
        closed, shape = jax.make_jaxpr(lambda *xs: fn(*jax.tree.unflatten(tree, xs)),
                                       return_shape=True)(*flat)
        if all(is_canonical(dn) for dn in conv_dimension_numbers(closed)):
            return fn(*args)
        return jax.tree.unflatten(jax.tree.structure(shape), _run(closed, flat))

    return wrapped
