"""hesso_jax.train.make_train_step: the training recipe shared by benchmarks and notebooks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hesso_jax as hj
from hesso_jax.train import make_train_step


def _problem():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(5, 6)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(6,)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    groups = hj.Groups.from_families([hj.GroupFamily(
        6, (hj.Member(("w",), 1), hj.Member(("b",), 0)))])
    return params, x, y, groups


def _loss(p, x, y):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


def test_step_equals_hand_written_adam_step():
    params, x, y, _ = _problem()
    tx = optax.adam(1e-2)
    step = make_train_step(_loss, tx)
    new, state, loss = step(params, tx.init(params), x, y)
    ref_loss, grads = jax.value_and_grad(_loss)(params, x, y)
    updates, ref_state = tx.update(grads, tx.init(params), params)
    ref = optax.apply_updates(params, updates)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for k in params:
        np.testing.assert_allclose(new[k], ref[k], rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_has_aux_returns_aux_and_unjitted_matches_jitted():
    params, x, y, _ = _problem()

    def loss_aux(p, x, y):
        err = x @ p["w"] + p["b"] - y
        return jnp.mean(err ** 2), {"max": jnp.max(jnp.abs(err))}

    tx = optax.sgd(0.1)
    out_j = make_train_step(loss_aux, tx, has_aux=True)(params, tx.init(params), x, y)
    out_p = make_train_step(loss_aux, tx, has_aux=True, jit=False)(params, tx.init(params),
                                                                    x, y)
    assert len(out_j) == 4 and set(out_j[3]) == {"max"}
    np.testing.assert_allclose(out_j[2], _loss(params, x, y), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out_j), jax.tree.leaves(out_p), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cric", [False, True])
def test_hesso_chain_prunes_exactly_k(cric):
    """value_fn reaches HESSO: with CRIC on, the chain runs and still prunes exactly K."""
    params, x, y, groups = _problem()
    config = hj.CricConfig(sample_steps=2, learning_rate=1e-2) if cric else None
    tx = optax.chain(optax.adam(1e-2), hj.hesso(groups, 2, 2, 3, warmup_steps=2, cric=config))
    step = make_train_step(_loss, tx)
    state = tx.init(params)
    for _ in range(2 + 2 * 3 + 2):
        params, state, loss = step(params, state, x, y)
    assert np.isfinite(float(loss))
    assert int(groups.zero_groups(params).sum()) == 2
    assert hj.hesso_status(state).num_pruned == 2
