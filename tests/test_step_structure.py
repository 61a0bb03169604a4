"""The compiled ordinary HESSO step has the base step's structure (issue 14 item 1).

Asserted on the compiled step, not on timings: ``memory_analysis()`` (scratch bytes) and
the entry computation's ``copy`` instructions of the optimised HLO. The base step (Adam)
is memory-bound and writes no update ``u``; a HESSO step may add ``O(G)`` bytes (masks,
scores, per-channel sums), never a parameter-sized buffer, donated or not. (The contrast,
``optax.chain(adam, hesso(...))`` with the default direction keeping ``u`` in a buffer, is
``tests/test_step_cost.py::test_update_direction_keeps_the_update_in_a_buffer``.)
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import compile_default

import hesso_jax as hj
from hesso_jax.groups import ROW_BLOCK

WIDE, IN = 1024, 512  # l1 kernel 512 x 1024 float32 = 2 MiB; G = 1024
O_G = 256 * WIDE  # 64 float32 per group (masks, scores, sort, per-channel sums): 1/8 kernel
# the period start's saliency sums of the 512-row kernel: 3 statistics per block of rows
PARTIALS = 3 * -(-IN // ROW_BLOCK) * WIDE * 4  # 3/32 of the kernel: fits in O_G
X = jax.random.normal(jax.random.key(1), (32, IN))
Y = jax.random.normal(jax.random.key(2), (32, 10))


def make_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"l1": {"kernel": jax.random.normal(k1, (IN, WIDE)) / 16, "bias": jnp.zeros((WIDE,))},
            "l2": {"kernel": jax.random.normal(k2, (WIDE, 10)) / 8, "bias": jnp.zeros((10,))}}


GROUPS = hj.Groups.from_families([hj.GroupFamily(
    WIDE, (hj.Member(("l1", "kernel"), 1), hj.Member(("l1", "bias"), 0)),
    (hj.Member(("l2", "kernel"), 0),))])


def loss(p):
    h = jax.nn.relu(X @ p["l1"]["kernel"] + p["l1"]["bias"])
    return jnp.mean((h @ p["l2"]["kernel"] + p["l2"]["bias"] - Y) ** 2)


def step_fn(tx, pass_grad):
    def step(p, s):
        grads = jax.grad(loss)(p)
        extra = {"grad": grads} if pass_grad else {}
        updates, s = tx.update(grads, s, p, value_fn=loss, **extra)
        return optax.apply_updates(p, updates), s
    return step


@functools.cache
def compiled(tx, donate, pass_grad=False):
    params = make_params()
    step = jax.jit(step_fn(tx, pass_grad), donate_argnums=(0, 1) if donate else ())
    return compile_default(step.lower(params, tx.init(params)))


def temp(c):
    return c.memory_analysis().temp_size_in_bytes


def entry_copies(c):
    """``(dtype, dims, operand)`` of each copy instruction of the entry computation (one
    kernel launch each), e.g. ``("f32", "512,1024", "%p__l1____kernel__.1")``."""
    entry = c.as_text().split("ENTRY")[1]
    return re.findall(r"= (\w+)\[([\d,]*)\](?:\{[^}]*\})? copy\((%[^)\s,]+)\)", entry)


def copied_bytes(c):
    """Bytes of the float32 arrays the entry computation copies (copy instructions)."""
    return sum(4 * int(np.prod([int(d) for d in dims.split(",") if d]))
               for dtype, dims, _ in entry_copies(c) if dtype == "f32")


def hesso(**kw):
    return hj.hesso(GROUPS, 0.5, 2, 4, warmup_steps=4, **kw)


ADAM = optax.adam(1e-3)
VARIANTS = {  # (transformation, pass grad=): configurations whose period start reads no u
    "fused": (hesso(base=ADAM), False),
    "chain-gradient": (optax.chain(ADAM, hesso(direction="gradient")), True),
    "fused-record": (hesso(base=ADAM, on_fault="record"), False),
}
FORMS = {**VARIANTS, "chain": (optax.chain(ADAM, hesso()), False)}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_ordinary_step_scratch_is_the_base_steps_plus_o_g(name):
    """Without donation: scratch bytes ≤ Adam's + O(G), the saliency sums' per-block
    partial sums included (blocks of `hesso_jax.groups.ROW_BLOCK` = 32 rows; with 16 the
    chain form with ``direction="gradient"`` needed 427 KB, more than O(G) here)."""
    assert PARTIALS <= O_G
    tx, pass_grad = VARIANTS[name]
    base = temp(compiled(ADAM, False))
    assert temp(compiled(tx, False, pass_grad)) - base <= O_G


@pytest.mark.parametrize("name", list(VARIANTS))
def test_donated_step_copies_no_parameter_or_moment(name):
    """Donated: no parameter or moment is copied beyond what Adam's own step copies (the
    old design copied every parameter a ``lax.cond`` reads: the member kernel, 512 KiB,
    and with the fused form both moments), and the scratch is Adam's + O(G), the fused
    form's period-start branch included (with 16-row blocks: 301 KB, more): its saliency
    sums recompute ``u`` inside one reduction per block of rows (the 512-row kernel is
    taller than one pass, `hesso_jax.groups.ONE_PASS_ROWS`) instead of holding it in a
    kernel-sized buffer, as the earlier rule did (2 MiB)."""
    tx, pass_grad = VARIANTS[name]
    base = compiled(ADAM, True)
    c = compiled(tx, True, pass_grad)
    assert copied_bytes(c) - copied_bytes(base) <= O_G
    assert temp(c) - temp(base) <= O_G


def run(tx, steps=13):
    params = make_params()
    state = tx.init(params)
    step = jax.jit(step_fn(tx, False))
    masks = []
    for _ in range(steps):
        params, state = step(params, state)
        masks.append(np.asarray(hj.hesso_status(state).redundant))
    return params, state, masks


def test_fused_form_equals_the_chain():
    """``hesso(..., base=adam)`` selects what ``optax.chain(adam, hesso(...))`` selects,
    period after period, with the same scores and parameters, and the same state
    structure (checkpoints interchange)."""
    p_c, s_c, m_c = run(optax.chain(optax.adam(1e-2), hesso()))
    p_f, s_f, m_f = run(hesso(base=optax.adam(1e-2)))
    assert jax.tree.structure(s_c) == jax.tree.structure(s_f)
    for a, b in zip(m_c, m_f, strict=True):
        np.testing.assert_array_equal(a, b)
    st_c, st_f = hj.hesso_status(s_c), hj.hesso_status(s_f)
    assert st_c.num_pruned == st_f.num_pruned == WIDE // 2
    np.testing.assert_array_equal(st_c.pruned, st_f.pruned)
    np.testing.assert_allclose(st_c.scores, st_f.scores, rtol=1e-5, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p_c, p_f)
    np.testing.assert_array_equal(GROUPS.zero_groups(p_c), GROUPS.zero_groups(p_f))


def test_fused_form_rejects_a_non_transformation():
    with pytest.raises(TypeError, match="base must be an optax.GradientTransformation"):
        hesso(base="adam")


@pytest.mark.parametrize("name", list(FORMS))
def test_donated_step_copies_at_most_two_small_state_arrays(name):
    """Donated: every in-place write follows every read of the old value (`_after` on the
    ``lax.cond`` results and the probe's gathers), so beyond Adam's own copies at most the
    counter and the ``G``-long redundant mask are copied, never a parameter (before: the
    probe's gather of ``u'`` copied the member leaves, and ``on_fault="record"`` copied
    every parameter and state array its ``lax.cond`` reads: 14 copies, 2 MiB)."""
    tx, pass_grad = FORMS[name]
    base = {operand for _, _, operand in entry_copies(compiled(ADAM, True))}
    extra = [c for c in entry_copies(compiled(tx, True, pass_grad)) if c[2] not in base]
    assert len(extra) <= 2, extra
    assert not any(operand.startswith("%p_") for _, _, operand in extra), extra


def test_period_end_verdict_writes_no_leaf_sized_buffer():
    """The period-end check's cheap verdict (`_clean_period_end`) reads each member leaf
    inside its reductions: its scratch is ``O(G)``, not a masked copy of the 2 MiB kernel
    (a ``where`` on the broadcast mask wrote one on XLA:CPU). It flags an unzeroed pruned
    group and a non-finite element inside or outside the member leaves."""
    from hesso_jax.hesso import _clean_period_end

    pruned = jnp.arange(WIDE) % 3 == 0

    def verdict(p, mask):
        return _clean_period_end(GROUPS, p, mask)

    params = make_params()
    compiled_verdict = jax.jit(verdict).lower(params, pruned).compile()
    assert compiled_verdict.memory_analysis().temp_size_in_bytes <= O_G
    zeroed = jax.tree.map(lambda a, m: a * (1.0 - m), params,
                          GROUPS.broadcast(pruned.astype(jnp.float32), params))
    assert not bool(compiled_verdict(params, pruned))
    assert bool(compiled_verdict(zeroed, pruned))
    for path, value in ((("l2", "bias"), jnp.inf), (("l1", "kernel"), jnp.nan),
                        (("l2", "kernel"), -jnp.inf)):
        bad = jax.tree.map(lambda a: a, zeroed)
        leaf = bad[path[0]][path[1]]
        bad[path[0]][path[1]] = leaf.at[(1,) * leaf.ndim].set(value)  # group 1: not pruned
        assert not bool(compiled_verdict(bad, pruned)), path
