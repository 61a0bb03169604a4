"""`Groups.mask` / `Groups.channel_keep`: the one keep-mask operation, against an oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hesso_jax as hj


def _groups():
    """Two families over one fused leaf (offset slices) plus a head-blocked family."""
    fam_a = hj.GroupFamily(4, (hj.Member(("w1",), 1), hj.Member(("b1",), 0)),
                           dependents=(hj.Member(("w2",), 0),))
    fam_b = hj.GroupFamily(2, (hj.Member(("qkv",), 1, block=3, offset=0),))
    fam_c = hj.GroupFamily(3, (hj.Member(("qkv",), 1, offset=6),))
    return hj.Groups.from_families([fam_a, fam_b, fam_c])


def _tree(seed=0):
    r = np.random.default_rng(seed)
    return {"w1": r.normal(size=(5, 4)).astype(np.float32),
            "b1": r.normal(size=(4,)).astype(np.float32),
            "w2": r.normal(size=(4, 3)).astype(np.float32),
            "qkv": r.normal(size=(2, 10)).astype(np.float32)}


def _oracle(tree, keep, dependents):
    """Hand-written slices of every removed group set to zero."""
    out = {k: v.copy() for k, v in tree.items()}
    a, b, c = keep[:4], keep[4:6], keep[6:9]
    for i in np.flatnonzero(~a):
        out["w1"][:, i] = 0
        out["b1"][i] = 0
        if dependents:
            out["w2"][i, :] = 0
    for i in np.flatnonzero(~b):
        out["qkv"][:, 3 * i:3 * i + 3] = 0
    for i in np.flatnonzero(~c):
        out["qkv"][:, 6 + i] = 0
    return out


@settings(max_examples=25, deadline=None)
@given(st.lists(st.booleans(), min_size=9, max_size=9), st.booleans())
def test_mask_matches_oracle(keep, dependents):
    keep = np.asarray(keep, bool)
    tree = _tree()
    got = _groups().mask(tree, keep, dependents=dependents)
    want = _oracle(tree, keep, dependents)
    for k in tree:
        np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=k)
        assert got[k].dtype == tree[k].dtype


def test_mask_zeroes_nan_and_inf_exactly_and_jits():
    tree = _tree()
    tree["w1"][:, 1] = np.nan
    tree["qkv"][:, 7] = np.inf
    keep = np.ones(9, bool)
    keep[[1, 7]] = False
    got = jax.jit(_groups().mask)(tree, jnp.asarray(keep))
    assert np.all(np.asarray(got["w1"])[:, 1] == 0.0)
    assert np.all(np.asarray(got["qkv"])[:, 7] == 0.0)
    assert np.all(np.isfinite(np.asarray(got["qkv"])))
    np.testing.assert_array_equal(np.asarray(got["w2"]), tree["w2"])  # members only


def test_channel_keep_is_what_mask_keeps():
    keep = np.array([1, 0, 1, 0, 0, 1, 1, 0, 1], bool)
    groups, tree = _groups(), _tree()
    masks = groups.channel_keep(tree, keep)
    paths = [p[0][0].key for p in jax.tree_util.tree_flatten_with_path(tree)[0]]
    masked = groups.mask(tree, keep, dependents=True)
    for (leaf, axis), ch in masks.items():
        arr = np.moveaxis(np.asarray(masked[paths[leaf]]), axis, 0)
        assert np.all(arr[~ch] == 0), paths[leaf]
        assert np.all(arr[ch] != 0), paths[leaf]
    np.testing.assert_array_equal(masks[(paths.index("qkv"), 1)],
                                  [0, 0, 0, 1, 1, 1, 1, 0, 1, 1])
    assert (paths.index("w2"), 0) in masks
    assert (paths.index("w2"), 0) not in groups.channel_keep(tree, keep, dependents=None)


def test_mask_rejects_bad_keep():
    with pytest.raises(ValueError, match=r"bool\[9\]"):
        _groups().mask(_tree(), np.ones(8, bool))
    with pytest.raises(ValueError, match=r"bool\[9\]"):
        _groups().mask(_tree(), np.ones(9, np.float32))


def test_shrink_of_masked_equals_shrink():
    keep = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0], bool)
    groups, tree = _groups(), _tree()
    masked = groups.mask(tree, keep)
    small, plan = hj.shrink(masked, groups)
    np.testing.assert_array_equal(plan.keep_mask(), keep)
    assert small["w1"].shape == (5, 3) and small["w2"].shape == (3, 3)
    assert small["qkv"].shape == (2, 6)
