"""Per-family floor (``min_keep``): no family loses more than ``n_f − m_f`` groups."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hesso_jax as hj
from hesso_jax.baselines import one_shot_prune
from hesso_jax.groups import resolve_min_keep
from hesso_jax.projection import FamilyFloor

D_IN, H1, H2, D_OUT = 5, 8, 6, 3


def families(sizes):
    """Groups of independent families (one vector leaf each): sizes only matter here."""
    return hj.Groups.from_families([
        hj.GroupFamily(n, (hj.Member((f"f{i}",), 0),), name=f"f{i}")
        for i, n in enumerate(sizes)])


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_protected_are_the_top_alive_of_each_family(data):
    sizes = data.draw(st.lists(st.integers(1, 7), min_size=1, max_size=5))
    groups = families(sizes)
    G = groups.num_groups
    m = data.draw(st.one_of(st.integers(0, 8), st.floats(0.05, 0.95)))
    floors = resolve_min_keep(m, groups)
    floor = FamilyFloor.build(groups, m)
    scores = np.asarray(data.draw(st.lists(
        st.sampled_from([0.0, 1.0, 2.0, -3.0, 0.5, np.nan]), min_size=G, max_size=G)),
        np.float32)
    alive = np.asarray(data.draw(st.lists(st.booleans(), min_size=G, max_size=G)))
    if floor is None:
        assert not floors.any()
        return
    got = np.asarray(floor.protected(jnp.asarray(scores), jnp.asarray(alive)))
    clean = np.where(np.isnan(scores), np.inf, scores)
    for f, start in enumerate(groups.starts):
        idx = np.arange(start, start + sizes[f])
        live = idx[alive[idx]]
        # The m_f alive groups with the highest scores (ties → lower index) are protected.
        want = sorted(live, key=lambda i: (-clean[i], i))[:floors[f]]
        assert set(np.flatnonzero(got[idx]) + start) == set(want)
    assert not (got & ~alive).any()


def test_resolve_min_keep_counts_fractions_and_errors():
    groups = families([10, 3, 1])
    np.testing.assert_array_equal(resolve_min_keep(2, groups), [2, 2, 1])
    np.testing.assert_array_equal(resolve_min_keep(0.25, groups), [3, 1, 1])
    np.testing.assert_array_equal(resolve_min_keep(0, groups), [0, 0, 0])
    assert resolve_min_keep(2, groups, k=9).sum() == 5  # 14 − 5 = 9 groups left to prune
    with pytest.raises(ValueError, match="K=10 .* min_keep=2.* at most 9"):
        resolve_min_keep(2, groups, k=10)
    with pytest.raises(ValueError, match="min_keep must be >= 0"):
        resolve_min_keep(-1, groups)
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\)"):
        resolve_min_keep(1.5, groups)
    with pytest.raises(TypeError, match="min_keep must be an int count"):
        resolve_min_keep("1", groups)
    with pytest.raises(ValueError, match="at most 9"):
        hj.hesso(groups, 10, 2, 3, min_keep=2)  # before any tracing


# Two hidden layers; the second is scaled down so that its groups are the least salient.
def make_params(scale2=1e-3):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {"l1": {"kernel": jax.random.normal(k1, (D_IN, H1)), "bias": jnp.full((H1,), 0.1)},
            "l2": {"kernel": scale2 * jax.random.normal(k2, (H1, H2)),
                   "bias": jnp.full((H2,), 1e-3)},
            "l3": {"kernel": jax.random.normal(k3, (H2, D_OUT)), "bias": jnp.zeros((D_OUT,))}}


def mlp_groups():
    return hj.Groups.from_families([
        hj.GroupFamily(H1, (hj.Member(("l1", "kernel"), 1), hj.Member(("l1", "bias"), 0)),
                       (hj.Member(("l2", "kernel"), 0),), name="h1"),
        hj.GroupFamily(H2, (hj.Member(("l2", "kernel"), 1), hj.Member(("l2", "bias"), 0)),
                       (hj.Member(("l3", "kernel"), 0),), name="h2")])


X = jax.random.normal(jax.random.key(1), (32, D_IN))
Y = jax.random.normal(jax.random.key(2), (32, D_OUT))


def loss_fn(p):
    h = jax.nn.relu(X @ p["l1"]["kernel"] + p["l1"]["bias"])
    h = jax.nn.relu(h @ p["l2"]["kernel"] + p["l2"]["bias"])
    return jnp.mean((h @ p["l3"]["kernel"] + p["l3"]["bias"] - Y) ** 2)


def train(tx, params, steps):
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params, value_fn=loss_fn)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize("cric", [None, hj.CricConfig(sample_steps=2, learning_rate=0.01)])
def test_hesso_floor_keeps_every_family_alive(cric):
    groups, params = mlp_groups(), make_params()
    K, P, Tp = 9, 3, 2
    kw = dict(saliency="magnitude", cric=cric)
    if cric is None:
        # Without a floor the tiny second layer goes first: all 6 of its groups are pruned.
        plain, _ = train(optax.chain(optax.sgd(1e-3), hj.hesso(groups, K, P, Tp, **kw)),
                         params, P * Tp + 1)
        zero = groups.zero_groups(plain)
        assert zero.sum() == K and zero[H1:].all()
    # With min_keep=2 exactly K are still pruned, and h2 keeps 2 groups (its floor).
    floored, state = train(optax.chain(optax.sgd(1e-3),
                                       hj.hesso(groups, K, P, Tp, min_keep=2, **kw)),
                           params, P * Tp + 1)
    zero = groups.zero_groups(floored)
    status = hj.hesso_status(state)
    assert zero.sum() == K == status.pruned.sum()
    np.testing.assert_array_equal(zero, status.pruned)
    assert (~zero[:H1]).sum() >= 2 and (~zero[H1:]).sum() == 2


def test_floor_that_never_binds_changes_nothing():
    groups, params = mlp_groups(), make_params(scale2=1.0)
    tx = lambda **kw: optax.chain(optax.sgd(1e-3), hj.hesso(groups, 4, 2, 2, **kw))  # noqa: E731
    a, _ = train(tx(), params, 5)
    b, _ = train(tx(min_keep=1), params, 5)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                    strict=True))


def test_one_shot_prune_floor():
    groups, params = mlp_groups(), make_params()
    _, keep = one_shot_prune(params, groups, 9)
    assert not keep[H1:].any()
    pruned, keep = one_shot_prune(params, groups, 9, min_keep=0.3)  # floors ⌈2.4⌉, ⌈1.8⌉
    assert (~keep).sum() == 9 and keep[:H1].sum() == 3 and keep[H1:].sum() == 2
    assert (groups.zero_groups(pruned) == ~keep).all()
    with pytest.raises(ValueError, match="one_shot_prune: K=10 .* at most 9"):
        one_shot_prune(params, groups, 10, min_keep=0.3)
