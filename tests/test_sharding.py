"""HESSO and HESSO-CRIC under jax.jit on an 8-device mesh (Auto and Explicit axis types).

Data parallel (replicated parameters, batch sharded) and FSDP-style (parameters sharded
along their channel axes, so per-group reductions cross devices) runs must select the same
groups and reach the same parameters (within 1e-6) as the single-device run, keep the
parameters' shardings in the parameters and the base optimizer's state, keep HESSO's
per-group vectors replicated, round-trip through orbax with their shardings, and still
report a misplaced HESSO from the placement check.
"""

import functools

import chex
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import (
    FSDP_SPECS,
    SHARD_DIMS,
    SHARD_K,
    SHARD_PERIODS,
    SHARD_TP,
    mesh_of,
    put,
    shard_data,
    shard_groups,
    shard_loss,
    shard_params,
    shard_train,
)
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import hesso_jax as hj
from hesso_jax.cric import CricConfig
from hesso_jax.hesso import HessoState

D_IN, HIDDEN, D_OUT, BATCH = SHARD_DIMS
K, PERIODS, TP, TW = SHARD_K, SHARD_PERIODS, SHARD_TP, 1
STEPS = TW + PERIODS * TP + 1  # warm-up, two periods, fine-tune; placement check at 3 and 5
CRIC = CricConfig(sample_steps=2, learning_rate=0.05)

FSDP = FSDP_SPECS
DP = {"l1": {"kernel": P(), "bias": P()}, "l2": {"kernel": P(), "bias": P()}}

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
make_params, make_groups, loss = shard_params, shard_groups, shard_loss
X, Y = shard_data()


def make_tx(cric, *, misplaced=False):
    parts = [optax.adam(1e-2), hj.hesso(make_groups(), K, PERIODS, TP, warmup_steps=TW,
                                        cric=cric)]
    if misplaced:
        parts.append(optax.scale(0.5))
    return optax.chain(*parts)


def train(tx, params, x, y, steps=STEPS):
    return shard_train(tx, params, x, y, steps)


@functools.cache
def reference(use_cric):
    """The single-device run (default device, no mesh)."""
    params, state = train(make_tx(CRIC if use_cric else None), make_params(), X, Y)
    return jax.device_get(params), hj.hesso_status(state)


def assert_same_sharding(arr, mesh, spec, ndim):
    expected = NamedSharding(mesh, spec)
    assert arr.sharding.is_equivalent_to(expected, ndim), (arr.sharding, expected)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
@pytest.mark.parametrize("layout,use_cric", [("dp", False), ("fsdp", False), ("fsdp", True)],
                         ids=["dp", "fsdp", "fsdp-cric"])
def test_sharded_run_matches_single_device(tmp_path, axis_type, layout, use_cric):
    specs = FSDP if layout == "fsdp" else DP
    mesh = mesh_of(axis_type)
    with jax.set_mesh(mesh):
        params = put(mesh, make_params(), specs)
        x = jax.device_put(X, NamedSharding(mesh, P("d")))
        y = jax.device_put(Y, NamedSharding(mesh, P("d")))
        params, state = train(make_tx(CRIC if use_cric else None), params, x, y)
        jax.block_until_ready((params, state))
        restored = checkpoint_round_trip(tmp_path, mesh, make_tx(None), params, state)
    ref_params, ref_status = reference(use_cric)
    status = hj.hesso_status(state)

    # Same pruned set, same parameters.
    assert status.phase == "finetune" and status.num_pruned == K
    np.testing.assert_array_equal(status.pruned, ref_status.pruned)
    host = jax.device_get(params)
    np.testing.assert_array_equal(make_groups().zero_groups(host), ref_status.pruned)
    chex.assert_trees_all_close(host, ref_params, rtol=0, atol=1e-6)
    np.testing.assert_allclose(status.scores, ref_status.scores, rtol=1e-5, atol=1e-6)
    assert status.cric_cycles == ref_status.cric_cycles

    # Parameters and the base optimizer's moments keep the parameters' shardings.
    adam_state, hesso_state = state[0][0], state[1]
    for tree in (params, adam_state.mu, adam_state.nu):
        jax.tree.map(lambda a, s: assert_same_sharding(a, mesh, s, a.ndim), tree, specs)
    # HESSO's per-group vectors are replicated on every device.
    assert isinstance(hesso_state, HessoState)
    for field in (hesso_state.redundant, hesso_state.pruned, hesso_state.scores):
        assert field.sharding.is_fully_replicated
        assert len(field.sharding.device_set) == 8

    # Orbax restores every state leaf with its sharding (moments like the parameters).
    chex.assert_trees_all_equal(restored, jax.device_get(state))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)


def checkpoint_round_trip(path, mesh, fresh_tx, params, state):
    """Saves ``state``; restores it against ``eval_shape(fresh_tx.init, params)``.

    Under an Explicit mesh ``eval_shape`` returns shardings on the *abstract* mesh; orbax
    needs devices, so each spec is put on the concrete mesh (docs/multihost.md).
    """
    def concrete(s):
        spec = s.sharding.spec if s.sharding is not None else P()
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, spec))

    target = jax.eval_shape(fresh_tx.init, params)
    if any(mesh.axis_types[i] == AxisType.Explicit for i in range(len(mesh.axis_names))):
        target = jax.tree.map(concrete, target)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "ckpt", state)
        ckpt.wait_until_finished()
        return ckpt.restore(path / "ckpt", target)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_placement_check_fires_under_fsdp(axis_type):
    mesh = mesh_of(axis_type)
    with jax.set_mesh(mesh):
        params = put(mesh, make_params(), FSDP)
        x = jax.device_put(X, NamedSharding(mesh, P("d")))
        y = jax.device_put(Y, NamedSharding(mesh, P("d")))
        tx = make_tx(None, misplaced=True)
        # First period ends at step TW + TP; the check runs on the next update.
        with pytest.raises(Exception, match="must be the LAST transformation"):
            jax.block_until_ready(train(tx, params, x, y, steps=TW + TP + 1))


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_group_reductions_on_sharded_params(axis_type):
    """`Groups.reduce` (and zero_groups / sq_norms) runs on FSDP-sharded leaves, jitted."""
    groups = make_groups()
    host = make_params()
    host["l1"]["kernel"] = host["l1"]["kernel"].at[:, :5].set(0.0)
    host["l1"]["bias"] = host["l1"]["bias"].at[:5].set(0.0)
    mesh = mesh_of(axis_type)
    with jax.set_mesh(mesh):
        params = put(mesh, host, FSDP)
        norms = jax.jit(groups.sq_norms)(params)
        zero = groups.zero_groups(params)
    np.testing.assert_allclose(norms, groups.sq_norms(host), rtol=1e-6)
    np.testing.assert_array_equal(zero, np.arange(HIDDEN) < 5)


def floor_tx():
    # min_keep=20 of 32 leaves exactly K=12 candidates: the floor's sort decides them all.
    return optax.chain(optax.adam(1e-2), hj.hesso(make_groups(), K, PERIODS, TP,
                                                  warmup_steps=TW, min_keep=20))


@functools.cache
def floor_reference():
    """The single-device run with the floor (shared by both axis types)."""
    return hj.hesso_status(train(floor_tx(), make_params(), X, Y)[1])


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_family_floor_under_fsdp_matches_single_device(axis_type):
    ref = floor_reference()
    mesh = mesh_of(axis_type)
    with jax.set_mesh(mesh):
        params = put(mesh, make_params(), FSDP)
        x = jax.device_put(X, NamedSharding(mesh, P("d")))
        y = jax.device_put(Y, NamedSharding(mesh, P("d")))
        params, state = train(floor_tx(), params, x, y)
    status = hj.hesso_status(state)
    assert status.num_pruned == K
    np.testing.assert_array_equal(status.pruned, ref.pruned)
    np.testing.assert_array_equal(make_groups().zero_groups(jax.device_get(params)),
                                  ref.pruned)
