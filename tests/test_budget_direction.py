"""`hj.saliency.budget_saliency()` brings its direction (the raw gradient) into `hj.hesso`.

A saliency meant for ``−∇f`` scored on Adam's update would silently be a magnitude
(`hesso_jax.saliency`, "Budgets"): HESSO takes the callable's ``direction`` unless its own
``direction=`` is given, and then needs the gradient (``grad=``, ``value_fn``, or the
fused ``base=`` form, which is given ``g``).
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import optax
import pytest
from helpers import mlp_data, mlp_forward, mlp_groups, mlp_loss, mlp_params

import hesso_jax as hj

BUDGET = hj.Budget(params=0.7)


def _costed_groups(params, x):
    groups = mlp_groups()
    return groups, hj.group_costs(mlp_forward, params, groups, x)


def _run(tx, params, x, y, steps, **update_kw):
    state = tx.init(params)
    for _ in range(steps):
        grads = jax.grad(mlp_loss)(params, x, y)
        kw = {k: (grads if v == "grads" else v) for k, v in update_kw.items()}
        updates, state = tx.update(grads, state, params, **kw)
        params = optax.apply_updates(params, updates)
    return params, state


def test_fused_form_scores_budget_saliency_on_the_gradient_it_is_given():
    params, (x, y) = mlp_params(), mlp_data(16)
    groups, costs = _costed_groups(params, x)
    kw = dict(warmup_steps=1, saliency=hj.saliency.budget_saliency(), costs=costs)
    fused = hj.hesso(groups, BUDGET, 1, 2, base=optax.adam(0.05), **kw)
    p_fused, s_fused = _run(fused, params, x, y, 4)
    chain = optax.chain(optax.adam(0.05), hj.hesso(groups, BUDGET, 1, 2,
                                                   direction="gradient", **kw))
    p_chain, s_chain = _run(chain, params, x, y, 4, grad="grads")
    pruned = hj.hesso_status(s_fused).pruned
    assert pruned.any()
    np.testing.assert_array_equal(pruned, hj.hesso_status(s_chain).pruned)
    np.testing.assert_array_equal(np.asarray(s_fused[1].scores), np.asarray(s_chain[1].scores))
    jax.tree.map(np.testing.assert_array_equal, p_fused, p_chain)
    # scoring Adam's update instead gives other scores: the direction was really g
    upd = optax.chain(optax.adam(0.05), hj.hesso(groups, BUDGET, 1, 2, direction="update",
                                                 **kw))
    _, s_upd = _run(upd, params, x, y, 4)
    assert not np.allclose(np.asarray(s_upd[1].scores), np.asarray(s_chain[1].scores),
                           rtol=1e-3)


def test_chain_form_without_the_gradient_is_a_clear_error():
    params, (x, y) = mlp_params(), mlp_data(16)
    groups, costs = _costed_groups(params, x)
    tx = optax.chain(optax.adam(1e-3), hj.hesso(groups, BUDGET, 1, 2, warmup_steps=1,
                                                saliency=hj.saliency.budget_saliency(),
                                                costs=costs))
    with pytest.raises(ValueError, match=r'direction="gradient"\) needs the gradient'):
        _run(tx, params, x, y, 1)


def test_explicit_direction_wins_over_the_saliencys():
    params, (x, y) = mlp_params(), mlp_data(16)
    groups, costs = _costed_groups(params, x)
    tx = optax.chain(optax.adam(1e-3), hj.hesso(groups, BUDGET, 1, 2, warmup_steps=1,
                                                saliency=hj.saliency.budget_saliency(),
                                                costs=costs, direction="update"))
    _, state = _run(tx, params, x, y, 4)  # no gradient needed: scores on u
    assert hj.hesso_status(state).pruned.any()


# ---- saliency=None under a Budget: budget_saliency where the gradient is there ----

def _scores(state):
    return np.asarray(hj.hesso_status(state).scores)


def test_budget_default_is_budget_saliency_on_the_gradient():
    params, (x, y) = mlp_params(), mlp_data(16)
    groups, costs = _costed_groups(params, x)
    kw = dict(warmup_steps=1, costs=costs)
    explicit = hj.hesso(groups, BUDGET, 1, 2, base=optax.adam(0.05),
                        saliency=hj.saliency.budget_saliency(), **kw)
    default = hj.hesso(groups, BUDGET, 1, 2, base=optax.adam(0.05), **kw)
    chain = optax.chain(optax.adam(0.05), hj.hesso(groups, BUDGET, 1, 2, **kw))
    p_exp, s_exp = _run(explicit, params, x, y, 4)
    p_def, s_def = _run(default, params, x, y, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the gradient is given: no fallback, no warning
        p_chain, s_chain = _run(chain, params, x, y, 4, grad="grads")
    np.testing.assert_array_equal(_scores(s_def), _scores(s_exp))
    np.testing.assert_array_equal(_scores(s_chain), _scores(s_exp))
    jax.tree.map(np.testing.assert_array_equal, p_def, p_exp)
    jax.tree.map(np.testing.assert_array_equal, p_chain, p_exp)
    # and it is not the additive mix on Adam's update, the fallback below
    mix = hj.hesso(groups, BUDGET, 1, 2, base=optax.adam(0.05), direction="update", **kw)
    _, s_mix = _run(mix, params, x, y, 4)
    assert not np.allclose(_scores(s_mix), _scores(s_exp), rtol=1e-3)


def test_budget_default_without_a_gradient_warns_and_scores_the_mix_on_u():
    params, (x, y) = mlp_params(), mlp_data(16)
    groups, costs = _costed_groups(params, x)
    kw = dict(warmup_steps=1, costs=costs)
    default = optax.chain(optax.adam(0.05), hj.hesso(groups, BUDGET, 1, 2, **kw))
    with pytest.warns(UserWarning, match=r"grad=grads"):
        p_def, s_def = _run(default, params, x, y, 4)
    mix = optax.chain(optax.adam(0.05), hj.hesso(
        groups, BUDGET, 1, 2, saliency=hj.saliency.weighted(normalize="additive"), **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit saliency: nothing to warn about
        p_mix, s_mix = _run(mix, params, x, y, 4)
    assert hj.hesso_status(s_def).pruned.any()
    np.testing.assert_array_equal(_scores(s_def), _scores(s_mix))
    jax.tree.map(np.testing.assert_array_equal, p_def, p_mix)
    # direction="update" asks for that mix on purpose: the same run, no warning
    upd = optax.chain(optax.adam(0.05), hj.hesso(groups, BUDGET, 1, 2, direction="update",
                                                 **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, s_upd = _run(upd, params, x, y, 4)
    np.testing.assert_array_equal(_scores(s_upd), _scores(s_mix))


def test_cric_budget_default_is_budget_saliency():
    params, (x, y) = mlp_params(), mlp_data(16)
    groups, costs = _costed_groups(params, x)

    def loss(p):
        return mlp_loss(p, x, y)

    kw = dict(sample_steps=2, learning_rate=0.05, costs=costs)
    res = hj.cric(loss, params, groups, BUDGET, **kw)
    exp = hj.cric(loss, params, groups, BUDGET, saliency=hj.saliency.budget_saliency(), **kw)
    mix = hj.cric(loss, params, groups, BUDGET,
                  saliency=hj.saliency.weighted(normalize="additive"), **kw)
    np.testing.assert_array_equal(np.asarray(res.scores), np.asarray(exp.scores))
    np.testing.assert_array_equal(np.asarray(res.redundant), np.asarray(exp.redundant))
    assert not np.allclose(np.asarray(res.scores), np.asarray(mix.scores), rtol=1e-3)
