"""benchmarks/tall_leaves.py: its three reduction rules compute the same sums, and only the
earlier one holds the fused period start's recomputed ``u`` of a tall leaf in a buffer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from helpers import compile_default, load_benchmark, mlp_forward, mlp_groups, mlp_params

import hesso_jax as hj
import hesso_jax.groups as hg

TALL, C = 300, 40  # a 300-row leaf: more than one pass (64 rows), fewer than 8192 channels


def model():
    return mlp_params(TALL, C, 3), mlp_groups(C)


def test_rules_sum_alike_and_restore_the_library():
    tl = load_benchmark("tall_leaves")
    params, groups = model()
    direction = jax.tree.map(lambda a: 0.3 * a + 0.1, params)
    saved = hg._channel_sums, hg.ROW_BLOCK
    sums = {}
    for rule in tl.RULES:
        with tl.rule(rule):
            f = jax.jit(lambda p, d: groups.reduce_many(lambda x, u: (x * x, u * u, x * u), p, d))
            sums[rule] = np.asarray(f(params, direction))
        assert (hg._channel_sums, hg.ROW_BLOCK) == saved
    for rule in tl.RULES:
        np.testing.assert_allclose(sums[rule], sums["library"], rtol=2e-5)


def test_only_the_earlier_rule_keeps_u_of_the_tall_leaf():
    tl = load_benchmark("tall_leaves")
    params, groups = model()
    tx = hj.hesso(groups, 0.5, 2, 4, warmup_steps=4, base=optax.adam(1e-3),
                  on_fault="record")
    x = jax.random.normal(jax.random.key(3), (16, TALL))

    def loss(q):
        return jnp.mean(mlp_forward(q, x) ** 2)

    def temp(tr):
        def step(p, s):  # a new function per rule: JAX caches traces per function
            updates, s = tr.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, updates), s

        jitted = jax.jit(step, donate_argnums=(0, 1))
        c = compile_default(jitted.lower(params, tr.init(params)))
        return c.memory_analysis().temp_size_in_bytes

    temps = {}
    for rule in tl.RULES:
        with tl.rule(rule):
            temps[rule] = temp(tx)
    kernel = TALL * C * 4
    partials = 3 * -(-TALL // hg.ROW_BLOCK) * C * 4  # 3 statistics per block of ROW_BLOCK rows
    assert temps["earlier"] - temps["library"] >= kernel // 2  # u of the tall kernel
    assert 0 <= temps["library"] - temps["blocks of 64"] <= partials
