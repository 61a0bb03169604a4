"""An ordinary HESSO step allocates nothing parameter-sized beyond the base optimizer
(issue 14 item 1, issue 13 item 4), checked on the compiled step's memory analysis, and
the period-start designs that make it so select what the paper's saliency selects."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import compile_default

import hesso_jax as hj
from hesso_jax import placement
from hesso_jax.saliency import needs_direction, resolve_saliency

WIDE = 2048  # l1 kernel: 64·2048·4 = 512 KiB; G = 2048
X = jax.random.normal(jax.random.key(1), (32, 64))
Y = jax.random.normal(jax.random.key(2), (32, 10))


def make_params(width=WIDE):
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"l1": {"kernel": jax.random.normal(k1, (64, width)) / 8, "bias": jnp.zeros((width,))},
            "l2": {"kernel": jax.random.normal(k2, (width, 10)) / 8, "bias": jnp.zeros((10,))}}


def make_groups(width=WIDE):
    return hj.Groups.from_families([hj.GroupFamily(
        width, (hj.Member(("l1", "kernel"), 1), hj.Member(("l1", "bias"), 0)),
        (hj.Member(("l2", "kernel"), 0),))])


def loss(p):
    h = jax.nn.relu(X @ p["l1"]["kernel"] + p["l1"]["bias"])
    return jnp.mean((h @ p["l2"]["kernel"] + p["l2"]["bias"] - Y) ** 2)


def step_fn(tx, pass_grad=False):
    def step(p, s):
        grads = jax.grad(loss)(p)
        extra = {"grad": grads} if pass_grad else {}
        updates, s = tx.update(grads, s, p, value_fn=loss, **extra)
        return optax.apply_updates(p, updates), s
    return step


def temp_bytes(tx, donate, pass_grad=False):
    params = make_params()
    step = jax.jit(step_fn(tx, pass_grad), donate_argnums=(0, 1) if donate else ())
    compiled = compile_default(step.lower(params, tx.init(params)))
    return compiled.memory_analysis().temp_size_in_bytes


def hesso(**kw):
    return hj.hesso(make_groups(), 0.5, 2, 4, warmup_steps=4, **kw)


@pytest.mark.parametrize("donate", [False, True], ids=["plain", "donated"])
@pytest.mark.parametrize("kw", [{"direction": "gradient"}, {"saliency": "magnitude"}],
                         ids=["gradient-direction", "magnitude-saliency"])
def test_ordinary_step_needs_no_parameter_sized_buffer(kw, donate):
    """With a period start that does not read the base update (``direction="gradient"``
    given ``grad``, or a magnitude saliency) the step's scratch memory is the base step's
    plus O(G): far below one copy of the largest member leaf (512 KiB). Donated, XLA:CPU
    copies the member kernel that the placement check's ``lax.cond`` reads (copy
    insertion for a donated parameter read by control flow; the default direction has
    the same copy): at most that one leaf more."""
    base = temp_bytes(optax.adam(1e-3), donate, pass_grad=True)
    with_hesso = temp_bytes(optax.chain(optax.adam(1e-3), hesso(**kw)), donate,
                            pass_grad=True)
    kernel = 64 * WIDE * 4
    assert with_hesso - base <= (kernel if donate else 0) + 64 * WIDE, (with_hesso, base)


def test_update_direction_keeps_the_update_in_a_buffer():
    """The default saliency reads ``u`` at period starts: as a ``lax.cond`` operand XLA
    keeps it in a parameter-sized buffer on every step (the documented cost)."""
    base = temp_bytes(optax.adam(1e-3), False)
    with_hesso = temp_bytes(optax.chain(optax.adam(1e-3), hesso()), False)
    assert with_hesso - base >= 64 * WIDE * 4, (with_hesso, base)


def leaf_index(tree, leaf):
    return next(i for i, x in enumerate(jax.tree.leaves(tree)) if x is leaf)


def test_probe_samples_only_cheap_leaves():
    """The probe reads ``u'`` only of cheap member leaves (bias-like or at most
    ``SMALL_LEAF`` elements: keeping their update costs little), and of the smallest
    member leaf when there is none."""
    params = make_params()
    layout = make_groups().layout(params, dependents="present")
    probe = placement.probe_sites(params, layout)
    leaves = {leaf for leaf, _ in probe.sites}
    assert leaves == {leaf_index(params, params["l1"]["bias"])}
    assert len(probe.sites) == placement.PROBE_SIZE
    only_kernel = hj.Groups.from_families([hj.GroupFamily(
        WIDE, (hj.Member(("l1", "kernel"), 1),))])
    probe = placement.probe_sites(params, only_kernel.layout(params, dependents="present"))
    assert {leaf for leaf, _ in probe.sites} == {leaf_index(params, params["l1"]["kernel"])}


def run(tx, steps, pass_grad=False):
    params = make_params()
    state = tx.init(params)
    step = jax.jit(step_fn(tx, pass_grad))
    masks = []
    for _ in range(steps):
        params, state = step(params, state)
        masks.append(np.asarray(hj.hesso_status(state).redundant))
    return params, state, masks


def test_gradient_direction_selects_as_the_update_direction_under_sgd():
    """Under SGD ``u = −η∇f``: the saliency is invariant to the direction's positive
    scale, so ``direction="gradient"`` (``−∇f``) selects the same groups as the default,
    period after period, and the scores agree to float rounding."""
    tx_u = optax.chain(optax.sgd(0.05), hesso())
    p_u, s_u, m_u = run(tx_u, 13)
    for pass_grad in (True, False):  # grad= given, or recomputed from value_fn
        tx_g = optax.chain(optax.sgd(0.05), hesso(direction="gradient"))
        p_g, s_g, m_g = run(tx_g, 13, pass_grad)
        for a, b in zip(m_u, m_g, strict=True):
            np.testing.assert_array_equal(a, b)
        assert hj.hesso_status(s_g).num_pruned == hj.hesso_status(s_u).num_pruned == WIDE // 2
        np.testing.assert_allclose(hj.hesso_status(s_g).scores, hj.hesso_status(s_u).scores,
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(make_groups().zero_groups(p_u),
                                      make_groups().zero_groups(p_g))


def test_gradient_direction_needs_grad_or_value_fn():
    tx = optax.chain(optax.sgd(0.1), hesso(direction="gradient"))
    params = make_params()
    grads = jax.grad(loss)(params)
    with pytest.raises(ValueError, match='direction="gradient"\\) needs the gradient'):
        tx.update(grads, tx.init(params), params)
    with pytest.raises(ValueError, match="grad 'l1/bias' has shape"):
        tx.update(grads, tx.init(params), params,
                  grad={**grads, "l1": {**grads["l1"], "bias": jnp.zeros(3)}})


def test_bad_direction():
    with pytest.raises(ValueError, match="direction must be"):
        hesso(direction="momentum")


@pytest.mark.parametrize("saliency,needs", [
    ("magnitude", False), ("avg_magnitude", False), ({"magnitude": 1, "avg_magnitude": 2}, False),
    (None, True), ("cosine_similarity", True), ({"magnitude": 1, "taylor_first_order": 1}, True),
    (lambda p, d, g: jnp.zeros(g.num_groups), True)])
def test_needs_direction(saliency, needs):
    assert needs_direction(resolve_saliency(saliency)) is needs


def test_magnitude_saliency_scores_are_unchanged_without_the_direction():
    """Passing no direction to a magnitude-only saliency changes none of its scores."""
    params = make_params()
    fn = resolve_saliency({"magnitude": 0.7, "avg_magnitude": 0.3})
    u = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), params)
    np.testing.assert_array_equal(fn(params, None, make_groups()),
                                  fn(params, u, make_groups()))
    with pytest.raises(ValueError, match="needs the update direction"):
        resolve_saliency(None)(params, None, make_groups())
