"""Tests of FLOP/parameter budgets (`hesso_jax.budget`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import hesso_jax as hj
from hesso_jax.baselines import one_shot_prune
from hesso_jax.budget import (
    Budget,
    CostTable,
    budget_select,
    marginal_cost,
    removed_cost,
    resolve_budget,
)
from hesso_jax.costs import CostTerms, GroupCosts, group_costs
from hesso_jax.groups import GroupFamily, Groups, Member
from hesso_jax.models import CNN
from hesso_jax.projection import FamilyFloor

SIZES = (4, 3, 5)


@st.composite
def chains(draw):
    """A chain of families (fixed shapes, so one compilation) with random channel blocks,
    coefficients and unowned channels: linear end terms, bilinear links and a constant."""
    G = sum(SIZES)
    starts = np.cumsum([0, *SIZES])[:-1]
    maps = []
    for s, n in zip(starts, SIZES, strict=True):
        block = draw(st.integers(1, 3))
        extra = draw(st.integers(0, 2))  # channels no group owns
        maps.append(np.concatenate([np.repeat(np.arange(s, s + n), block),
                                    np.full(extra, G)]).astype(np.int32))
    coef = draw(st.lists(st.integers(1, 5), min_size=len(SIZES) + 2, max_size=len(SIZES) + 2))
    terms = [(coef[0], [(len(maps[0]), maps[0])]),
             (coef[1], [(len(maps[-1]), maps[-1]), (3, None)]), (draw(st.integers(0, 40)), [])]
    terms += [(c, [(len(maps[f]), maps[f]), (len(maps[f + 1]), maps[f + 1])])
              for f, c in enumerate(coef[2:len(SIZES) + 1])]
    groups = Groups.from_families([GroupFamily(n, (Member(("w", f), 0),))
                                   for f, n in enumerate(SIZES)])
    return groups, CostTerms.build(terms, G)


def _key_order(scores, marg, cand):
    shifted = scores - min(0.0, scores[cand].min()) if cand.any() else scores
    return np.where(marg > 0, shifted / np.where(marg > 0, marg, 1), np.inf)


@settings(max_examples=60, deadline=None)
@given(chain=chains(), seed=st.integers(0, 10_000), frac=st.floats(0.05, 1.0))
def test_budget_select_meets_target_minimally(chain, seed, frac):
    groups, terms = chain
    G = groups.num_groups
    rng = np.random.default_rng(seed)
    scores = rng.integers(-3, 10, G).astype(np.float32)
    alive = rng.random(G) < 0.8
    protected = rng.random(G) < 0.2
    # the target as budget_select reads it (float32): (1 − ⅓)·408 = 272.00000000000006 in
    # float64 is 272.0 there, and removing 272 meets it
    target = float(np.float32((1.0 - frac) * terms.dense()))
    table = CostTable.from_terms(terms)
    sel = np.asarray(budget_select(jnp.asarray(scores), table, jnp.asarray(alive),
                                   jnp.asarray(protected), jnp.asarray([target])))
    again = budget_select(jnp.asarray(scores), table, jnp.asarray(alive),
                          jnp.asarray(protected), jnp.asarray([target]))
    np.testing.assert_array_equal(sel, np.asarray(again))  # deterministic
    cand = alive & ~protected
    assert not (sel & ~cand).any()  # never a removed or protected group
    dead = ~alive
    if terms.removed(dead | cand) < target:  # unreachable: every candidate
        np.testing.assert_array_equal(sel, cand)
        return
    assert terms.removed(dead | sel) >= target  # kept fraction <= target
    if sel.any():  # minimal: the greedy prefix without its last group falls short
        key = _key_order(scores, terms.marginal(dead), cand)
        last = np.flatnonzero(sel)[np.lexsort((np.flatnonzero(sel), key[sel]))[-1]]
        short = sel.copy()
        short[last] = False
        assert terms.removed(dead | short) < target
        # and it is a prefix of the saliency-per-cost order
        assert key[sel].max() <= key[cand & ~sel].min(initial=np.inf) * (1 + 1e-5)


@settings(max_examples=40, deadline=None)
@given(chain=chains(), seed=st.integers(0, 10_000))
def test_jnp_costs_equal_exact_numpy(chain, seed):
    groups, terms = chain
    drop = np.random.default_rng(seed).random(groups.num_groups) < 0.5
    table = CostTable.from_terms(terms)
    assert float(removed_cost(table, jnp.asarray(drop))) == terms.removed(drop)
    np.testing.assert_array_equal(np.asarray(marginal_cost(table, jnp.asarray(drop))),
                                  terms.marginal(drop))


def _cnn():
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CNN(rngs=nnx.Rngs(0))))
    model = nnx.merge(graphdef, jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), state))
    groups = model.groups()
    return groups, group_costs(model, groups, jnp.ones((1, 8, 8, 1)))


@pytest.mark.parametrize("budget", [Budget(flops=0.5), Budget(params=0.3),
                                    Budget(params=0.6, flops=0.4), Budget(flops=0.15)])
def test_periods_reach_their_share_and_land_within_tolerance(budget):
    groups, costs = _cnn()
    rb = resolve_budget(budget, groups, costs, min_keep=0.1)
    G, P = groups.num_groups, 4
    rng = np.random.default_rng(0)
    alive = np.ones(G, bool)
    floor = FamilyFloor.build(groups, 0.1)
    for p in range(P):
        scores = jnp.asarray(rng.random(G), jnp.float32)
        prot = floor.protected(scores, jnp.asarray(alive))
        sel = np.asarray(budget_select(scores, rb.tables, jnp.asarray(alive), prot,
                                       rb.period_target(p, P)))
        assert not (sel & ~alive).any()
        alive &= ~sel
        removed = [costs.terms(m).removed(~alive) for m in rb.metrics]
        np.testing.assert_array_less((p + 1) / P * rb.required * (1 - 1e-6), removed)
    kept = dict(zip(("params", "flops"), costs.kept_fraction(~alive), strict=True))
    for metric, frac in budget.items():
        assert kept[metric] <= frac + 1e-9
    binding = max(budget.items(), key=lambda mf: kept[mf[0]] - mf[1])
    assert binding[1] - 0.03 <= kept[binding[0]]
    assert binding[1] - rb.granularity.max() <= kept[binding[0]]
    fams = groups.family_index()
    for f, fam in enumerate(groups.families):  # floors held: >= 10% of every family
        assert alive[fams == f].sum() >= np.ceil(0.1 * fam.size)


def test_selection_runs_inside_lax_cond_under_jit():
    groups, costs = _cnn()
    rb = resolve_budget(Budget(flops=0.5), groups, costs)
    G = groups.num_groups
    scores = jnp.linspace(1.0, 2.0, G)
    none = jnp.zeros(G, bool)

    @jax.jit
    def period_start(start, period):
        return jax.lax.cond(start, lambda: budget_select(
            scores, rb.tables, ~none, none, rb.period_target(period, 2)), lambda: none)

    direct = budget_select(scores, rb.tables, ~none, none, rb.period_target(0, 2))
    np.testing.assert_array_equal(period_start(True, 0), direct)
    assert not np.asarray(period_start(False, 0)).any()
    frac = costs.kept_fraction(np.asarray(direct))[1]
    assert 0.75 - 0.03 <= frac <= 0.75  # half of the required half after period 1 of 2


def test_budget_validation():
    with pytest.raises(ValueError, match="params=, flops= or both"):
        Budget()
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            Budget(flops=bad)
    for bad in ("0.5", True):
        with pytest.raises(TypeError, match="fraction"):
            Budget(params=bad)
    b = Budget(params=1, flops=0.5)
    assert b.items() == (("params", 1.0), ("flops", 0.5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.flops = 0.3  # type: ignore[misc]


def test_resolve_budget_names_the_smallest_reachable_fraction():
    groups, costs = _cnn()
    # the head's bias and the stem's input side cannot be pruned: a tiny target fails
    floor0 = costs.unprunable_params / costs.dense_params
    with pytest.raises(ValueError, match=r"smallest reachable params fraction is 0\.\d{4}"):
        resolve_budget(Budget(params=floor0 / 2), groups, costs)
    ok = resolve_budget(Budget(params=0.3), groups, costs)
    strict = resolve_budget(Budget(params=0.3), groups, costs, min_keep=0.5)
    assert strict.reachable[0] > ok.reachable[0] >= floor0 - 1e-12
    with pytest.raises(ValueError, match="min_keep=0.5"):
        resolve_budget(Budget(params=float(strict.reachable[0]) * 0.9), groups, costs,
                       min_keep=0.5)
    np.testing.assert_allclose(ok.required, 0.7 * costs.dense_params)
    with pytest.raises(TypeError, match="Budget"):
        resolve_budget(0.5, groups, costs)
    with pytest.raises(TypeError, match="GroupCosts"):
        resolve_budget(Budget(flops=0.5), groups, costs.to_dict())
    other = Groups.from_families(groups.families[:1])
    with pytest.raises(ValueError, match="other groups"):
        resolve_budget(Budget(flops=0.5), other, costs)
    assert isinstance(GroupCosts.from_dict(costs.to_dict()), GroupCosts)


@settings(max_examples=30, deadline=None)
@given(a=chains(), b=chains(), seed=st.integers(0, 10_000),
       fracs=st.tuples(st.floats(0.05, 1.0), st.floats(0.05, 1.0)))
def test_two_metrics_meet_both_targets_minimally(a, b, seed, fracs):
    (groups, t1), (_, t2) = a, b  # same group layout (fixed SIZES), two cost models
    G = groups.num_groups
    rng = np.random.default_rng(seed)
    scores = jnp.asarray(rng.random(G), jnp.float32)
    alive = rng.random(G) < 0.9
    target = np.asarray([(1 - fracs[0]) * t1.dense(), (1 - fracs[1]) * t2.dense()],
                        np.float32).astype(np.float64)  # as budget_select reads it
    tables = (CostTable.from_terms(t1), CostTable.from_terms(t2))
    sel = np.asarray(budget_select(scores, tables, jnp.asarray(alive), jnp.zeros(G, bool),
                                   jnp.asarray(target)))
    assert not (sel & ~alive).any()
    dead = ~alive
    removed = np.asarray([t1.removed(dead | sel), t2.removed(dead | sel)])
    if t1.removed(np.ones(G, bool)) < target[0] or t2.removed(np.ones(G, bool)) < target[1]:
        return
    if not (t1.removed(dead | alive) >= target[0] and t2.removed(dead | alive) >= target[1]):
        np.testing.assert_array_equal(sel, alive)
        return
    assert (removed >= target).all()
    for g in np.flatnonzero(sel):  # some single group is the one that closed the gap
        fewer = sel.copy()
        fewer[g] = False
        if t1.removed(dead | fewer) < target[0] or t2.removed(dead | fewer) < target[1]:
            break
    else:
        assert not sel.any()


def test_budget_never_empties_a_family_that_surgery_would_keep():
    """Surgery keeps a zero placeholder of an emptied family, so a budget keeps one group
    per family: the shrunk model meets its target, and a target only an emptied family
    could meet is refused before any selection (it used to be 'met' and then missed)."""
    fam = hj.GroupFamily(4, (hj.Member(("w1",), 1),), dependents=(hj.Member(("w2",), 0),))
    groups = hj.Groups.from_families([fam])
    r = np.random.default_rng(0)
    params = {"w1": jnp.asarray(r.normal(size=(8, 4)), jnp.float32),
              "w2": jnp.asarray(r.normal(size=(4, 3)), jnp.float32)}
    x = jnp.ones((2, 8))
    costs = hj.group_costs(lambda p, x: x @ p["w1"] @ p["w2"], params, groups, x)
    dense = sum(v.size for v in params.values())  # 44; a neuron is 11
    pruned, keep = one_shot_prune(params, groups, hj.Budget(params=0.3), costs=costs)
    assert keep.sum() == 1
    small, _ = hj.shrink(pruned, groups)
    assert sum(v.size for v in small.values()) / dense <= 0.3
    for call in (lambda: one_shot_prune(params, groups, hj.Budget(params=0.2), costs=costs),
                 lambda: hj.hesso(groups, hj.Budget(params=0.2), 2, 2, costs=costs),
                 lambda: hj.cric(lambda p: jnp.sum(x @ p["w1"] @ p["w2"]), params, groups,
                                 hj.Budget(params=0.2), sample_steps=2, learning_rate=0.1,
                                 costs=costs)):
        with pytest.raises(ValueError, match="smallest reachable params fraction is 0.25"):
            call()
    res = hj.cric(lambda p: jnp.sum((x @ p["w1"] @ p["w2"]) ** 2), params, groups,
                  hj.Budget(params=0.3), sample_steps=2, learning_rate=0.01, costs=costs)
    assert int(np.asarray(res.redundant).sum()) == 3
