"""Tests of `hesso_jax.groups`: construction, validation, reductions, JSON, tree paths."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from helpers import (
    MODEL_SPECS,
    build_tree,
    flat_leaves,
    group_slices,
    jit_reduce,
    layouts,
    make_model,
    oracle_broadcast,
    zero_removed,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import hesso_jax as hj
from hesso_jax import GroupFamily, Groups, Member

# ----------------------------------------------------------------------------- helpers


def map_like(tree, fn):
    if isinstance(tree, dict):
        return {k: map_like(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [map_like(v, fn) for v in tree]
    return fn(tree)


def as_f64(x):
    return np.asarray(x).astype(np.float64)


def oracle_reduce(groups, fn, *trees):
    flats = [flat_leaves(t) for t in trees]
    res = np.zeros(groups.num_groups, np.float64)
    for g, members in enumerate(group_slices(groups)):
        for path, axis, chans in members:
            parts = [np.take(as_f64(f[path]), list(chans), axis=axis) for f in flats]
            res[g] += float(np.sum(fn(*parts)))
    return res


def oracle_counts(groups, tree):
    flat = flat_leaves(tree)
    res = np.zeros(groups.num_groups, np.int64)
    for g, members in enumerate(group_slices(groups)):
        for path, axis, chans in members:
            res[g] += np.take(np.zeros(flat[path].shape), list(chans), axis=axis).size
    return res


def library_reductions(groups, tree, other, vec, fill=-7.5):
    return (groups.sq_norms(tree), groups.dots(tree, other), groups.nonzero_counts(tree),
            groups.broadcast(vec, tree, fill=fill))


jit_reductions = jax.jit(library_reductions, static_argnums=(0, 4))


def check_reductions(groups, tree, other, vec, *, rtol=1e-5, jit=False, fill=-7.5):
    """Library reductions (eager, or all in one jit) against the explicit-loop oracles."""
    res = (jit_reductions if jit else library_reductions)(groups, tree, other, vec, fill)
    sq, dt, nz, b = res
    assert sq.shape == dt.shape == nz.shape == (groups.num_groups,)
    np.testing.assert_allclose(np.asarray(sq), oracle_reduce(groups, lambda x: x * x, tree),
                               rtol=rtol, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dt),
                               oracle_reduce(groups, lambda x, y: x * y, tree, other),
                               rtol=rtol, atol=1e-4)
    nonzero = oracle_reduce(groups, lambda x: x != 0, tree)
    np.testing.assert_array_equal(np.asarray(nz), nonzero)
    np.testing.assert_array_equal(groups.counts(tree), oracle_counts(groups, tree))
    if not jit:
        np.testing.assert_array_equal(groups.zero_groups(tree), nonzero == 0)
    ob = oracle_broadcast(groups, vec, tree, fill)
    fb = flat_leaves(b)
    assert fb.keys() == ob.keys()
    for p in ob:
        assert fb[p].dtype == jnp.asarray(vec).dtype
        np.testing.assert_array_equal(np.asarray(fb[p]), ob[p], err_msg=str(p))
    return res


# ----------------------------------------------------------------------------- construction


def test_member_normalises_and_defaults():
    m = Member(["a", 0, "kernel"], np.int64(-1))
    assert m.path == ("a", 0, "kernel") and isinstance(m.path, tuple)
    assert m.axis == -1 and type(m.axis) is int
    assert (m.block, m.offset) == (1, 0)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(path="layer/kernel", axis=0), TypeError, "tuple of keys"),
    (dict(path=("a",), axis=True), TypeError, "axis"),
    (dict(path=("a",), axis=0.0), TypeError, "axis"),
    (dict(path=("a", 1.5), axis=0), TypeError, "keys must be str or int"),
    (dict(path=("a", False), axis=0), TypeError, "keys must be str or int"),
    (dict(path=("a",), axis=0, block=0), ValueError, "block"),
    (dict(path=("a",), axis=0, block=True), TypeError, "block"),
    (dict(path=("a",), axis=0, offset=-1), ValueError, "offset"),
])
def test_member_type_and_value_checks(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Member(**kwargs)


def test_group_family_checks():
    m = Member(("w",), 0)
    fam = GroupFamily(3, [m], [Member(("v",), 0)], name="f")
    assert fam.members == (m,) and isinstance(fam.members, tuple)
    assert isinstance(fam.dependents, tuple)
    with pytest.raises(TypeError, match="Member"):
        GroupFamily(3, (m, ("w", 0)))
    with pytest.raises(TypeError, match="Member"):
        GroupFamily(3, (m,), ("v",))
    with pytest.raises(TypeError, match="sequence of Member"):
        GroupFamily(3, m)
    with pytest.raises(TypeError, match="size"):
        GroupFamily(True, (m,))
    with pytest.raises(TypeError, match="size"):
        GroupFamily(2.0, (m,))
    with pytest.raises(TypeError, match="name"):
        GroupFamily(2, (m,), name=3)
    with pytest.raises(TypeError, match="GroupFamily"):
        Groups([fam, m])


def test_groups_bookkeeping():
    g = Groups.from_families([
        GroupFamily(3, (Member(("a",), 0),)),
        GroupFamily(2, (Member(("b",), 0),)),
        GroupFamily(4, (Member(("c",), 0),)),
    ])
    assert g.num_groups == 9 and len(g) == 3
    assert g.starts == (0, 3, 5)
    np.testing.assert_array_equal(g.family_index(), [0, 0, 0, 1, 1, 2, 2, 2, 2])
    assert g == Groups(list(g.families)) and hash(g) == hash(Groups(list(g.families)))
    assert g != Groups(g.families[:2])


# ----------------------------------------------------------------------------- validation


def _tree():
    return {
        "conv": {"kernel": jnp.ones((3, 3, 4, 8)), "bias": jnp.ones((8,))},
        "fc": {"kernel": jnp.ones((8, 5)), "bias": jnp.ones((5,))},
        "layers": [jnp.ones((6, 2))],
        "steps": jnp.ones((3,), jnp.int32),
    }


def _groups(*families):
    return Groups.from_families(families)


def test_validate_accepts_a_valid_layout():
    g = _groups(
        GroupFamily(4, (Member(("conv", "kernel"), -1, 2), Member(("conv", "bias"), 0, 2)),
                    (Member(("fc", "kernel"), 0, 2),)),
        GroupFamily(3, (Member(("layers", 0), 0, 1, 3),)),
        GroupFamily(3, (Member(("layers", 0), 0),)),
    )
    g.validate(_tree())
    g.validate(_tree(), dependents="present")


@pytest.mark.parametrize("family, match", [
    # unknown member path: the message contains the path text
    (GroupFamily(2, (Member(("conv", "kernal"), 3),)), r"conv/kernal"),
    (GroupFamily(2, (Member(("layers", 1), 0),)), r"layers/1"),
    # unknown dependent path (dependents='require')
    (GroupFamily(2, (Member(("conv", "bias"), 0),), (Member(("nope", "kernel"), 0),)),
     r"dependent path 'nope/kernel'"),
    # axis out of range, positive and negative
    (GroupFamily(2, (Member(("conv", "kernel"), 4),)), r"conv/kernel.*axis 4.*out of range"),
    (GroupFamily(2, (Member(("fc", "bias"), -2),)), r"fc/bias.*axis -2.*out of range"),
    (GroupFamily(2, (Member(("fc", "bias"), 0),), (Member(("fc", "kernel"), 2),)),
     r"fc/kernel.*axis 2.*out of range"),
    # slice past the end of its axis: offset + size * block > length
    (GroupFamily(3, (Member(("conv", "bias"), 0, 3),)), r"conv/bias.*axis 0.*= 9.*length 8"),
    (GroupFamily(2, (Member(("conv", "bias"), 0, 3, 3),)), r"conv/bias.*axis 0.*= 9.*length 8"),
    (GroupFamily(5, (Member(("conv", "kernel"), -2, 1, 0),)),
     r"conv/kernel.*axis 2.*= 5.*length 4"),
    (GroupFamily(2, (Member(("fc", "bias"), 0),), (Member(("fc", "kernel"), 1, 1, 4),)),
     r"fc/kernel.*axis 1.*= 6.*length 5"),
    # empty families
    (GroupFamily(0, (Member(("conv", "bias"), 0),)), r"empty: size=0"),
    (GroupFamily(-1, (Member(("conv", "bias"), 0),)), r"empty: size=-1"),
    (GroupFamily(3, ()), r"empty: it has no members"),
    (GroupFamily(3, (), (Member(("conv", "bias"), 0),)), r"empty: it has no members"),
])
def test_validate_errors_single_family(family, match):
    g = _groups(family)
    with pytest.raises(ValueError, match=match):
        g.validate(_tree())


def test_validate_overlap_between_families():
    a = GroupFamily(4, (Member(("conv", "bias"), 0),), name="first")
    b = GroupFamily(2, (Member(("conv", "bias"), 0, 2, 3),), name="second")
    with pytest.raises(ValueError, match=r"conv/bias.*axis 0.*\[3, 4\).*claimed twice"):
        _groups(a, b).validate(_tree())
    # the same axis written with different signs is still the same axis
    c = GroupFamily(2, (Member(("conv", "kernel"), 3, 1, 5),))
    d = GroupFamily(2, (Member(("conv", "kernel"), -1, 1, 6),))
    with pytest.raises(ValueError, match=r"conv/kernel.*axis 3.*\[6, 7\).*claimed twice"):
        _groups(c, d).validate(_tree())
    # a member and a dependent of different families on the same channels
    e = GroupFamily(2, (Member(("conv", "bias"), 0),), (Member(("fc", "kernel"), 0, 2),))
    f = GroupFamily(2, (Member(("fc", "kernel"), 0, 1, 3),))
    with pytest.raises(ValueError, match=r"fc/kernel.*axis 0.*\[3, 4\).*claimed twice"):
        _groups(e, f).validate(_tree())
    # within one family, two members on the same slice
    g = GroupFamily(2, (Member(("conv", "bias"), 0), Member(("conv", "bias"), 0, 1, 1)))
    with pytest.raises(ValueError, match=r"conv/bias.*claimed twice"):
        _groups(g).validate(_tree())
    # adjacent but disjoint spans are fine
    _groups(a, GroupFamily(2, (Member(("conv", "bias"), 0, 2, 4),))).validate(_tree())


def test_validate_member_slices_on_two_axes():
    a = GroupFamily(2, (Member(("fc", "kernel"), 0),))
    b = GroupFamily(2, (Member(("fc", "kernel"), 1),))
    with pytest.raises(ValueError, match=r"fc/kernel.*axis 0.*axis 1.*one group only"):
        _groups(a, b).validate(_tree())
    # a dependent on the other axis of a member leaf is fine (MLP: next kernel's rows)
    c = GroupFamily(2, (Member(("fc", "bias"), 0),), (Member(("fc", "kernel"), 0),))
    _groups(c, b).validate(_tree())


def test_validate_dependents_modes():
    fam = GroupFamily(2, (Member(("fc", "bias"), 0),),
                      (Member(("fc", "kernel"), 1), Member(("bn", "mean"), 0)))
    g = _groups(fam)
    with pytest.raises(ValueError, match=r"bn/mean"):
        g.validate(_tree())
    with pytest.raises(ValueError, match=r"bn/mean"):
        g.validate(_tree(), dependents="require")
    g.validate(_tree(), dependents="present")
    layout = g.layout(_tree(), dependents="present")
    assert layout.missing == (("bn", "mean"),)
    # 'present' only forgives missing dependents, never missing members or bad axes
    with pytest.raises(ValueError, match=r"bn/scale"):
        _groups(GroupFamily(2, (Member(("bn", "scale"), 0),))).validate(
            _tree(), dependents="present")
    bad = GroupFamily(2, (Member(("fc", "bias"), 0),), (Member(("fc", "kernel"), 1, 3, 0),))
    with pytest.raises(ValueError, match=r"fc/kernel"):
        _groups(bad).validate(_tree(), dependents="present")
    with pytest.raises(ValueError, match="dependents must be"):
        g.validate(_tree(), dependents="ignore")


def test_validate_no_families_and_non_float_member():
    with pytest.raises(ValueError, match="no families"):
        Groups([]).validate(_tree())
    with pytest.raises(TypeError, match="steps.*floating"):
        _groups(GroupFamily(3, (Member(("steps",), 0),))).validate(_tree())


def test_reference_model_groups_validate():
    for model in map(make_model, MODEL_SPECS):
        g = model.groups()
        g.validate(nnx.state(model))
        g.validate(nnx.state(model, nnx.Param), dependents="present")


# ----------------------------------------------------------------------------- reductions


def _rand(rng, shape, dtype=jnp.float32, zero_frac=0.2):
    x = rng.normal(size=shape)
    x[rng.random(shape) < zero_frac] = 0.0
    return jnp.asarray(x, dtype)


def _concat_layout():
    """Families sharing axes through offsets, blocks, negative axes; bf16 leaves."""
    rng = np.random.default_rng(1)
    tree = {
        "qkv": {"kernel": _rand(rng, (5, 30)), "bias": _rand(rng, (30,), jnp.bfloat16)},
        "proj": {"kernel": _rand(rng, (4, 3, 6))},
        "seq": [_rand(rng, (7, 2)), _rand(rng, (2, 9), jnp.bfloat16)],
        "free": _rand(rng, (3,)),
    }
    groups = Groups.from_families([
        # heads of size 3 (block 3), segment 0 of a concatenation: channels [2, 14)
        GroupFamily(4, (Member(("qkv", "kernel"), -1, 3, 2), Member(("qkv", "bias"), 0, 3, 2),
                        Member(("proj", "kernel"), 0)),
                    (Member(("seq", 0), 0, 1, 1),), name="heads"),
        # second segment of the same axes: channels [14, 26), two channel blocks each
        GroupFamily(6, (Member(("qkv", "kernel"), 1, 2, 14), Member(("qkv", "bias"), -1, 2, 14),
                        Member(("seq", 1), -1, 1, 3)), name="neurons"),
        # a third family after the first one's dependent slice on the same axis
        GroupFamily(2, (Member(("seq", 0), 0, 1, 5),), name="rows"),
    ])
    return tree, groups


def test_reductions_against_oracle_concat_blocks_offsets_bf16():
    tree, groups = _concat_layout()
    groups.validate(tree)
    G = groups.num_groups
    assert G == 12
    rng = np.random.default_rng(2)
    other = map_like(tree, lambda x: _rand(rng, x.shape, x.dtype))
    # make group 5 (family 'neurons', local 1) exactly zero: it must be a zero group
    tree = map_like(tree, np.array)
    tree["qkv"]["kernel"][:, 16:18] = 0.0
    tree["qkv"]["bias"][16:18] = 0.0
    tree["seq"][1][:, 4] = 0.0
    tree = map_like(tree, jnp.asarray)
    vec = jnp.arange(1, G + 1, dtype=jnp.float32) * 0.5
    sq, dt, nz, b = check_reductions(groups, tree, other, vec, rtol=2e-5)
    zero = groups.zero_groups(tree)
    assert zero[5] and zero.sum() == 1
    assert sq.dtype == np.float32 and dt.dtype == np.float32 and nz.dtype == np.float32
    assert groups.counts(tree).dtype == np.int64
    # elements of no group and leaves without members get the fill value
    assert np.all(np.asarray(b["free"]) == -7.5)
    assert np.all(np.asarray(b["qkv"]["bias"])[:2] == -7.5)
    assert np.all(np.asarray(b["qkv"]["bias"])[26:] == -7.5)
    # broadcast keeps the vector's dtype and the leaf's shape
    bb = groups.broadcast(jnp.ones(G, bool), tree)
    assert all(x.dtype == jnp.bool_ for x in jax.tree.leaves(bb))
    assert jax.tree.map(jnp.shape, bb) == jax.tree.map(jnp.shape, tree)
    ob = oracle_broadcast(groups, np.ones(G, bool), tree, False)
    for p, x in flat_leaves(bb).items():
        np.testing.assert_array_equal(np.asarray(x), ob[p])
    # the default fill (0) under jit
    check_reductions(groups, tree, other, -vec, rtol=2e-5, jit=True, fill=0.0)
    with pytest.raises(ValueError, match="shape"):
        groups.broadcast(jnp.ones(G + 1), tree)


def test_reductions_on_reference_models():
    for model in map(make_model, MODEL_SPECS):
        g = model.groups()
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        rng = np.random.default_rng(0)
        params = map_like(params, lambda x, r=rng: _rand(r, x.shape, zero_frac=0.0))
        other = map_like(params, lambda x, r=rng: _rand(r, x.shape))
        vec = jnp.asarray(rng.normal(size=g.num_groups), jnp.float32)
        check_reductions(g, params, other, vec, jit=True)
        # the same numbers through the nnx.State itself
        state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(state, params)
        np.testing.assert_array_equal(np.asarray(jit_reduce(g, "sq_norms", state)),
                                      np.asarray(jit_reduce(g, "sq_norms", params)))


# each example compiles new shapes eagerly and under jit: keep the count small
FEW = settings(max_examples=min(settings().max_examples, 8))


@FEW
@given(layouts())
def test_reductions_property(layout):
    groups, paths, shapes, dtypes, seed = layout
    rng = np.random.default_rng(seed)
    tree = build_tree(paths, [_rand(rng, s, d, zero_frac=0.3) for s, d in zip(shapes, dtypes,
                                                                               strict=True)])
    other = build_tree(paths, [_rand(rng, s, d) for s, d in zip(shapes, dtypes, strict=True)])
    groups.validate(tree)
    # zero out a random set of whole groups so zero_groups is exercised
    keep = rng.random(groups.num_groups) < 0.7
    tree = zero_removed(groups, keep, tree, paths)
    vec = jnp.asarray(rng.normal(size=groups.num_groups), jnp.float32)
    eager = check_reductions(groups, tree, other, vec, rtol=2e-5)
    assert groups.zero_groups(tree)[~keep].all()
    # one jit of all four reductions gives the same results: counts and broadcast values
    # exactly, float sums up to rounding (XLA may fuse and reassociate under jit)
    jitted = jit_reductions(groups, tree, other, vec, -7.5)
    assert jax.tree.structure(jitted) == jax.tree.structure(eager)
    for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        assert e.dtype == j.dtype and e.shape == j.shape
    for e, j in zip(eager[:2], jitted[:2], strict=True):
        np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=1e-6, atol=1e-6)
    for e, j in zip(jax.tree.leaves(eager[2:]), jax.tree.leaves(jitted[2:]), strict=True):
        np.testing.assert_array_equal(np.asarray(j), np.asarray(e))



@pytest.mark.parametrize("rows,C,after", [
    (1, 5, 3), (17, 5, 1), (100, 5, 3), (64 * 64 + 3, 5, 1), (64, 8192, 1), (64 + 9, 8192, 1),
    (2 * 64 + 1, 8192, 2)])
def test_reduce_many_over_tall_leaves_blocks_and_remainders(rows, C, after):
    """Leaves taller than one block of rows (`hesso_jax.groups.ROW_BLOCK`), whole blocks
    and zero-padded last blocks, several levels of blocks, narrow and wide channel axes,
    elements after the channel axis: every statistic equals float64 sums."""
    rng = np.random.default_rng(rows * 10 + after)
    shape = (rows, C, after) if after > 1 else (rows, C)
    x, d = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
    groups = Groups.from_families([GroupFamily(C, (Member(("w",), 1),))])
    f = jax.jit(lambda p, q: groups.reduce_many(lambda a, b: (a * a, a * b, b), p, q))
    got = np.asarray(f({"w": x}, {"w": d}))
    axes = tuple(a for a in range(x.ndim) if a != 1)
    x64, d64 = x.astype(np.float64), d.astype(np.float64)
    want = np.stack([np.sum(x64 * x64, axes), np.sum(x64 * d64, axes), np.sum(d64, axes)])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.sqrt(x.size))
    one = np.asarray(jax.jit(lambda p: groups.reduce(jnp.square, p))({"w": x}))
    np.testing.assert_allclose(one, want[0], rtol=2e-5)


# ----------------------------------------------------------------------------- JSON


def test_json_round_trip_int_and_str_keys():
    g = Groups.from_families([
        GroupFamily(4, (Member(("layers", 0, "kernel"), 1, 2, 3), Member(("layers", 0, "bias"),
                                                                          -1, 2, 3)),
                    (Member(("layers", 1, "kernel"), 0, 2, 3),), name="l0"),
        GroupFamily(2, (Member((7, "w"), 0),)),
        GroupFamily(3, (Member(("0", "w"), -2),), name="str zero"),
    ])
    text = g.to_json()
    back = Groups.from_json(text)
    assert back == g
    assert back.families[0].members[0].path == ("layers", 0, "kernel")
    assert isinstance(back.families[1].members[0].path[0], int)
    assert isinstance(back.families[2].members[0].path[0], str)
    assert back.families[2].name == "str zero" and back.families[1].name == ""
    assert back.families[0].dependents == g.families[0].dependents
    assert Groups.from_json(g.to_json(indent=2)) == g
    # a changed key type is a different Groups
    doc = json.loads(text)
    doc["families"][1]["members"][0]["path"][0] = "7"
    assert Groups.from_dict(doc) != g
    # missing / wrong format tag
    doc = json.loads(text)
    del doc["format"]
    with pytest.raises(ValueError, match="format"):
        Groups.from_json(json.dumps(doc))
    doc["format"] = "hesso_jax.KeepPlan"
    with pytest.raises(ValueError, match="format"):
        Groups.from_dict(doc)


def test_json_round_trip_reference_models():
    for model in map(make_model, MODEL_SPECS):
        g = model.groups()
        back = Groups.from_json(g.to_json())
        assert back == g
        state = nnx.state(model)
        np.testing.assert_array_equal(np.asarray(jit_reduce(back, "sq_norms", state)),
                                      np.asarray(jit_reduce(g, "sq_norms", state)))


# ----------------------------------------------------------------------------- tree paths


def test_tree_paths_nnx_state_matches_flat_state():
    for model in map(make_model, MODEL_SPECS):
        for state in (nnx.state(model, nnx.Param), nnx.state(model)):
            paths = hj.tree_paths(state)
            flat = nnx.to_flat_state(state)
            keys = [tuple(p) for p, _ in flat]
            assert len(paths) == len(set(paths)) == len(jax.tree.leaves(state))
            assert set(paths) == set(keys)
            # each path names the right leaf
            by_path = {tuple(p): v for p, v in flat}
            for p, leaf in zip(paths, jax.tree.leaves(state), strict=True):
                assert by_path[p][...] is leaf or np.array_equal(by_path[p][...], leaf)
                assert by_path[p][...].shape == leaf.shape


def test_tree_paths_nested_dicts_match_flatten_dict():
    rng = np.random.default_rng(0)
    tree = {
        "b": {"kernel": rng.normal(size=(2, 3)), "bias": rng.normal(size=(3,))},
        "a": {0: {"w": rng.normal(size=(4,))}, 1: {"w": rng.normal(size=(5,))}},
        "c": rng.normal(size=(1,)),
    }
    paths = hj.tree_paths(tree)
    flat = traverse_util.flatten_dict(tree)
    assert len(paths) == len(flat) and set(paths) == set(flat)
    for p, leaf in zip(paths, jax.tree.leaves(tree), strict=True):
        assert flat[p] is leaf
    # int keys stay ints, a pure dict of a model gives the nnx.State's paths
    assert ("a", 0, "w") in paths and ("a", "0", "w") not in paths
    state = nnx.state(make_model("mlp"))
    assert hj.tree_paths(nnx.to_pure_dict(state)) == hj.tree_paths(state)


def test_tree_paths_variables_lists_and_tuples():
    t = {"a": nnx.Param(jnp.ones((2,))), "b": [jnp.ones(1), (jnp.ones(2), jnp.ones(3))]}
    assert hj.tree_paths(t) == [("a",), ("b", 0), ("b", 1, 0), ("b", 1, 1)]
    assert hj.tree_paths(jnp.ones(3)) == [()]
    assert hj.groups.format_path(("b", 1, 0)) == "b/1/0"
    assert hj.groups.format_path(()) == "<root>"


@jax.jit
def _flatten_dense(params, x):
    """conv (3x3, C out) -> relu -> flatten (h, w, C) -> dense: channel c recurs every C rows."""
    h = jax.lax.conv_general_dilated(x, params["conv"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h + params["conv"]["bias"])
    return h.reshape(h.shape[0], -1) @ params["dense"]["kernel"] + params["dense"]["bias"]


def _flatten_groups(C, hw):
    return Groups.from_families([GroupFamily(
        C, (Member(("conv", "kernel"), 3), Member(("conv", "bias"), 0)),
        (Member(("dense", "kernel"), 0, repeat=hw, stride=C),), name="conv")])


@functools.cache
def _flatten_problem(C, hw):
    ks = jax.random.split(jax.random.key(0), 4)
    params = {"conv": {"kernel": jax.random.normal(ks[0], (3, 3, 2, C)),
                       "bias": jax.random.normal(ks[1], (C,))},
              "dense": {"kernel": jax.random.normal(ks[2], (hw * C, 5)),
                        "bias": jnp.zeros((5,))}}
    return params, jax.random.normal(ks[3], (3, 4, 4, 2))


@given(st.lists(st.booleans(), min_size=6, max_size=6))
def test_repeated_member_flatten_before_dense(keep):
    """``repeat``/``stride`` dependents: shrink keeps the function; shrink_groups re-bases."""
    keep = np.asarray(keep)
    keep[0] = True
    C, hw = 6, 4 * 4
    params, x = _flatten_problem(C, hw)
    groups = _flatten_groups(C, hw)
    groups.validate(params)
    mask = groups.broadcast(jnp.asarray(keep, jnp.float32), params, fill=1.0)
    masked = jax.tree.map(lambda a, m: a * m, params, mask)
    small, plan = hj.shrink(masked, groups)
    kept = int(keep.sum())
    assert small["dense"]["kernel"].shape == (hw * kept, 5)
    np.testing.assert_allclose(_flatten_dense(small, x), _flatten_dense(masked, x),
                               rtol=1e-5, atol=1e-5)
    shrunk = hj.shrink_groups(groups, plan)
    assert shrunk == _flatten_groups(kept, hw)
    shrunk.validate(small)


def test_repeated_member_json_and_checks():
    m = Member(("w",), 0, block=2, offset=1, repeat=3, stride=10)
    assert m.starts() == [1, 11, 21]
    assert Member.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    assert Member(("w",), 0, repeat=1, stride=7).stride == 0
    with pytest.raises(ValueError, match="needs a stride"):
        Member(("w",), 0, repeat=2)
    tree = {"w": jnp.zeros((30,))}
    with pytest.raises(ValueError, match="shorter than the span"):
        Groups.from_families([GroupFamily(4, (Member(("w",), 0, repeat=2, stride=3),))]
                             ).validate(tree)
    with pytest.raises(ValueError, match="runs past"):
        Groups.from_families([GroupFamily(4, (Member(("w",), 0, repeat=3, stride=14),))]
                             ).validate(tree)
    g = Groups.from_families([GroupFamily(2, (m,))])
    np.testing.assert_array_equal(g.counts(tree), [6, 6])
