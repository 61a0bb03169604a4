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
from hesso_jax.budget import Budget
from hesso_jax.costs import group_costs


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


# ------------------------------------------------------------------ budgets (issue 16)
def _digits_cnn():
    from flax import nnx

    from hesso_jax.data import load_digits_split
    from hesso_jax.models import CNN

    data = load_digits_split()
    model = CNN(rngs=nnx.Rngs(0))
    model.eval()
    return model, jnp.asarray(data.x_test[:1]), data


@pytest.mark.parametrize(("budget", "metric", "lo", "hi"), [
    (Budget(flops=0.5), "flops", 0.45, 0.52),
    (Budget(params=0.3), "params", 0.27, 0.30),
])
def test_one_shot_budget_on_digits_cnn(budget, metric, lo, hi):
    from flax import nnx

    import hesso_jax as hj
    from hesso_jax.train import count_params, forward_flops

    model, x, data = _digits_cnn()
    groups = model.groups()
    costs = group_costs(model, groups, x)
    params = nnx.state(model, nnx.Param)
    # a few Taylor gradients of the real loss, so the scores are not just init noise
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, xb, yb):
        logits = nnx.merge(graphdef, p, rest)(xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    grad = jax.jit(jax.grad(loss))
    grads = [grad(params, jnp.asarray(data.x_train[i:i + 64]),
                  jnp.asarray(data.y_train[i:i + 64])) for i in (0, 64)]
    dense_flops, dense_params = forward_flops(model, x), count_params(model)
    pruned, keep = one_shot_prune(params, groups, budget, "taylor", grads, costs=costs,
                                  min_keep=0.1)
    nnx.update(model, pruned)
    small = hj.shrink_model(model, groups, x)
    achieved = (forward_flops(small, x) / dense_flops if metric == "flops"
                else count_params(small) / dense_params)
    print(f"{budget}: achieved {metric} fraction (XLA / count) {achieved:.4f}")
    assert lo <= achieved <= hi, achieved
    predicted = dict(zip(("params", "flops"), costs.kept_fraction(~keep), strict=True))
    assert budget.items()[0][1] - 0.03 <= predicted[metric] <= budget.items()[0][1]
    if metric == "params":  # parameters are counted exactly
        assert count_params(small) == costs.dense_params - costs.removed(~keep)[0]


def test_one_shot_budget_needs_costs_and_a_reachable_target():
    params, groups = _setup(0)
    fn = (lambda p, x: jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"])  # noqa: E731
    costs = group_costs(fn, params, groups, jnp.ones((4, 5)))
    with pytest.raises(ValueError, match="costs="):
        one_shot_prune(params, groups, Budget(flops=0.5))
    with pytest.raises(ValueError, match="smallest reachable flops fraction"):
        one_shot_prune(params, groups, Budget(flops=0.2), costs=costs, min_keep=4)
    pruned, keep = one_shot_prune(params, groups, Budget(flops=0.5), costs=costs)
    # 2·4·(5·9 + 9·3) FLOPs, 2·4·8 per neuron: 0.5 needs 5 of the 9 neurons
    assert int((~keep).sum()) == 5
    np.testing.assert_array_equal(groups.zero_groups(pruned), ~keep)
    assert costs.kept_fraction(~keep)[1] <= 0.5
