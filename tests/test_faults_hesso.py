"""HESSO faults (issue 13 items 3, 4, 5, 8): non-finite parameters told apart from a
misplaced HESSO, a missing base optimizer, a misplaced HESSO found within two updates
(and no false alarm from apply_if_finite, MultiSteps, resume, several inits, donation,
bf16, nnx.Optimizer, surgery), wrappers with a second copy of the parameters refused at
init, and CRIC trials with a non-finite loss rejected."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import compile_default, mlp_data, mlp_groups, mlp_loss, mlp_params

import hesso_jax as hj
from hesso_jax.cric import CricConfig

D_IN, HIDDEN, D_OUT = 6, 12, 3
K, PERIODS, TP, TW = 6, 2, 3, 2
LAST = "must be the LAST transformation of the optax.chain"
X, Y = mlp_data(32)


def make_params(dtype=jnp.float32):
    return mlp_params(dtype=dtype)


def make_groups():
    return mlp_groups()


def loss(params):
    return mlp_loss(params, X, Y)


def hesso(**kw):
    args = dict(warmup_steps=TW)
    args.update(kw)
    return hj.hesso(make_groups(), K, PERIODS, TP, **args)


def make_step(tx, *, jit=True, donate=False):
    """A training step; ``poison`` (a traced bool) replaces the gradient by NaN."""

    def step(params, state, poison):
        grads = jax.grad(loss)(params)
        bad = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), grads)
        updates, state = tx.update(bad, state, params, value_fn=loss)
        return optax.apply_updates(params, updates), state

    if jit:
        return jax.jit(step, donate_argnums=(0, 1) if donate else ())
    return step


def train(tx, steps, *, bad=(), params=None, state=None, **kw):
    step = make_step(tx, **kw)
    params = make_params() if params is None else params
    state = tx.init(params) if state is None else state
    for t in range(steps):
        params, state = step(params, state, jnp.asarray(t in bad))
    return jax.block_until_ready(params), state


# ---------------------------------------------------------------- item 3: non-finite
@pytest.mark.parametrize("at", [1, TW, TW + 1], ids=["warmup", "period-start", "mid-period"])
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_nan_update_is_reported_as_nonfinite_at_the_next_step(at, jit):
    """A NaN update at step ``at`` makes the parameters NaN; the very next update says so,
    since which step, and what to do — and does not blame the chain order."""
    tx = optax.chain(optax.adam(1e-2), hesso())
    expected = (f"hesso: parameters are NaN/inf since step ~{at + 1}; wrap the chain in "
                "optax.apply_if_finite(optax.chain(base, hj.hesso(...)), "
                "max_consecutive_errors) to skip non-finite updates, and lower the learning "
                "rate if the loss diverges.")
    with pytest.raises(Exception) as info:
        train(tx, at + 2, bad={at}, jit=jit)
    assert expected in str(info.value)
    assert "LAST" not in str(info.value) and "raw gradients" not in str(info.value)
    if not jit:
        assert info.type is ValueError and str(info.value) == expected


@pytest.mark.parametrize("where", [("l2", "bias"), ("l1", "kernel")])
def test_nan_outside_the_probe_is_found_at_the_period_end(where):
    """NaN in an element the probe does not sample (a dependent bias; the last element of
    a member kernel, which the verdict's masked sum covers) right before a period end:
    the period-end check reports non-finite parameters, not a misplaced HESSO."""
    tx = optax.chain(optax.sgd(1e-2), hesso())
    params, state = train(tx, TW + TP)
    leaf = params[where[0]][where[1]]
    params[where[0]][where[1]] = leaf.at[(-1,) * leaf.ndim].set(jnp.nan)
    with pytest.raises(Exception, match=re.escape(
            f"hesso: parameters are NaN/inf since step {TW + TP} or earlier; wrap the chain "
            "in optax.apply_if_finite")) as info:
        train(tx, 1, params=params, state=state)
    assert "LAST" not in str(info.value)


def test_period_end_check_calls_the_host_only_on_a_fault(monkeypatch):
    """The check after each period end decides on the device; the host round trip (the
    callback that raises) runs only when something is wrong."""
    from hesso_jax import placement

    calls = []
    real = placement.diagnose

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(placement, "diagnose", counting)
    tx = optax.chain(optax.sgd(1e-2), hesso(check_updates=False))
    params, state = train(tx, TW + PERIODS * TP + 2)   # past both period-end checks
    assert hj.hesso_status(state).num_pruned == K and calls == []
    params, state = train(tx, TW + TP)                  # the next update checks period 0
    moved = jax.tree.map(lambda x: x + 1.0, params)     # its pruned groups are not zero
    with pytest.raises(Exception, match="are not exactly zero"):
        train(tx, 1, params=moved, state=state)
    assert calls


def diverging_loss(params):
    return 1e3 * jnp.mean((X @ params["l1"]["kernel"] + params["l1"]["bias"]) ** 2)


@pytest.mark.parametrize("make_tx", [
    lambda: optax.chain(hj.hesso(make_groups(), K, PERIODS, TP, warmup_steps=1000)),
    lambda: hj.hesso(make_groups(), K, PERIODS, TP, warmup_steps=1000),
], ids=["first-in-chain", "alone"])
def test_missing_base_optimizer_is_named_when_updates_diverge(make_tx):
    """Raw gradients as updates are gradient ascent; when the parameters overflow, the
    error names the missing base optimizer (found from where init was called)."""
    tx = make_tx()
    params = make_params()
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(diverging_loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    with pytest.raises(Exception) as info:
        for _ in range(200):
            params, state = step(params, state)
    msg = str(info.value)
    assert "hesso: parameters are NaN/inf since step ~" in msg
    assert ("hesso was initialised as the first transformation of its optax.chain (or "
            "outside any chain), so the updates it projects are the raw gradients, and "
            "x + ∇f is gradient ascent: put a base optimizer first, e.g. "
            "optax.chain(optax.adam(1e-3), hj.hesso(...)).") in msg


def test_with_a_base_optimizer_no_base_hint():
    tx = optax.chain(optax.sgd(1e3), hesso(warmup_steps=1000))
    with pytest.raises(Exception) as info:
        train(tx, 200, params=make_params())
    assert "parameters are NaN/inf" in str(info.value)
    assert "raw gradients" not in str(info.value)


def test_apply_if_finite_keeps_the_run_alive():
    tx = optax.apply_if_finite(optax.chain(optax.adam(1e-2), hesso()), 5)
    params, state = train(tx, TW + PERIODS * TP + 4, bad={1, TW, TW + 1, TW + TP})
    assert hj.hesso_status(state).num_pruned == K
    assert make_groups().zero_groups(params).sum() == K


# ---------------------------------------------------------------- item 4: early placement
WRONG = {
    "hesso-first": lambda: optax.chain(hesso(warmup_steps=1000), optax.adam(1e-2)),
    "scaled-after": lambda: optax.chain(optax.adam(1e-2), hesso(warmup_steps=1000),
                                        optax.scale(0.5)),
    "clipped-after": lambda: optax.chain(optax.sgd(1.0), hesso(warmup_steps=1000),
                                         optax.clip(1e-3)),
}


@pytest.mark.parametrize("name", list(WRONG))
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_misplaced_hesso_is_reported_at_the_second_update(name, jit):
    """Long before the first period end (warm-up of 1000 steps), at update 1."""
    tx = WRONG[name]()
    step = make_step(tx, jit=jit)
    params = make_params()
    state = tx.init(params)
    params, state = step(params, state, jnp.asarray(False))  # update 0 arms the probe
    with pytest.raises(Exception) as info:
        jax.block_until_ready(step(params, state, jnp.asarray(False)))
    msg = str(info.value)
    assert re.search(r"hesso: the parameters did not move by HESSO's last update: at step 1 "
                     r"a sampled element of 'l1/(kernel|bias)' is -?[0-9.e+-]+, but the "
                     r"previous parameters plus HESSO's update give -?[0-9.e+-]+\.", msg), msg
    assert LAST in msg
    assert "pass check_updates=False to hj.hesso if you do so on purpose" in msg
    if not jit:
        assert info.type is ValueError


def test_misplaced_hesso_is_reported_inside_lax_scan():
    tx = WRONG["hesso-first"]()

    @jax.jit
    def run(params):
        def body(carry, _):
            p, s = carry
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, tx.init(params)), None, length=3)[0]

    with pytest.raises(Exception, match="did not move by HESSO's last update: at step 1"):
        jax.block_until_ready(run(make_params()))


def clip_params(params):
    return jax.tree.map(lambda p: jnp.clip(p, -0.5, 0.5), params)


@pytest.mark.parametrize("check_updates", [True, False])
def test_parameters_changed_between_updates(check_updates):
    """Weight clipping between updates: reported by default, allowed with
    check_updates=False (the period-end check still holds: clip(0) = 0)."""
    tx = optax.chain(optax.adam(1e-2), hesso(check_updates=check_updates))
    step = make_step(tx)
    params = make_params()
    state = tx.init(params)

    def run():
        nonlocal params, state
        for _ in range(TW + PERIODS * TP + 2):
            params, state = step(params, state, jnp.asarray(False))
            params = clip_params(params)
        return jax.block_until_ready(params)

    if check_updates:
        with pytest.raises(Exception, match="did not move by HESSO's last update: at step 1"):
            run()
    else:
        run()
        assert make_groups().zero_groups(params).sum() == K


def test_check_updates_must_be_bool():
    with pytest.raises(TypeError, match="check_updates must be a bool"):
        hesso(check_updates=1)


def full_run(tx, steps=TW + PERIODS * TP + 3, **kw):
    params, state = train(tx, steps, **kw)
    assert make_groups().zero_groups(params).sum() == K
    return params, state


@pytest.mark.parametrize("make_tx", [
    lambda: optax.chain(optax.adam(1e-2), hesso()),
    lambda: optax.chain(optax.sgd(0.05, momentum=0.9), optax.ema(0.9), hesso()),
    lambda: optax.MultiSteps(optax.chain(optax.adam(1e-2), hesso()), every_k_schedule=3),
    lambda: optax.apply_if_finite(optax.chain(optax.adam(1e-2), hesso()), 3),
    lambda: optax.chain(optax.adam(1e-2), hesso(cric=CricConfig(2, 0.05))),
    lambda: optax.chain(optax.adamw(1e-2, weight_decay=0.1), hesso(min_keep=2)),
], ids=["adam", "ema", "multisteps", "apply_if_finite", "cric", "adamw-floor"])
def test_no_false_alarm_over_a_whole_schedule(make_tx):
    tx = make_tx()
    multi = isinstance(tx, optax.MultiSteps)
    steps = (TW + PERIODS * TP + 3) * (3 if multi else 1)
    # apply_if_finite: the skipped step 4 keeps the parameters and HESSO's state; donated
    # buffers (MultiSteps): the probe reads the parameters before they are overwritten.
    full_run(tx, steps + (1 if "apply_if_finite" in str(tx) else 0), donate=multi,
             bad={4} if "apply_if_finite" in str(tx) else ())


def test_no_false_alarm_with_donated_buffers():
    full_run(optax.chain(optax.adam(1e-2), hesso()), donate=True)


def test_no_false_alarm_with_bf16_and_mixed_dtypes():
    params = make_params(jnp.bfloat16)
    params["l2"]["kernel"] = params["l2"]["kernel"].astype(jnp.float32)
    tx = optax.chain(optax.adam(1e-2), hesso())
    params, _ = train(tx, TW + PERIODS * TP + 3, params=params)
    assert make_groups().zero_groups(params).sum() == K


def test_no_false_alarm_for_several_inits_and_a_new_start():
    """Two runs from one transformation; a state initialised on other values; a state
    carried to parameters of the same shapes that were re-initialised (not armed: only the
    first update after init never compares)."""
    tx = optax.chain(optax.adam(1e-2), hesso())
    a = full_run(tx)
    b = full_run(tx)
    jax.tree.map(np.testing.assert_array_equal, a[0], b[0])
    state = tx.init(jax.tree.map(jnp.zeros_like, make_params()))
    full_run(tx, state=state)  # init on zeros, train from make_params()
    state = jax.jit(tx.init)(make_params())
    full_run(tx, state=state)


def test_state_from_other_shapes_is_not_compared():
    """A probe armed for other parameter shapes (e.g. the state before surgery) is not
    compared: the key differs, so the first update re-arms it."""
    tx = optax.chain(optax.adam(1e-2), hesso())
    _, state = train(tx, 2)
    hs = state[1]
    assert int(hs.probe_key) != 0
    wide = hj.Groups.from_families([hj.GroupFamily(
        HIDDEN, (hj.Member(("l1", "kernel"), 1), hj.Member(("l1", "bias"), 0)))])
    other = {"l1": {"kernel": jnp.ones((D_IN + 1, HIDDEN)), "bias": jnp.ones((HIDDEN,))}}
    tx2 = hj.hesso(wide, K, PERIODS, TP, warmup_steps=TW)
    tx2.init(other)
    u, hs2 = jax.jit(tx2.update)(other, hs, other)
    assert int(hs2.probe_key) not in (0, int(hs.probe_key))


def test_no_false_alarm_with_nnx_optimizer_and_surgery():
    from hesso_jax.models import MLP

    model = MLP(8, (16, 8), 4, rngs=nnx.Rngs(0))
    groups = model.groups()
    x = jax.random.normal(jax.random.key(0), (16, 8))
    y = jax.random.normal(jax.random.key(1), (16, 4))
    tx = optax.chain(optax.adam(1e-2), hj.hesso(groups, 10, 2, 3))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)

    for _ in range(8):
        step(model, optimizer)
    assert groups.zero_groups(nnx.state(model, nnx.Param)).sum() == 10


def test_probe_adds_no_parameter_sized_buffer(monkeypatch):
    """The compiled step with the probe needs (almost) no more scratch memory than with
    an empty probe: far less than the smallest member leaf."""
    from hesso_jax import placement

    wide = 512
    params = {"l1": {"kernel": jnp.ones((64, wide)), "bias": jnp.zeros((wide,))},
              "l2": {"kernel": jnp.ones((wide, 10)), "bias": jnp.zeros((10,))}}
    groups = hj.Groups.from_families([hj.GroupFamily(
        wide, (hj.Member(("l1", "kernel"), 1), hj.Member(("l1", "bias"), 0)),
        (hj.Member(("l2", "kernel"), 0),))])
    xs = jnp.ones((32, 64))

    def temp_bytes():
        tx = optax.chain(optax.adam(1e-3), hj.hesso(groups, 0.5, 2, 4, warmup_steps=4))

        def step(p, s):
            g = jax.grad(lambda q: jnp.mean(jax.nn.relu(xs @ q["l1"]["kernel"]
                                                        + q["l1"]["bias"]) @ q["l2"]["kernel"]
                                            + q["l2"]["bias"]))(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params))
        return compile_default(lowered).memory_analysis().temp_size_in_bytes

    with_probe = temp_bytes()
    monkeypatch.setattr(placement, "probe_sites", lambda p, layout: placement.ProbeSites((), 1))
    without = temp_bytes()
    assert with_probe - without < 1024, (with_probe, without)  # bias leaf alone: 2048 bytes


# ---------------------------------------------------------------- item 5: second copies
def test_schedule_free_is_refused_at_init():
    params = make_params()
    msg = ("hesso cannot follow this optimizer: optax.contrib.schedule_free "
           "(schedule_free_adamw, schedule_free_sgd) keeps its own copy z of the parameters")
    for base in (optax.contrib.schedule_free_adamw(1e-2),
                 optax.contrib.schedule_free_sgd(1e-2)):
        tx = optax.chain(base, hesso())
        with pytest.raises(ValueError, match=re.escape(msg)) as info:
            tx.init(params)
        assert "schedule_free_eval_params" in str(info.value)
        assert "optax.chain(optax.adamw(" in str(info.value)
        with pytest.raises(ValueError, match=re.escape(msg)):
            jax.eval_shape(tx.init, params)
    inside = optax.contrib.schedule_free(optax.chain(optax.adam(1e-2, b1=0.0), hesso()), 1e-2)
    with pytest.raises(ValueError, match=re.escape(
            "hesso cannot be used inside this wrapper: optax.contrib.schedule_free")):
        inside.init(params)


def test_schedule_free_eval_params_would_not_be_pruned():
    """Why it is refused: bypassing the check, the training sequence is pruned but the
    evaluation parameters have no zero group."""
    params = make_params()
    sf = optax.contrib.schedule_free_adamw(1e-2)
    h = hesso()
    h_state = h.init(params)  # outside the chain, so the check does not see schedule-free
    state = (sf.init(params), h_state)

    @jax.jit
    def step(p, s):
        u, s0 = sf.update(jax.grad(loss)(p), s[0], p)
        u, s1 = h.update(u, s[1], p)
        return optax.apply_updates(p, u), (s0, s1)

    for _ in range(TW + PERIODS * TP + 2):
        params, state = step(params, state)
    assert make_groups().zero_groups(params).sum() == K
    eval_params = optax.contrib.schedule_free_eval_params(state[0], params)
    assert make_groups().zero_groups(eval_params).sum() == 0


def test_lookahead_is_refused_at_init():
    tx = optax.lookahead(optax.chain(optax.adam(1e-2), hesso()), sync_period=3,
                         slow_step_size=0.5)
    with pytest.raises(ValueError, match=re.escape(
            "hesso cannot be used inside this wrapper: optax.lookahead keeps slow parameters")):
        tx.init(optax.LookaheadParams.init_synced(make_params()))


def test_schedule_free_refused_through_nnx_optimizer():
    from hesso_jax.models import MLP

    model = MLP(8, (16, 8), 4, rngs=nnx.Rngs(0))
    tx = optax.chain(optax.contrib.schedule_free_adamw(1e-2), hj.hesso(model.groups(), 4, 2, 3))
    with pytest.raises(ValueError, match="schedule_free_eval_params"):
        nnx.Optimizer(model, tx, wrt=nnx.Param)


# ---------------------------------------------------------------- item 8: CRIC trials
def test_cric_trial_with_nonfinite_loss_is_rejected():
    """A trial step that overflows (huge trial learning rate): the trial is rejected, the
    greedy set is kept, the scores stay finite, and the result says so."""
    params, groups = make_params(), make_groups()
    res = hj.cric(loss, params, groups, 4, sample_steps=3, learning_rate=1e10)
    greedy_scores = hj.saliency.weighted()(params, jax.tree.map(
        lambda g: -1e10 * g, jax.grad(loss)(params)), groups)
    greedy = hj.projection.bottom_k(greedy_scores, jnp.ones(HIDDEN, bool), 4)
    assert int(res.rejected) == 1 and int(res.cycles) == 0
    np.testing.assert_array_equal(res.redundant, greedy)
    np.testing.assert_array_equal(res.scores, greedy_scores)
    assert np.isfinite(np.asarray(res.scores)).all()
    ok = hj.cric(loss, params, groups, 4, sample_steps=3, learning_rate=0.05)
    assert int(ok.rejected) == 0


def test_cric_rejects_a_trial_whose_loss_turns_nan():
    """The loss is NaN once the trial moves the parameters (NaN batch for the trial
    points only): rejected, greedy set kept."""
    params, groups = make_params(), make_groups()
    x0 = params["l1"]["bias"]

    def fragile(p):
        moved = jnp.any(p["l1"]["bias"] != x0)
        return jnp.where(moved, jnp.nan, loss(p))

    res = hj.cric(fragile, params, groups, 4, sample_steps=3, learning_rate=0.05)
    assert int(res.rejected) == 1
    assert int(res.redundant.sum()) == 4 and np.isfinite(np.asarray(res.scores)).all()


def test_hesso_cric_records_a_rejected_trial_and_keeps_training():
    cric = CricConfig(sample_steps=2, learning_rate=1e10)
    tx = optax.chain(optax.adam(1e-2), hesso(cric=cric))
    params, state = train(tx, TW + PERIODS * TP + 2)
    status = hj.hesso_status(state)
    assert status.cric_rejected == PERIODS and status.num_pruned == K
    assert make_groups().zero_groups(params).sum() == K
    assert np.all([np.isfinite(v).all() for v in jax.tree.leaves(params)])
    ok_tx = optax.chain(optax.adam(1e-2), hesso(cric=CricConfig(2, 0.05)))
    assert hj.hesso_status(train(ok_tx, TW + 1)[1]).cric_rejected == 0


def test_nan_gradient_at_a_cric_period_start():
    """NaN gradients at the period start of HESSO-CRIC: with apply_if_finite the step is
    skipped (its CRIC selection discarded); without it the next update reports NaN."""
    cric = CricConfig(sample_steps=2, learning_rate=0.05)
    guarded = optax.apply_if_finite(optax.chain(optax.adam(1e-2), hesso(cric=cric)), 3)
    params, state = train(guarded, TW + PERIODS * TP + 3, bad={TW})
    assert make_groups().zero_groups(params).sum() == K
    tx = optax.chain(optax.adam(1e-2), hesso(cric=cric))
    with pytest.raises(Exception, match=re.escape(
            f"hesso: parameters are NaN/inf since step ~{TW + 1}; wrap the chain")):
        train(tx, TW + 2, bad={TW})


# ---------------------------------------------------------------- 8-device meshes
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
@pytest.mark.parametrize("axis_type,fault", [("auto", "misplaced"), ("explicit", "misplaced"),
                                             ("explicit", "nan")])
def test_early_checks_on_an_fsdp_mesh(axis_type, fault):
    """On 8 devices with FSDP-sharded parameters (sampled elements on sharded
    dimensions), a misplaced HESSO is reported at update 1 and a NaN update at the next
    update, long before the first period end; a correct run raises nothing."""
    from helpers import (
        FSDP_SPECS,
        SHARD_K,
        SHARD_PERIODS,
        SHARD_TP,
        mesh_of,
        put,
        shard_data,
        shard_groups,
        shard_params,
        shard_train,
    )
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = mesh_of(AxisType.Auto if axis_type == "auto" else AxisType.Explicit)
    x, y = shard_data()
    with jax.set_mesh(mesh):
        params = put(mesh, shard_params(), FSDP_SPECS)
        x = jax.device_put(x, NamedSharding(mesh, P("d")))
        y = jax.device_put(y, NamedSharding(mesh, P("d")))
        h = hj.hesso(shard_groups(), SHARD_K, SHARD_PERIODS, SHARD_TP, warmup_steps=100)
        ok = optax.chain(optax.adam(1e-2), h)
        jax.block_until_ready(shard_train(ok, params, x, y, steps=3))
        if fault == "misplaced":
            tx, match = optax.chain(h, optax.adam(1e-2)), "did not move by HESSO's last update"
        else:
            tx, match = optax.chain(optax.sgd(1e30), h), "parameters are NaN/inf since step ~"
        with pytest.raises(Exception, match=match):
            jax.block_until_ready(shard_train(tx, params, x, y, steps=3))
