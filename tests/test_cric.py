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
