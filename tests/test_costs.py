"""Tests of the jaxpr cost model (`hesso_jax.costs`) against XLA and against surgery."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import compile_default
from hypothesis import given, settings
from hypothesis import strategies as st

import hesso_jax as hj
from hesso_jax.costs import GroupCosts, group_costs
from hesso_jax.groups import GroupFamily, Groups, Member
from hesso_jax.jaxpr.interpreter import inner_jaxpr
from hesso_jax.models import CARN, CNN, MLP, BertEncoder, CharLM, Llama, ResNet, TinyTransformer

LINEAR = ("dot_general", "conv_general_dilated")


def _xla_flops(fn, *args) -> float:
    cost = compile_default(jax.jit(fn).lower(*args)).cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost.get("flops", 0.0))  # XLA omits the key when the count is 0


_OP_CACHE: dict = {}


def _xla_linear_and_other(closed) -> tuple[float, int]:
    """(XLA FLOPs of every dot/conv lowered alone, elements touched by every other op)."""
    linear, other = 0.0, 0

    def walk(jaxpr, mult):
        nonlocal linear, other
        for e in jaxpr.eqns:
            inner = inner_jaxpr(e)
            if inner is not None:
                walk(inner.jaxpr, mult)
                continue
            if e.primitive.name == "scan":
                walk(e.params["jaxpr"].jaxpr, mult * e.params["length"])
                continue
            if e.primitive.name not in LINEAR:
                other += mult * sum(int(np.prod(v.aval.shape)) for v in (*e.invars, *e.outvars)
                                    if hasattr(getattr(v, "aval", None), "shape"))
                continue
            avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in e.invars]
            key = (e.primitive.name, str(avals), str(sorted(e.params.items())))
            if key not in _OP_CACHE:
                _OP_CACHE[key] = _xla_flops(
                    lambda *a, e=e: e.primitive.bind(*a, **e.params), *avals)
            linear += mult * _OP_CACHE[key]

    walk(closed.jaxpr, 1)
    return linear, other


def _build(make):
    """The model ``make()`` builds, with random positive parameters filled in from numpy
    (``nnx.eval_shape`` first: no eager initialiser has to compile)."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(0)
    return nnx.merge(graphdef, jax.tree.map(
        lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)), state))


def _models():
    return {
        "mlp": (lambda: MLP(64, [32, 16], 10, rngs=nnx.Rngs(0)), (4, 8, 8, 1)),
        "cnn": (lambda: CNN(16, 32, rngs=nnx.Rngs(0)), (2, 8, 8, 1)),
        "resnet": (lambda: ResNet((8, 16), (1, 1), in_channels=3, rngs=nnx.Rngs(0)),
                   (2, 16, 16, 3)),
        "transformer": (lambda: TinyTransformer(d_model=16, mlp_dim=32, depth=1,
                                                rngs=nnx.Rngs(0)), (2, 8, 8)),
        "bert": (lambda: BertEncoder(50, 16, 32, 4, 64, 2, rngs=nnx.Rngs(0)), (2, 8), jnp.int32),
        "carn": (lambda: CARN(8, 2, rngs=nnx.Rngs(0)), (1, 8, 8, 1)),
        "charlm": (lambda: CharLM(seq_len=16, d_model=16, mlp_dim=32, depth=1, rngs=nnx.Rngs(0)),
                   (2, 16), jnp.int32),
        "llama": (lambda: Llama(64, 32, 2, 4, 2, 64, rngs=nnx.Rngs(0)), (2, 10), jnp.int32),
    }


def _model(name):
    make, shape, *dtype = _models()[name]
    return _build(make), jnp.ones(shape, *dtype)


def _groups(model, x) -> Groups:
    if hasattr(model, "groups"):
        return model.groups()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hj.discover_groups(model, x)


@pytest.mark.parametrize("name", list(_models()))
def test_reference_model_flops_match_xla_and_surgery(name):
    model, x = _model(name)
    groups = _groups(model, x)
    costs = group_costs(model, groups, x)
    graphdef, state = nnx.split(model)

    def forward(s, x):
        return nnx.merge(graphdef, s)(x)

    # 1. the dot/conv part equals XLA's count of those ops exactly
    linear, other = _xla_linear_and_other(jax.make_jaxpr(forward)(state, x))
    assert costs.dense_flops == linear
    # 2. XLA's whole-program total adds elementwise work: at least 0, and at most a few
    #    FLOPs per element that the other ops read or write
    total = _xla_flops(forward, state, x)
    assert 0 <= total - costs.dense_flops <= 4 * other, (total, costs.dense_flops, other)
    assert costs.dense_params == sum(np.size(v) for v in jax.tree.leaves(
        nnx.state(model, nnx.Param)))
    # 3. removing a random set: the exact multilinear prediction equals dense - shrunk
    rng = np.random.default_rng(1)
    drop = rng.random(groups.num_groups) < 0.4
    drop[list(groups.starts)] = False  # every family keeps a group
    params = nnx.state(model, nnx.Param)
    mask = groups.broadcast(jnp.asarray(~drop, jnp.float32), params, fill=1.0)
    nnx.update(model, jax.tree.map(lambda p, m: (p * m).astype(p.dtype), params, mask))
    small = hj.shrink_model(model, groups)
    shrunk = group_costs(small, None, x)
    assert costs.removed(drop) == (costs.dense_params - shrunk.dense_params,
                                   costs.dense_flops - shrunk.dense_flops)
    assert costs.prunable_flops <= costs.dense_flops
    assert costs.unprunable_params == costs.param_terms.value(np.ones(groups.num_groups, bool))


def _chain(n_in=6, h1=5, h2=4, n_out=3):
    ks = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(ks[0], (n_in, h1)), "b1": jnp.zeros(h1),
              "w2": jax.random.normal(ks[1], (h1, h2)), "w3": jax.random.normal(ks[2], (h2, n_out))}
    groups = Groups.from_families([
        GroupFamily(h1, (Member(("w1",), 1), Member(("b1",), 0)), (Member(("w2",), 0),)),
        GroupFamily(h2, (Member(("w2",), 1),), (Member(("w3",), 0),))])

    def fn(p, x):
        h = jax.nn.relu(x @ p["w1"] + p["b1"])
        return jax.nn.relu(h @ p["w2"]) @ p["w3"]

    return fn, params, groups


@settings(max_examples=20, deadline=None)
@given(ra=st.integers(0, 5), rb=st.integers(0, 4), seed=st.integers(0, 99))
def test_bilinear_cross_term_formula(ra, rb, seed):
    n, n_in, h1, h2, n_out = 7, 6, 5, 4, 3
    fn, params, groups = _chain(n_in, h1, h2, n_out)
    costs = group_costs(fn, params, groups, jnp.ones((n, n_in)))
    rng = np.random.default_rng(seed)
    drop = np.zeros(h1 + h2, bool)
    drop[rng.choice(h1, ra, replace=False)] = True
    drop[h1 + rng.choice(h2, rb, replace=False)] = True
    # F = 2n (n_in h1 + h1 h2 + h2 n_out); the middle layer is bilinear in (h1, h2)
    want = 2 * n * (n_in * ra + (ra * h2 + rb * h1 - ra * rb) + rb * n_out)
    assert costs.removed(drop)[1] == want
    # per-group costs are the single-group removals; their sum misses the cross term
    assert costs.flops[drop].sum() - want == 2 * n * ra * rb
    assert costs.removed(drop)[0] == (n_in + 1) * ra + ra * h2 + rb * h1 - ra * rb + rb * n_out
    # the marginal cost from any state is the exact difference of set costs
    for g in range(h1 + h2):
        if not drop[g]:
            plus = drop.copy()
            plus[g] = True
            assert costs.marginal(drop)[1][g] == costs.removed(plus)[1] - want


@settings(max_examples=8, deadline=None)
@given(stride=st.integers(1, 3), dil=st.integers(1, 2), lhs_dil=st.integers(1, 2),
       pad=st.sampled_from(["SAME", "VALID", ((2, 0), (1, 3))]), groups_=st.sampled_from([1, 4]))
def test_conv_flops_count_valid_positions_like_xla(stride, dil, lhs_dil, pad, groups_):
    x = jax.ShapeDtypeStruct((2, 9, 7, 8), jnp.float32)
    w = jnp.ones((3, 2, 8 // groups_, 8))
    if isinstance(pad, str) and lhs_dil > 1:
        pad = ((1, 1), (0, 2))

    def fn(p, x):
        return jax.lax.conv_general_dilated(
            x, p["w"], (stride, stride), pad, lhs_dilation=(lhs_dil, 1),
            rhs_dilation=(dil, dil), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups_)

    groups = Groups.from_families([GroupFamily(8, (Member(("w",), 3),))])
    costs = group_costs(fn, {"w": w}, groups, x)
    assert costs.dense_flops == _xla_flops(fn, {"w": w}, x)
    assert costs.flops.sum() == costs.dense_flops  # out channels: linear, no cross term


def test_scan_counts_every_iteration():
    def body(h, w):
        return jax.nn.relu(h @ w), None

    def fn(p, x):
        return jax.lax.scan(body, x, p["w"])[0]

    def unrolled(p, x):
        for i in range(p["w"].shape[0]):
            x = body(x, p["w"][i])[0]
        return x

    params = {"w": jnp.ones((3, 4, 4))}
    groups = Groups.from_families([GroupFamily(4, (Member(("w",), 2),), (Member(("w",), 1),))])
    x = jnp.ones((5, 4))
    costs = group_costs(fn, params, groups, x)
    assert costs.dense_flops == _xla_linear_and_other(jax.make_jaxpr(unrolled)(params, x))[0]
    assert costs.dense_flops == 3 * 2 * 5 * 4 * 4


def test_json_round_trip_and_errors():
    fn, params, groups = _chain()
    costs = group_costs(fn, params, groups, jnp.ones((2, 6)))
    back = GroupCosts.from_json(json.dumps(json.loads(costs.to_json())))
    np.testing.assert_array_equal(back.flops, costs.flops)
    np.testing.assert_array_equal(back.params, costs.params)
    assert (back.dense_flops, back.prunable_params) == (costs.dense_flops,
                                                         costs.prunable_params)
    drop = np.arange(groups.num_groups) % 2 == 0
    assert back.removed(drop) == costs.removed(drop)
    with pytest.raises(TypeError, match="nnx.Module or a callable"):
        group_costs(3, groups)
    with pytest.raises(TypeError, match="parameter pytree and the groups"):
        group_costs(fn, params)
    with pytest.raises(TypeError, match="Groups"):
        group_costs(fn, params, "groups", jnp.ones((2, 6)))
    with pytest.raises(ValueError, match="format tag"):
        GroupCosts.from_dict({})
