"""HESSO and HESSO-CRIC on the Llama decoder with FSDP x tensor parallelism (8 devices).

The mesh is ``("fsdp", "tp") = (2, 4)``. The pruned axes themselves are sharded over
``"tp"`` (Megatron style, `helpers.tp_specs`): the kv-head axis of ``key``/``value`` with
the query-head axis of ``query``/``out`` (each device holds whole kv groups with their
query heads), the SwiGLU neuron axis of ``gate``/``up``/``down`` and the embedding's
vocabulary; the model width over ``"fsdp"``; the batch over ``"fsdp"``. A run must
select the same groups and reach the same parameters (float noise) as the one-device run,
keep the parameters' and Adam moments' shardings, keep HESSO's per-group vectors
replicated; the model shrunk with ``round_to=4`` must keep every pruned axis divisible by
``"tp"`` and run re-sharded with the same specs, equal to the masked model.

Under ``AxisType.Explicit`` the Llama forward pass runs inside
``jax.sharding.auto_axes``: the model is written sharding-agnostic, and called directly on
Explicit-typed arrays its first op, the embedding lookup (a gather of batch-sharded
tokens), raises ``ShardingTypeError`` asking for an ``out_sharding=``. The gradients,
HESSO's update and the optimizer state stay Explicit-typed.

``run`` blocks after every step. Without it one of four runs of this setup (Auto, 2 x 4)
died in an XLA:CPU rendezvous timeout (2 cores shared with other jobs): each device's
collectives wait on a thread of one shared pool, and every waiting thread belonged to
devices 0-3, none to devices 4-7.
"""

from __future__ import annotations

import functools

import chex
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import (
    TP_MESH_SHAPE,
    assert_close_rel,
    load_benchmark,
    put_host,
    randomized,
    tp_mesh,
    tp_specs,
)
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import hesso_jax as hj
from hesso_jax.hesso import HessoState
from hesso_jax.models import Llama
from hesso_jax.models.charlm import lm_loss
from hesso_jax.surgery import KeepPlan, shrink_groups

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")

# 2 layers of 16 query / 8 kv heads (head_dim 2) and 32 SwiGLU neurons: 80 groups, every
# pruned axis divisible by TP.
V, D, LAYERS, HEADS, KV_HEADS, MLP = 64, 32, 2, 16, 8, 32
BATCH, SEQ = 8, 8
FSDP, TP = TP_MESH_SHAPE
K, PERIODS, PERIOD_LEN, TW = 40, 2, 2, 1
STEPS = TW + PERIODS * PERIOD_LEN + 1  # warm-up, two periods, one fine-tune step
# avg magnitude puts heads and neurons on one scale, so heads are pruned too (plain
# magnitude favours the 16x larger head groups); first-order Taylor needs the direction.
SALIENCY = {"avg_magnitude": 1.0, "taylor_first_order": 1.0}
CRIC = hj.CricConfig(sample_steps=2, learning_rate=0.05)
AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


@functools.cache
def problem():
    """``(graphdef, params, groups, windows)``: a random Llama (no initialiser compiled),
    its discovered groups and a batch of token windows."""
    model = randomized(lambda: Llama(V, D, LAYERS, HEADS, KV_HEADS, MLP, max_len=SEQ,
                                     rngs=nnx.Rngs(0)))
    windows = jax.random.randint(jax.random.key(1), (BATCH, SEQ + 1), 0, V)
    groups = hj.discover_groups(model, windows[:, :-1])
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params, groups, windows


def make_tx(groups, use_cric):
    return optax.chain(optax.adam(1e-2), hj.hesso(
        groups, K, PERIODS, PERIOD_LEN, warmup_steps=TW, saliency=SALIENCY,
        cric=CRIC if use_cric else None))


def forward_fn(graphdef, explicit):
    """``f(params, tokens) -> logits``; wrapped in `auto_axes` on an Explicit mesh."""
    def forward(params, tokens):
        return nnx.merge(graphdef, params)(tokens)

    if explicit:
        return jax.sharding.auto_axes(forward, out_sharding=P("fsdp"))
    return forward


def auto_layout(tx, params, specs, mesh):
    """``(param_shardings, state_shardings)`` to pin a step's outputs on an Auto mesh.

    Under ``AxisType.Auto`` the layout of an output is the compiler's choice: ``tx.init``'s
    ``zeros_like`` moments (no data dependence) come out replicated, and after a step
    the RMSNorm scales and their Adam moments move from ``P()`` to ``P("fsdp")`` (Adam
    alone does the same). Unpinned, every such change recompiles the step; pinned (moments
    like their parameters, the rest replicated), it compiles once.
    """
    param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    state_shardings = optax.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_shardings,
        transform_non_params=lambda _: NamedSharding(mesh, P()))
    return param_shardings, state_shardings


def run(use_cric, mesh=None):
    """``STEPS`` jitted HESSO steps, on one device or on ``mesh`` (inside its `set_mesh`).

    On a mesh the parameters are put with `tp_specs` and the batch along ``"fsdp"``;
    on an Auto mesh the step's outputs are pinned (`auto_layout`), on an Explicit mesh
    the layouts are the arrays' types. Returns ``(params, opt_state)``.
    """
    graphdef, params, groups, windows = problem()
    explicit = mesh is not None and AxisType.Explicit in mesh.axis_types
    forward = forward_fn(graphdef, explicit)
    tx = make_tx(groups, use_cric)

    def loss(p, w):
        return lm_loss(forward(p, w[:, :-1]), w[:, 1:])

    def train_step(p, s, w):
        g = jax.grad(loss)(p, w)
        u, s = tx.update(g, s, p, value_fn=lambda q: loss(q, w))
        return optax.apply_updates(p, u), s

    init, step = jax.jit(tx.init), jax.jit(train_step)
    if mesh is not None:
        specs = tp_specs(params, groups)
        params = put_host(mesh, params, specs)
        windows = put_host(mesh, windows, P("fsdp"))
        if not explicit:
            pinned = auto_layout(tx, params, specs, mesh)
            init = jax.jit(tx.init, out_shardings=pinned[1])
            step = jax.jit(train_step, out_shardings=pinned)
    state = init(params)
    for _ in range(STEPS):
        params, state = jax.block_until_ready(step(params, state, windows))
    return params, state


@functools.cache
def reference(use_cric):
    """The one-device run: host parameters and status."""
    params, state = run(use_cric)
    return jax.device_get(params), hj.hesso_status(state)


@functools.cache
def sharded(axis, use_cric):
    """The run on the 2 x 4 mesh: ``(params, opt_state, mesh, specs)``."""
    mesh = tp_mesh(AXIS_TYPES[axis])
    _, params, groups, _ = problem()
    specs = tp_specs(params, groups)
    with jax.set_mesh(mesh):
        params, state = run(use_cric, mesh)
    return params, state, mesh, specs


def assert_sharded_like(tree, mesh, specs):
    def check(a, s):
        want = NamedSharding(mesh, s)
        assert a.sharding.is_equivalent_to(want, a.ndim), (a.sharding, want)

    jax.tree.map(check, tree, specs)


# HESSO-CRIC on Auto (22 s of compile on 2 cores, the most expensive program here) is
# left to tests/test_sharding.py's FSDP runs; here CRIC runs on the Explicit mesh, where
# every carry's sharding is part of its type.
@pytest.mark.parametrize("axis,use_cric", [("auto", False), ("explicit", False),
                                           ("explicit", True)],
                         ids=["auto", "explicit", "explicit-cric"])
def test_fsdp_tp_run_matches_single_device(axis, use_cric):
    params, state, mesh, specs = sharded(axis, use_cric)
    ref_params, ref_status = reference(use_cric)
    status = hj.hesso_status(state)
    groups = problem()[2]

    # Same selection, same parameters (float noise: the sharded reductions sum in
    # another order), pruned groups exactly zero.
    assert status.phase == "finetune" and status.num_pruned == K
    np.testing.assert_array_equal(status.pruned, ref_status.pruned)
    np.testing.assert_array_equal(status.redundant, ref_status.redundant)
    assert status.cric_cycles == ref_status.cric_cycles
    np.testing.assert_allclose(status.scores, ref_status.scores, rtol=1e-4, atol=1e-6)
    host = jax.device_get(params)
    chex.assert_trees_all_close(host, ref_params, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(groups.zero_groups(host)), status.pruned)
    # Heads and neurons of both layers were pruned (the sharded axes were cut into).
    per_family = [status.pruned[s:s + f.size].sum()
                  for s, f in zip(groups.starts, groups.families, strict=True)]
    assert all(n > 0 for n in per_family), per_family

    # Parameters and Adam's moments keep the FSDP x TP layout (on Explicit meshes a
    # property of the step's types; on Auto meshes pinned, see `auto_layout`); HESSO's
    # per-group vectors are replicated.
    adam = state[0][0]
    for tree in (params, adam.mu, adam.nu):
        assert_sharded_like(tree, mesh, specs)
    hesso_state = state[1]
    assert isinstance(hesso_state, HessoState)
    for field in (hesso_state.redundant, hesso_state.pruned, hesso_state.scores):
        assert field.sharding.is_fully_replicated and len(field.sharding.device_set) == 8


def test_shrunk_model_keeps_tp_divisible_sizes_and_runs_resharded():
    """``shrink_model(round_to=TP)`` of the sharded run re-shards with the same specs."""
    params, state, _, _ = sharded("auto", False)
    graphdef, _, groups, windows = problem()
    tokens = windows[:, :-1]
    pruned = hj.hesso_status(state).pruned
    host = jax.device_get(params)
    masked = nnx.merge(graphdef, host)  # the pruned groups are exactly zero
    small = hj.shrink_model(masked, groups, tokens, round_to=TP)  # verified on tokens

    # Each family keeps its surviving groups rounded up to a multiple of TP (exact-zero
    # placeholders added), so every pruned axis still divides the "tp" mesh axis.
    kept = [int((~pruned[s:s + f.size]).sum())
            for s, f in zip(groups.starts, groups.families, strict=True)]
    want = [min(f.size, -(-k // TP) * TP) for k, f in zip(kept, groups.families, strict=True)]
    assert any(k % TP for k in kept), f"no kept count to round in this run: {kept}"
    assert all(n % TP == 0 for n in want)
    rep = HEADS // KV_HEADS
    for i, layer in enumerate(small.layers):
        assert layer.attn.key.shape[1] == layer.attn.value.shape[1] == want[2 * i]
        assert layer.attn.query.shape[1] == layer.attn.out.shape[0] == rep * want[2 * i]
        assert layer.mlp.gate.kernel.shape[1] == layer.mlp.down.kernel.shape[0] == want[2 * i + 1]
    small_groups = shrink_groups(groups, KeepPlan.from_mask(groups, ~pruned, round_to=TP))
    assert [f.size for f in small_groups.families] == want

    # Re-sharded with the same rule, the shrunk model equals the masked one.
    small_graph, small_params = nnx.split(small, nnx.Param)
    specs = tp_specs(small_params, small_groups)
    want_out = jax.jit(forward_fn(graphdef, False))(host, tokens)
    for axis, axis_type in AXIS_TYPES.items():
        mesh = tp_mesh(axis_type)
        with jax.set_mesh(mesh):
            on_mesh = put_host(mesh, small_params, specs)
            x = put_host(mesh, tokens, P("fsdp"))
            out = jax.jit(forward_fn(small_graph, axis == "explicit"))(on_mesh, x)
        assert_close_rel(out, want_out, 1e-5)
        for member in (m for f in small_groups.families for m in f.members):
            leaf = functools.reduce(lambda t, k: t[k], member.path, on_mesh)[...]
            shard = leaf.addressable_shards[0].data.shape
            assert shard[member.axis] * TP == leaf.shape[member.axis], member.path

    # Without rounding a kept count that TP does not divide cannot be laid out.
    unrounded = nnx.split(hj.shrink_model(masked, groups, verify=False), nnx.Param)[1]
    with pytest.raises(ValueError, match="evenly divide"):
        put_host(tp_mesh(AxisType.Auto), unrounded, tp_specs(unrounded, groups))


def test_memory_benchmark_measures_what_the_formula_says():
    """benchmarks/llm_memory.py: measured per-device bytes == its arithmetic, balanced."""
    bench = load_benchmark("llm_memory")
    _, params, groups, _ = problem()
    assert bench.tp_specs is hj.tensor_parallel_specs  # one rule, the library's

    config = bench.LlamaConfig(vocab_size=V, d_model=D, num_layers=LAYERS, num_heads=HEADS,
                               num_kv_heads=KV_HEADS, mlp_dim=MLP, max_len=SEQ)
    one, eight = (bench.measure(config, f, t) for f, t in ((1, 1), TP_MESH_SHAPE))
    n = one["params_count"]
    assert one["params_bytes_max"] == 4 * n and one["adam_bytes_max"] == 8 * n + 4
    for row in (one, eight):
        assert row["total_bytes_max"] == row["total_bytes_min"] == row["model_bytes"]
        assert row["hesso_bytes_max"] == row["model_hesso_bytes"]  # O(G), replicated
    replicated = 4 * eight["replicated_params"]  # the RMSNorm scales
    assert eight["params_bytes_max"] == (4 * n - replicated) // (FSDP * TP) + replicated
