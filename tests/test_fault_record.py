"""``hesso(..., on_fault="record")``: the step keeps the first placement fault in its state
instead of calling the host, and `hj.check_faults` raises exactly what the default step
raises; the step holds no host callback, so JAX keeps its fast, asynchronous dispatch."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import mlp_data, mlp_groups, mlp_loss, mlp_params

import hesso_jax as hj

K, PERIODS, TP, TW = 6, 2, 3, 2
X, Y = mlp_data(32)


def loss(params):
    return mlp_loss(params, X, Y)


def run(tx, steps, *, params=None, state=None, nan_at=()):
    """``steps`` jitted updates of ``tx``; the gradient is NaN at the steps in ``nan_at``."""

    @jax.jit
    def step(params, state, poison):
        grads = jax.grad(loss)(params)
        grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), grads)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = mlp_params() if params is None else params
    state = tx.init(params) if state is None else state
    for t in range(steps):
        params, state = step(params, state, jnp.asarray(t in nan_at))
    return params, state


def both(make):
    """``make(on_fault)`` for both modes: (raise-mode tx, record-mode tx)."""
    return make("raise"), make("record")


def raised_by_step(tx, steps, **kw):
    with pytest.raises(Exception) as info:
        run(tx, steps, **kw)
    return str(info.value)


def raised_by_check(tx, steps, **kw):
    params, state = run(tx, steps, **kw)   # the run goes on: nothing raised here
    with pytest.raises(ValueError) as info:
        hj.check_faults(state, params)
    return str(info.value)


def hesso(on_fault, **kw):
    return hj.hesso(mlp_groups(), K, PERIODS, TP, warmup_steps=TW, on_fault=on_fault, **kw)


@pytest.mark.parametrize("case", ["after-hesso", "nan", "not-zero"])
def test_check_faults_raises_what_the_step_raises(case):
    """Misplaced (a scale after HESSO), NaN parameters, and a pruned group moved off zero
    (check_updates=False hides the move from the probe, the period-end check finds it):
    the recorded fault's message is the one the default step raises, word for word."""
    steps = TW + 4
    if case == "after-hesso":
        raise_tx, record_tx = both(lambda f: optax.chain(optax.adam(1e-2), hesso(f),
                                                         optax.scale(0.5)))
        kw = {}
    elif case == "nan":
        raise_tx, record_tx = both(lambda f: optax.chain(optax.adam(1e-2), hesso(f)))
        kw = {"nan_at": {3}}
    else:
        raise_tx, record_tx = both(lambda f: optax.chain(
            optax.adam(1e-2), hesso(f, check_updates=False)))
        params, state = run(raise_tx, TW + TP)
        moved = jax.tree.map(lambda x: x + 1.0, params)
        expected = raised_by_step(raise_tx, 1, params=moved, state=state)
        params, state = run(record_tx, TW + TP)
        got = raised_by_check(record_tx, 1, params=jax.tree.map(lambda x: x + 1.0, params),
                              state=state)
        assert "are not exactly zero" in got and got in expected
        return
    expected = raised_by_step(raise_tx, steps, **kw)
    got = raised_by_check(record_tx, steps, **kw)
    assert got.startswith("hesso: ") and got in expected


def test_the_first_fault_is_kept():
    """A NaN update at step 3: every later step finds NaN parameters again; the state
    keeps the first finding (step 4), not the last (which would say step ~8)."""
    tx = optax.chain(optax.adam(1e-2), hesso("record"))
    params, state = run(tx, TW + 6, nan_at={3})
    with pytest.raises(ValueError, match=re.escape("NaN/inf since step ~4")):
        hj.check_faults(state, params)


def test_a_clean_run_records_nothing_and_prunes_alike():
    """No fault: check_faults returns None, and the record-mode run is the raise-mode run
    bit for bit (same pruned groups, same parameters)."""
    raise_tx, record_tx = both(lambda f: optax.chain(optax.adam(1e-2), hesso(f)))
    p1, s1 = run(raise_tx, TW + PERIODS * TP + 2)
    p2, s2 = run(record_tx, TW + PERIODS * TP + 2)
    assert hj.check_faults(s1, p1) is None and hj.check_faults(s2, p2) is None
    assert np.array_equal(hj.hesso_status(s1).pruned, hj.hesso_status(s2).pruned)
    assert hj.hesso_status(s2).num_pruned == K
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # the two period-end checks found nothing, so they left the fault slot empty
    h2, = [s for s in jax.tree.leaves(s2, is_leaf=lambda s: isinstance(s, hj.HessoState))
           if isinstance(s, hj.HessoState)]
    assert not np.any(np.asarray(h2.fault))


@pytest.mark.parametrize("base", [False, True], ids=["chain", "fused"])
def test_record_mode_step_holds_no_host_callback(base):
    """The compiled step of the record mode has no custom call (the raise mode's has the
    callback), so JAX does not treat it as a program with host callbacks."""
    def make(on_fault):
        if base:
            return hesso(on_fault, base=optax.adam(1e-2))
        return optax.chain(optax.adam(1e-2), hesso(on_fault))

    def hlo(tx):
        params = mlp_params()

        def step(params, state):
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            return optax.apply_updates(params, updates), state

        return jax.jit(step).lower(params, tx.init(params)).as_text()

    raise_tx, record_tx = both(make)
    assert "callback" in hlo(raise_tx)
    assert "callback" not in hlo(record_tx) and "custom_call" not in hlo(record_tx)


def test_on_fault_is_checked():
    with pytest.raises(ValueError, match='on_fault must be "raise" or "record"'):
        hesso("warn")


def test_check_faults_needs_one_hesso_state():
    with pytest.raises(ValueError, match="check_faults: no HessoState found in opt_state"):
        hj.check_faults(optax.adam(1e-2).init(mlp_params()), mlp_params())


def test_train_classifier_raises_a_recorded_fault():
    """train_classifier checks at every evaluation: a record-mode HESSO placed before a
    scale is reported by the loop, without any callback in its step."""
    from flax import nnx

    from hesso_jax.data import load_digits_split
    from hesso_jax.models import CNN
    from hesso_jax.train import train_classifier

    model = CNN(c1=4, c2=8, rngs=nnx.Rngs(0))
    groups = hj.discover_groups(model, jnp.zeros((2, 8, 8, 1)))
    tx = optax.chain(optax.adam(1e-3), hj.hesso(groups, 0.5, 1, 4, on_fault="record"),
                     optax.scale(0.5))
    with pytest.raises(ValueError, match="did not move by HESSO's last update"):
        train_classifier(model, tx, load_digits_split(), steps=4, eval_every=4,
                         progress=False)
