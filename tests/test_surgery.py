"""Tests of `hesso_jax.surgery`: shrink, KeepPlan, shrink_groups, shrink_opt_state."""

from __future__ import annotations

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import (
    assert_close_rel,
    build_tree,
    flat_leaves,
    jit_reduce,
    layouts,
    make_model,
    masked,
    random_keep,
    zero_removed,
)
from hypothesis import given, settings

import hesso_jax as hj
from hesso_jax import GroupFamily, Groups, KeepPlan, Member

FEW = settings(max_examples=min(settings().max_examples, 8))


def n_params(state):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def expected_shapes(groups, keep, state):
    """Per path: the leaf shape after removing every removed group's channels."""
    shapes = {p: list(np.shape(x)) for p, x in zip(hj.tree_paths(state),
                                                     jax.tree.leaves(state), strict=True)}
    g = 0
    for fam in groups.families:
        removed = int((~keep[g:g + fam.size]).sum())
        g += fam.size
        for m in (*fam.members, *fam.dependents):
            shape = shapes[m.path]
            shape[m.axis % len(shape)] -= removed * m.block
    return {p: tuple(s) for p, s in shapes.items()}


def zero_removed_dependents(tree, groups, keep):
    """Flat ``{path: np.ndarray}`` of ``tree`` with removed groups' dependent slices zeroed.

    A kept group's member elements on a leaf that also carries dependents on another axis
    (the next layer's kernel) lose those rows at surgery; with them zeroed here, the kept
    groups' norms are what the shrunk groups must report on the shrunk tree.
    """
    d = nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree
    flat = {p: np.asarray(x).astype(np.float32) for p, x in flat_leaves(d).items()}
    g = 0
    for fam in groups.families:
        for i in range(fam.size):
            if not keep[g]:
                for m in fam.dependents:
                    if m.path in flat:
                        arr = flat[m.path]
                        idx = [slice(None)] * arr.ndim
                        idx[m.axis] = slice(m.offset + i * m.block, m.offset + (i + 1) * m.block)
                        arr[tuple(idx)] = 0.0
            g += 1
    return flat


def unflatten(flat):
    out: dict = {}
    for path, x in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = x
    return out


@functools.partial(jax.jit, static_argnums=0)
def norms_and_nonzeros(groups, tree):
    return groups.sq_norms(tree), groups.nonzero_counts(tree)


def check_shrunk_groups(groups, plan, tree, small):
    """The shrunk groups fit the shrunk tree and report the kept groups' norms and counts."""
    keep = plan.keep_mask()
    sg = hj.shrink_groups(groups, plan, tree=tree)
    assert sg.num_groups == int(keep.sum())
    assert len(sg) == sum(1 for k in plan.keep if k)
    if not sg.num_groups:
        return sg
    sg.validate(small)
    ref = unflatten(zero_removed_dependents(tree, groups, keep))
    sq_small, nz_small = norms_and_nonzeros(sg, small)
    sq_ref, nz_ref = norms_and_nonzeros(groups, ref)
    np.testing.assert_allclose(np.asarray(sq_small), np.asarray(sq_ref)[keep], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(nz_small), np.asarray(nz_ref)[keep])
    # counts: each kept group's member slices, measured on the expected shrunk shapes
    shapes = expected_shapes(groups, keep, tree)
    def other_dims(m):
        shape = shapes[m.path]
        return int(np.prod([d for j, d in enumerate(shape) if j != m.axis % len(shape)]))

    counts = [sum(m.block * other_dims(m) for m in fam.members)
              for fam in groups.families for _ in range(fam.size)]
    np.testing.assert_array_equal(sg.counts(small), np.asarray(counts)[keep])
    return sg


# ----------------------------------------------------------------------------- models

XSHAPES = {"mlp": (5, 64), "cnn": (6, 8, 8, 1), "transformer": (3, 8, 8)}


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, state, x):
    """``(output, state after the call)``; train-mode BatchNorm updates its statistics."""
    model = nnx.merge(graphdef, state)
    return model(x), nnx.state(model)


def with_placeholders(groups, keep):
    """``keep`` with the lowest group of every fully removed family kept (`KeepPlan`)."""
    keep = np.array(keep, bool)
    for fam, start in zip(groups.families, groups.starts, strict=True):
        if not keep[start:start + fam.size].any():
            keep[start] = True
    return keep


@pytest.mark.parametrize("name, drop_family", [
    ("mlp", None), ("mlp", 1), ("cnn", None), ("transformer", None), ("transformer", 0)])
def test_shrink_reference_model(name, drop_family):
    xshape = XSHAPES[name]
    model = make_model(name)
    groups = model.groups()
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(sorted(XSHAPES).index(name) + 10 * (drop_family or 0))
    x = jnp.asarray(rng.normal(size=xshape), jnp.float32)
    if name == "cnn":
        # non-trivial running statistics: a couple of train-mode passes before zeroing
        before = np.asarray(state["down"]["bn"]["mean"][...])
        for _ in range(2):
            _, state = forward(graphdef, state,
                               jnp.asarray(rng.normal(size=xshape) * 2 + 0.5, jnp.float32))
        assert not np.allclose(np.asarray(state["down"]["bn"]["mean"][...]), before)
    keep = random_keep(groups, rng, drop_family=drop_family)
    state = masked(state, groups, keep)
    np.testing.assert_array_equal(groups.zero_groups(state), ~keep)
    before_params = n_params(nnx.state(nnx.merge(graphdef, state), nnx.Param))

    small, plan = hj.shrink(state, groups)
    zero = ~keep
    keep = with_placeholders(groups, keep)  # an emptied family keeps one zero group
    assert plan.num_removed == int((~keep).sum())
    np.testing.assert_array_equal(plan.keep_mask(), keep)
    assert plan.sizes == tuple(f.size for f in groups.families)
    assert all(plan.keep)
    if drop_family is not None:
        assert plan.keep[drop_family] == (0,)
        # the placeholder is still exactly zero in the small tree
        np.testing.assert_array_equal(hj.shrink_groups(groups, plan).zero_groups(small),
                                      zero[keep])

    # every leaf has exactly the expected shape, dtypes and structure unchanged
    exp = expected_shapes(groups, keep, state)
    got = dict(zip(hj.tree_paths(small), jax.tree.leaves(small), strict=True))
    assert got.keys() == exp.keys()
    for p, x_ in got.items():
        assert x_.shape == exp[p], p
    assert jax.tree.structure(small) == jax.tree.structure(state)
    assert [x_.dtype for x_ in jax.tree.leaves(small)] == [
        x_.dtype for x_ in jax.tree.leaves(state)]

    after_params = n_params(nnx.state(nnx.merge(graphdef, small), nnx.Param))
    assert after_params < before_params
    assert after_params == sum(int(np.prod(exp[p])) for p in hj.tree_paths(
        nnx.state(nnx.merge(graphdef, state), nnx.Param)))
    if name == "mlp":
        r0, r1 = (int((~keep[:32]).sum()), int((~keep[32:]).sum()))
        assert small["layers"][0]["kernel"].shape == (64, 32 - r0)
        assert small["layers"][1]["kernel"].shape == (32 - r0, 24 - r1)
        assert small["head"]["kernel"].shape == (24 - r1, 10)
        assert after_params == (65 * (32 - r0) + (32 - r0) * (24 - r1) + (24 - r1)
                                + (24 - r1) * 10 + 10)

    # the small model computes what the masked model did, under jit (CNN: train-mode
    # BatchNorm, whose statistics updates must agree on the kept channels too) ...
    ref, state_after = forward(graphdef, state, x)
    out, small_after = forward(graphdef, small, x)
    assert_close_rel(out, ref)
    for a, b in zip(jax.tree.leaves(small_after),
                    jax.tree.leaves(hj.apply_plan(state_after, groups, plan)), strict=True):
        assert_close_rel(a, b)
    if name == "cnn":
        # ... in eval mode, which reads the running statistics ...
        full_model = nnx.merge(graphdef, state)
        full_model.eval()
        small_model = nnx.merge(graphdef, small)
        small_model.eval()
        ref_eval, _ = forward(*nnx.split(full_model), x)
        out_eval, _ = forward(*nnx.split(small_model), x)
        assert_close_rel(out_eval, ref_eval)
        assert not np.allclose(np.asarray(ref_eval), np.asarray(ref), atol=1e-3)
    if name == "mlp":
        # ... and eagerly, as nnx.merge(graphdef, small)(x) (op-by-op compiles of every new
        # shape make this slow for the larger models on CPU, so only here)
        assert_close_rel(nnx.merge(graphdef, small)(x), ref)

    # shrunk groups describe the small tree and keep the kept groups' norms
    small_groups = check_shrunk_groups(groups, plan, state, small)
    assert [f.name for f in small_groups.families] == [f.name for f in groups.families]
    if drop_family is not None:
        assert small_groups.families[drop_family].size == 1

    # re-applying the plan to a fresh model of the same architecture gives the same shapes
    fresh_gd, fresh = nnx.split(make_model(name, seed=1))
    if plan.num_removed:
        # its "removed" groups are not zero: refused unless a tolerance is given
        with pytest.raises(ValueError, match="not zero"):
            hj.shrink(fresh, groups, plan=plan)
    small2, plan2 = hj.shrink(fresh, groups, plan=plan, tolerance=float("inf"))
    assert plan2 is plan
    assert jax.tree.map(jnp.shape, small2) == jax.tree.map(jnp.shape, small)
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree.leaves(small2), jax.tree.leaves(small), strict=True))
    out, _ = forward(fresh_gd, small2, x)
    assert out.shape == ref.shape and bool(jnp.all(jnp.isfinite(out)))
    # a plan for the wrong groups is refused
    with pytest.raises(ValueError, match="family sizes"):
        hj.shrink(fresh, groups, plan=KeepPlan((1,), ((0,),)))


def test_shrink_nothing_to_remove_is_identity():
    model = make_model("mlp")
    groups = model.groups()
    state = nnx.state(model)
    small, plan = hj.shrink(state, groups)
    assert plan.num_removed == 0 and plan.keep_mask().all()
    for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert hj.shrink_groups(groups, plan) == groups


# ----------------------------------------------------------------------------- KeepPlan


def test_keep_plan_round_trip_and_masks():
    plan = KeepPlan((4, 3, 2), ((0, 2, 3), (2,), (1,)))
    assert plan.num_removed == 4
    np.testing.assert_array_equal(plan.keep_mask(),
                                  [1, 0, 1, 1, 0, 0, 1, 0, 1])
    text = plan.to_json()
    assert json.loads(text)["format"] == "hesso_jax.KeepPlan"
    back = KeepPlan.from_json(text)
    assert back == plan and back.keep == ((0, 2, 3), (2,), (1,)) and back.sizes == (4, 3, 2)
    assert KeepPlan.from_json(plan.to_json(indent=1)) == plan
    g = Groups.from_families([GroupFamily(n, (Member(("w",), 0),)) for n in (4, 3, 2)])
    assert KeepPlan.from_mask(g, plan.keep_mask()) == plan
    # lists and numpy integers are normalised to tuples of ints
    p2 = KeepPlan([4, 3, 2], [np.array([0, 2, 3]), [2], [np.int64(1)]])
    assert p2 == plan and all(type(i) is int for k in p2.keep for i in k)
    assert KeepPlan((), ()).keep_mask().shape == (0,)


def test_keep_plan_never_empties_a_family():
    """A fully removed family keeps its lowest group (an exactly-zero placeholder), so no
    shrunk leaf has a zero-size axis; an explicit empty keep list is refused."""
    g = Groups.from_families([GroupFamily(n, (Member((f"w{n}",), 0),)) for n in (4, 3, 2)])
    mask = np.array([1, 0, 1, 1, 0, 0, 0, 0, 1], bool)
    assert KeepPlan.from_mask(g, mask).keep == ((0, 2, 3), (0,), (1,))
    assert KeepPlan.from_mask(g, mask, round_to=2).keep == ((0, 1, 2, 3), (0, 1), (0, 1))
    assert KeepPlan.from_mask(g, np.zeros(9, bool)).num_removed == 9 - 3
    with pytest.raises(ValueError, match="KeepPlan family 1 keeps no group: every family "
                                         "keeps at least one"):
        KeepPlan((4, 3, 2), ((0,), (), (1,)))
    # a plan written when a family could be emptied reads back with the placeholder
    legacy = json.dumps({"format": "hesso_jax.KeepPlan", "version": 1, "sizes": [4, 3, 2],
                         "keep": [[0, 2, 3], [], [1]]})
    assert KeepPlan.from_json(legacy).keep == ((0, 2, 3), (0,), (1,))


@pytest.mark.parametrize("sizes, keep, match", [
    ((3, 2), ((0, 1),), "2 sizes but 1 keep"),
    ((3,), ((1, 0),), "family 0.*sorted"),
    ((3,), ((1, 1),), "family 0.*unique"),
    ((3, 2), ((0,), (0, 2)), r"family 1.*\[0, 2\)"),
    ((3,), ((-1, 0),), r"\[0, 3\)"),
])
def test_keep_plan_validation(sizes, keep, match):
    with pytest.raises(ValueError, match=match):
        KeepPlan(sizes, keep)


def test_keep_plan_from_mask_check_and_json_errors():
    g = Groups.from_families([GroupFamily(3, (Member(("w",), 0),))])
    with pytest.raises(ValueError, match="shape"):
        KeepPlan.from_mask(g, np.ones(4, bool))
    with pytest.raises(ValueError, match="family sizes"):
        KeepPlan((4,), ((0,),)).check(g)
    with pytest.raises(ValueError, match="family sizes"):
        hj.apply_plan({"w": jnp.ones(3)}, g, KeepPlan((3, 1), ((0,), (0,))))
    with pytest.raises(ValueError, match="format"):
        KeepPlan.from_json(json.dumps({"sizes": [3], "keep": [[0]]}))
    with pytest.raises(ValueError, match="format"):
        KeepPlan.from_json(g.to_json())


# ----------------------------------------------------------------------------- shrink_groups


def test_shrink_groups_concatenation_offsets():
    rng = np.random.default_rng(0)
    # one axis of length 14: [2 padding | 4 heads of block 2 (A) | 2 neurons (B) | C | 1 tail]
    tree = {
        "w": jnp.asarray(rng.normal(size=(3, 14)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(14,)), jnp.float32),
        "nxt": jnp.asarray(rng.normal(size=(14, 2)), jnp.float32),
    }
    a = GroupFamily(4, (Member(("w",), -1, 2, 2), Member(("b",), 0, 2, 2)),
                    (Member(("nxt",), 0, 2, 2),), name="A")
    b = GroupFamily(2, (Member(("w",), -1, 1, 10), Member(("b",), 0, 1, 10)),
                    (Member(("nxt",), 0, 1, 10),), name="B")
    c = GroupFamily(1, (Member(("b",), 0, 1, 12),), name="C")
    groups = Groups.from_families([a, b, c])
    groups.validate(tree)
    keep = np.array([True, False, True, False, True, True, True])
    tree = masked(tree, groups, keep)
    small, plan = hj.shrink(tree, groups)
    np.testing.assert_array_equal(plan.keep_mask(), keep)
    assert small["w"].shape == (3, 10) and small["nxt"].shape == (10, 2)
    kept_cols = [0, 1, 2, 3, 6, 7, 10, 11, 12, 13]
    np.testing.assert_array_equal(np.asarray(small["w"]), np.asarray(tree["w"])[:, kept_cols])
    np.testing.assert_array_equal(np.asarray(small["b"]), np.asarray(tree["b"])[kept_cols])
    sg = hj.shrink_groups(groups, plan)
    fa, fb, fc = sg.families
    assert (fa.size, fb.size, fc.size) == (2, 2, 1)
    assert [m.offset for m in fa.members] == [2, 2] and fa.dependents[0].offset == 2
    # two removed heads of block 2 come before B and C: their offsets move down by 4
    assert [m.offset for m in fb.members] == [6, 6] and fb.dependents[0].offset == 6
    assert fc.members[0].offset == 8
    assert [m.axis for m in fb.members] == [-1, 0]  # axes as written
    assert [f.name for f in sg.families] == ["A", "B", "C"]
    sg.validate(small)
    np.testing.assert_allclose(np.asarray(sg.sq_norms(small)),
                               np.asarray(groups.sq_norms(tree))[keep], rtol=1e-6)
    np.testing.assert_array_equal(sg.counts(small), groups.counts(tree)[keep])
    # removing all of A but its placeholder group 0 shifts B by the other 6 channels
    tree2 = masked(tree, groups, np.array([False, False, False, False, True, True, True]))
    small2, plan2 = hj.shrink(tree2, groups)
    assert plan2.keep == ((0,), (0, 1), (0,))
    sg2 = hj.shrink_groups(groups, plan2)
    assert [f.name for f in sg2.families] == ["A", "B", "C"] and sg2.families[0].size == 1
    assert sg2.families[1].members[0].offset == 4 and sg2.families[2].members[0].offset == 6
    assert sg2.zero_groups(small2).tolist() == [True, False, False, False]
    small2 = hj.apply_plan(tree, groups, plan2)
    sg2.validate(small2)
    np.testing.assert_allclose(np.asarray(sg2.sq_norms(small2)),
                               np.asarray(groups.sq_norms(tree))[plan2.keep_mask()],
                               rtol=1e-6)


# ----------------------------------------------------------------------------- optimizer state


def _mlp_problem():
    model = make_model("mlp")
    groups = model.groups()
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 64)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=16))

    def loss(p, gd):
        logits = nnx.merge(gd, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return model, groups, graphdef, params, loss


def _kept_mlp(tree, keep):
    """Independent slicing of an MLP-shaped pure dict (kept neurons of each layer)."""
    k0, k1 = np.flatnonzero(keep[:32]), np.flatnonzero(keep[32:])
    d = nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree
    return {
        "layers": {
            0: {"kernel": np.asarray(d["layers"][0]["kernel"])[:, k0],
                "bias": np.asarray(d["layers"][0]["bias"])[k0]},
            1: {"kernel": np.asarray(d["layers"][1]["kernel"])[k0][:, k1],
                "bias": np.asarray(d["layers"][1]["bias"])[k1]},
        },
        "head": {"kernel": np.asarray(d["head"]["kernel"])[k1],
                 "bias": np.asarray(d["head"]["bias"])},
    }


def _assert_tree_close(a, b, rtol=1e-5, atol=1e-7):
    a = nnx.to_pure_dict(a) if isinstance(a, nnx.State) else a
    b = nnx.to_pure_dict(b) if isinstance(b, nnx.State) else b
    fa, fb = flat_leaves(a), flat_leaves(b)
    assert fa.keys() == fb.keys()
    for p in fa:
        np.testing.assert_allclose(np.asarray(fa[p]), np.asarray(fb[p]), rtol=rtol, atol=atol,
                                   err_msg=str(p))


def test_shrink_opt_state_adam():
    _, groups, graphdef, params, loss = _mlp_problem()
    keep = random_keep(groups, np.random.default_rng(5))
    params = masked(params, groups, keep)
    upd_mask = groups.broadcast(jnp.asarray(keep, jnp.float32), params, fill=1.0)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(p, opt, mask):
        g = jax.grad(loss)(p, graphdef)
        u, opt = tx.update(g, opt, p)
        if mask is not None:  # keeps the zero groups at zero
            u = jax.tree.map(lambda a, m: a * m, u, mask)
        return optax.apply_updates(p, u), opt, g

    opt = tx.init(params)
    for _ in range(3):
        params, opt, _ = step(params, opt, upd_mask)
    np.testing.assert_array_equal(groups.zero_groups(params), ~keep)

    small, plan = hj.shrink(params, groups)
    np.testing.assert_array_equal(plan.keep_mask(), keep)
    small_opt = hj.shrink_opt_state(opt, params, groups, plan=plan)
    # the same with the plan recomputed from the params
    small_opt2 = hj.shrink_opt_state(opt, params, groups)
    assert jax.tree.structure(small_opt2) == jax.tree.structure(small_opt)
    _assert_tree_close(small_opt2[0].nu, small_opt[0].nu, rtol=0, atol=0)
    adam_full, adam_small = opt[0], small_opt[0]
    assert int(adam_small.count) == int(adam_full.count) == 3
    _assert_tree_close(adam_small.mu, _kept_mlp(adam_full.mu, keep), rtol=0, atol=0)
    _assert_tree_close(adam_small.nu, _kept_mlp(adam_full.nu, keep), rtol=0, atol=0)
    _assert_tree_close(small, _kept_mlp(params, keep), rtol=0, atol=0)
    assert jax.tree.structure(small_opt) == jax.tree.structure(opt)

    # one more step: full masked vs shrunk (the same function of the kept parameters, so
    # the same gradients, moments and updates)
    new_full, new_opt, g_full = step(params, opt, upd_mask)
    new_small, new_small_opt, g_small = step(small, small_opt, None)
    _assert_tree_close(g_small, _kept_mlp(g_full, keep), rtol=1e-5, atol=1e-6)
    _assert_tree_close(new_small, _kept_mlp(new_full, keep), rtol=1e-5, atol=1e-6)
    _assert_tree_close(new_small_opt[0].nu, _kept_mlp(new_opt[0].nu, keep), rtol=1e-4,
                       atol=1e-9)


def test_shrink_opt_state_hesso_chain():
    _, groups, graphdef, params, loss = _mlp_problem()
    K = 10
    tx = optax.chain(optax.adam(1e-2), hj.hesso(groups, K, 1, 2, warmup_steps=1))

    @jax.jit
    def step(p, opt):
        g = jax.grad(loss)(p, graphdef)
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt

    opt = tx.init(params)
    for _ in range(4):
        params, opt = step(params, opt)
    status = hj.hesso_status(opt)
    assert status.num_pruned == K
    zero = groups.zero_groups(params)
    np.testing.assert_array_equal(zero, status.pruned)

    small, plan = hj.shrink(params, groups)
    keep = plan.keep_mask()
    small_opt = hj.shrink_opt_state(opt, params, groups, plan=plan)
    hs_full = opt[1]
    hs_small = small_opt[1]
    assert isinstance(hs_small, hj.HessoState)
    assert int(hs_small.count) == int(hs_full.count) == 4
    for field in ("redundant", "pruned", "scores"):
        np.testing.assert_array_equal(np.asarray(getattr(hs_small, field)),
                                      np.asarray(getattr(hs_full, field))[keep], err_msg=field)
    assert hs_small.pruned.shape == (groups.num_groups - K,) and not hs_small.pruned.any()
    # adam's moments inside the chain (adam is itself a chain) were cut the same way
    adam_full, adam_small = opt[0][0], small_opt[0][0]
    _assert_tree_close(adam_small.mu, _kept_mlp(adam_full.mu, keep), rtol=0, atol=0)
    _assert_tree_close(adam_small.nu, _kept_mlp(adam_full.nu, keep), rtol=0, atol=0)
    assert int(adam_small.count) == int(adam_full.count) == 4
    # the shrunk state has the shapes a HESSO rebuilt on the shrunk groups expects
    small_groups = hj.shrink_groups(groups, plan)
    tx2 = optax.chain(optax.adam(1e-2), hj.hesso(small_groups, 0, 1, 2, warmup_steps=1))
    fresh = tx2.init(small)
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, small_opt)


# ----------------------------------------------------------------------------- property


def oracle_apply(groups, keep, flat):
    """``np.delete`` of every removed group's channels, member and dependent axes alike."""
    out = {p: np.asarray(x).astype(np.float32) for p, x in flat.items()}
    removed: dict = {}
    g = 0
    for fam in groups.families:
        for i in range(fam.size):
            if not keep[g]:
                for m in (*fam.members, *fam.dependents):
                    ax = m.axis % out[m.path].ndim
                    removed.setdefault((m.path, ax), set()).update(
                        range(m.offset + i * m.block, m.offset + (i + 1) * m.block))
            g += 1
    for (path, ax), chans in removed.items():
        out[path] = np.delete(out[path], sorted(chans), axis=ax)
    return out


@FEW
@given(layouts(with_dependents=True))
def test_apply_plan_property(layout):
    groups, paths, shapes, dtypes, seed = layout
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(rng.normal(size=s) + 0.1, d) for s, d in zip(shapes, dtypes,
                                                                         strict=True)]
    tree = build_tree(paths, leaves)
    groups.validate(tree)
    keep = rng.random(groups.num_groups) < 0.5
    tree = zero_removed(groups, keep, tree, paths)
    np.testing.assert_array_equal(np.asarray(jit_reduce(groups, "nonzero_counts", tree)) == 0,
                                  ~keep)
    plan = KeepPlan.from_mask(groups, keep)
    keep = with_placeholders(groups, keep)
    assert plan.num_removed == int((~keep).sum())
    small = hj.apply_plan(tree, groups, plan)
    expect = oracle_apply(groups, keep, flat_leaves(tree))
    got = flat_leaves(small)
    assert got.keys() == expect.keys()
    for p in expect:
        assert got[p].dtype == flat_leaves(tree)[p].dtype
        np.testing.assert_array_equal(np.asarray(got[p]).astype(np.float32), expect[p],
                                      err_msg=str(p))
    # re-applying the plan gives the same tree
    again = hj.apply_plan(tree, groups, KeepPlan.from_json(plan.to_json()))
    assert jax.tree.map(jnp.shape, again) == jax.tree.map(jnp.shape, small)
    # the shrunk groups describe the small tree
    check_shrunk_groups(groups, plan, tree, small)


def test_shrink_groups_mixed_axis_signs_need_tree():
    tree = {"w": jnp.arange(18.0).reshape(3, 6)}
    groups = Groups([GroupFamily(2, (Member(("w",), 1),)),
                     GroupFamily(2, (Member(("w",), -1, 1, 2),))])
    plan = KeepPlan((2, 2), ((1,), (0, 1)))
    small = hj.apply_plan(tree, groups, plan)
    with pytest.raises(ValueError, match="both negative and non-negative axes"):
        hj.shrink_groups(groups, plan)
    shrunk = hj.shrink_groups(groups, plan, tree=tree)
    np.testing.assert_array_equal(shrunk.sq_norms(small), groups.sq_norms(tree)[plan.keep_mask()])
    assert shrunk.families[1].members[0].offset == 1


def test_apply_plan_keeps_numpy_leaves_numpy():
    tree = {"w": np.arange(18.0).reshape(3, 6), "b": np.ones(6, np.float16)}
    groups = Groups([GroupFamily(3, (Member(("w",), 1, 2), Member(("b",), 0, 2)))])
    small = hj.apply_plan(tree, groups, KeepPlan((3,), ((0, 2),)))
    assert isinstance(small["w"], np.ndarray) and small["w"].dtype == np.float64
    assert small["b"].dtype == np.float16
    np.testing.assert_array_equal(small["w"], tree["w"][:, [0, 1, 4, 5]])


def test_shrink_opt_state_of_nnx_optimizer_keeps_wrappers():
    from hesso_jax.models import MLP

    model = MLP(8, (6,), 3, rngs=nnx.Rngs(0))
    groups = model.groups()
    optimizer = nnx.Optimizer(model, optax.chain(optax.adam(1e-2), hj.hesso(groups, 3, 1, 2)),
                              wrt=nnx.Param)
    x = jnp.ones((4, 8))

    @nnx.jit
    def step(model, optimizer):
        optimizer.update(model, nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model))

    for _ in range(2):
        step(model, optimizer)
    params = nnx.state(model, nnx.Param)
    small_state = hj.shrink_opt_state(optimizer.opt_state, params, groups)
    hs = [s for s in jax.tree.leaves(small_state, is_leaf=lambda s: isinstance(s, hj.HessoState))
          if isinstance(s, hj.HessoState)][0]
    assert type(hs.redundant) is type(hs.count)  # same wrapper for every field
    status = hj.hesso_status(small_state)
    assert status.pruned.shape == (3,) and status.step == 2


# ----------------------------------------------------------------------------- continuing


def _block_a_first(params, direction, groups):
    """A deterministic saliency: the CNN's ``block_a`` family (groups 8..15) is the most
    redundant, then every other group by index; so HESSO empties that whole family."""
    idx = jnp.arange(groups.num_groups, dtype=jnp.float32)
    return jnp.where((idx >= 8) & (idx < 16), idx - 100.0, idx)


@nnx.jit
def _nnx_step(model, optimizer, x, y):
    def loss(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    optimizer.update(model, nnx.grad(loss)(model))


def test_nnx_optimizer_continues_after_shrink_model_like_the_masked_run():
    """The documented continuation of an nnx.Optimizer after shrink_model: 50 more steps
    on the shrunk model equal 50 more steps of the masked model with HESSO holding its
    zeros (kept channels, to float rounding), including a fully pruned family, Adam's
    moments (OptVariable leaves) and BatchNorm statistics."""
    from hesso_jax.models import CNN
    from hesso_jax.surgery import remaining_schedule

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=16))
    model = CNN(8, 16, rngs=nnx.Rngs(0))
    groups = model.groups()
    tx = optax.chain(optax.adam(1e-2), hj.hesso(groups, 12, 2, 3, warmup_steps=2,
                                                saliency=_block_a_first))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for _ in range(2 + 2 * 3):
        _nnx_step(model, optimizer, x, y)
    zero = groups.zero_groups(nnx.state(model))
    assert zero[8:16].all() and int(zero.sum()) == 12  # block_a is empty

    plan = KeepPlan.from_mask(groups, ~zero)
    assert plan.keep[1] == (0,)  # block_a keeps one exactly-zero placeholder channel
    small = hj.shrink_model(model, groups, plan=plan)
    small_state = hj.shrink_opt_state(optimizer.opt_state, nnx.state(model, nnx.Param),
                                      groups, plan=plan)
    assert remaining_schedule(small_state) == {"K": 0, "P": 2, "Tp": 3, "warmup_steps": 2}
    small_tx = optax.chain(optax.adam(1e-2), hj.hesso(hj.shrink_groups(groups, plan),
                                                      **remaining_schedule(small_state)))
    small_opt = nnx.Optimizer(small, small_tx, wrt=nnx.Param)
    small_opt.opt_state = small_state
    small_opt.step.value = optimizer.step.value
    status = hj.hesso_status(small_opt.opt_state)
    assert (status.step, status.phase, status.target, status.num_pruned) == (
        8, "finetune", 0, 1)

    for _ in range(50):
        _nnx_step(model, optimizer, x, y)
        _nnx_step(small, small_opt, x, y)
    np.testing.assert_array_equal(groups.zero_groups(nnx.state(model)), zero)
    expect = hj.apply_plan(nnx.state(model), groups, plan)
    for path, a, b in zip(hj.tree_paths(expect), jax.tree.leaves(nnx.state(small)),
                          jax.tree.leaves(expect), strict=True):
        assert_close_rel(a, b, rtol=2e-4), path
    mu_small = small_opt.opt_state[0][0].mu
    mu_expect = hj.apply_plan(optimizer.opt_state[0][0].mu, groups, plan, dependents="present")
    for a, b in zip(jax.tree.leaves(mu_small), jax.tree.leaves(mu_expect), strict=True):
        assert_close_rel(a, b, rtol=2e-4)
    assert hj.hesso_status(small_opt.opt_state).step == 58


def _by_index(params, direction, groups):
    return jnp.arange(groups.num_groups, dtype=jnp.float32)


def test_shrink_at_a_period_boundary_continues_the_schedule():
    """Surgery between two pruning periods: the shrunk state carries the schedule still
    ahead (P' periods after Tw' steps selecting the K' groups still due), and the rebuilt
    HESSO on the shrunk groups ends where the masked run ends."""
    from hesso_jax.surgery import remaining_schedule

    _, groups, graphdef, params, loss = _mlp_problem()

    steps_of = {}  # one compiled step per transformation, shared by its runs

    def run(tx, p, state, steps):
        if id(tx) not in steps_of:
            @jax.jit
            def step(p, state):
                u, state = tx.update(jax.grad(loss)(p, graphdef), state, p)
                return optax.apply_updates(p, u), state

            steps_of[id(tx)] = step
        step = steps_of[id(tx)]
        for _ in range(steps):
            p, state = step(p, state)
        return p, state

    tx = optax.chain(optax.adam(1e-2), hj.hesso(groups, 20, 2, 2, warmup_steps=1,
                                                saliency=_by_index))
    params, state = run(tx, params, tx.init(params), 3)  # warm-up + period 0
    assert hj.hesso_status(state).num_pruned == 10
    mid, mid_state = run(tx, params, state, 1)
    with pytest.raises(ValueError, match=re.escape(
            "shrink_opt_state: HESSO is in the middle of pruning period 1 (step 1 of 2); "
            "shrink at a period boundary (step 5) or after the schedule (step 5)")):
        hj.shrink_opt_state(mid_state, mid, groups)

    small, plan = hj.shrink(params, groups)
    small_state = hj.shrink_opt_state(state, params, groups, plan=plan)
    assert remaining_schedule(small_state) == {"K": 10, "P": 1, "Tp": 2, "warmup_steps": 3}
    assert int(state[1].probe_key) != 0 and int(small_state[1].probe_key) == 0  # disarmed
    status = hj.hesso_status(small_state)
    assert (status.step, status.phase, status.period, status.target) == (3, "pruning", 0, 10)
    small_tx = optax.chain(optax.adam(1e-2), hj.hesso(
        hj.shrink_groups(groups, plan), **remaining_schedule(small_state),
        saliency=_by_index))
    full_end, full_state = run(tx, params, state, 6)
    small_end, small_end_state = run(small_tx, small, small_state, 6)
    assert hj.hesso_status(full_state).num_pruned == 20
    assert hj.hesso_status(small_end_state).num_pruned == 10
    _assert_tree_close(small_end, hj.apply_plan(full_end, groups, plan), rtol=1e-4,
                       atol=1e-6)


def test_shrink_opt_state_refuses_a_parameter_shaped_leaf_it_cannot_cut():
    _, groups, _, params, _ = _mlp_problem()
    keep = random_keep(groups, np.random.default_rng(3))
    params = masked(params, groups, keep)
    flat = jax.tree.leaves(params)  # the moments as a flat list: not the params' paths
    state = (optax.adam(1e-2).init(params), {"trace": [jnp.zeros_like(x) for x in flat]})
    with pytest.raises(ValueError, match=re.escape(
            "shrink_opt_state: opt_state[1]['trace'][1] has shape (24, 10), the pre-surgery "
            "shape of parameter 'head/kernel', but is not inside a sub-tree with the "
            "parameters' paths and shapes, so it cannot be cut; nothing was returned")):
        hj.shrink_opt_state(state, params, groups)
    # the same leaves under the parameters' paths are cut, whatever the leaf kind
    wrapped = jax.tree.map(lambda x: nnx.OptVariable(jnp.ones_like(x)), nnx.to_pure_dict(params))
    small_state = hj.shrink_opt_state((state[0], wrapped), params, groups)
    small, _ = hj.shrink(params, groups)
    assert jax.tree.map(jnp.shape, small_state[1]) == jax.tree.map(
        jnp.shape, nnx.to_pure_dict(small))


@pytest.mark.parametrize("make_tx", [
    lambda p: optax.masked(optax.adam(1e-2), jax.tree.map(lambda x: x.ndim > 1, p)),
    lambda p: optax.MultiSteps(optax.adam(1e-2), 2),
    lambda p: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
    lambda p: optax.contrib.schedule_free_adamw(1e-2),
    lambda p: optax.chain(optax.ema(0.9), optax.sgd(1e-2, momentum=0.9)),
], ids=["masked", "multisteps", "inject_hyperparams", "schedule_free", "ema+momentum"])
def test_shrink_opt_state_of_optax_wrappers(make_tx):
    """Partial trees (optax.masked), accumulators, hyperparameter states and second copies
    of the parameters are all cut: the result has the shapes of a fresh init on the shrunk
    parameters, and the optimizer steps on it."""
    _, groups, _, params, _ = _mlp_problem()
    params = masked(nnx.to_pure_dict(params), groups,
                    random_keep(groups, np.random.default_rng(4)))
    small, plan = hj.shrink(params, groups)
    tx = make_tx(params)
    state = tx.init(params)
    small_state = hj.shrink_opt_state(state, params, groups, plan=plan)
    assert jax.tree.map(jnp.shape, small_state) == jax.tree.map(jnp.shape,
                                                                make_tx(small).init(small))
    tx.update(jax.tree.map(jnp.ones_like, small), small_state, small)


def test_shrink_opt_state_refuses_a_budget_schedule_mid_run_and_cuts_it_after():
    from helpers import mlp_data, mlp_groups, mlp_params

    from hesso_jax.surgery import remaining_schedule

    params, groups = mlp_params(), mlp_groups()
    x, _ = mlp_data(4)
    costs = hj.group_costs(lambda p, x: x @ p["l1"]["kernel"] @ p["l2"]["kernel"], params,
                           groups, x)
    tx = optax.chain(optax.sgd(0.0), hj.hesso(groups, hj.Budget(params=0.6), 2, 2,
                                              costs=costs))
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    step = jax.jit(tx.update)
    for _ in range(2):  # the first period: its groups are exactly zero at the boundary
        updates, state = step(zeros, state, params)
        params = optax.apply_updates(params, updates)
    with pytest.raises(ValueError, match="Budget.*after the schedule"):
        hj.shrink_opt_state(state, params, groups)
    for _ in range(2):
        updates, state = step(zeros, state, params)
        params = optax.apply_updates(params, updates)
    small = hj.shrink_opt_state(state, params, groups)
    assert remaining_schedule(small)["K"] == 0
