"""Discovery on the patterns of issue 12: RoPE heads, shared constants, closed-over arrays,
padding and every axis-moving rule, grouped convolutions.

Every family found here is checked numerically (`assert_sound`): zero the members of a
random subset of groups and perturb their dependents -- the output must not change -- and
`hj.shrink` of the masked parameters computes what the masked function does. The test
functions are pure and take their sizes (heads, channels, ``feature_group_count``) from
the parameter shapes, so the shrunk tree runs.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import hesso_jax as hj
from hesso_jax.groups import format_path

FEW = settings(max_examples=6, deadline=None)  # x 22 rules: keep the file under a minute


# ----------------------------------------------------------------------------- helpers
def randn(seed, *shape, scale=1.0):
    """A float32 normal array (NumPy's generator: no per-shape compilation)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def params_of(shapes, seed=0, scale=0.5):
    """Random normal leaves of the given (possibly nested) shapes."""
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    return jax.tree.unflatten(treedef, [randn(seed * 1000 + i, *s, scale=scale)
                                        for i, s in enumerate(leaves)])


def discover(fn, params, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hj.DiscoveryWarning)
        return hj.discover_groups(fn, params, *args)


def _close(got, want, rtol=1e-5):
    # the inputs are O(1): an output that is exactly 0 (e.g. a stacked x - x) is compared
    # at that scale, not at 0, where float32 rounding of the shrunk sums (a few ulps of
    # the O(1) terms, ~1e-7 each: 1.9e-7 measured under LLVM -O0) would fail
    scale = max(float(jnp.max(jnp.abs(want))), 1e-1)
    err = float(jnp.max(jnp.abs(got - want)))
    assert err <= rtol * scale, f"max error {err:.3g} vs scale {scale:.3g}"


def assert_sound(fn, params, x, groups, seed=0, run_shrunk=True):
    """Zeroed members + perturbed dependents leave the output; shrinking is exact.

    ``run_shrunk=False`` for functions whose sizes are not read from the parameters
    (haiku modules are built with fixed sizes).
    """
    fn = jax.jit(fn)  # one compilation per shape instead of one per operation
    rng = np.random.default_rng(seed)
    keep = rng.random(groups.num_groups) < 0.5
    keep[list(groups.starts)] = True  # one survivor per family
    mask = groups.broadcast(jnp.asarray(keep, jnp.float32), params, fill=1.0)
    masked = jax.tree.map(lambda a, m: a * m, params, mask)
    want = fn(masked, x)
    deps = [hj.GroupFamily(f.size, f.dependents, (), f.name) for f in groups.families
            if f.dependents]
    if deps:
        removed = np.concatenate([~keep[s:s + f.size] for s, f in
                                  zip(groups.starts, groups.families, strict=True)
                                  if f.dependents])
        dmask = hj.Groups.from_families(deps).broadcast(
            jnp.asarray(removed, jnp.float32), params, fill=0.0)
        noise = params_of(jax.tree.map(lambda a: tuple(a.shape), params), seed + 7, 3.0)
        # positive noise keeps variances valid
        perturbed = jax.tree.map(lambda a, m, e: a + m * jnp.abs(e), masked, dmask, noise)
        _close(fn(perturbed, x), want)
    small, plan = hj.shrink(masked, groups)
    assert plan.num_removed == int((~keep).sum())
    if run_shrunk:
        _close(fn(small, x), want)
    return small


def member_set(family):
    return {(m.path, m.axis, m.block, m.offset, m.repeat, m.stride) for m in family.members}


# ------------------------------------------------------------------ 1. RoPE attention
def _tables(t, rot):
    """cos/sin of RoPE angles (t, rot/2), computed in the trace from the sizes."""
    inv = 1.0 / (10000.0 ** (jnp.arange(0, rot, 2, dtype=jnp.float32) / rot))
    ang = jnp.arange(t, dtype=jnp.float32)[:, None] * inv[None, :]
    return jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]


def rope_half(x, cos, sin):
    """Llama / GPT-NeoX: rotate_half by slicing head_dim in halves and concatenating."""
    h = x.shape[-1] // 2
    c, s = jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1)
    return x * c + jnp.concatenate([-x[..., h:], x[..., :h]], -1) * s


def rope_interleaved(x, cos, sin):
    """GPT-J: even/odd pairs (strided slices) rotated and re-interleaved with a stack."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    return jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).reshape(x.shape)


def rope_stack_half(x, cos, sin):
    """rotate_half written with ``jnp.stack`` of the halves and a reshape."""
    h = x.shape[-1] // 2
    rot = jnp.stack([-x[..., h:], x[..., :h]], -2).reshape(x.shape)
    c, s = jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1)
    return x * c + rot * s


def rope_split(x, cos, sin):
    """rotate_half with ``jnp.split`` (the split primitive)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    c, s = jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1)
    return x * c + jnp.concatenate([-x2, x1], -1) * s


ROPES = {"half": rope_half, "interleaved": rope_interleaved, "stack": rope_stack_half,
         "split": rope_split}
HEAD_DIM = 8


def rope_attention(p, x, *, rope, rotary_dim=HEAD_DIM):
    """Llama-style attention with GQA; partial rotary when ``rotary_dim < head_dim``."""
    b, t, _ = x.shape
    d = HEAD_DIM
    q = (x @ p["wq"]).reshape(b, t, -1, d)
    k = (x @ p["wk"]).reshape(b, t, -1, d)
    v = (x @ p["wv"]).reshape(b, t, -1, d)
    cos, sin = _tables(t, rotary_dim)

    def apply(z):
        if rotary_dim == d:
            return rope(z, cos, sin)
        return jnp.concatenate([rope(z[..., :rotary_dim], cos, sin), z[..., rotary_dim:]], -1)

    q, k = apply(q), apply(k)
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    logits = jnp.einsum("bqhd,bshd->bhqs", q, k) / jnp.sqrt(jnp.float32(d))
    causal = jnp.tril(jnp.ones((t, t), bool))
    att = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
    o = jnp.einsum("bhqs,bshd->bqhd", att, v).reshape(b, t, -1)
    return o @ p["wo"]


def _rope_params(q_heads=4, kv_heads=2, dm=12, seed=0):
    d = HEAD_DIM
    return params_of({"wq": (dm, q_heads * d), "wk": (dm, kv_heads * d),
                      "wv": (dm, kv_heads * d), "wo": (q_heads * d, dm)}, seed)


@pytest.mark.parametrize("rotary_dim", [HEAD_DIM, HEAD_DIM // 2])
@pytest.mark.parametrize("name", sorted(ROPES))
def test_rope_gqa_heads(name, rotary_dim):
    if name == "interleaved" and rotary_dim != HEAD_DIM:
        rotary_dim = HEAD_DIM // 2
    params = _rope_params()
    x = randn(1, 2, 5, 12)

    def fn(p, x):
        return rope_attention(p, x, rope=ROPES[name], rotary_dim=rotary_dim)

    groups = discover(fn, params, x)
    # one family: kv head g with its rep = 2 query heads; head_dim is not a family
    (fam,) = groups.families
    d = HEAD_DIM
    assert fam.size == 2
    assert member_set(fam) == {(("wq",), 1, 2 * d, 0, 1, 0), (("wk",), 1, d, 0, 1, 0),
                               (("wv",), 1, d, 0, 1, 0)}
    assert fam.dependents == (hj.Member(("wo",), 0, block=2 * d),)
    assert_sound(fn, params, x, groups)


def test_rope_mha_heads_are_per_head():
    params = _rope_params(q_heads=3, kv_heads=3)
    x = randn(2, 2, 4, 12)

    def fn(p, x):
        return rope_attention(p, x, rope=rope_half)

    (fam,) = discover(fn, params, x).families
    assert fam.size == 3 and {m.block for m in fam.members} == {HEAD_DIM}
    assert_sound(fn, params, x, hj.Groups.from_families([fam]), seed=3)


def neox_fused_qkv(p, x):
    """GPT-NeoX layout: one (d, H*3D) projection, per head [q | k | v], split on head_dim."""
    b, t, _ = x.shape
    d = HEAD_DIM
    q, k, v = jnp.split((x @ p["wqkv"]).reshape(b, t, -1, 3 * d), 3, axis=-1)
    cos, sin = _tables(t, d)
    q, k = rope_half(q, cos, sin), rope_half(k, cos, sin)
    att = jax.nn.softmax(jnp.einsum("bqhd,bshd->bhqs", q, k) / jnp.sqrt(jnp.float32(d)), -1)
    return jnp.einsum("bhqs,bshd->bqhd", att, v).reshape(b, t, -1) @ p["wo"]


def test_fused_qkv_heads_with_rope():
    params = params_of({"wqkv": (12, 3 * 3 * HEAD_DIM), "wo": (3 * HEAD_DIM, 12)})
    x = randn(5, 2, 4, 12)
    (fam,) = discover(neox_fused_qkv, params, x).families
    assert fam.size == 3
    assert fam.members == (hj.Member(("wqkv",), 1, block=3 * HEAD_DIM),)
    assert fam.dependents == (hj.Member(("wo",), 0, block=HEAD_DIM),)
    assert_sound(neox_fused_qkv, params, x, hj.Groups.from_families([fam]))


def rope_single_head(p, x):
    """No heads to prune: head_dim is mixed by RoPE (and scaled by 1/sqrt(d))."""
    q = rope_half((x @ p["wq"])[:, :, None, :], *_tables(x.shape[1], p["wq"].shape[1]))
    k = rope_half((x @ p["wk"])[:, :, None, :], *_tables(x.shape[1], p["wk"].shape[1]))
    logits = jnp.einsum("bqhd,bshd->bhqs", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    att = jax.nn.softmax(logits, -1)
    return jnp.einsum("bhqs,bsd->bqd", att, x @ p["wv"]) @ p["wo"]


def test_rope_head_dim_stays_unprunable():
    params = params_of({"wq": (6, 8), "wk": (6, 8), "wv": (6, 5), "wo": (5, 6)})
    x = randn(0, 2, 4, 6)
    groups = discover(rope_single_head, params, x)
    # only the value width (5) -- neither q's nor k's head_dim
    assert [(f.size, {m.path for m in f.members}) for f in groups.families] == [
        (5, {("wv",)})]
    assert_sound(rope_single_head, params, x, groups)


def test_rope_partial_rotary_pass_through_is_not_split_from_heads():
    """Partial rotary: the head_dim of v is still inner to the heads (heads win)."""
    params = _rope_params(q_heads=2, kv_heads=2)
    x = randn(4, 1, 3, 12)

    def fn(p, x):
        return rope_attention(p, x, rope=rope_half, rotary_dim=4)

    groups = discover(fn, params, x)
    assert [f.size for f in groups.families] == [2]
    groups.validate(params)


# ----------------------------------------------------------------- 2. shared constants
def head_masked_layers(p, x):
    """Two attention layers; row i of one ``ones((L, H))`` head mask scales layer i."""
    b, t, _ = x.shape
    d = 4
    layers = p["layers"]
    heads = [lp["wq"].shape[1] // d for lp in layers]
    head_mask = jnp.ones((len(layers), max(heads)))  # (L, H) before any pruning
    h = x
    for i, lp in enumerate(layers):
        q = (h @ lp["wq"]).reshape(b, t, -1, d)
        k = (h @ lp["wk"]).reshape(b, t, -1, d)
        v = (h @ lp["wv"]).reshape(b, t, -1, d)
        att = jax.nn.softmax(jnp.einsum("bqhd,bshd->bhqs", q, k) * 0.5, -1)
        att = att * head_mask[i, :heads[i]][None, :, None, None]
        h = h + jnp.einsum("bhqs,bshd->bqhd", att, v).reshape(b, t, -1) @ lp["wo"]
    return h


def _layer_params(n_layers=2, heads=3, d=4, dm=8):
    return params_of({"layers": [{"wq": (dm, heads * d), "wk": (dm, heads * d),
                                  "wv": (dm, heads * d), "wo": (heads * d, dm)}
                                 for _ in range(n_layers)]})


def test_shared_constant_does_not_tie_layers():
    params = _layer_params()
    x = randn(0, 2, 5, 8)
    groups = discover(head_masked_layers, params, x)
    # one head family per layer, not one family joining both layers' heads
    assert [f.size for f in groups.families] == [3, 3]
    for i, fam in enumerate(groups.families):
        assert {m.path[:2] for m in fam.members} == {("layers", i)}
    assert_sound(head_masked_layers, params, x, groups)


def shared_scale(p, x):
    """One in-trace constant vector used by two unrelated layers (elementwise scale)."""
    c = jnp.full((max(p["w1"].shape[1], p["w2"].shape[1]),), 2.0)
    a = jax.nn.relu(x @ p["w1"])
    b = jax.nn.relu(x @ p["w2"])
    a, b = a * c[:a.shape[-1]], b * c[:b.shape[-1]]
    return a @ p["v1"] + b @ p["v2"]


def test_uniform_constant_multiplicand_keeps_families_apart():
    params = params_of({"w1": (6, 5), "w2": (6, 5), "v1": (5, 3), "v2": (5, 3)})
    x = randn(0, 4, 6)
    groups = discover(shared_scale, params, x)
    assert sorted({m.path for m in f.members}.pop() for f in groups.families) == [
        ("w1",), ("w2",)]
    assert_sound(shared_scale, params, x, groups)


def iota_scale(p, x):
    """A constant that varies along the channels (from iota) cannot be sliced."""
    h = jax.nn.relu(x @ p["w1"]) * jnp.arange(1, p["w1"].shape[1] + 1, dtype=jnp.float32)
    return h @ p["w2"]


def test_varying_in_trace_constant_blocks_its_axis():
    params = params_of({"w1": (6, 5), "w2": (5, 3)})
    assert discover(iota_scale, params, jnp.ones((2, 6))).families == ()


def rms_over_two_axes(p, x):
    """An RMS over (tokens, channels) jointly (GroupNorm-like): its divisor T*C changes
    when a channel is removed, so the channels are not a family."""
    h = jax.nn.relu(x @ p["w1"])
    h = h * jax.lax.rsqrt((h * h).mean(axis=(1, 2), keepdims=True) + 1e-6)
    return h @ p["w2"]


def test_mean_over_several_axes_blocks_the_channels():
    params = params_of({"w1": (6, 5), "w2": (5, 3)})
    assert discover(rms_over_two_axes, params, randn(0, 2, 4, 6)).families == ()


# ---------------------------------------------------------------- 3. closed-over arrays
def _bn_block(p, stats, x):
    h = jax.lax.conv_general_dilated(x, p["k1"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = (h - stats["mean"]) * jax.lax.rsqrt(stats["var"] + 1e-5) * p["scale"] + p["shift"]
    h = jax.nn.relu(h)
    return jnp.mean(h, axis=(1, 2)) @ p["w"]


def _bn_setup():
    params = params_of({"k1": (3, 3, 2, 6), "scale": (6,), "shift": (6,), "w": (6, 3)})
    stats = {"mean": jnp.linspace(-1, 1, 6), "var": jnp.linspace(0.5, 2, 6)}
    return params, stats, randn(0, 2, 5, 5, 2)


def test_closed_over_arrays_warn_with_names_and_paths():
    params, stats, x = _bn_setup()
    with pytest.warns(hj.DiscoveryWarning) as record:
        groups = hj.discover_groups(lambda p, x: _bn_block(p, stats, x), params, x)
    assert groups.families == ()
    text = "\n".join(str(w.message) for w in record)
    assert "closed-over" in text and "float32[6]" in text
    for path in ("k1", "scale", "shift"):
        assert path in text
    assert "batch_stats" in text  # how to pass them in
    # passed in as part of the tree (non-trainable), they become dependents
    tree = {"params": params, "batch_stats": stats}
    (fam,) = discover(lambda t, x: _bn_block(t["params"], t["batch_stats"], x), tree,
                      x).families
    assert {m.path for m in fam.dependents} >= {("batch_stats", "mean"),
                                                ("batch_stats", "var")}
    assert_sound(lambda t, x: _bn_block(t["params"], t["batch_stats"], x), tree, x,
                 hj.Groups.from_families([fam]))


def test_closure_ignoring_params_warns():
    params = params_of({"w1": (6, 5), "w2": (5, 3)})

    def closure(_p, x):
        return jax.nn.relu(x @ params["w1"]) @ params["w2"]

    with pytest.warns(hj.DiscoveryWarning, match="does not use its parameters"):
        groups = hj.discover_groups(closure, params, jnp.ones((2, 6)))
    assert groups.families == ()


def test_bound_method_of_module_raises():
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="discover_groups\\(model"):
        hj.discover_groups(model.__call__, jnp.ones((2, 4)))


def test_zero_groups_explains_why():
    params = params_of({"w1": (6, 5), "w2": (5, 3)})

    def softmax_hidden(p, x):
        return jax.nn.softmax(x @ p["w1"], axis=-1) @ p["w2"]

    with pytest.warns(hj.DiscoveryWarning, match=r"no prunable groups[\s\S]*w1"):
        hj.discover_groups(softmax_hidden, params, jnp.ones((2, 6)))


def test_haiku_closed_over_state_warns():
    hk = pytest.importorskip("haiku")

    def net(x, training):
        h = hk.Conv2D(6, 3, with_bias=False)(x)
        h = hk.BatchNorm(True, True, 0.9)(h, is_training=training)
        return hk.Linear(3)(jnp.mean(jax.nn.relu(h), axis=(1, 2)))

    f = hk.transform_with_state(net)
    x = randn(0, 2, 5, 5, 2)
    params, state = f.init(jax.random.key(1), x, True)
    state = jax.tree.map(lambda a: a + 0.1 * jnp.arange(a.size).reshape(a.shape)
                         if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
    with pytest.warns(hj.DiscoveryWarning, match="closed-over"):
        found = hj.discover_groups(lambda p, x: f.apply(p, state, None, x, False)[0],
                                   params, x)
    assert found.families == ()
    tree = {"params": params, "state": state}

    def apply(t, x):
        return f.apply(t["params"], t["state"], None, x, False)[0]

    groups = hj.discover_groups(apply, tree, x, trainable=lambda path: path[0] == "params")
    (fam,) = groups.families
    assert fam.size == 6
    assert {format_path(m.path) for m in fam.dependents} >= {
        "state/batch_norm/~/mean_ema/average", "state/batch_norm/~/var_ema/average"}
    assert_sound(apply, tree, x, groups, run_shrunk=False)


# ----------------------------------------------------------- 4. rules that move axes
def _conv(x, k, groups=1, padding="SAME"):
    return jax.lax.conv_general_dilated(x, k, (1, 1), padding, feature_group_count=groups,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def pad_valid_block(p, x):
    """Downsampling block: explicit spatial pad, then VALID convolutions."""
    h = jax.nn.relu(_conv(x, p["k1"]) + p["b1"])
    h = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h = jax.nn.relu(_conv(h, p["k2"], padding="VALID"))
    return jnp.mean(h, axis=(1, 2)) @ p["w"]


def test_pad_before_valid_conv_keeps_both_families():
    params = params_of({"k1": (3, 3, 2, 5), "b1": (5,), "k2": (3, 3, 5, 4), "w": (4, 3)})
    x = randn(0, 2, 6, 6, 2)
    groups = discover(pad_valid_block, params, x)
    assert [f.size for f in groups.families] == [5, 4]
    assert {m.path for m in groups.families[0].members} == {("k1",), ("b1",)}
    assert groups.families[0].dependents == (hj.Member(("k2",), 2),)
    assert_sound(pad_valid_block, params, x, groups)


def test_pad_with_nonzero_value_drops_the_family():
    def fn(p, x):
        h = jax.nn.relu(x @ p["w1"])
        return jnp.pad(h, ((1, 1), (0, 0)), constant_values=1.0) @ p["w2"]

    params = params_of({"w1": (6, 5), "w2": (5, 3)})
    assert discover(fn, params, jnp.ones((2, 6))).families == ()


# One op per rule, applied to an activation ``h`` whose channel axis ``c`` sits at a
# random position among three other axes (sizes 2, 3, 4); each returns the new array and
# the new position of the channel axis. Only axes other than the channel are touched.
def _others(h, c):
    return [a for a in range(h.ndim) if a != c]


def op_transpose(h, c, r):
    perm = list(r.permutation(h.ndim))
    return jnp.transpose(h, perm), perm.index(c)


def op_reshape(h, c, r):
    # merge the two axes after the first non-channel pair (never the channel)
    ax = [a for a in range(h.ndim - 1) if c not in (a, a + 1)]
    a = ax[r.integers(len(ax))]
    shape = h.shape[:a] + (h.shape[a] * h.shape[a + 1],) + h.shape[a + 2:]
    return h.reshape(shape), c if c < a else c - 1


def op_split_reshape(h, c, r):
    ax = [a for a in _others(h, c) if h.shape[a] in (4, 6)]
    if not ax:
        return h, c
    a = ax[r.integers(len(ax))]
    shape = h.shape[:a] + (2, h.shape[a] // 2) + h.shape[a + 1:]
    return h.reshape(shape), c if c < a else c + 1


def op_pad(h, c, r):
    widths = [(0, 0) if a == c else (int(r.integers(3)), int(r.integers(3)))
              for a in range(h.ndim)]
    return jnp.pad(h, widths), c


def op_broadcast(h, c, r):
    a = int(r.integers(h.ndim + 1))
    g = jnp.expand_dims(h, a)
    shape = list(g.shape)
    shape[a] = 3
    return jnp.broadcast_to(g, shape), c if c < a else c + 1


def op_squeeze(h, c, r):
    a = int(r.integers(h.ndim + 1))
    g = jnp.expand_dims(h, a)
    return jnp.squeeze(g, a), c


def op_expand_dims(h, c, r):
    a = int(r.integers(h.ndim + 1))
    return jnp.expand_dims(h, a), c if c < a else c + 1


def _reduce(fn):
    def op(h, c, r):
        a = int(r.choice(_others(h, c)))
        return fn(h, axis=a), c if c < a else c - 1
    return op


def op_slice(h, c, r):
    idx = tuple(slice(None) if a == c else slice(int(r.integers(2)), None)
                for a in range(h.ndim))
    return h[idx], c


def op_strided_slice(h, c, r):
    idx = tuple(slice(None) if a == c else slice(None, None, 2) for a in range(h.ndim))
    return h[idx], c


def op_concatenate(h, c, r):
    a = int(r.choice(_others(h, c)))
    return jnp.concatenate([h, 2.0 * h], axis=a), c


def op_stack(h, c, r):
    a = int(r.integers(h.ndim + 1))
    return jnp.stack([h, -h], axis=a), c if c < a else c + 1


def op_rev(h, c, r):
    return jnp.flip(h, axis=int(r.choice(_others(h, c)))), c


def op_dynamic_slice(h, c, r):
    a = int(r.choice(_others(h, c)))
    return jax.lax.dynamic_slice_in_dim(h, 1, h.shape[a] - 1, axis=a), c


def op_dynamic_update_slice(h, c, r):
    a = int(r.choice(_others(h, c)))
    upd = jnp.zeros(h.shape[:a] + (1,) + h.shape[a + 1:])
    return jax.lax.dynamic_update_slice_in_dim(h, upd, 0, axis=a), c


def op_take(h, c, r):
    a = int(r.choice(_others(h, c)))
    return jnp.take(h, jnp.array([1, 0, 1]), axis=a), c


def op_cumsum(h, c, r):
    return jnp.cumsum(h, axis=int(r.choice(_others(h, c)))), c


def op_sort(h, c, r):
    return jnp.sort(h, axis=int(r.choice(_others(h, c)))), c


def op_roll(h, c, r):
    return jnp.roll(h, 1, axis=int(r.choice(_others(h, c)))), c


def op_where(h, c, r):
    a = int(r.choice(_others(h, c)))
    shape = [1] * h.ndim
    shape[a] = h.shape[a]
    mask = (jnp.arange(h.shape[a]) % 2 == 0).reshape(shape)
    return jnp.where(mask, h, 0.0), c


AXIS_OPS = {
    "transpose": op_transpose, "reshape_merge": op_reshape, "reshape_split": op_split_reshape,
    "pad": op_pad, "broadcast_in_dim": op_broadcast, "squeeze": op_squeeze,
    "expand_dims": op_expand_dims, "reduce_sum": _reduce(jnp.sum),
    "reduce_max": _reduce(jnp.max), "reduce_min": _reduce(jnp.min), "slice": op_slice,
    "strided_slice": op_strided_slice, "concatenate": op_concatenate, "stack": op_stack,
    "rev": op_rev, "dynamic_slice": op_dynamic_slice,
    "dynamic_update_slice": op_dynamic_update_slice, "gather": op_take, "cumsum": op_cumsum,
    "sort": op_sort, "roll": op_roll, "select_n": op_where,
}
CHANNELS = 5


def _axis_model(op, layout_seed, c_pos):
    """relu(x @ w1) laid out with the channel at ``c_pos``, ``op`` applied, then summed
    over every other axis and contracted with ``w2`` (C -> 3)."""

    def fn(p, x):
        h = jax.nn.relu(jnp.einsum("abdf,fc->abdc", x, p["w1"]) + p["b1"])
        h = jnp.moveaxis(h, -1, c_pos)
        h, c = op(h, c_pos, np.random.default_rng(layout_seed))
        h = jnp.moveaxis(h, c, -1)
        return h.reshape(-1, h.shape[-1]).sum(0) @ p["w2"]

    return fn


@pytest.mark.parametrize("rule", sorted(AXIS_OPS))
@FEW
@given(layout=st.integers(0, 2**16), c_pos=st.integers(0, 3))
def test_axis_rules_keep_the_channel_family(rule, layout, c_pos):
    params = params_of({"w1": (6, CHANNELS), "b1": (CHANNELS,), "w2": (CHANNELS, 3)})
    x = randn(layout % 7, 2, 3, 4, 6)
    fn = _axis_model(AXIS_OPS[rule], layout, c_pos)
    groups = discover(fn, params, x)
    (fam,) = groups.families
    assert fam.size == CHANNELS
    assert set(fam.members) == {hj.Member(("w1",), 1), hj.Member(("b1",), 0)}
    assert fam.dependents == (hj.Member(("w2",), 0),)
    assert_sound(fn, params, x, groups, seed=layout)


# Ops *on* the channel axis: some keep sub-families (a roll cuts it into two segments, a
# self-concatenation repeats it), others block it; whatever is found must be sound.
CHANNEL_OPS = {
    "rev": (lambda h: jnp.flip(h, -1), []),
    "cumsum": (lambda h: jnp.cumsum(h, -1), []),
    "sort": (lambda h: jnp.sort(h, -1), []),
    "roll": (lambda h: jnp.roll(h, 1, -1), [4, 1]),
    "slice": (lambda h: h[..., 1:], [4, 1]),  # the dropped channel: a family of one
    "self_concatenate": (lambda h: jnp.concatenate([h, -h], -1), [5]),
    "take": (lambda h: jnp.take(h, jnp.array([0, 2, 4]), axis=-1), []),
    "strided_slice": (lambda h: h[..., ::2], []),
    "pad": (lambda h: jnp.pad(h, ((0, 0),) * (h.ndim - 1) + ((1, 1),)), []),
}


@pytest.mark.parametrize("rule", sorted(CHANNEL_OPS))
def test_channel_axis_ops_are_sound(rule):
    op, sizes = CHANNEL_OPS[rule]
    params = params_of({"w1": (6, CHANNELS), "w2": (CHANNELS, 3)})
    out = jax.eval_shape(op, jax.ShapeDtypeStruct((2, CHANNELS), jnp.float32)).shape[-1]
    params["w2"] = randn(3, out, 3)

    def fn(p, x):
        return op(jax.nn.relu(x @ p["w1"])) @ p["w2"]

    x = randn(4, 3, 6)
    groups = discover(fn, params, x)
    assert sorted((f.size for f in groups.families), reverse=True) == sizes
    if sizes:
        assert_sound(fn, params, x, groups)


# --------------------------------------------------------------- 5. grouped convolution
def resnext_block(p, x):
    """1x1 reduce -> grouped 3x3 (G = C / k from the shapes) -> 1x1 expand, residual."""
    h = jax.nn.relu(_conv(x, p["reduce"]) * p["s1"] + p["t1"])
    g = h.shape[-1] // p["grouped"].shape[-2]
    h = jax.nn.relu(_conv(h, p["grouped"], groups=g) * p["s2"] + p["t2"])
    return x + _conv(h, p["expand"])


def _resnext_params(c=6, width=8, k=2, m=2):
    groups = width // k
    return params_of({"reduce": (1, 1, c, width), "s1": (width,), "t1": (width,),
                      "grouped": (3, 3, k, groups * m), "s2": (groups * m,),
                      "t2": (groups * m,), "expand": (1, 1, groups * m, c)})


def test_grouped_conv_prunes_whole_groups():
    params = _resnext_params()
    x = randn(0, 2, 5, 5, 6)
    groups = discover(resnext_block, params, x)
    (fam,) = groups.families
    assert fam.size == 4  # 8 / k=2 conv-groups
    assert member_set(fam) == {
        (("reduce",), 3, 2, 0, 1, 0), (("s1",), 0, 2, 0, 1, 0), (("t1",), 0, 2, 0, 1, 0),
        (("grouped",), 3, 2, 0, 1, 0), (("s2",), 0, 2, 0, 1, 0), (("t2",), 0, 2, 0, 1, 0)}
    assert fam.dependents == (hj.Member(("expand",), 2, block=2),)
    small = assert_sound(resnext_block, params, x, groups)
    # still a grouped conv with k = 2 in-channels per group, fewer groups
    assert small["grouped"].shape[2] == 2
    assert small["reduce"].shape[3] == small["grouped"].shape[3]


def test_grouped_conv_unequal_group_widths():
    params = _resnext_params(width=6, k=3, m=2)  # 2 groups: 3 in, 2 out per group
    x = randn(1, 2, 4, 4, 6)
    groups = discover(resnext_block, params, x)
    (fam,) = groups.families
    assert fam.size == 2
    assert {(m.path, m.block) for m in fam.members if m.axis == 3} == {
        (("reduce",), 3), (("grouped",), 2)}
    assert_sound(resnext_block, params, x, groups, seed=1)


def grouped_on_input(p, x):
    """The grouped conv reads the model input: whole groups would change the input, so
    the family is out-channel j of every group."""
    g = x.shape[-1] // p["grouped"].shape[-2]
    h = jax.nn.relu(_conv(x, p["grouped"], groups=g) + p["b"])
    return jnp.mean(h, axis=(1, 2)) @ p["w"]


def test_grouped_conv_on_input_prunes_channel_in_every_group():
    # 3 groups, 2 in- and 4 out-channels per group
    params = params_of({"grouped": (3, 3, 2, 12), "b": (12,), "w": (12, 3)})
    x = randn(0, 2, 5, 5, 6)
    groups = discover(grouped_on_input, params, x)
    (fam,) = groups.families
    assert fam.size == 4
    assert set(fam.members) == {hj.Member(("grouped",), 3, repeat=3, stride=4),
                                hj.Member(("b",), 0, repeat=3, stride=4)}
    assert fam.dependents == (hj.Member(("w",), 0, repeat=3, stride=4),)
    small = assert_sound(grouped_on_input, params, x, groups)
    assert small["grouped"].shape[3] % 3 == 0


def grouped_with_group_max(p, x):
    """A max over the conv-groups of the grouped conv's input blocks whole groups; what
    is left is in-channel i of every group (the kernel's in axis is its dependent) and
    out-channel j of every group."""
    h = jax.nn.relu(_conv(x, p["k1"]))
    g = h.shape[-1] // p["grouped"].shape[-2]
    y = jax.nn.relu(_conv(h, p["grouped"], groups=g))
    z = h.reshape(*h.shape[:3], g, -1).max(axis=3)
    return jnp.mean(y, axis=(1, 2)) @ p["w"] + jnp.mean(z, axis=(1, 2)) @ p["v"]


def test_grouped_conv_channel_in_group_families():
    # 2 groups of 3 in- and 2 out-channels
    params = params_of({"k1": (3, 3, 2, 6), "grouped": (3, 3, 3, 4), "w": (4, 3),
                        "v": (3, 3)})
    x = randn(0, 2, 5, 5, 2)
    groups = discover(grouped_with_group_max, params, x)
    cin, cout = groups.families
    assert (cin.size, cout.size) == (3, 2)
    assert set(cin.members) == {hj.Member(("k1",), 3, repeat=2, stride=3)}
    assert set(cin.dependents) == {hj.Member(("grouped",), 2), hj.Member(("v",), 0)}
    assert set(cout.members) == {hj.Member(("grouped",), 3, repeat=2, stride=2)}
    small = assert_sound(grouped_with_group_max, params, x, groups)
    assert small["k1"].shape[3] == 2 * small["grouped"].shape[2]


# ------------------------------------------------------------- the reference Llama
def test_llama_kv_head_and_swiglu_families():
    models = pytest.importorskip("hesso_jax.models.llama")
    model = models.Llama(64, 16, 2, 4, 2, 24, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 6)), jnp.int32)
    groups = hj.discover_groups(model, tokens)
    want = model.groups()

    def as_sets(g):
        return {(f.size, frozenset(f.members), frozenset(f.dependents)) for f in g.families}

    assert as_sets(groups) == as_sets(want)
    assert [f.size for f in groups.families] == [2, 24, 2, 24]
    graphdef, state = nnx.split(model)
    assert_sound(lambda st, t: nnx.merge(graphdef, st)(t), state, tokens, groups)


def test_stack_rule_regression_exactly_zero_output():
    """Hypothesis found layout 852 / c_pos 1 of the stack rule: the reference output is
    exactly 0 and the shrunk one ~1e-7; the family itself is sound."""
    test_axis_rules_keep_the_channel_family.hypothesis.inner_test("stack", 852, 1)
