"""HESSO / CRIC with a FLOP or parameter `Budget` (issue 16), end to end.

Short schedules: the tests assert the achieved fractions of the shrunk model (XLA's
``cost_analysis()`` FLOPs, ``nnx.Param`` counts), not accuracy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hesso_jax as hj
from hesso_jax.data import load_digits_split
from hesso_jax.models import CNN, MLP
from hesso_jax.train import count_params, forward_flops, train_classifier

X_EXAMPLE = jnp.zeros((2, 8, 8, 1), jnp.float32)


@functools.cache
def _data():
    return load_digits_split(0)


def _run(make_model, budget, *, cric=None, P=3, Tp=4, Tw=4, min_keep=0, costs=None):
    """Trains a fresh model with ``hesso(groups, budget, ...)``; returns what the tests read."""
    model = make_model()
    groups, dense_flops = _discovered(make_model)
    dense_params = count_params(model)
    tx = optax.chain(optax.adam(1e-3), hj.hesso(groups, budget, P, Tp, warmup_steps=Tw,
                                                cric=cric, min_keep=min_keep, costs=costs))
    model, opt_state, _ = train_classifier(model, tx, _data(), steps=Tw + P * Tp + 2,
                                           batch_size=32, eval_every=10_000,
                                           progress=False)
    status = hj.hesso_status(opt_state)
    small = hj.shrink_model(model, groups)
    return dict(groups=groups, status=status,
                flops=forward_flops(small, X_EXAMPLE) / dense_flops,
                params=count_params(small) / dense_params,
                predicted=groups.costs.kept_fraction(status.pruned))


def _cnn():
    return CNN(rngs=nnx.Rngs(0))


@functools.cache
def _discovered(make_model):
    """``(groups, dense forward FLOPs)`` of ``make_model()``: discovery is deterministic
    (the same program every time), so the tests of one model share it."""
    model = make_model()
    return hj.discover_groups(model, X_EXAMPLE), forward_flops(model, X_EXAMPLE)


def test_flops_budget_on_discovered_cnn_needs_nothing_else():
    out = _run(_cnn, hj.Budget(flops=0.5))
    assert 0.45 <= out["flops"] <= 0.52, out["flops"]
    assert 0.47 <= out["predicted"][1] <= 0.5  # the dot/conv FLOPs: the budget's own count
    st = out["status"]
    assert st.phase == "finetune" and st.target == -1
    assert st.budget == hj.Budget(flops=0.5)
    assert st.num_pruned > 0 and st.num_redundant == 0


def test_params_budget_on_discovered_cnn():
    out = _run(_cnn, hj.Budget(params=0.3), P=2)
    assert 0.27 <= out["params"] <= 0.30, out["params"]
    assert out["status"].budget == hj.Budget(params=0.3)


def test_flops_budget_with_cric_on_cnn():
    cric = hj.CricConfig(sample_steps=2, learning_rate=1e-3, max_cycles=1)
    out = _run(_cnn, hj.Budget(flops=0.5), cric=cric, P=2, Tp=3, Tw=2)
    assert 0.45 <= out["flops"] <= 0.52, out["flops"]
    assert out["status"].cric_cycles >= 0


def test_both_metrics_on_mlp_with_floor():
    out = _run(lambda: MLP(64, (96, 64), 10, rngs=nnx.Rngs(1)),
               hj.Budget(params=0.6, flops=0.4), P=2, min_keep=0.2)
    assert 0.37 <= out["flops"] <= 0.42, out["flops"]  # XLA adds the bias / relu work
    assert out["params"] <= 0.6 + 1e-9
    pf, ff = out["predicted"]
    assert pf <= 0.6 and 0.37 <= ff <= 0.4
    assert out["status"].budget == hj.Budget(params=0.6, flops=0.4)
    fam = out["groups"].family_index()
    alive = ~out["status"].pruned
    for f, family in enumerate(out["groups"].families):  # the 20 % floor held
        assert alive[fam == f].sum() >= np.ceil(0.2 * family.size)


def test_unreachable_or_costless_budget_raises_before_tracing():
    model = _cnn()
    groups, _ = _discovered(_cnn)
    with pytest.raises(ValueError, match="smallest reachable flops fraction"):
        hj.hesso(groups, hj.Budget(flops=0.05), 2, 2, min_keep=0.5)
    with pytest.raises(ValueError, match="discover_groups"):
        hj.hesso(model.groups(), hj.Budget(flops=0.5), 2, 2)  # hand-made: no costs
    costs = hj.group_costs(model, model.groups(), X_EXAMPLE)
    hj.hesso(model.groups(), hj.Budget(flops=0.5), 2, 2, costs=costs)  # given: fine
    with pytest.raises(ValueError, match="costs has"):
        hj.hesso(MLP(64, (8,), 10, rngs=nnx.Rngs(0)).groups(), hj.Budget(flops=0.5), 2, 2,
                 costs=costs)


def test_hand_made_groups_take_costs_keyword():
    model = _cnn()
    groups = model.groups()  # hand-written: no costs recorded
    costs = hj.group_costs(model, groups, X_EXAMPLE)
    params = nnx.state(model, nnx.Param)
    tx = hj.hesso(groups, hj.Budget(flops=0.5), 1, 1, costs=costs)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    # P = Tp = 1: pruned at once; grad= gives the budget's default score its gradient
    _, state = jax.jit(lambda g, s, p: tx.update(g, s, p, grad=g))(grads, state, params)
    st = hj.hesso_status(state)
    assert st.budget == hj.Budget(flops=0.5) and st.target == -1
    assert 0.47 <= costs.kept_fraction(st.pruned)[1] <= 0.5


def test_cric_function_with_budget_meets_the_target():
    model = MLP(64, (48, 32), 10, rngs=nnx.Rngs(0))
    groups = hj.discover_groups(model, X_EXAMPLE)
    graphdef, params = nnx.split(model)
    data = _data()
    x, y = jnp.asarray(data.x_train[:64]), jnp.asarray(data.y_train[:64])

    def loss(p):
        logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    res = jax.jit(lambda p: hj.cric(loss, p, groups, hj.Budget(params=0.5), sample_steps=2,
                                    learning_rate=1e-2, max_cycles=1))(params)
    kept = groups.costs.kept_fraction(np.asarray(res.redundant))[0]
    assert 0.47 <= kept <= 0.5, kept
    with pytest.raises(ValueError, match="costs"):
        hj.cric(loss, params, model.groups(), hj.Budget(params=0.5), sample_steps=1,
                learning_rate=1e-2)


def test_discovery_records_costs_and_surgery_drops_them():
    model = _cnn()
    groups, _ = _discovered(_cnn)
    ref = hj.group_costs(model, groups, X_EXAMPLE)
    assert groups.costs is not None
    assert (groups.costs.dense_flops, groups.costs.dense_params) == (ref.dense_flops,
                                                                     ref.dense_params)
    np.testing.assert_array_equal(groups.costs.flops, ref.flops)
    np.testing.assert_array_equal(groups.costs.params, ref.params)
    twin = hj.Groups.from_families(groups.families)  # no costs, no fingerprint
    assert twin.costs is None and twin == groups and hash(twin) == hash(groups)
    keep = np.ones(groups.num_groups, bool)
    keep[::3] = False
    small = hj.shrink_groups(groups, hj.KeepPlan.from_mask(groups, keep))
    assert small.costs is None  # stale after surgery, like the fingerprint
    assert small.fingerprint is None
