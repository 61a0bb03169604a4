"""Discovery's extension points and arguments (issue 17 items 2 and 5).

* `hesso_jax.jaxpr.axes.register_rule`: a primitive without a rule blocks its axes; a
  registered rule makes its family discoverable (and sound).
* Every `DiscoveryWarning` names the user's source line (``file:line``).
* ``discover_groups(model, ..., wrt=nnx filter)``: only the selected variables are
  members; ``trainable=`` on a module and ``wrt=`` on a pure function raise.
* The zero analysis lives in ``hesso_jax/jaxpr/`` and nothing there imports discovery.
"""

from __future__ import annotations

import ast
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import Primitive
from jax.interpreters import mlir

import hesso_jax as hj
from hesso_jax.jaxpr import axes, interpreter, views

HERE = pathlib.Path(__file__)
JAXPR_DIR = pathlib.Path(axes.__file__).parent


def _line_of(marker: str) -> int:
    """Line number (1-based) of the line of this file that ends with ``# marker``."""
    lines = HERE.read_text().splitlines()
    (hit,) = [i for i, s in enumerate(lines, 1) if s.rstrip().endswith(f"# {marker}")]
    return hit


def _relu_primitive(name: str) -> Primitive:
    """A primitive unknown to JAX's own rule tables (no jvp, no batching): relu."""
    prim = Primitive(name)
    prim.def_impl(lambda x: jnp.maximum(x, 0))
    prim.def_abstract_eval(lambda x: x)
    mlir.register_lowering(prim, mlir.lower_fun(lambda x: jnp.maximum(x, 0),
                                                multiple_results=False))
    return prim


MY_RELU = _relu_primitive("hj_test_relu")


def _with_custom(p, x):
    h = MY_RELU.bind(x @ p["w1"] + p["b1"])  # custom primitive
    return h @ p["w2"]


def _params():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {"w1": jax.random.normal(k1, (6, 5)), "b1": jax.random.normal(k2, (5,)),
            "w2": jax.random.normal(k3, (5, 3))}


def _messages(record) -> str:
    return "\n".join(str(w.message) for w in record if issubclass(w.category,
                                                                    hj.DiscoveryWarning))


# ------------------------------------------------------------------- register_rule
def test_custom_primitive_is_blocked_then_found_after_register_rule():
    params, x = _params(), jax.random.normal(jax.random.key(1), (4, 6))
    assert "hj_test_relu" not in axes.RULES
    with pytest.warns(hj.DiscoveryWarning) as record:
        blocked = hj.discover_groups(_with_custom, params, x)
    assert blocked.families == ()
    text = _messages(record)
    assert "'hj_test_relu'" in text and "w1" in text
    try:
        rule = axes.register_rule(MY_RELU, axes.elementwise_rule("first"))
        assert axes.RULES["hj_test_relu"] is rule
        with pytest.raises(ValueError, match="override=True"):
            axes.register_rule("hj_test_relu", rule)
        with warnings.catch_warnings():
            warnings.simplefilter("error", hj.DiscoveryWarning)
            groups = hj.discover_groups(_with_custom, params, x)
        (fam,) = groups.families
        assert fam.size == 5
        assert set(fam.members) == {hj.Member(("w1",), 1), hj.Member(("b1",), 0)}
        assert fam.dependents == (hj.Member(("w2",), 0),)
        # sound: zero groups 1 and 3, shrink, and the outputs agree
        keep = jnp.asarray([1, 0, 1, 0, 1], jnp.float32)
        mask = groups.broadcast(keep, params, fill=1.0)
        masked = jax.tree.map(lambda a, m: a * m, params, mask)
        small, plan = hj.shrink(masked, groups)
        assert plan.num_removed == 2 and small["w1"].shape == (6, 3)
        np.testing.assert_allclose(_with_custom(small, x), _with_custom(masked, x),
                                   rtol=1e-5, atol=1e-5)
        # a rule that keeps no zero ("none") is a valid rule that finds nothing
        axes.register_rule(MY_RELU, axes.elementwise_rule("none"), override=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hj.DiscoveryWarning)
            assert hj.discover_groups(_with_custom, params, x).families == ()
    finally:
        axes.RULES.pop("hj_test_relu", None)


def test_register_rule_decorator_and_definers():
    try:
        @axes.register_rule("hj_test_decorated")
        def rule(tr, eqn, ins):
            return axes.default_rule(tr, eqn, ins)

        assert axes.RULES["hj_test_decorated"] is rule
        axes.def_elementwise("any", "hj_test_mul_a", "hj_test_mul_b")
        assert axes.ZERO_KINDS["hj_test_mul_a"] == axes.ZERO_KINDS["hj_test_mul_b"] == "any"
        assert axes.RULES["hj_test_mul_a"] is axes.RULES["mul"]
        axes.def_blocked("hj_test_opaque")
        assert axes.RULES["hj_test_opaque"] is axes.default_rule
    finally:
        for n in ("hj_test_decorated", "hj_test_mul_a", "hj_test_mul_b", "hj_test_opaque"):
            axes.RULES.pop(n, None)
            axes.ZERO_KINDS.pop(n, None)
    with pytest.raises(ValueError, match="zero kind"):
        axes.def_elementwise("sometimes", "hj_test_bad")
    with pytest.raises(ValueError, match="zero kind"):
        axes.elementwise_rule("sometimes")
    with pytest.raises(TypeError, match="primitive or its name"):
        axes.register_rule(3, axes.default_rule)
    with pytest.raises(TypeError, match="callable"):
        axes.register_rule("hj_test_bad", 3)
    with pytest.raises(ValueError, match="has a discovery rule already"):
        axes.def_identity("optimization_barrier")
    assert "hj_test_bad" not in axes.RULES


def test_builtin_rule_tables_are_consistent():
    """Every elementwise kind has its rule; definers registered the built-in families."""
    for name in axes.ZERO_KINDS:
        assert name in axes.RULES, name
    for name in axes.IDENTITY:
        assert axes.RULES[name] is axes.RULES["optimization_barrier"]
    assert axes.ZERO_FIRST.isdisjoint(axes.ZERO_ANY | axes.ZERO_ALL | axes.ZERO_NONE)
    assert axes.AxisTracer.rules is axes.RULES


# ------------------------------------------------------------------- source lines
def test_warning_names_the_source_line_of_the_blocking_equation():
    params, x = _params(), jnp.ones((2, 6))
    with pytest.warns(hj.DiscoveryWarning) as record:
        hj.discover_groups(_with_custom, params, x)
    where = f"{HERE}:{_line_of('custom primitive')}"
    msgs = [str(w.message) for w in record]
    blamed = [m for m in msgs if "could not be proven safe" in m]
    assert blamed and where in blamed[0], msgs
    assert all(f"{HERE}:" in m for m in msgs), msgs


def test_every_warning_kind_carries_a_source_line():
    params, x = _params(), jnp.ones((2, 6))
    table = jnp.arange(5.0)

    def closes_over(p, x):
        return jax.nn.relu(x @ p["w1"] * table) @ p["w2"]  # closed-over use

    def ignores(p, x):
        return x * 2.0

    def mean_scaled(p, x):
        h = jax.nn.relu(x @ p["w1"])
        return h.mean(-1, keepdims=True) * p["w2"].sum(0)  # mean over the channels

    with pytest.warns(hj.DiscoveryWarning) as record:
        hj.discover_groups(closes_over, params, x)
    text = _messages(record)
    assert "closed-over" in text
    assert f"{HERE}:{_line_of('closed-over use')}" in text
    with pytest.warns(hj.DiscoveryWarning) as record:
        hj.discover_groups(ignores, params, x)
    (msg,) = [str(w.message) for w in record]
    assert "does not use its parameters" in msg
    assert f"defined at {HERE}:" in msg and "ignores" in msg
    with pytest.warns(hj.DiscoveryWarning) as record:
        hj.discover_groups(mean_scaled, params, x)
    text = _messages(record)
    assert "a mean or RMS" in text
    assert f"{HERE}:{_line_of('mean over the channels')}" in text


def test_source_line_is_robust():
    assert interpreter.source_line(None) is None
    assert interpreter.source_line(object()) is None
    eqn = jax.make_jaxpr(lambda x: jnp.sin(x))(1.0).jaxpr.eqns[0]
    assert interpreter.source_line(eqn.source_info).startswith(f"{HERE}:")


# ------------------------------------------------------------------- wrt= (NNX)
class Frozen(nnx.Variable):
    """A non-trainable variable type (a frozen embedding table)."""


class EmbedMLP(nnx.Module):
    def __init__(self, rngs):
        self.embed = Frozen(jax.random.normal(rngs.params(), (11, 6)))
        self.fc1 = nnx.Linear(6, 5, rngs=rngs)
        self.fc2 = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, ids):
        return self.fc2(nnx.relu(self.fc1(self.embed[...][ids])))


def _members(groups):
    return {m.path for f in groups.families for m in f.members}


def test_wrt_selects_the_member_variables():
    model, ids = EmbedMLP(nnx.Rngs(0)), jnp.zeros((2, 4), jnp.int32)
    default = hj.discover_groups(model, ids)
    assert hj.discover_groups(model, ids, wrt=nnx.Param) == default
    assert ("embed",) not in _members(default)
    assert _members(default) == {("fc1", "kernel"), ("fc1", "bias")}
    both = hj.discover_groups(model, ids, wrt=(nnx.Param, Frozen))
    assert [f.size for f in both.families] == [6, 5]
    assert both.families[0].members == (hj.Member(("embed",), 1),)
    assert hj.Member(("fc1", "kernel"), 0) in both.families[0].dependents
    only = hj.discover_groups(model, ids, wrt=Frozen)
    assert _members(only) == {("embed",)}
    fc1 = hj.discover_groups(model, ids, wrt=nnx.PathContains("fc1"))
    assert _members(fc1) == {("fc1", "kernel"), ("fc1", "bias")}
    # the selected embedding family is sound: masked == shrunk on the module
    keep = np.ones(both.num_groups, bool)
    keep[[1, 4, 8]] = False
    state = nnx.state(model)
    mask = both.broadcast(jnp.asarray(keep, jnp.float32), state, fill=1.0)
    nnx.update(model, jax.tree.map(
        lambda a, m: a * m if jnp.issubdtype(a.dtype, jnp.floating) else a, state, mask))
    want = model(ids + 3)
    small = hj.shrink_model(model, both)
    assert small.embed[...].shape == (11, 4) and small.fc1.in_features == 4
    np.testing.assert_allclose(small(ids + 3), want, rtol=1e-5, atol=1e-5)


def test_wrt_and_trainable_misuse_raise():
    model, ids = EmbedMLP(nnx.Rngs(0)), jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(TypeError, match="wrt="):
        hj.discover_groups(model, ids, trainable=lambda path: True)
    with pytest.raises(TypeError, match="nnx filter"):
        hj.discover_groups(model, ids, wrt=3)
    with pytest.raises(ValueError, match="selects no variable.*Frozen"):
        hj.discover_groups(model, ids, wrt=nnx.BatchStat)
    with pytest.raises(TypeError, match="trainable="):
        hj.discover_groups(lambda p, x: x @ p, jnp.ones((3, 3)), jnp.ones((2, 3)),
                           wrt=nnx.Param)


# ------------------------------------------------------------------- layout
def test_jaxpr_package_does_not_import_discovery():
    for path in sorted(JAXPR_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            assert not any(n.startswith("hesso_jax.discovery") for n in names), path
    assert not hasattr(__import__("hesso_jax.discovery").discovery, "_Spaces")


def test_capture_follows_parameter_views_with_the_shared_tracker():
    """SNOWS' linear-op detection reads kernels through `views.view_axes` (split=False)."""
    from hesso_jax.jaxpr.capture import trace

    x = jnp.ones((2, 6))
    merged = trace(lambda p, x: x @ p["w"].transpose(1, 0, 2).reshape(6, 4),
                   {"w": jnp.ones((3, 2, 4))}, x)
    (op,) = merged.ops
    assert (op.leaf, op.reduction_axes, op.nm_axes) == (0, (0, 1), (0, 1))
    # a reshape that splits an axis is not a view: the kernel is not a parameter leaf
    split = trace(lambda p, x: x @ p["w"].reshape(6, 4), {"w": jnp.ones((24,))}, x)
    assert split.ops == []
    eqn = jax.make_jaxpr(lambda w: w.reshape(6, 4))(jnp.ones(24)).jaxpr.eqns[0]
    assert views.view_axes(eqn, views.leaf_axes(0, 1), (24,), (6, 4)) == (
        frozenset({(0, 0)}), frozenset({(0, 0)}))


def test_cost_model_failure_warning_names_the_traced_function(monkeypatch):
    from hesso_jax import discovery

    def boom(*_a, **_k):
        raise RuntimeError("cost model broke")

    def mlp(p, x):
        return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]

    monkeypatch.setattr(discovery, "costs_from_jaxpr", boom)
    with pytest.warns(hj.DiscoveryWarning, match="no costs recorded") as record:
        groups = hj.discover_groups(mlp, _params(), jnp.ones((2, 6)))
    assert groups.costs is None and [f.size for f in groups.families] == [5]
    (msg,) = [str(w.message) for w in record]
    assert f"defined at {HERE}:" in msg and "mlp" in msg and "cost model broke" in msg
