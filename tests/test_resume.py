"""Checkpoint and resume: the whole optax-chain state round-trips through orbax and a
resumed run continues bit for bit as the uninterrupted one.

The checkpoint is restored in the way a restarted job does it: a *fresh* transformation
(new ``hesso`` closure, new jit cache), restored against ``jax.eval_shape(tx.init, params)``.
Resume points cover warm-up, the step right before a period start (the update that runs the
identification, greedy or CRIC), the middle of a period, the update that runs the placement
check, and fine-tuning. (CRIC's whole identification runs inside one update, so "inside an
identification step" is, at checkpoint granularity, just before or just after it.)
"""

import chex
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import mlp_data, mlp_groups, mlp_loss, mlp_params

import hesso_jax as hj
from hesso_jax.cric import CricConfig
from hesso_jax.hesso import HessoState

K, PERIODS, TP, TW = 6, 2, 3, 2
STEPS = TW + PERIODS * TP + 3  # 11: warm-up 0-1, periods at 2-4 and 5-7, fine-tune 8-10
CRIC = CricConfig(sample_steps=2, learning_rate=0.05)

XS, YS = mlp_data(16, batches=STEPS)
make_params = mlp_params
make_groups = mlp_groups
loss = mlp_loss


def make_tx(use_cric):
    """A new transformation each call: what a restarted process builds."""
    return optax.chain(optax.adam(1e-2),
                       hj.hesso(make_groups(), K, PERIODS, TP, warmup_steps=TW,
                                cric=CRIC if use_cric else None))


def steps_fn(tx):
    @jax.jit
    def step(params, state, t):
        x, y = XS[t], YS[t]  # batch t: the data order is a function of the step only
        grads = jax.grad(loss)(params, x, y)
        updates, state = tx.update(grads, state, params, value_fn=lambda p: loss(p, x, y))
        return optax.apply_updates(params, updates), state

    def run(params, state, start, stop):
        for t in range(start, stop):
            params, state = step(params, state, t)
        return params, state

    return run


def save(path, tree):
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, tree)
        ckpt.wait_until_finished()


def restore(path, target):
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(path, target)


@pytest.mark.parametrize("use_cric,resume_points", [
    # 1: warm-up; 2: the next update identifies period 0's groups; 3: mid-period;
    # 5: the next update starts period 1 and runs the first placement check; 9: fine-tune.
    (False, (1, 2, 3, 5, 9)),
    # 2: the next update runs CRIC (period 0 start); 6: mid-period after a CRIC
    # identification; 8: the next update runs the placement check after the last period.
    (True, (2, 6, 8)),
], ids=["greedy", "cric"])
def test_resume_is_bit_for_bit(tmp_path, use_cric, resume_points):
    # First "process": the uninterrupted run, checkpointing at every resume point.
    tx = make_tx(use_cric)
    run = steps_fn(tx)
    params = make_params()
    state = tx.init(params)
    saved = {}
    for t in range(STEPS):
        if t in resume_points:
            saved[t] = jax.device_get({"params": params, "opt_state": state})
            save(tmp_path / f"step_{t}", {"params": params, "opt_state": state})
        params, state = run(params, state, t, t + 1)
    ref = jax.device_get((params, state))

    # Second "process": a fresh optimizer that never ran, restoring against abstract shapes.
    tx2 = make_tx(use_cric)
    run2 = steps_fn(tx2)
    abstract_params = jax.eval_shape(make_params)
    target = {"params": abstract_params, "opt_state": jax.eval_shape(tx2.init, abstract_params)}
    for t in resume_points:
        restored = restore(tmp_path / f"step_{t}", target)
        assert isinstance(restored["opt_state"][1], HessoState)
        chex.assert_trees_all_equal(jax.device_get(restored), saved[t])
        params2, state2 = run2(restored["params"], restored["opt_state"], t, STEPS)
        chex.assert_trees_all_equal(jax.device_get((params2, state2)), ref)
    status = hj.hesso_status(state2)
    assert status.phase == "finetune" and status.num_pruned == K
    np.testing.assert_array_equal(make_groups().zero_groups(params2), status.pruned)


def test_round_trip_preserves_every_state_field(tmp_path):
    """Mid-period state with non-trivial masks, scores, Adam moments and counters."""
    tx = make_tx(False)
    params = make_params()
    params, state = steps_fn(tx)(params, tx.init(params), 0, TW + TP + 1)
    hs = state[1]
    assert int(hs.count) == TW + TP + 1
    assert bool(hs.redundant.any()) and bool(hs.pruned.any()) and bool(hs.scores.any())
    save(tmp_path / "ckpt", state)
    restored = restore(tmp_path / "ckpt", jax.eval_shape(tx.init, params))
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
    assert isinstance(restored[1], HessoState)
    chex.assert_trees_all_equal_shapes_and_dtypes(restored, state)
