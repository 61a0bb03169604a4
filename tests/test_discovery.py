"""Tests of `hesso_jax.discover_groups` on pure functions and the reference NNX models.

Each case is a pure ``fn(params, x)`` that takes its sizes from the parameter shapes, with
the family sizes derived by hand. The exactness property: zero a random subset of the
discovered groups, shrink the parameters, and the shrunk function computes what the
masked one did.
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
from hesso_jax.models import CNN, MLP, TinyTransformer
from hesso_jax.models.carn import CARN
from hesso_jax.models.charlm import CharLM

FEW = settings(max_examples=6)


def _normal(key, shape, scale=0.5):
    return scale * jax.random.normal(key, shape)


def _params(shapes, seed=0):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {k: _normal(key, s) for (k, s), key in zip(shapes.items(), keys, strict=True)}


# ----------------------------------------------------------------------------- cases
def mlp_gelu(p, x):
    return jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def swiglu(p, x):
    return (jax.nn.silu(x @ p["gate"]) * (x @ p["up"])) @ p["down"]


def glu_sigmoid(p, x):
    # sigmoid(0) = 1/2 is not zero, but the product is zero once ``up`` is
    return (jax.nn.sigmoid(x @ p["gate"]) * (x @ p["up"])) @ p["down"]


def concat_two(p, x):
    a = jax.nn.relu(x @ p["wa"])
    b = jnp.tanh(x @ p["wb"])
    return jnp.concatenate([a, b], axis=-1) @ p["wo"]


def split_fused(p, x):
    h = jax.nn.relu(x @ p["w"] + p["b"])
    n = p["wa"].shape[0]
    return h[:, :n] @ p["wa"] + h[:, n:] @ p["wb"]


def merged_heads(p, x):
    """Attention with ``(d, H*D)`` projections; head_dim D=4 is a constant."""
    b, t, _ = x.shape
    q = (x @ p["wq"]).reshape(b, t, -1, 4)
    k = (x @ p["wk"]).reshape(b, t, -1, 4)
    v = (x @ p["wv"]).reshape(b, t, -1, 4)
    att = jax.nn.softmax(jnp.einsum("bqhd,bshd->bhqs", q, k) / 2.0, axis=-1)
    o = jnp.einsum("bhqs,bshd->bqhd", att, v).reshape(b, t, -1)
    return o @ p["wo"]


def gqa(p, x):
    """Grouped-query attention: Hq = 4 query heads share Hkv = 2 key/value heads."""
    b, t, _ = x.shape
    q = (x @ p["wq"]).reshape(b, t, -1, 4)
    k = (x @ p["wk"]).reshape(b, t, -1, 4)
    v = (x @ p["wv"]).reshape(b, t, -1, 4)
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    att = jax.nn.softmax(jnp.einsum("bqhd,bshd->bhqs", q, k) * 0.5, axis=-1)
    o = jnp.einsum("bhqs,bshd->bqhd", att, v).reshape(b, t, -1)
    return o @ p["wo"]


def layernorm_residual(p, x):
    h = x @ p["w_in"]
    h = h + jax.nn.relu(h @ p["w1"]) @ p["w2"]
    mu = h.mean(-1, keepdims=True)
    h = (h - mu) / jnp.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * p["g"]
    return h @ p["w_out"]


def rmsnorm_residual(p, x):
    h = x @ p["w_in"]
    h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + 1e-6) * p["g"]
    return jax.nn.relu(h @ p["w1"]) @ p["w2"]


def flatten_dense(p, x):
    h = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h + p["kb"])
    return h.reshape(h.shape[0], -1) @ p["w"]


def _conv(x, k, groups=1):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", feature_group_count=groups,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def depthwise(p, x):
    h = jax.nn.relu(_conv(x, p["expand"]))
    h = jax.nn.relu(_conv(h, p["dw"], groups=h.shape[-1]) * p["scale"] + p["shift"])
    return _conv(h, p["project"]).mean(axis=(1, 2))


def grouped(p, x):
    """A grouped conv whose feature_group_count comes from the shapes (C_in / k)."""
    h = jax.nn.relu(_conv(x, p["k1"]))
    h = jax.nn.relu(_conv(h, p["k2"], groups=h.shape[-1] // p["k2"].shape[-2]))
    return h.mean(axis=(1, 2)) @ p["w"]


def scan_stack(p, x):
    def layer(h, w):
        return h + jax.nn.relu(h @ w["w1"]) @ w["w2"], None

    h, _ = jax.lax.scan(layer, x, {"w1": p["w1"], "w2": p["w2"]})
    return h


def cond_branches(p, x):
    h = x @ p["w1"]
    h = jax.lax.cond(x.sum() > 0, jax.nn.relu, jnp.tanh, h)
    return h @ p["w2"]


def cond_exp(p, x):
    h = x @ p["w1"]
    h = jax.lax.cond(x.sum() > 0, jax.nn.relu, jnp.exp, h)
    return h @ p["w2"]


def softmax_hidden(p, x):
    return jax.nn.softmax(x @ p["w1"], axis=-1) @ p["w2"]


def embedding(p, ids):
    h = jnp.take(p["embed"], ids, axis=0)
    return jax.nn.relu(h @ p["w1"]) @ p["w2"]


def mean_channels(p, x):
    h = jax.nn.relu(x @ p["w1"])
    return h @ p["w2"] + h.mean(-1, keepdims=True)


def prescaled_attention(p, x):
    """One head; the query is scaled by 1/sqrt(head_dim) *before* q·k (nnx's layout)."""
    q = x @ p["wq"]
    q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    att = jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", q, x @ p["wk"]), axis=-1)
    return jnp.einsum("bqk,bkd->bqd", att, x @ p["wv"]) @ p["wo"]


def pool_then_dense(p, x):
    """4x4 mean pooling divides by 16, which is also the channel count (not a 1/n scale)."""
    return jax.nn.relu(_conv(x, p["k"])).mean(axis=(1, 2)) @ p["w"]


CASES = {
    # name: (fn, param shapes, input, expected family sizes in order)
    "mlp_gelu": (mlp_gelu, {"w1": (6, 5), "b1": (5,), "w2": (5, 3), "b2": (3,)},
                 (4, 6), [5]),
    "swiglu": (swiglu, {"gate": (6, 7), "up": (6, 7), "down": (7, 3)}, (4, 6), [7]),
    "glu_sigmoid": (glu_sigmoid, {"gate": (6, 7), "up": (6, 7), "down": (7, 3)}, (4, 6), [7]),
    # a: 4 relu channels at offset 0, b: 3 tanh channels at offset 4 of wo's rows
    "concat_two": (concat_two, {"wa": (6, 4), "wb": (6, 3), "wo": (7, 2)}, (4, 6), [4, 3]),
    # one Dense output split in two halves: two families at offsets 0 and 5 of w
    "split_fused": (split_fused, {"w": (6, 10), "b": (10,), "wa": (5, 3), "wb": (5, 3)},
                    (4, 6), [5, 5]),
    # 3 heads of 4: head_dim loses to the outer factor (heads)
    "merged_heads": (merged_heads, {"wq": (8, 12), "wk": (8, 12), "wv": (8, 12),
                                    "wo": (12, 8)}, (2, 5, 8), [3]),
    # 2 kv heads, each with the 2 query heads that share it
    "gqa": (gqa, {"wq": (8, 16), "wk": (8, 8), "wv": (8, 8), "wo": (16, 8)}, (2, 5, 8), [2]),
    # the residual width is normalised (not prunable); the MLP's 9 neurons are
    "layernorm_residual": (layernorm_residual, {"w_in": (6, 8), "w1": (8, 9), "w2": (9, 8),
                                                "g": (8,), "w_out": (8, 3)}, (4, 6), [9]),
    "rmsnorm_residual": (rmsnorm_residual, {"w_in": (6, 8), "g": (8,), "w1": (8, 9),
                                            "w2": (9, 3)}, (4, 6), [9]),
    # 5 conv channels, each recurring every 5 rows of w (4x4 positions)
    "flatten_dense": (flatten_dense, {"k": (3, 3, 2, 5), "kb": (5,), "w": (80, 3)},
                      (2, 4, 4, 2), [5]),
    # expand + depthwise + its affine form one family of 6; project output is the output
    "depthwise": (depthwise, {"expand": (1, 1, 3, 6), "dw": (3, 3, 1, 6), "scale": (6,),
                              "shift": (6,), "project": (1, 1, 6, 4)}, (2, 5, 5, 3), [6]),
    # grouped conv (2 groups of 2 in- and 2 out-channels): whole conv-groups are pruned
    "grouped": (grouped, {"k1": (3, 3, 2, 4), "k2": (3, 3, 2, 4), "w": (4, 3)},
                (2, 5, 5, 2), [2]),
    # stacked layers: hidden neuron j of every layer is one group (the residual is the
    # input/output stream)
    "scan_stack": (scan_stack, {"w1": (3, 6, 5), "w2": (3, 5, 6)}, (4, 6), [5]),
    "cond_branches": (cond_branches, {"w1": (6, 5), "w2": (5, 3)}, (4, 6), [5]),
    "cond_exp": (cond_exp, {"w1": (6, 5), "w2": (5, 3)}, (4, 6), []),
    "softmax_hidden": (softmax_hidden, {"w1": (6, 5), "w2": (5, 3)}, (4, 6), []),
    # embedding features and hidden neurons
    "embedding": (embedding, {"embed": (11, 6), "w1": (6, 5), "w2": (5, 3)}, None, [6, 5]),
    # q/k head_dim feeds the 1/sqrt(d) scale (not prunable); v's head_dim is exact
    "prescaled_attention": (prescaled_attention, {"wq": (8, 4), "wk": (8, 4), "wv": (8, 4),
                                                  "wo": (4, 8)}, (2, 5, 8), [4]),
    "pool_then_dense": (pool_then_dense, {"k": (3, 3, 2, 16), "w": (16, 3)}, (2, 4, 4, 2),
                        [16]),
    "mean_channels": (mean_channels, {"w1": (6, 5), "w2": (5, 3)}, (4, 6), []),
}


def _case(name, seed=0):
    fn, shapes, xshape, sizes = CASES[name]
    params = _params(shapes, seed)
    if xshape is None:
        x = jax.random.randint(jax.random.key(seed + 1), (3, 4), 0, 11)
    else:
        x = jax.random.normal(jax.random.key(seed + 1), xshape)
    return fn, params, x, sizes


def _discover(fn, params, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hj.DiscoveryWarning)
        return hj.discover_groups(fn, params, x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_discovered_family_sizes(name):
    fn, params, x, sizes = _case(name)
    groups = _discover(fn, params, x)
    assert [f.size for f in groups.families] == sizes
    if sizes:
        groups.validate(params)


def _keep_mask(groups, bits):
    keep = np.resize(np.asarray(bits, bool), groups.num_groups)
    keep[list(groups.starts)] = True  # at least one survivor per family
    return keep


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c[3]))
@FEW
@given(bits=st.lists(st.booleans(), min_size=16, max_size=16))
def test_masked_equals_shrunk(name, bits):
    fn, params, x, _ = _case(name)
    groups = _discover(fn, params, x)
    keep = _keep_mask(groups, bits)
    mask = groups.broadcast(jnp.asarray(keep, jnp.float32), params, fill=1.0)
    masked = jax.tree.map(lambda a, m: a * m, params, mask)
    small, plan = hj.shrink(masked, groups)
    assert plan.num_removed == int((~keep).sum())
    want, got = fn(masked, x), fn(small, x)
    scale = float(jnp.max(jnp.abs(want))) + 1e-12
    assert float(jnp.max(jnp.abs(got - want))) <= 1e-5 * scale


def test_patterns_of_heads_gqa_and_flatten():
    fn, params, x, _ = _case("merged_heads")
    (fam,) = _discover(fn, params, x).families
    assert {(m.path, m.axis, m.block) for m in fam.members} == {
        (("wq",), 1, 4), (("wk",), 1, 4), (("wv",), 1, 4)}
    assert fam.dependents == (hj.Member(("wo",), 0, block=4),)
    fn, params, x, _ = _case("gqa")
    (fam,) = _discover(fn, params, x).families
    blocks = {m.path: m.block for m in fam.members}
    assert blocks == {("wq",): 8, ("wk",): 4, ("wv",): 4}  # 2 q heads x 4 per kv head
    assert fam.dependents == (hj.Member(("wo",), 0, block=8),)
    fn, params, x, _ = _case("flatten_dense")
    (fam,) = _discover(fn, params, x).families
    assert fam.dependents == (hj.Member(("w",), 0, repeat=16, stride=5),)
    fn, params, x, _ = _case("split_fused")
    offsets = sorted(m.offset for f in _discover(fn, params, x).families for m in f.members
                     if m.path == ("w",))
    assert offsets == [0, 5]


def test_unknown_primitive_warns_and_blocks():
    def with_callback(p, x):
        h = jax.nn.relu(x @ p["w1"])
        h = jax.pure_callback(lambda a: np.asarray(a), jax.ShapeDtypeStruct(h.shape, h.dtype),
                              h)
        g = jax.nn.relu(x @ p["w3"])
        return h @ p["w2"] + g @ p["w4"]

    params = _params({"w1": (6, 5), "w2": (5, 3), "w3": (6, 4), "w4": (4, 3)})
    with pytest.warns(hj.DiscoveryWarning, match=r"pure_callback.*w1"):
        groups = hj.discover_groups(with_callback, params, jnp.ones((2, 6)))
    assert [f.members[0].path for f in groups.families] == [("w3",)]


def test_grouped_conv_prunes_whole_groups():
    fn, params, x, _ = _case("grouped")
    (fam,) = _discover(fn, params, x).families
    assert set(fam.members) == {hj.Member(("k1",), 3, block=2), hj.Member(("k2",), 3, block=2)}
    assert fam.dependents == (hj.Member(("w",), 0, block=2),)


def test_bad_arguments():
    with pytest.raises(TypeError, match="nnx.Module or a callable"):
        hj.discover_groups(3, jnp.ones(2))
    with pytest.raises(TypeError, match="parameter pytree"):
        hj.discover_groups(mlp_gelu)


def test_trainable_predicate_and_static_args():
    def bn_like(p, x, *, eps):
        h = x @ p["params"]["w1"]
        h = (h - p["batch_stats"]["mean"]) * p["params"]["scale"] + p["params"]["shift"]
        return jax.nn.relu(h + eps) @ p["params"]["w2"]

    params = {"params": _params({"w1": (6, 5), "scale": (5,), "shift": (5,), "w2": (5, 3)}),
              "batch_stats": {"mean": jnp.ones((5,))}}
    (fam,) = hj.discover_groups(bn_like, params, jnp.ones((2, 6)), eps=0.0).families
    assert ("batch_stats", "mean") in {m.path for m in fam.dependents}
    assert ("batch_stats", "mean") not in {m.path for m in fam.members}
    # adding a constant after the zero point breaks zero invariance
    assert hj.discover_groups(bn_like, params, jnp.ones((2, 6)), eps=0.1).families == ()


# ------------------------------------------------------------------- reference models
def _as_sets(groups):
    return {(f.size, frozenset(f.members), frozenset(f.dependents)) for f in groups.families}


REFERENCE = {
    "mlp": (lambda: MLP(64, (32, 16), 10, rngs=nnx.Rngs(0)), (2, 64)),
    "cnn": (lambda: CNN(8, 12, rngs=nnx.Rngs(0)), (2, 8, 8, 1)),
    "transformer": (lambda: TinyTransformer(rngs=nnx.Rngs(0)), (2, 8, 8)),
    "carn": (lambda: CARN(8, 2, rngs=nnx.Rngs(0)), (2, 8, 8, 1)),
    "charlm": (lambda: CharLM(seq_len=16, d_model=16, mlp_dim=32, rngs=nnx.Rngs(0)), None),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_reference_models_match_hand_written_groups(name, mode):
    build, xshape = REFERENCE[name]
    model = build()
    getattr(model, mode)()
    x = jnp.ones((2, 16), jnp.int32) if xshape is None else jnp.ones(xshape)
    found = hj.discover_groups(model, x)
    oracle = model.groups()
    assert _as_sets(found) == _as_sets(oracle), (
        [format_path(f.members[0].path) for f in found.families],
        [format_path(f.members[0].path) for f in oracle.families])


# ------------------------------------------------------------ NNX: dropout, pooling, scan
class PoolNet(nnx.Module):
    """conv → BN → relu → dropout → max-pool → conv → avg-pool → flatten → Linear."""

    def __init__(self, rngs):
        self.c1 = nnx.Conv(1, 6, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.c2 = nnx.Conv(6, 5, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(5 * 2 * 2, 3, rngs=rngs)

    def __call__(self, x):
        h = self.drop(nnx.relu(self.bn(self.c1(x))))
        h = nnx.max_pool(h, (2, 2), (2, 2))
        h = nnx.avg_pool(nnx.relu(self.c2(h)), (2, 2), (2, 2))
        return self.fc(h.reshape(h.shape[0], -1))


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(8, 6, rngs=rngs)
        self.fc2 = nnx.Linear(6, 8, rngs=rngs)

    def __call__(self, x):
        return x + self.fc2(nnx.relu(self.fc1(x)))


class ScanNet(nnx.Module):
    """Three residual MLP blocks stacked with ``nnx.vmap`` and applied with ``nnx.scan``."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return _Block(rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(h, block):
            return block(h)

        return self.head(step(x, self.blocks))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dropout_pooling_and_flatten(mode):
    model = PoolNet(nnx.Rngs(0, dropout=1))
    getattr(model, mode)()
    groups = hj.discover_groups(model, jnp.ones((2, 8, 8, 1)))
    c1, c2 = groups.families
    assert (c1.size, c2.size) == (6, 5)
    assert {m.path for m in c1.dependents} == {("bn", "mean"), ("bn", "var"),
                                               ("c2", "kernel")}
    # 5 channels x (2 x 2) positions after the flatten: channel i is every 5th row
    assert c2.dependents == (hj.Member(("fc", "kernel"), 0, repeat=4, stride=5),)
    if mode == "eval":
        keep = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 0, 1], bool)
        state = nnx.state(model)
        mask = groups.broadcast(jnp.asarray(keep, jnp.float32), state, fill=1.0)
        nnx.update(model, jax.tree.map(
            lambda a, m: a * m if jnp.issubdtype(a.dtype, jnp.floating) else a, state, mask))
        small = hj.shrink_model(model, groups)
        x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
        np.testing.assert_allclose(small(x), model(x), rtol=1e-5, atol=1e-5)
        assert small.c1.out_features == 3 and small.fc.in_features == 12


def test_scan_stacked_layers():
    model = ScanNet(nnx.Rngs(0))
    (fam,) = hj.discover_groups(model, jnp.ones((2, 8))).families
    # neuron j of every stacked layer is one group (the stack axis is not pruned)
    assert fam.size == 6
    assert set(fam.members) == {hj.Member(("blocks", "fc1", "kernel"), 2),
                                hj.Member(("blocks", "fc1", "bias"), 1)}
    assert fam.dependents == (hj.Member(("blocks", "fc2", "kernel"), 1),)
