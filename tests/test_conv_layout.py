"""The convolution layout rewrite: same values and gradients, every convolution canonical.

`hesso_jax.jaxpr.conv_layout.canonical_convs` must equal the original function (value and
gradients w.r.t. input and kernel) for strided, padded, dilated and grouped convolutions in
any layout, including inside ``while``/``cond``/``scan`` bodies, and leave no convolution
in a non-canonical layout anywhere in the rewritten program.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from hesso_jax.jaxpr.conv_layout import (
    canonical_conv,
    canonical_convs,
    canonical_dimension_numbers,
    conv_dimension_numbers,
    is_canonical,
)

LAYOUTS = {  # spec strings and the permutation from (N, C, spatial…) / (O, I, spatial…)
    "NHWC": (("NHWC", "HWIO", "NHWC"), (0, 2, 3, 1), (2, 3, 1, 0)),
    "NCHW": (("NCHW", "OIHW", "NCHW"), (0, 1, 2, 3), (0, 1, 2, 3)),
    "CHWN": (("CHWN", "IOHW", "NHWC"), (1, 2, 3, 0), (1, 0, 2, 3)),
}


def make_loss(layout: str, strides, padding, lhs_dil, rhs_dil, groups, batch_groups=1):
    """``(x, k) -> Σ w·tanh(conv(x, k))``: a scalar with non-trivial gradients."""
    specs = LAYOUTS[layout][0]

    def loss(x, k):
        y = lax.conv_general_dilated(x, k, strides, padding, lhs_dilation=lhs_dil,
                                     rhs_dilation=rhs_dil, dimension_numbers=specs,
                                     feature_group_count=groups,
                                     batch_group_count=batch_groups)
        w = jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape))
        return jnp.sum(w * jnp.tanh(y))

    return loss


def operands(layout: str, n: int, c: int, o: int, hw: tuple, khw: tuple, groups: int):
    """Random input/kernel in (N, C, H, W) / (O, I, kh, kw) order, permuted to ``layout``."""
    _, xp, kp = LAYOUTS[layout]
    kx, kk = jax.random.split(jax.random.key(n * 7 + c))
    x = jax.random.normal(kx, (n, c, *hw))
    k = jax.random.normal(kk, (o, c // groups, *khw)) / 3
    return jnp.transpose(x, xp), jnp.transpose(k, kp)


def check_same(loss, x, k):
    """Value and both gradients equal; every conv of the rewritten gradient canonical."""
    vg = jax.value_and_grad(loss, argnums=(0, 1))
    rewritten = canonical_convs(vg)
    (v0, (gx0, gk0)), (v1, (gx1, gk1)) = jax.jit(vg)(x, k), jax.jit(rewritten)(x, k)
    np.testing.assert_allclose(v1, v0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx1, gx0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gk1, gk0, rtol=1e-4, atol=1e-5)
    assert not all(map(is_canonical, conv_dimension_numbers(jax.make_jaxpr(vg)(x, k))))
    dns = conv_dimension_numbers(jax.make_jaxpr(rewritten)(x, k))
    assert len(dns) >= 3 and all(map(is_canonical, dns))  # forward + two gradients


CASES = {
    "strided SAME": ("NHWC", (2, 2), "SAME", (1, 1), (1, 1), 1),
    "stride 3, asymmetric pad": ("NHWC", (3, 2), ((2, 0), (1, 3)), (1, 1), (1, 1), 1),
    "VALID, rhs dilation": ("NHWC", (1, 1), "VALID", (1, 1), (2, 3), 1),
    "lhs dilation (transposed conv)": ("NHWC", (1, 1), ((1, 1), (2, 1)), (2, 2), (1, 1), 1),
    "grouped, strided": ("NHWC", (2, 1), "SAME", (1, 1), (1, 1), 2),
    "depthwise, dilated": ("NHWC", (1, 2), ((2, 2), (1, 1)), (1, 1), (2, 2), 4),
    "NCHW strided grouped": ("NCHW", (2, 2), ((1, 0), (0, 1)), (1, 1), (1, 2), 2),
    "CHWN in, NHWC out": ("CHWN", (2, 1), "SAME", (1, 1), (1, 1), 1),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_rewrite_equals_original_value_and_gradients(case):
    layout, strides, padding, lhs_dil, rhs_dil, groups = CASES[case]
    x, k = operands(layout, 2, 4, 8, (9, 7), (3, 2), groups)
    check_same(make_loss(layout, strides, padding, lhs_dil, rhs_dil, groups), x, k)


@settings(max_examples=4, deadline=None)
@given(layout=st.sampled_from(sorted(LAYOUTS)), s=st.tuples(*[st.integers(1, 3)] * 2),
       pad=st.tuples(*[st.integers(0, 2)] * 4), d=st.tuples(*[st.integers(1, 2)] * 2),
       ld=st.tuples(*[st.integers(1, 2)] * 2), groups=st.sampled_from([1, 2, 4]))
def test_rewrite_equals_original_property(layout, s, pad, d, ld, groups):
    x, k = operands(layout, 2, 4, 4, (7, 6), (2, 3), groups)
    padding = ((pad[0], pad[1]), (pad[2], pad[3]))
    check_same(make_loss(layout, s, padding, ld, d, groups), x, k)


def test_batch_group_count_is_rewritten_exactly():
    x, k = operands("NHWC", 4, 3, 6, (6, 6), (3, 3), 1)
    check_same(make_loss("NHWC", (1, 1), "SAME", (1, 1), (1, 1), 1, batch_groups=2), x, k)


def grad_step(loss, x):
    def step(k):
        return k - 0.1 * jax.grad(loss, argnums=1)(x, k)
    return step


@pytest.mark.parametrize("flow", ["fori", "while", "cond", "scan"])
def test_rewrite_reaches_control_flow_bodies(flow):
    """Gradient convolutions inside loop/cond bodies (where XLA:CPU is slow) are rewritten."""
    x, k0 = operands("NHWC", 2, 4, 4, (8, 8), (3, 3), 1)
    step = grad_step(make_loss("NHWC", (2, 2), "SAME", (1, 1), (1, 1), 1), x)

    def run(k):
        if flow == "fori":
            return lax.fori_loop(0, 3, lambda i, c: step(c), k)
        if flow == "while":
            return lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, step(c[1])),
                                  (0, k))[1]
        if flow == "cond":
            return lax.cond(jnp.sum(k) > -1e9, step, lambda c: c, k)
        return lax.scan(lambda c, _: (step(c), jnp.sum(c)), k, None, length=3)

    rewritten = jax.jit(canonical_convs(run))
    for a, b in zip(jax.tree.leaves(rewritten(k0)), jax.tree.leaves(jax.jit(run)(k0)),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    dns = conv_dimension_numbers(jax.make_jaxpr(canonical_convs(run))(k0))
    assert dns and all(map(is_canonical, dns))
    assert not all(map(is_canonical, conv_dimension_numbers(jax.make_jaxpr(run)(k0))))


def test_closed_over_tracers_and_jit():
    x, k = operands("NHWC", 2, 4, 4, (6, 6), (3, 3), 1)
    loss = make_loss("NHWC", (2, 2), "SAME", (1, 1), (1, 1), 1)

    @jax.jit
    def outer(x, k):  # the rewritten function closes over x, a tracer of this jit
        return canonical_convs(lambda kk: jax.grad(loss, argnums=1)(x, kk))(k)

    np.testing.assert_allclose(outer(x, k), jax.grad(loss, argnums=1)(x, k),
                               rtol=1e-5, atol=1e-6)


def test_function_without_convolutions_is_called_unchanged():
    calls = []

    def f(a, b):
        calls.append(1)
        return {"s": a @ b}

    out = canonical_convs(f)(jnp.ones((2, 3)), jnp.ones((3, 4)))
    assert out["s"].shape == (2, 4) and len(calls) == 2  # traced once, then called


def test_canonical_conv_is_identity_on_canonical_layout():
    x, k = operands("NHWC", 1, 2, 3, (5, 5), (3, 3), 1)
    eqn = jax.make_jaxpr(lambda x, k: lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=LAYOUTS["NHWC"][0]))(x, k).eqns[0]
    assert is_canonical(eqn.params["dimension_numbers"])
    closed = jax.make_jaxpr(lambda x, k: canonical_conv(x, k, **eqn.params))(x, k)
    assert [e.primitive.name for e in closed.eqns] == ["conv_general_dilated"]


def test_one_and_three_spatial_dimensions():
    for n in (1, 3):
        dn = canonical_dimension_numbers(n)
        x = jax.random.normal(jax.random.key(n), (2, *[5] * n, 4))
        k = jax.random.normal(jax.random.key(n + 1), (*[2] * n, 4, 3))
        specs = lax.conv_dimension_numbers(x.shape, k.shape, dn)

        def loss(x, k, specs=specs, n=n):
            return jnp.sum(jnp.sin(lax.conv_general_dilated(
                x, k, (2,) * n, "SAME", dimension_numbers=specs)))

        check_same(loss, x, k)


def test_bad_input_raises_clear_errors():
    with pytest.raises(TypeError, match="callable"):
        canonical_convs(3)
    with pytest.raises(ValueError, match="num_spatial"):
        canonical_dimension_numbers(-1)
    with pytest.raises(TypeError, match="dimension_numbers"):
        canonical_conv(jnp.ones((1, 3, 3, 1)), jnp.ones((1, 1, 1, 1)))
