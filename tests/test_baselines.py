"""Tests of the one-shot baselines (`hesso_jax.baselines`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hesso_jax import GroupFamily, Groups, Member
from hesso_jax.baselines import group_scores, keep_pruned, one_shot_prune


def _setup(seed):
    ks = jax.random.split(jax.random.key(seed), 3)
    params = {"w1": jax.random.normal(ks[0], (5, 9)), "b1": jax.random.normal(ks[1], (9,)),
              "w2": jax.random.normal(ks[2], (9, 3))}
    groups = Groups.from_families([GroupFamily(
        9, (Member(("w1",), 1), Member(("b1",), 0)), (Member(("w2",), 0),))])
    return params, groups


def _loss(p, x):
    return jnp.sum((jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]) ** 2)


@settings(max_examples=10)
@given(seed=st.integers(0, 1000), k=st.integers(1, 8), taylor=st.booleans())
def test_exactly_k_lowest_groups_zeroed(seed, k, taylor):
    params, groups = _setup(seed)
    x = jax.random.normal(jax.random.key(seed + 1), (4, 5))
    grads = [jax.grad(_loss)(params, x)] if taylor else []
    pruned, keep = one_shot_prune(params, groups, k, "taylor" if taylor else "magnitude",
                                  grads)
    assert int((~keep).sum()) == k
    np.testing.assert_array_equal(groups.zero_groups(pruned), ~keep)
    # numpy oracle of the scores
    w1, b1 = np.asarray(params["w1"]), np.asarray(params["b1"])
    if taylor:
        g1, gb = np.asarray(grads[0]["w1"]), np.asarray(grads[0]["b1"])
        want = np.abs(w1 * g1).sum(0) + np.abs(b1 * gb)
    else:
        want = np.sqrt((w1 ** 2).sum(0) + b1 ** 2)
    got = np.asarray(group_scores(groups, params, "taylor" if taylor else "magnitude", grads))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert set(np.flatnonzero(~keep)) == set(np.argsort(want, kind="stable")[:k])
    # dependents are untouched until surgery
    np.testing.assert_array_equal(pruned["w2"], params["w2"])


def test_keep_pruned_holds_zeros_while_fine_tuning():
    params, groups = _setup(0)
    x = jax.random.normal(jax.random.key(1), (4, 5))
    pruned, keep = one_shot_prune(params, groups, 0.5)
    tx = optax.chain(optax.adam(1e-2), keep_pruned(groups, keep))
    state = tx.init(pruned)
    p = pruned
    for _ in range(5):
        updates, state = tx.update(jax.grad(_loss)(p, x), state, p)
        p = optax.apply_updates(p, updates)
    np.testing.assert_array_equal(groups.zero_groups(p), ~keep)
    assert not np.allclose(p["w1"][:, keep], pruned["w1"][:, keep])


def test_bad_arguments():
    params, groups = _setup(0)
    with pytest.raises(ValueError, match="criterion"):
        group_scores(groups, params, "random")
    with pytest.raises(ValueError, match="gradient"):
        group_scores(groups, params, "taylor")
    with pytest.raises(ValueError, match="smaller than the number of groups"):
        one_shot_prune(params, groups, 9)
    with pytest.raises(ValueError, match="expected"):
        keep_pruned(groups, np.ones(3, bool))
