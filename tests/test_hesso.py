"""HESSO as an optax transformation: schedule, exact zeros, placement, optax composition."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import mlp_data, mlp_forward, mlp_groups, mlp_loss, mlp_params
from hypothesis import given, settings
from hypothesis import strategies as st

import hesso_jax as hj
from hesso_jax.hesso import HessoState, resolve_count, schedule_counts

D_IN, HIDDEN, D_OUT = 6, 12, 3
DATA_X, DATA_Y = mlp_data(32)
forward = mlp_forward


def make_params(seed=0, dtype=jnp.float32):
    return mlp_params(seed=seed, dtype=dtype)


def make_groups():
    return mlp_groups(name="hidden")


def loss_fn(params):
    return mlp_loss(params, DATA_X, DATA_Y)


def run(tx, params, steps, *, jit=True):
    state = tx.init(params)

    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step) if jit else step
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def zero_groups(params):
    return make_groups().zero_groups(params)


# ---------------------------------------------------------------- schedule & exact zeros
@pytest.mark.parametrize("K,P,Tp,Tw", [(5, 1, 4, 0), (5, 2, 3, 2), (7, 3, 1, 1), (1, 3, 2, 0)])
def test_exactly_k_groups_zero_at_end(K, P, Tp, Tw):
    groups = make_groups()
    tx = optax.chain(optax.adam(1e-2), hj.hesso(groups, K, P, Tp, warmup_steps=Tw))
    params, state = run(tx, make_params(), Tw + P * Tp)
    zero = zero_groups(params)
    assert zero.sum() == K
    status = hj.hesso_status(state)
    assert status.phase == "finetune"
    assert status.num_pruned == K and status.num_redundant == 0
    np.testing.assert_array_equal(status.pruned, zero)
    # Members of pruned groups are exactly 0.0 (not merely tiny), in every member leaf.
    cols = np.flatnonzero(zero)
    assert np.all(np.asarray(params["l1"]["kernel"])[:, cols] == 0.0)
    assert np.all(np.asarray(params["l1"]["bias"])[cols] == 0.0)


def test_pruned_groups_stay_zero_while_finetuning():
    groups = make_groups()
    tx = optax.chain(optax.sgd(0.05, momentum=0.9), hj.hesso(groups, 4, 2, 3))
    params, state = run(tx, make_params(), 6)
    zero = zero_groups(params)
    assert zero.sum() == 4
    opt_state = state
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p))
    for _ in range(25):
        updates, opt_state = step(params, opt_state)
        params = optax.apply_updates(params, updates)
        np.testing.assert_array_equal(zero_groups(params), zero)
    assert hj.hesso_status(opt_state).phase == "finetune"


def test_fraction_k_and_schedule_counts():
    assert resolve_count(0.5, 12) == 6
    assert resolve_count(0.29, 100) == 29
    assert schedule_counts(7, 3) == (2, 2, 3)
    assert schedule_counts(2, 3) == (0, 0, 2)
    groups = make_groups()
    tx = optax.chain(optax.adam(1e-2), hj.hesso(groups, 0.5, 3, 2))
    params, _ = run(tx, make_params(), 6)
    assert zero_groups(params).sum() == 6


def test_period_counts_per_period():
    groups = make_groups()
    tx = optax.chain(optax.adam(1e-2), hj.hesso(groups, 7, 3, 2, warmup_steps=1))
    params, state = make_params(), tx.init(make_params())
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p))
    seen = []
    for _ in range(1 + 3 * 2):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        seen.append(hj.hesso_status(state).num_pruned)
    # warm-up step, then periods of 2 steps pruning 2, 2, 3 groups.
    assert seen == [0, 0, 2, 2, 4, 4, 7]


def identity_base():
    """A base optimizer whose update is exactly zero: isolates the projection."""
    return optax.scale(0.0)


def test_gamma_telescopes_to_zero():
    Tp = 5
    groups = make_groups()
    p0 = make_params()
    tx = optax.chain(identity_base(), hj.hesso(groups, 3, 1, Tp, saliency="magnitude"))
    state = tx.init(p0)
    params = p0
    norms0 = np.sqrt(np.asarray(groups.sq_norms(p0)))
    for s in range(Tp):
        updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
        params = optax.apply_updates(params, updates)
        chosen = hj.hesso_status(state)
        mask = chosen.redundant if s < Tp - 1 else chosen.pruned
        norms = np.sqrt(np.asarray(groups.sq_norms(params)))
        # Π_{j<=s} γ_j = (Tp - s - 1) / Tp
        np.testing.assert_allclose(norms[mask], norms0[mask] * (Tp - s - 1) / Tp, rtol=1e-6)
        np.testing.assert_array_equal(norms[~mask], norms0[~mask])
    assert np.all(norms[mask] == 0.0) and mask.sum() == 3
    # magnitude saliency picks the three smallest-norm groups
    np.testing.assert_array_equal(np.flatnonzero(mask), np.sort(np.argsort(norms0)[:3]))


def test_important_groups_receive_base_update_bit_for_bit():
    groups = make_groups()
    base = optax.adam(1e-2)
    tx = optax.chain(base, hj.hesso(groups, 4, 2, 3, warmup_steps=1))
    params = make_params()
    s_base, s_full = base.init(params), tx.init(params)
    for _ in range(9):
        grads = jax.grad(loss_fn)(params)
        u_base, s_base = base.update(grads, s_base, params)
        u_full, s_full = tx.update(grads, s_full, params)
        status = hj.hesso_status(s_full)
        touched = np.asarray(groups.broadcast(jnp.asarray(status.redundant | status.pruned),
                                              params, False)["l1"]["kernel"])
        np.testing.assert_array_equal(np.asarray(u_full["l1"]["kernel"])[~touched],
                                      np.asarray(u_base["l1"]["kernel"])[~touched])
        # Leaves without members are untouched entirely.
        np.testing.assert_array_equal(u_full["l2"]["kernel"], u_base["l2"]["kernel"])
        np.testing.assert_array_equal(u_full["l2"]["bias"], u_base["l2"]["bias"])
        params = optax.apply_updates(params, u_full)


def test_ties_broken_by_lowest_index():
    groups = make_groups()
    tx = optax.chain(optax.adam(1e-3),
                     hj.hesso(groups, 5, 1, 2, saliency=lambda p, d, g: jnp.zeros(g.num_groups)))
    params, state = run(tx, make_params(), 2)
    np.testing.assert_array_equal(np.flatnonzero(zero_groups(params)), np.arange(5))


def test_custom_saliency_lowest_is_pruned():
    groups = make_groups()
    scores = -jnp.arange(HIDDEN, dtype=jnp.float32)  # highest index = lowest score
    tx = optax.chain(optax.adam(1e-3), hj.hesso(groups, 4, 2, 2, saliency=lambda p, d, g: scores))
    params, state = run(tx, make_params(), 4)
    np.testing.assert_array_equal(np.flatnonzero(zero_groups(params)), np.arange(8, 12))


def test_deterministic():
    groups = make_groups()
    tx = optax.chain(optax.adam(1e-2), hj.hesso(groups, 5, 2, 3, warmup_steps=2))
    a, _ = run(tx, make_params(), 12)
    b, _ = run(tx, make_params(), 12)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_jit_and_eager_agree():
    groups = make_groups()
    tx = optax.chain(optax.sgd(0.05), hj.hesso(groups, 5, 2, 3, warmup_steps=1))
    a, _ = run(tx, make_params(), 9, jit=True)
    b, _ = run(tx, make_params(), 9, jit=False)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
    np.testing.assert_array_equal(zero_groups(a), zero_groups(b))


# ---------------------------------------------------------------- optax composition
@pytest.mark.parametrize("base", [
    optax.sgd(0.05),
    optax.sgd(0.05, momentum=0.9),
    optax.adam(1e-2),
    optax.adamw(1e-2, weight_decay=1e-2),
    optax.lion(1e-3),
    optax.adam(optax.linear_schedule(1e-2, 1e-3, 20)),
    optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
], ids=["sgd", "momentum", "adam", "adamw", "lion", "schedule", "inject_hyperparams"])
def test_lax_scan_training_loop(base):
    groups = make_groups()
    K, P, Tp, Tw = 6, 3, 3, 2
    tx = optax.chain(base, hj.hesso(groups, K, P, Tp, warmup_steps=Tw))

    @jax.jit
    def train(params):
        def body(carry, _):
            params, state = carry
            updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
            return (optax.apply_updates(params, updates), state), loss_fn(params)

        (params, state), losses = jax.lax.scan(body, (params, tx.init(params)), None,
                                               length=Tw + P * Tp + 4)
        return params, state, losses

    params, state, losses = train(make_params())
    assert zero_groups(params).sum() == K
    assert hj.hesso_status(state).num_pruned == K
    assert np.all(np.isfinite(losses))


def test_multisteps_counts_real_steps_only():
    groups = make_groups()
    K, P, Tp = 4, 2, 2
    tx = optax.MultiSteps(optax.chain(optax.adam(1e-2), hj.hesso(groups, K, P, Tp)),
                          every_k_schedule=3)
    params, state = run(tx, make_params(), 3 * P * Tp - 1)
    assert hj.hesso_status(state).step == P * Tp - 1
    assert zero_groups(params).sum() < K
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p))
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    assert hj.hesso_status(state).step == P * Tp


def test_multisteps_full_schedule():
    groups = make_groups()
    tx = optax.MultiSteps(optax.chain(optax.adam(1e-2), hj.hesso(groups, 4, 2, 2)),
                          every_k_schedule=2)
    params, state = run(tx, make_params(), 2 * 4)
    assert zero_groups(params).sum() == 4


def test_bf16_params_keep_dtype_and_exact_zeros():
    groups = make_groups()
    tx = optax.chain(optax.adam(1e-2), hj.hesso(groups, 5, 2, 3))
    params, state = run(tx, make_params(dtype=jnp.bfloat16), 6 + 3)
    for leaf in jax.tree.leaves(params):
        assert leaf.dtype == jnp.bfloat16
    assert zero_groups(params).sum() == 5


def test_no_recompilation_between_steps():
    groups = make_groups()
    tx = optax.chain(optax.adam(1e-2), hj.hesso(groups, 5, 2, 3, warmup_steps=2))

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
        return optax.apply_updates(params, updates), state

    params = make_params()
    state = tx.init(params)
    for _ in range(14):  # warm-up, both periods, fine-tune
        params, state = step(params, state)
    assert step._cache_size() == 1


def test_unknown_extra_args_ignored():
    groups = make_groups()
    tx = optax.chain(optax.adam(1e-2), hj.hesso(groups, 3, 1, 2))
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    params = make_params()
    state = tx.init(params)
    grads = jax.grad(loss_fn)(params)
    u1, _ = tx.update(grads, state, params, value=1.0, some_future_arg="x")
    u2, _ = tx.update(grads, state, params)
    jax.tree.map(np.testing.assert_array_equal, u1, u2)


def test_state_is_namedtuple_of_arrays():
    groups = make_groups()
    state = hj.hesso(groups, 3, 1, 2).init(make_params())
    assert isinstance(state, HessoState)
    for leaf in state:
        assert isinstance(leaf, jax.Array)
    assert state.redundant.shape == (HIDDEN,) and state.redundant.dtype == jnp.bool_


def test_status_phases():
    groups = make_groups()
    tx = optax.chain(optax.adam(1e-2), hj.hesso(groups, 4, 2, 3, warmup_steps=2))
    params = make_params()
    state = tx.init(params)
    phases = []
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p))
    for _ in range(10):
        st_ = hj.hesso_status(state)
        phases.append((st_.phase, st_.period))
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    assert phases[:2] == [("warmup", -1)] * 2
    assert phases[2:5] == [("pruning", 0)] * 3
    assert phases[5:8] == [("pruning", 1)] * 3
    assert phases[8:] == [("finetune", 2)] * 2
    with pytest.raises(ValueError, match="no HessoState"):
        hj.hesso_status(optax.adam(1e-3).init(params))


def test_nnx_optimizer_integration():
    model = hj_mlp()
    groups = model.groups()
    tx = optax.chain(optax.adam(1e-2), hj.hesso(groups, 10, 2, 3))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(0), (16, 8))
    y = jax.random.normal(jax.random.key(1), (16, 4))

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)

    for _ in range(6):
        step(model, optimizer)
    assert groups.zero_groups(nnx.state(model, nnx.Param)).sum() == 10
    assert hj.hesso_status(optimizer.opt_state).num_pruned == 10


def hj_mlp():
    from hesso_jax.models import MLP

    return MLP(8, (16, 8), 4, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- placement check
@pytest.mark.parametrize("make_tx", [
    lambda g: optax.chain(hj.hesso(g, 4, 2, 3), optax.adam(1e-2)),
    lambda g: optax.chain(optax.adam(1e-2), hj.hesso(g, 4, 2, 3), optax.scale(0.5)),
], ids=["hesso-first", "scaled-after"])
def test_not_last_in_chain_fails_loudly(make_tx):
    tx = make_tx(make_groups())
    with pytest.raises(Exception, match="must be the LAST transformation"):
        run(tx, make_params(), 3 + 1)


def test_not_last_detected_eagerly_with_valueerror():
    tx = optax.chain(optax.adam(1e-2), hj.hesso(make_groups(), 4, 2, 3), optax.scale(0.5))
    with pytest.raises(ValueError, match="LAST transformation"):
        run(tx, make_params(), 3 + 1, jit=False)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(K=12), ValueError, "smaller than the number of groups"),
    (dict(K=20), ValueError, "smaller than the number of groups"),
    (dict(K=-1), ValueError, "K must be >= 0"),
    (dict(K=1.0), ValueError, r"fraction must lie in \(0, 1\)"),
    (dict(K=0.0), ValueError, r"fraction must lie in \(0, 1\)"),
    (dict(K="3"), TypeError, "K must be an int"),
    (dict(K=True), TypeError, "K must be an int"),
    (dict(P=0), ValueError, "P .* must be >= 1"),
    (dict(Tp=0), ValueError, "Tp .* must be >= 1"),
    (dict(Tp=2.5), TypeError, "Tp .* must be an int"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps must be >= 0"),
    (dict(saliency={"magnitud": 1.0}), ValueError, "unknown saliency score 'magnitud'"),
    (dict(saliency={"magnitude": -1.0}), ValueError, "finite and >= 0"),
    (dict(saliency={"magnitude": 0.0}), ValueError, "all zero"),
    (dict(saliency=3), TypeError, "saliency must be"),
    (dict(cric=object()), TypeError, "cric must be None or a hesso_jax.CricConfig"),
])
def test_bad_arguments_raise_before_tracing(kwargs, exc, msg):
    args = dict(K=4, P=2, Tp=3)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        hj.hesso(make_groups(), args.pop("K"), args.pop("P"), args.pop("Tp"), **args)


def test_bad_groups_type():
    with pytest.raises(TypeError, match="hesso_jax.Groups"):
        hj.hesso([make_groups()], 2, 1, 1)


def test_mismatched_params_at_init_names_path():
    params = make_params()
    del params["l1"]["bias"]
    with pytest.raises(ValueError, match=re.escape("'l1/bias'")):
        hj.hesso(make_groups(), 2, 1, 1).init(params)


def test_changed_params_between_init_and_update():
    tx = hj.hesso(make_groups(), 2, 1, 1)
    state = tx.init(make_params())
    params = make_params()
    params["l1"]["kernel"] = params["l1"]["kernel"][:, :8]
    with pytest.raises(ValueError, match="runs past the axis length"):
        tx.update(params, state, params)


def test_update_requires_params_and_matching_updates():
    tx = hj.hesso(make_groups(), 2, 1, 1)
    params = make_params()
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(params, state)
    bad = jax.tree.map(lambda x: x, params)
    bad["l2"]["bias"] = jnp.zeros((5,))
    with pytest.raises(ValueError, match="l2/bias"):
        tx.update(bad, state, params)


# ---------------------------------------------------------------- properties
@settings(max_examples=min(settings().max_examples, 12), deadline=None)  # a compile each
@given(K=st.integers(0, HIDDEN - 1), P=st.integers(1, 4), Tp=st.integers(1, 3),
       Tw=st.integers(0, 2), seed=st.integers(0, 3))
def test_property_schedule_prunes_exactly_k(K, P, Tp, Tw, seed):
    groups = make_groups()
    tx = optax.chain(optax.adam(1e-2), hj.hesso(groups, K, P, Tp, warmup_steps=Tw))

    @jax.jit
    def train(params):
        def body(carry, _):
            params, state = carry
            updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, state), _ = jax.lax.scan(body, (params, tx.init(params)), None,
                                          length=Tw + P * Tp + 1)
        return params, state

    params, state = train(make_params(seed))
    zero = zero_groups(params)
    assert zero.sum() == K
    np.testing.assert_array_equal(np.asarray(state[1].pruned), zero)
    counts = schedule_counts(K, P)
    assert sum(counts) == K and all(c >= 0 for c in counts)


def test_update_has_no_side_effects():
    # The placement check's pure_callback carries no effect (a debug.callback would be an
    # unordered one). It still makes JAX dispatch the step on its Python path, as any host
    # callback does; on_fault="record" holds none (tests/test_fault_record.py).
    groups = make_groups()
    tx = optax.chain(optax.adam(1e-2), hj.hesso(groups, 4, 2, 3, warmup_steps=1))

    def step(params, state):
        updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
        return optax.apply_updates(params, updates), state

    params = make_params()
    jaxpr = jax.make_jaxpr(step)(params, tx.init(params))
    assert not jaxpr.effects
    assert "pure_callback" in str(jaxpr)  # the placement check is still there


def test_bottom_k_selects_exactly_k_with_nan_and_inf_scores():
    from hesso_jax.projection import bottom_k

    scores = jnp.array([jnp.nan, 0.5, jnp.inf, jnp.nan, 0.1, -1.0, 2.0, jnp.nan])
    candidates = jnp.array([True, True, True, True, False, False, True, True])
    for k in range(7):
        chosen = np.asarray(bottom_k(scores, candidates, k))
        assert chosen.sum() == min(k, 6)
        assert not np.any(chosen & ~np.asarray(candidates))
    # finite scores first (0.5, 2.0), then inf/NaN by index (0, 2, 3, 7)
    np.testing.assert_array_equal(np.flatnonzero(bottom_k(scores, candidates, 4)), [0, 1, 2, 6])


def test_schedule_is_named_in_the_state():
    """``HessoState.schedule`` stays ``int32[4]`` (checkpoints) and reads as a HessoSchedule."""
    from hesso_jax.hesso import HessoSchedule

    tx = hj.hesso(make_groups(), 4, 2, 3, warmup_steps=5)
    state = tx.init(make_params())
    assert state.schedule.shape == (4,) and state.schedule.dtype == jnp.int32
    assert HessoSchedule.from_array(state.schedule) == HessoSchedule(
        warmup_steps=5, periods=2, period_len=3, k=4)
