"""CRIC and HESSO-CRIC: the indispensable-structure case, Corollary 3.4, jit, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import mlp_forward, mlp_groups
from hypothesis import given, settings
from hypothesis import strategies as st

import hesso_jax as hj
from hesso_jax.cric import CricConfig

D_IN, HIDDEN = 4, 8
CRITICAL = np.array([5, 6])  # small input weights, large output weights: indispensable


def teacher():
    """Hidden neurons 5 and 6 carry the whole function with small-norm input weights;
    the other six have larger input weights but zero output weights (useless)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    w1 = jax.random.normal(k1, (D_IN, HIDDEN))
    w1 = w1.at[:, CRITICAL].multiply(0.1)
    b1 = jnp.zeros((HIDDEN,)).at[CRITICAL].set(0.05)
    w2 = jnp.zeros((HIDDEN, 1)).at[CRITICAL, 0].set(10.0)
    return {"l1": {"kernel": w1, "bias": b1}, "l2": {"kernel": w2, "bias": jnp.zeros((1,))}}


def groups_of():
    return mlp_groups(HIDDEN)


forward = mlp_forward


X = jax.random.normal(jax.random.key(1), (64, D_IN))
Y = forward(teacher(), X)  # the teacher is exactly optimal: loss 0, gradient 0


def loss_fn(p):
    return jnp.mean((forward(p, X) - Y) ** 2)


def masked_loss(p, redundant):
    keep = groups_of().broadcast(jnp.asarray(~redundant, jnp.float32), p, 1.0)
    return float(loss_fn(jax.tree.map(lambda a, m: a * m, p, keep)))


def test_greedy_picks_the_indispensable_structure_and_cric_does_not():
    p, groups = teacher(), groups_of()
    res = hj.cric(loss_fn, p, groups, 2, sample_steps=5, learning_rate=0.05)
    greedy = hj.cric(loss_fn, p, groups, 2, sample_steps=5, learning_rate=0.05, max_cycles=0)
    greedy_scores = hj.saliency.weighted()(p, jax.tree.map(jnp.zeros_like, p), groups)
    # Greedy (magnitude-dominated at an optimum) ranks the small-norm critical pair lowest.
    np.testing.assert_array_equal(np.sort(np.argsort(np.asarray(greedy_scores))[:2]), CRITICAL)
    assert not np.any(np.asarray(res.redundant)[CRITICAL])
    assert int(res.redundant.sum()) == 2
    assert masked_loss(p, np.asarray(res.redundant)) < 1e-6
    assert masked_loss(p, np.isin(np.arange(HIDDEN), CRITICAL)) > 1.0
    assert int(res.cycles) >= 1
    assert int(greedy.cycles) == 0


def hesso_run(cric):
    groups = groups_of()
    tx = optax.chain(optax.sgd(1e-3), hj.hesso(groups, 2, 1, 4, cric=cric))

    @jax.jit
    def step(p, s):
        updates, s = tx.update(jax.grad(loss_fn)(p), s, p, value_fn=loss_fn)
        return optax.apply_updates(p, updates), s

    p, s = teacher(), tx.init(teacher())
    for _ in range(8):
        p, s = step(p, s)
    return p, s


def test_hesso_cric_avoids_the_collapse_greedy_hesso_suffers():
    p_greedy, s_greedy = hesso_run(None)
    p_cric, s_cric = hesso_run(CricConfig(sample_steps=5, learning_rate=0.05))
    groups = groups_of()
    assert groups.zero_groups(p_greedy).sum() == 2 and groups.zero_groups(p_cric).sum() == 2
    np.testing.assert_array_equal(np.flatnonzero(groups.zero_groups(p_greedy)), CRITICAL)
    assert not np.any(groups.zero_groups(p_cric)[CRITICAL])
    assert float(loss_fn(p_greedy)) > 1.0  # collapse: the function is gone
    assert float(loss_fn(p_cric)) < 1e-4
    assert hj.hesso_status(s_cric).cric_cycles >= 1
    assert hj.hesso_status(s_greedy).cric_cycles == 0


def test_hesso_cric_requires_value_fn():
    groups = groups_of()
    tx = hj.hesso(groups, 2, 1, 4, cric=CricConfig(sample_steps=2, learning_rate=0.1))
    p = teacher()
    with pytest.raises(ValueError, match="value_fn"):
        tx.update(p, tx.init(p), p)


def test_hesso_cric_in_nnx_optimizer():
    from hesso_jax.models import MLP

    model = MLP(4, (8,), 1, rngs=nnx.Rngs(0))
    groups = model.groups()
    tx = optax.chain(optax.adam(1e-2),
                     hj.hesso(groups, 3, 1, 2, cric=CricConfig(sample_steps=2,
                                                               learning_rate=0.05)))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef = nnx.graphdef(model)

    def value_fn(params):
        return jnp.mean((nnx.merge(graphdef, params)(X) - Y) ** 2)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean((m(X) - Y) ** 2))(model)
        optimizer.update(model, grads, value_fn=value_fn)

    for _ in range(2):
        step(model, optimizer)
    assert groups.zero_groups(nnx.state(model, nnx.Param)).sum() == 3


def test_cric_jits_and_is_deterministic():
    p, groups = teacher(), groups_of()
    run = jax.jit(lambda p: hj.cric(loss_fn, p, groups, 3, sample_steps=3, learning_rate=0.05))
    a, b = run(p), run(p)
    eager = hj.cric(loss_fn, p, groups, 3, sample_steps=3, learning_rate=0.05)
    np.testing.assert_array_equal(a.redundant, b.redundant)
    np.testing.assert_array_equal(a.redundant, eager.redundant)
    np.testing.assert_array_equal(a.violating_sizes, b.violating_sizes)
    assert int(a.redundant.sum()) == 3


def test_tolerance_and_max_cycles():
    p, groups = teacher(), groups_of()
    capped = hj.cric(loss_fn, p, groups, 2, sample_steps=5, learning_rate=0.05, max_cycles=0)
    assert int(capped.cycles) == 0
    assert capped.violating_sizes.shape == (1,)
    lenient = hj.cric(loss_fn, p, groups, 2, sample_steps=5, learning_rate=0.05, tolerance=2)
    assert int(lenient.cycles) == 0  # 2 new violators <= tolerance: stop after one trial
    assert int(lenient.violating_sizes[0]) <= 2
    full = hj.cric(loss_fn, p, groups, 2, sample_steps=5, learning_rate=0.05)
    sizes = np.asarray(full.violating_sizes)
    ran = sizes[sizes >= 0]
    assert len(ran) == int(full.cycles) + 1
    assert np.all(ran[:-1] > 0) and ran[-1] == 0  # stopped because nothing new violated


# each example compiles a new (K, tolerance, sample_steps) CRIC: keep the count small
@settings(max_examples=min(settings().max_examples, 12))
@given(K=st.integers(1, HIDDEN - 1), tol=st.integers(0, 3), seed=st.integers(0, 5),
       steps=st.integers(1, 3))
def test_corollary_3_4_cycle_bound(K, tol, seed, steps):
    groups = groups_of()
    p = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(seed), a.shape),
                     teacher())
    res = hj.cric(loss_fn, p, groups, K, sample_steps=steps, learning_rate=0.2,
                  tolerance=tol, max_cycles=10_000)
    assert int(res.cycles) <= (HIDDEN - K) / max(tol, 1)
    assert int(res.cycles) <= (HIDDEN - K) // (tol + 1)
    assert int(res.redundant.sum()) == K


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(sample_steps=0), ValueError, "sample_steps must be >= 1"),
    (dict(sample_steps=1.5), TypeError, "sample_steps must be an int"),
    (dict(learning_rate=0.0), ValueError, "learning_rate must be finite and > 0"),
    (dict(learning_rate=float("nan")), ValueError, "learning_rate must be finite"),
    (dict(tolerance=-1), ValueError, "tolerance must be >= 0"),
    (dict(max_cycles=-2), ValueError, "max_cycles must be >= 0"),
    (dict(saliency="nope"), ValueError, "unknown saliency score"),
])
def test_bad_arguments(kwargs, exc, msg):
    args = dict(sample_steps=2, learning_rate=0.1)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        hj.cric(loss_fn, teacher(), groups_of(), 2, **args)
    with pytest.raises(exc, match=msg):
        CricConfig(**args)


def test_bad_k_and_groups():
    with pytest.raises(ValueError, match="smaller than the number of groups"):
        hj.cric(loss_fn, teacher(), groups_of(), HIDDEN, sample_steps=1, learning_rate=0.1)
    with pytest.raises(TypeError, match="hesso_jax.Groups"):
        hj.cric(loss_fn, teacher(), [1], 2, sample_steps=1, learning_rate=0.1)
    with pytest.raises(TypeError, match="cric must be None or a hesso_jax.CricConfig"):
        hj.hesso(groups_of(), 2, 1, 1, cric={"sample_steps": 2})


# ---------------------------------------------------------------- cost (issue 14 item 2)
def test_cric_evaluates_gradient_count_gradients():
    """Each trial reuses the gradient at x⁰ of the greedy pick: 1 + trials·(S − 1) calls."""
    calls = []

    def counted(p):
        jax.debug.callback(lambda: calls.append(1))
        return loss_fn(p)

    p, groups = teacher(), groups_of()
    res = jax.jit(lambda p: hj.cric(counted, p, groups, 2, sample_steps=5,
                                    learning_rate=0.05))(p)
    jax.effects_barrier()
    trials = int(res.cycles) + 1
    config = CricConfig(sample_steps=5, learning_rate=0.05)
    assert trials >= 2 and len(calls) == config.gradient_count(trials) == 1 + 4 * trials
    assert not np.any(np.asarray(res.redundant)[CRITICAL])  # the same selection as before


def small_cnn_loss():
    """A strided, padded, dilated, grouped conv net on 8×8 inputs and its channel groups."""
    from jax import lax

    k = jax.random.split(jax.random.key(3), 3)
    params = {"c1": jax.random.normal(k[0], (3, 3, 2, 8)) / 3,
              "c2": jax.random.normal(k[1], (3, 3, 4, 8)) / 3,
              "head": jax.random.normal(k[2], (8, 1)) / 3}
    x = jax.random.normal(jax.random.key(4), (4, 8, 8, 2))
    y = jax.random.normal(jax.random.key(5), (4, 1))
    nhwc = ("NHWC", "HWIO", "NHWC")

    def loss(p):
        h = jax.nn.relu(lax.conv_general_dilated(x, p["c1"], (2, 2), ((1, 0), (0, 1)),
                                                 dimension_numbers=nhwc))
        h = jax.nn.relu(lax.conv_general_dilated(h, p["c2"], (1, 1), "SAME",
                                                 rhs_dilation=(2, 1), dimension_numbers=nhwc,
                                                 feature_group_count=2))
        return jnp.mean((jnp.mean(h, axis=(1, 2)) @ p["head"] - y) ** 2)

    groups = hj.Groups.from_families([hj.GroupFamily(8, (hj.Member(("c2",), 3),))])
    return loss, params, groups


def test_cric_gradients_have_no_convolution_in_a_non_canonical_layout():
    """Structure, not timing: inside CRIC's loops every convolution is channels-last (the
    layout XLA:CPU runs on its fast kernels), and the selection equals the stock one."""
    import importlib

    from hesso_jax.jaxpr.conv_layout import conv_dimension_numbers, is_canonical

    loss, params, groups = small_cnn_loss()

    def make_run():  # a fresh function per trace: jit and make_jaxpr cache by identity
        return lambda p: hj.cric(loss, p, groups, 3, sample_steps=3, learning_rate=0.5)

    dns = conv_dimension_numbers(jax.make_jaxpr(make_run())(params))
    # greedy + trial gradient: 2 forward, 2 kernel-gradient, 1 input-gradient conv each
    assert len(dns) == 2 * 5 and all(map(is_canonical, dns))
    new = jax.jit(make_run())(params)
    cric_module = importlib.import_module("hesso_jax.cric")
    saved = cric_module.canonical_convs
    cric_module.canonical_convs = lambda fn: fn
    try:
        stock_dns = conv_dimension_numbers(jax.make_jaxpr(make_run())(params))
        stock = jax.jit(make_run())(params)
    finally:
        cric_module.canonical_convs = saved
    assert len(stock_dns) == 10 and not all(map(is_canonical, stock_dns))
    np.testing.assert_array_equal(new.redundant, stock.redundant)
    np.testing.assert_array_equal(new.violating_sizes, stock.violating_sizes)
    np.testing.assert_allclose(new.scores, stock.scores, rtol=1e-5, atol=1e-6)
