"""The optax contract battery for `hj.hesso` (modelled on optax ``contrib/_common_test.py``).

Every HESSO configuration (count K, fraction K, a parameter `Budget` with costs,
``min_keep``, saliency variants, CRIC with ``value_fn``) is checked with every base
optimizer:

- abstractly (``jax.eval_shape``, no compile) for the whole product: init/update trace,
  extra arguments are accepted, the state is a `HessoState` of arrays whose shapes and
  dtypes survive an update and both branches of a ``lax.cond`` (optax's
  shape/dtype-stability check), updates keep the parameters' structure and dtypes
  (float32 and bfloat16);
- by running, on a pairing that uses every configuration and every base optimizer at
  least once: one trace for the whole run (no recompilation between phases), stable
  state, exact zeros after the schedule (exactly K groups for counts), bit-identical
  reruns and a state that round-trips through ``jax.tree`` flatten/unflatten;
- inside ``optax.chain`` with other transformations, inside ``optax.apply_if_finite``
  around ``optax.MultiSteps``, on deeper nested parameters, and with and without jit
  (``chex.variants``).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import mlp_data, mlp_forward, mlp_groups, mlp_loss, mlp_params

import hesso_jax as hj
from hesso_jax.cric import CricConfig
from hesso_jax.hesso import HessoState

D_IN, HIDDEN, D_OUT = 4, 8, 2
TW, PERIODS, TP = 1, 2, 2
STEPS = TW + PERIODS * TP  # the schedule; every run adds one fine-tuning step
GROUPS = mlp_groups(HIDDEN)
PARAMS = mlp_params(D_IN, HIDDEN, D_OUT)
X, Y = mlp_data(8, D_IN, D_OUT)


def loss(params):
    return mlp_loss(params, X, Y)


@functools.cache
def costs():
    return hj.group_costs(mlp_forward, PARAMS, GROUPS, X)


def by_index(params, direction, groups):
    """A fixed score: group i scores i, so groups 0, 1, ... are pruned first."""
    return jnp.arange(groups.num_groups, dtype=jnp.float32)


# name -> (K, hesso keyword arguments): K as given to hesso
CONFIGS = {
    "count": lambda: (3, {}),
    "fraction": lambda: (0.5, {}),
    "budget-params": lambda: (hj.Budget(params=0.6), {"costs": costs()}),
    "min_keep": lambda: (5, {"min_keep": 3}),
    "magnitude": lambda: (3, {"saliency": "magnitude"}),
    "mix": lambda: (3, {"saliency": {"taylor_first_order": 1.0, "cosine_similarity": 2.0}}),
    "callable": lambda: (3, {"saliency": by_index}),
    "cric": lambda: (3, {"cric": CricConfig(sample_steps=2, learning_rate=0.05)}),
}
OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-2),
    "lion": lambda: optax.lion(1e-3),
}
# Runs pair configuration i with optimizer i mod 5: every one of each is run at least once.
PAIRS = [(c, o) for c, o in zip(CONFIGS, [*OPTIMIZERS, *OPTIMIZERS], strict=False)]


def make_hesso(config, groups=GROUPS):
    K, kw = CONFIGS[config]()
    return hj.hesso(groups, K, PERIODS, TP, warmup_steps=TW, **kw)


def make_tx(config, opt="adam"):
    return optax.chain(OPTIMIZERS[opt](), make_hesso(config))


def expected_pruned(config):
    """The number of groups the configuration prunes, or None for a budget."""
    K, _ = CONFIGS[config]()
    if isinstance(K, hj.Budget):
        return None
    return round(K * HIDDEN) if isinstance(K, float) else K


def hesso_state(state):
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, HessoState))
             if isinstance(s, HessoState)]
    assert len(found) == 1
    return found[0]


def assert_state_of_arrays(state):
    hs = hesso_state(state)
    assert isinstance(hs, tuple) and hasattr(hs, "_fields")  # a NamedTuple
    for name, field in zip(hs._fields, hs, strict=True):
        assert isinstance(field, jax.Array | jax.ShapeDtypeStruct), name


def assert_schedule_done(config, params, state):
    """After the schedule: fine-tuning, the pruned groups exactly zero and nothing else."""
    status = hj.hesso_status(state)
    assert status.phase == "finetune" and status.num_redundant == 0
    zero = np.asarray(GROUPS.zero_groups(params))
    np.testing.assert_array_equal(status.pruned, zero)
    want = expected_pruned(config)
    if want is not None:
        assert status.num_pruned == want
    else:  # Budget(params=0.6): kept fraction within one group's cost below the target
        c = costs()
        kept = c.kept_fraction(status.pruned)[0]
        assert 0.6 - float(np.max(c.params)) / c.dense_params <= kept <= 0.6, kept
    if config == "callable":
        np.testing.assert_array_equal(status.pruned, np.arange(HIDDEN) < 3)
    if config == "min_keep":
        assert (~status.pruned).sum() >= 3
    # pruned members are exactly 0.0 in every member leaf; dependents are left alone
    for leaf in (params["l1"]["kernel"][:, zero], params["l1"]["bias"][zero]):
        assert np.all(np.asarray(leaf) == 0.0)
    assert np.all(np.asarray(params["l2"]["kernel"])[zero].any(axis=1))


# ---------------------------------------------------------------- abstract: the product
@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("config", CONFIGS)
def test_state_and_updates_are_shape_and_dtype_stable(config, opt):
    """optax's test_state_shape_dtype_shard_stability and test_preserve_dtype, abstractly:
    an update (taken or not, under ``lax.cond``) returns a state of the same tree, shapes
    and dtypes, and updates of the parameters' tree and dtypes; extra args are ignored."""
    tx = make_tx(config, opt)
    for params in (PARAMS, jax.tree.map(lambda a: a.astype(jnp.bfloat16), PARAMS)):
        state = jax.eval_shape(tx.init, params)
        assert_state_of_arrays(state)

        def step(params, state):
            grads = jax.grad(loss)(params)
            take = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            return jax.lax.cond(
                take,
                lambda: tx.update(grads, state, params, value_fn=loss,
                                  unexpected_extra_arg_hesso_does_not_expect=1),
                lambda: (jax.tree.map(jnp.zeros_like, params), state))

        updates, new_state = jax.eval_shape(step, params, state)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
        assert jax.tree.structure(new_state) == jax.tree.structure(state)


# ---------------------------------------------------------------- running: the pairs
def build_step(config, opt):
    """``(tx, step, traces)``: one jitted step and the number of times it was traced."""
    tx = make_tx(config, opt)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params, value_fn=loss,
                                   unexpected_extra_arg_hesso_does_not_expect=1)
        return optax.apply_updates(params, updates), state

    return tx, step, traces


compiled_step = functools.cache(build_step)


def run(config, opt, steps=STEPS + 1):
    """Params and the state after every step (the init state first)."""
    tx, step, _ = compiled_step(config, opt)
    params, state = PARAMS, jax.jit(tx.init)(PARAMS)
    states = [state]
    for _ in range(steps):
        params, state = step(params, state)
        states.append(state)
    return params, states


@pytest.mark.parametrize("config,opt", PAIRS, ids=[f"{c}-{o}" for c, o in PAIRS])
def test_schedule_prunes_exactly_and_deterministically(config, opt):
    params, states = run(config, opt)
    for state in states[1:]:  # stable through warm-up, periods and fine-tuning
        chex.assert_trees_all_equal_shapes_and_dtypes(state, states[0])
        assert jax.tree.structure(state) == jax.tree.structure(states[0])
    assert_state_of_arrays(states[-1])
    assert_schedule_done(config, params, states[-1])
    # the same run again (same compiled step, no retrace): bit for bit
    params2, states2 = run(config, opt)
    chex.assert_trees_all_equal(params2, params)
    chex.assert_trees_all_equal(states2[-1], states[-1])
    # the state round-trips through jax.tree flatten/unflatten and goes on identically
    leaves, treedef = jax.tree.flatten(states[-1])
    back = jax.tree.unflatten(treedef, leaves)
    assert type(hesso_state(back)) is HessoState
    chex.assert_trees_all_equal(back, states[-1])
    _, step, traces = compiled_step(config, opt)
    chex.assert_trees_all_equal(step(params, back), step(params, states[-1]))
    assert len(traces) == 1  # one trace for warm-up, periods, fine-tuning and reruns


def test_a_fresh_transformation_reproduces_the_run_bit_for_bit():
    """Determinism across transformations (new closure, new compile), with CRIC."""
    config, opt = "cric", dict(PAIRS)["cric"]
    params, states = run(config, opt)
    tx, step, _ = build_step(config, opt)
    p, s = PARAMS, jax.jit(tx.init)(PARAMS)
    for _ in range(STEPS + 1):
        p, s = step(p, s)
    chex.assert_trees_all_equal(p, params)
    chex.assert_trees_all_equal(s, states[-1])


# ---------------------------------------------------------------- composition
def test_nested_params_and_a_longer_chain():
    """Deeper nesting, an ungrouped leaf, HESSO last of a nested chain of three."""
    groups = hj.Groups.from_families([hj.GroupFamily(
        HIDDEN, (hj.Member(("net", "l1", "kernel"), 1), hj.Member(("net", "l1", "bias"), 0)),
        (hj.Member(("net", "l2", "kernel"), 0),))])
    params = {"net": PARAMS, "scale": jnp.ones((3,))}

    def nested_loss(p):
        return loss(p["net"]) * jnp.mean(p["scale"]) ** 2

    tx = optax.chain(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
                     make_hesso("count", groups))

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(nested_loss)(p), s, p)
        return optax.apply_updates(p, u), s

    state = jax.jit(tx.init)(params)
    p = params
    for _ in range(STEPS + 1):
        p, state = step(p, state)
    assert_schedule_done("count", p["net"], state)
    assert not np.allclose(p["scale"], params["scale"])  # ungrouped leaves still train


def test_inside_apply_if_finite_and_multisteps():
    """optax's test_gradient_accumulation: an accumulating update is exactly zero; the
    schedule counts the applied steps only; a NaN gradient (at the first period start) is
    skipped without touching any state; the run still prunes exactly."""
    k, bad = 2, 2 * TW
    tx = optax.apply_if_finite(optax.MultiSteps(make_tx("count"), every_k_schedule=k),
                               max_consecutive_errors=3)

    @jax.jit
    def step(p, s, poison):
        g = jax.tree.map(lambda a: jnp.where(poison, jnp.nan, a), jax.grad(loss)(p))
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, u

    p, state = PARAMS, jax.jit(tx.init)(PARAMS)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    applied = 0
    for t in range(k * (STEPS + 1) + 1):
        before_state = state
        p, state, u = step(p, state, jnp.asarray(t == bad))
        if t == bad:
            chex.assert_trees_all_equal(u, zeros)
            chex.assert_trees_all_equal(state.inner_state, before_state.inner_state)
            assert int(state.notfinite_count) == 1
            continue
        applied += 1
        if applied % k:
            chex.assert_trees_all_equal(u, zeros)
        assert hj.hesso_status(state).step == applied // k
    assert int(state.total_notfinite) == 1
    assert hj.hesso_status(state).step == STEPS + 1
    assert_schedule_done("count", p, state)


def test_tree_map_params_is_a_no_op_on_the_state():
    """optax's 'tree_map_params works' subtest; the base optimizer's parameter-shaped
    leaves are mapped, HESSO's per-group state is not parameter-shaped and stays."""
    tx = make_tx("count")
    state = tx.init(PARAMS)
    chex.assert_trees_all_equal(optax.tree.map_params(tx, lambda v: v, state), state)
    shifted = optax.tree.map_params(tx, lambda v: v + 1.0, state)
    ours = [s for s in shifted if isinstance(s, HessoState)]
    chex.assert_trees_all_equal(ours, [s for s in state if isinstance(s, HessoState)])
    assert ours and any(
        not isinstance(s, HessoState) and jax.tree.leaves(s) and
        not jax.tree.all(jax.tree.map(lambda a, b: bool(np.all(a == b)), s, o))
        for s, o in zip(shifted, state, strict=True))


# ---------------------------------------------------------------- with and without jit
class JitAndEager(chex.TestCase):
    """The same schedule eager and jitted (the fixed-score configuration: groups 0-2 are
    pruned, exactly) agrees with the run of the pairs."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_update(self):
        config, opt = "callable", dict(PAIRS)["callable"]
        tx = make_tx(config, opt)
        init, update = self.variant(tx.init), self.variant(tx.update)
        p = PARAMS
        state = init(p)
        for _ in range(STEPS + 1):
            u, state = update(jax.grad(loss)(p), state, p)
            chex.assert_trees_all_equal_shapes_and_dtypes(u, p)
            p = optax.apply_updates(p, u)
        assert_schedule_done(config, p, state)
        ref, states = run(config, opt)
        chex.assert_trees_all_close(p, ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(hj.hesso_status(state).pruned,
                                      hj.hesso_status(states[-1]).pruned)
