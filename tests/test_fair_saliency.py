"""Fair competition between group kinds: the additive (loss-unit) saliency normalisation.

Properties of `hesso_jax.saliency.weighted(normalize="additive")` and `additive_scores`:
every score grows m-fold when a group is replicated m times (as its params / FLOPs do),
magnitude and Taylor-2 are exactly additive over a partition, the mix is a share of the
total (sums to the weight total), is scale-invariant, jits, and under `budget_select` a
head (a large group) is removed exactly when it is the cheaper loss per unit of cost.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import hesso_jax as hj
from hesso_jax.budget import CostTable, budget_select
from hesso_jax.costs import CostTerms
from hesso_jax.saliency import (
    NORMALIZATIONS,
    SCORES,
    additive_scores,
    group_stats,
    raw_scores,
    resolve_saliency,
    weighted,
)

finite = st.floats(-3.0, 3.0, allow_nan=False, width=32).filter(lambda v: abs(v) > 1e-2)
vectors = arrays(np.float32, st.integers(2, 6), elements=finite)


def two_groups(a, b):
    """Group 0 = the vector ``a`` (one family), group 1 = ``b`` (another)."""
    groups = hj.Groups.from_families([
        hj.GroupFamily(1, (hj.Member(("a",), 0, block=len(a)),)),
        hj.GroupFamily(1, (hj.Member(("b",), 0, block=len(b)),))])
    return groups, {"a": jnp.asarray(a), "b": jnp.asarray(b)}


def stats_of(x, d, xa, xb):
    groups, params = two_groups(xa, xb)
    _, direction = two_groups(d[0], d[1])
    return group_stats(groups, params, direction, diagonal=True)


@settings(max_examples=15, deadline=None)
@given(x=vectors, seed=st.integers(0, 2**16), m=st.integers(2, 4))
def test_replication_scales_additive_scores_by_m_and_raw_scores_by_their_degree(x, seed, m):
    d = np.random.default_rng(seed).normal(size=x.shape).astype(np.float32)
    stats = stats_of(x, (d, np.tile(d, m)), x, np.tile(x, m))
    add, raw = additive_scores(stats), raw_scores(stats)
    for name in SCORES:
        np.testing.assert_allclose(add[name][1], m * add[name][0], rtol=2e-4, atol=1e-6)
    degree = {"magnitude": 0.5, "avg_magnitude": -0.5, "cosine_similarity": 0.0,
              "taylor_first_order": 1.0, "taylor_second_order": 2.0}
    for name, k in degree.items():
        np.testing.assert_allclose(raw[name][1], m**k * raw[name][0], rtol=2e-4, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(x=vectors, seed=st.integers(0, 2**16), cut=st.integers(1, 5))
def test_magnitude_and_taylor2_are_additive_over_a_partition_taylor1_subadditive(x, seed, cut):
    cut = min(cut, len(x) - 1)
    d = np.random.default_rng(seed).normal(size=x.shape).astype(np.float32)
    whole = additive_scores(stats_of(x, (d, d), x, x))
    parts = additive_scores(stats_of(x, (d[:cut], d[cut:]), x[:cut], x[cut:]))
    for name in ("magnitude", "avg_magnitude", "taylor_second_order"):
        np.testing.assert_allclose(whole[name][0], parts[name][0] + parts[name][1],
                                   rtol=1e-4, atol=1e-6)
    t1 = "taylor_first_order"
    assert whole[t1][0] <= parts[t1][0] + parts[t1][1] + 1e-4


def small_model():
    groups = hj.Groups.from_families([
        hj.GroupFamily(4, (hj.Member(("w",), 1), hj.Member(("b",), 0)))])
    x = {"w": jnp.array([[1.0, 0.0, 3.0, -0.5], [2.0, 0.0, -1.0, 0.25]]),
         "b": jnp.array([0.5, 0.0, 2.0, 1.0])}  # group 1 is exactly zero
    d = {"w": jnp.array([[0.5, 1.0, -1.0, 0.3], [0.0, 2.0, 1.0, -0.7]]),
         "b": jnp.array([1.0, 0.0, 3.0, 0.2])}
    return groups, x, d


def test_additive_mix_is_a_share_of_the_total_and_zero_groups_score_zero():
    groups, x, d = small_model()
    w = {"magnitude": 0.5, "cosine_similarity": 1.0, "taylor_second_order": 2.0}
    s = np.asarray(weighted(w, normalize="additive")(x, d, groups))
    assert s[1] == 0.0 and np.all(s >= 0)
    np.testing.assert_allclose(s.sum(), sum(w.values()), rtol=1e-5)
    a = additive_scores(group_stats(groups, x, d, diagonal=True))
    expect = sum(wk * np.asarray(a[k]) / np.asarray(a[k]).sum() for k, wk in w.items())
    np.testing.assert_allclose(s, expect, rtol=1e-5)


def test_additive_mix_is_invariant_to_positive_scales_and_jits():
    groups, x, d = small_model()
    fn = weighted(normalize="additive")
    base = fn(x, d, groups)
    scaled_d = fn(x, jax.tree.map(lambda v: 1e-3 * v, d), groups)
    np.testing.assert_allclose(base, scaled_d, rtol=1e-4)
    mags = weighted({"magnitude": 1.0, "avg_magnitude": 1.0}, normalize="additive")
    np.testing.assert_allclose(mags(x, None, groups),
                               mags(jax.tree.map(lambda v: 7.0 * v, x), None, groups),
                               rtol=1e-5)
    jitted = jax.jit(lambda p, u: fn(p, u, groups))
    np.testing.assert_allclose(jitted(x, d), base, rtol=1e-6)


def test_default_and_norm_mode_are_the_reference_mix_unchanged():
    groups, x, d = small_model()
    np.testing.assert_array_equal(weighted()(x, d, groups),
                                  weighted(normalize="norm")(x, d, groups))
    assert weighted().normalize == "norm" and resolve_saliency(None).normalize == "norm"
    assert resolve_saliency({"magnitude": 1.0}, normalize="additive").normalize == "additive"
    assert weighted({"magnitude": 1.0}, normalize="additive").needs_direction is False


def test_bad_normalize_is_a_value_error():
    with pytest.raises(ValueError, match="normalize must be one of"):
        weighted(normalize="sum")
    with pytest.raises(ValueError, match="normalize must be one of"):
        resolve_saliency("magnitude", normalize=None)
    assert NORMALIZATIONS == ("norm", "additive")


def heads_and_neurons(head_value: float, neuron_value: float):
    """2 heads of 32 channels (cost 32 each) and 64 neurons (cost 1 each), all elements of
    a head equal to ``head_value``, of a neuron to ``neuron_value``."""
    groups = hj.Groups.from_families([
        hj.GroupFamily(2, (hj.Member(("h",), 0, block=32),)),
        hj.GroupFamily(64, (hj.Member(("n",), 0),))])
    params = {"h": jnp.full(64, head_value), "n": jnp.full(64, neuron_value)}
    owner = np.concatenate([np.repeat([0, 1], 32), np.arange(2, 66)]).astype(np.int32)
    table = CostTable.from_terms(CostTerms.build([(1, [(128, owner)])], 66))
    return groups, params, table


@pytest.mark.parametrize("head_value,neuron_value,heads_cheaper",
                         [(0.5, 1.0, True), (1.0, 0.5, False)])
def test_under_a_budget_heads_go_exactly_when_they_are_the_cheaper_loss_per_cost(
        head_value, neuron_value, heads_cheaper):
    groups, params, table = heads_and_neurons(head_value, neuron_value)
    G = groups.num_groups
    alive, protected = jnp.ones(G, bool), jnp.zeros(G, bool)

    def heads_removed(normalize):
        s = weighted({"magnitude": 1.0}, normalize=normalize)(params, None, groups)
        return int(np.asarray(budget_select(s, table, alive, protected, jnp.array([32.0])))[:2]
                   .sum())

    # loss per unit cost of a head: ½·32·h²/32 = h²/2; of a neuron: n²/2
    assert heads_removed("additive") == (1 if heads_cheaper else 0)
    # ‖x_g‖ / c_g: heads √32·h/32 vs neurons n/1, so heads look 5.7x cheaper per unit of
    # cost than they are, and the norm mix removes one even when it carries 4x the loss
    assert heads_removed("norm") == 1


def test_budget_saliency_on_the_gradient_sees_curvature_that_adams_update_hides():
    # Heads: small weights (0.5) in steep directions (gradient 2); neurons: larger weights
    # (1.0) in flat ones (gradient 0.1). OBD with the empirical Fisher, ½ x² g², per unit of
    # cost: head ½·0.25·4 = 0.5, neuron ½·1·0.01 = 0.005, so the heads must stay.
    from hesso_jax.saliency import BUDGET_WEIGHTS, budget_saliency

    groups, params, table = heads_and_neurons(0.5, 1.0)
    grad = {"h": jnp.full(64, 2.0), "n": jnp.full(64, 0.1)}
    adam = jax.tree.map(lambda g: -g / jnp.abs(g), grad)  # −m/√v of a steady gradient
    G = groups.num_groups
    alive, protected = jnp.ones(G, bool), jnp.zeros(G, bool)

    def heads_removed(fn, direction):
        s = fn(params, direction, groups)
        return int(np.asarray(budget_select(s, table, alive, protected, jnp.array([32.0])))[:2]
                   .sum())

    fn = budget_saliency()
    assert fn.direction == "gradient" and fn.weights == BUDGET_WEIGHTS
    assert fn.normalize == "additive" and fn.needs_direction
    assert heads_removed(fn, jax.tree.map(jnp.negative, grad)) == 0
    # on Adam's update |u_e| = 1 everywhere: every score is a magnitude, a head looks cheap
    assert heads_removed(fn, adam) == 1
    assert heads_removed(weighted(normalize="additive"), adam) == 1


@pytest.mark.parametrize("budgeted", [True, False])
def test_hesso_mixes_additively_under_a_budget_and_by_norm_for_a_count(budgeted):
    import optax

    from hesso_jax.costs import GroupCosts

    groups, params, _ = heads_and_neurons(1.0, 0.5)  # heads carry 4x a neuron's loss/cost
    owner = np.concatenate([np.repeat([0, 1], 32), np.arange(2, 66)]).astype(np.int32)
    terms = CostTerms.build([(1, [(128, owner)])], 66)
    costs = GroupCosts.from_terms(terms, terms)
    # a count K = 1 removes the lowest score; the budget removes 32 of 128 cost units
    K = hj.Budget(flops=0.75) if budgeted else 1
    tx = optax.chain(optax.sgd(0.0), hj.hesso(groups, K, 1, 1, costs=costs,
                                              saliency="magnitude"))
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
    pruned = np.asarray(hj.hesso_status(state).pruned)
    if budgeted:  # additive: 32 neurons (¼ of a head's loss per unit cost), no head
        assert pruned[:2].sum() == 0 and pruned[2:].sum() == 32
    else:  # the reference's norm mix, count K: ‖x‖ of a neuron (0.5) < a head's (5.7)
        assert pruned[:2].sum() == 0 and pruned[2:].sum() == 1


def test_cric_function_mixes_like_hesso_under_a_budget():
    """`hj.cric` with a Budget uses the additive mix too: with a loss that does not move
    the parameters (zero trial steps), CRIC keeps the greedy pick, which is the additive
    one (32 neurons), not the norm mix's head."""
    from hesso_jax.costs import GroupCosts

    groups, params, _ = heads_and_neurons(1.0, 0.5)
    owner = np.concatenate([np.repeat([0, 1], 32), np.arange(2, 66)]).astype(np.int32)
    terms = CostTerms.build([(1, [(128, owner)])], 66)
    costs = GroupCosts.from_terms(terms, terms)

    def flat(p):
        return 0.0 * sum(jnp.sum(x) for x in jax.tree.leaves(p))

    res = hj.cric(flat, params, groups, hj.Budget(flops=0.75), sample_steps=1,
                  learning_rate=1e-3, max_cycles=0, saliency="magnitude", costs=costs)
    red = np.asarray(res.redundant)
    assert red[:2].sum() == 0 and red[2:].sum() == 32
