"""Budgets in users' units: prune until the model keeps a fraction of its params / FLOPs.

``Budget(params=p, flops=f)`` asks that the shrunk model keeps at most ``p`` of the dense
model's parameters and at most ``f`` of its FLOPs (fractions of the *whole* model,
unprunable parts included; costs as `hesso_jax.costs.group_costs` counts them). With
``C(R)`` the exact cost removed by a set ``R`` of groups (the multilinear model of
`hesso_jax.costs`) and ``D`` the dense cost, the *required* removal of a metric is
``Q = (1 − fraction) · D``.

**Selection** (`budget_select`, jitted, ``O(G log G)``). From the current state (``dead``
= groups already removed), a knapsack-style greedy:

1. ``need_j = max(q_j − C_j(dead), 0)`` for each metric ``j`` (``q_j``: the cumulative
   target of this call); the per-group cost is ``c_g = Σ_j Δ_{j,g} / need_j`` with
   ``Δ_{j,g}`` the *exact marginal* cost of removing ``g`` alone from ``dead`` (the
   cross terms with already removed groups included; metrics already met weigh 0);
2. candidates (alive, not protected) are sorted by saliency per unit of cost,
   ``s'_g / c_g`` ascending (``s' = s − min(0, min_cand s)`` so ratios are ≥ 0; a group
   with ``c_g = 0`` is last: removing it buys nothing), ties to the lower index;
3. the result is the shortest prefix ``R_k`` of that order with
   ``C_j(dead ∪ R_k) ≥ q_j`` for every metric, found by binary search on ``k``
   (``C_j`` grows with ``k``) with the **exact** set cost (``⌈log₂(G+1)⌉`` evaluations
   of ``O(E)``, ``E`` the cost entries); if even every candidate falls short, all of them.

So the kept fraction never exceeds the target when the target is reachable, and it
undershoots it by less than the last group's cost: ``C(dead ∪ R_{k−1}) < q``. The
ordering uses the marginal costs at the call's start state (one sort); only the stopping
rule sees the cross terms between groups removed in the same call.

**Periods.** Over ``P`` selections (HESSO periods) the cumulative target after period
``p = 1..P`` is ``q_p = (p/P) · Q`` (`ResolvedBudget.period_target`), so overshoot in
one period is taken off the next and the last lands on ``Q``.

Example:
  >>> import jax.numpy as jnp, numpy as np
  >>> from hesso_jax.costs import CostTerms, GroupCosts
  >>> from hesso_jax.groups import GroupFamily, Groups, Member
  >>> groups = Groups.from_families([GroupFamily(4, (Member(("w",), 1),))])
  >>> m = np.arange(4, dtype=np.int32)              # one dense layer, 4 output neurons
  >>> terms = CostTerms.build([(2 * 8, [(4, m)])], 4)  # FLOPs 2·8·(4 − r)
  >>> costs = GroupCosts.from_terms(terms, terms)
  >>> rb = resolve_budget(Budget(flops=0.5), groups, costs)
  >>> rb.required.tolist()
  [32.0]
  >>> sel = budget_select(jnp.array([3., 1., 2., 0.]), rb.tables, jnp.ones(4, bool),
  ...                     jnp.zeros(4, bool), rb.period_target(0, 1))
  >>> np.asarray(sel).tolist()                      # the two least salient neurons
  [False, True, False, True]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hesso_jax.costs import CostTerms, GroupCosts
from hesso_jax.groups import Groups, resolve_min_keep
from hesso_jax.saliency import SaliencyFn, budget_saliency, replicate, resolve_saliency

__all__ = ["Budget", "CostTable", "ResolvedBudget", "budget_min_keep", "budget_select",
           "marginal_cost", "removed_cost", "resolve_budget"]

METRICS = ("params", "flops")


@dataclasses.dataclass(frozen=True)
class Budget:
    """Keep at most these fractions of the dense model's parameters and/or FLOPs.

    Attributes:
      params: fraction in (0, 1] of the dense parameter count, or None.
      flops: fraction in (0, 1] of the dense FLOPs, or None.

    Raises:
      TypeError: for a non-real fraction; ValueError if neither is given or one lies
        outside (0, 1].

    Example:
      >>> import hesso_jax as hj
      >>> hj.Budget(flops=0.5).items()
      (('flops', 0.5),)
      >>> hj.Budget(params=0.3, flops=0.6).items()
      (('params', 0.3), ('flops', 0.6))
    """

    params: float | None = None
    flops: float | None = None

    def __post_init__(self) -> None:
        if self.params is None and self.flops is None:
            raise ValueError("Budget needs params=, flops= or both (fractions in (0, 1])")
        for name in METRICS:
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
                raise TypeError(f"Budget {name} must be a fraction, got {v!r}")
            if not (0.0 < float(v) <= 1.0) or math.isnan(float(v)):
                raise ValueError(f"Budget {name} must lie in (0, 1], got {v}")
            object.__setattr__(self, name, float(v))

    def items(self) -> tuple[tuple[str, float], ...]:
        """``((metric, fraction), ...)`` of the metrics that are set, params first."""
        return tuple((n, getattr(self, n)) for n in METRICS if getattr(self, n) is not None)


class CostTable(NamedTuple):
    """One metric's `CostTerms` as fixed-shape ``jnp`` arrays (a pytree, jit-friendly).

    Attributes:
      coef: ``float32[T]``; size: ``float32[T, M]``; slot, group: ``int32[E]``;
      count: ``float32[E]`` (see `hesso_jax.costs.CostTerms`); pair_term, pair_group:
      ``int32[P]`` and pair_delta: ``float32[P, M]`` (`CostTerms.pairs`).
    """

    coef: jax.Array
    size: jax.Array
    slot: jax.Array
    group: jax.Array
    count: jax.Array
    pair_term: jax.Array
    pair_group: jax.Array
    pair_delta: jax.Array

    @classmethod
    def from_terms(cls, terms: CostTerms) -> CostTable:
        """The table of ``terms``."""
        term, group, delta = terms.pairs()
        f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
        i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
        return cls(f32(terms.coef), f32(terms.size), i32(terms.slot), i32(terms.group),
                   f32(terms.count), i32(term), i32(group), f32(delta))


def _kept(table: CostTable, drop: jax.Array) -> jax.Array:
    """``float32[T, M]`` kept sizes after removing ``drop`` (clipped at 0)."""
    removed = jax.ops.segment_sum(table.count * drop[table.group].astype(jnp.float32),
                                  table.slot, num_segments=table.size.size)
    return jnp.maximum(table.size - removed.reshape(table.size.shape), 0.0)


def removed_cost(table: CostTable, drop: jax.Array) -> jax.Array:
    """``float32[]``: the exact cost the set ``drop`` (``bool[G]``) removes.

    ``Σ_t coef_t (Π_m size_{t,m} − Π_m kept_{t,m})`` (`hesso_jax.costs`).
    """
    kept = _kept(table, drop)
    return jnp.sum(table.coef * (jnp.prod(table.size, axis=1) - jnp.prod(kept, axis=1)))


def marginal_cost(table: CostTable, drop: jax.Array) -> jax.Array:
    """``float32[G]``: exact cost of removing each group alone once ``drop`` is removed.

    ``Δ_g = Σ_{(t,g)} coef_t (Π_m n_{t,m} − Π_m max(n_{t,m} − δ_{t,g,m}, 0))``; 0 for the
    groups in ``drop``.
    """
    kept = _kept(table, drop)
    rows = kept[table.pair_term]
    gain = table.coef[table.pair_term] * (
        jnp.prod(rows, axis=1) - jnp.prod(jnp.maximum(rows - table.pair_delta, 0.0), axis=1))
    out = jax.ops.segment_sum(gain, table.pair_group, num_segments=drop.shape[0])
    return jnp.where(drop, 0.0, out)


def _positions(order: jax.Array) -> jax.Array:
    return jnp.zeros(order.shape, jnp.int32).at[order].set(
        jnp.arange(order.shape[0], dtype=jnp.int32))


def _greedy_rank(scores: jax.Array, cost: jax.Array, cand: jax.Array) -> jax.Array:
    """Position of each group in the order (candidates first, ``s'/c`` ascending)."""
    clean = jnp.where(jnp.isnan(scores), jnp.inf, scores.astype(jnp.float32))
    low = jnp.min(jnp.where(cand, clean, jnp.inf))
    shifted = clean - jnp.minimum(jnp.where(jnp.isfinite(low), low, 0.0), 0.0)
    key = jnp.where(cost > 0, shifted / jnp.where(cost > 0, cost, 1.0), jnp.inf)
    return _positions(jnp.lexsort((key, ~cand)))


@jax.jit
def budget_select(scores: jax.Array, cost: CostTable | tuple[CostTable, ...],
                  alive: jax.Array, protected: jax.Array,
                  target_removed_cost: jax.Array) -> jax.Array:
    """``bool[G]``: the alive, unprotected groups to remove now (module docstring).

    Pure ``jnp`` with fixed shapes, so it runs under ``jit``, ``lax.cond`` (a HESSO
    period start) and on replicated per-group vectors of a mesh.

    Args:
      scores: ``float[G]`` saliency (lowest = most redundant; NaN ranks last).
      cost: one `CostTable` per metric (a tuple, or one table).
      alive: ``bool[G]`` groups not removed yet (``~alive`` is the current state).
      protected: ``bool[G]`` groups that must stay (per-family floors).
      target_removed_cost: ``float[n_metrics]`` cumulative cost (from the dense model) that
        must be removed once this selection is removed too.

    Returns:
      The selection, disjoint from ``~alive`` and ``protected``: the shortest greedy
      prefix meeting every target, or every candidate if none does.
    """
    tables = (cost,) if isinstance(cost, CostTable) else tuple(cost)
    scores, alive, protected = replicate(scores), replicate(alive), replicate(protected)
    target = jnp.atleast_1d(jnp.asarray(target_removed_cost, jnp.float32))
    dead = ~alive
    cand = alive & ~protected
    done = jnp.stack([removed_cost(t, dead) for t in tables])
    need = jnp.maximum(target - done, 0.0)
    weight = jnp.where(need > 0, 1.0 / jnp.where(need > 0, need, 1.0), 0.0)
    per_group = sum(weight[j] * marginal_cost(t, dead) for j, t in enumerate(tables))
    rank = _greedy_rank(scores, per_group, cand)

    def meets(k: jax.Array) -> jax.Array:
        drop = dead | (cand & (rank < k))
        return jnp.all(jnp.stack([removed_cost(t, drop) for t in tables]) >= target)

    def halve(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds
        mid = (lo + hi) // 2
        ok = meets(mid)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    steps = max(1, math.ceil(math.log2(scores.shape[0] + 1)))
    n_cand = jnp.sum(cand, dtype=jnp.int32)
    _, k = jax.lax.fori_loop(0, steps, halve, (jnp.zeros([], jnp.int32), n_cand))
    return cand & (rank < k)


class ResolvedBudget(NamedTuple):
    """A `Budget` checked against a model's costs, ready for `budget_select`.

    Attributes:
      metrics: the budgeted metrics, e.g. ``('flops',)``.
      fractions: their target kept fractions.
      dense: ``float64[n]`` dense costs.
      required: ``float64[n]`` cost to remove, ``(1 − fraction) · dense``.
      tables: one `CostTable` per metric.
      reachable: ``float64[n]`` smallest kept fraction the floors allow.
      granularity: ``float64[n]`` largest single-group cost as a fraction of the dense
        cost: a selection overshoots its target by less than this, so the achieved
        fraction lands in ``[fraction − granularity, fraction]``.
    """

    metrics: tuple[str, ...]
    fractions: tuple[float, ...]
    dense: np.ndarray
    required: np.ndarray
    tables: tuple[CostTable, ...]
    reachable: np.ndarray
    granularity: np.ndarray

    def period_target(self, period: Any, num_periods: int) -> jax.Array:
        """``float32[n]``: cumulative removal after 0-based ``period``: ``(p+1)/P · Q``."""
        p = jnp.asarray(period, jnp.float32) + 1.0
        return jnp.asarray(self.required, jnp.float32) * p / float(num_periods)


def budget_min_keep(min_keep: int | float) -> int | float:
    """The per-family floor a `Budget` selection uses: ``min_keep``, at least one group.

    Surgery keeps one (exactly zero) placeholder group of a family whose groups are all
    removed (`hesso_jax.KeepPlan`), so a selection that empties a family would count a
    group as removed that the shrunk model still holds, and land above its target. A
    budget therefore never selects a family's last group: an int ``min_keep`` below 1
    becomes 1 (a fraction in (0, 1) already keeps ``⌈m · n_f⌉ ≥ 1``).

    Example:
      >>> budget_min_keep(0), budget_min_keep(3), budget_min_keep(0.05)
      (1, 3, 0.05)
    """
    if isinstance(min_keep, int | np.integer) and not isinstance(min_keep, bool):
        return max(int(min_keep), 1)
    return min_keep


def _floor_keep(groups: Groups, floors: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """``bool[G]``: the ``m_f`` cheapest groups of every family (what the floors keep)."""
    family = groups.family_index()
    order = np.lexsort((np.arange(len(cost)), cost, family))
    rank = np.empty(len(cost), np.int64)
    rank[order] = np.arange(len(cost))
    start = np.asarray(groups.starts, np.int64)[family]
    return (rank - start) < floors[family]


def saliency_normalize(K: Any) -> str:
    """How a named / mapped / default saliency mix is normalised for the target ``K``.

    ``"additive"`` for a `Budget` (each score an additive loss-increase estimate, so
    saliency per unit of cost compares heads with neurons), ``"norm"`` (the reference's
    mix) for a count or fraction of groups; `hesso_jax.hesso` and `hesso_jax.cric` share
    this rule.

    Example:
      >>> saliency_normalize(Budget(flops=0.5)), saliency_normalize(0.3)
      ('additive', 'norm')
    """
    return "additive" if isinstance(K, Budget) else "norm"


def target_saliency(saliency: Any, K: Any) -> SaliencyFn:
    """The saliency `hesso_jax.hesso` and `hesso_jax.cric` rank by for the target ``K``.

    ``saliency=None`` with a `Budget`: `hesso_jax.saliency.budget_saliency` (additive
    Taylor-2, ``½ Σ_{e∈g} x_e² d_e²``, meant for ``d = −∇f(x)``; it carries
    ``direction = "gradient"``), because under a budget the scores are compared *per unit
    of cost* across group kinds, and every score of the mix read on Adam's update is in
    effect a magnitude there (``|u_e| ≲ η``), which ranks whole heads as cheap loss per
    FLOP. Otherwise `hesso_jax.saliency.resolve_saliency` with `saliency_normalize`'s
    mix (``None``: the equal mix of the five scores).

    Example:
      >>> target_saliency(None, Budget(flops=0.5)).direction
      'gradient'
      >>> fn = target_saliency("magnitude", Budget(params=0.5))
      >>> target_saliency(None, 0.5).normalize, fn.normalize
      ('norm', 'additive')
    """
    if saliency is None and isinstance(K, Budget):
        return budget_saliency()
    return resolve_saliency(saliency, normalize=saliency_normalize(K))


def resolve_budget(budget: Budget, groups: Groups, costs: GroupCosts, *,
                   min_keep: int | float = 0, who: str = "budget") -> ResolvedBudget:
    """Checks that ``budget`` is reachable and builds the selection tables.

    The most a selection can remove is every group but the per-family floors
    (`hesso_jax.groups.resolve_min_keep` of `budget_min_keep`: at least one group per
    family, which surgery keeps anyway); the floors are taken as each family's
    cheapest groups (normalised cost ``Σ_j c_{j,g} / D_j``) and the set's exact cost
    gives the smallest reachable fraction of each metric.

    Args:
      budget: the `Budget`.
      groups: the groups the costs were computed for.
      costs: their `GroupCosts`.
      min_keep: the per-family floor (as for `hesso_jax.hesso`).
      who: name used in error messages.

    Raises:
      TypeError: if ``budget`` is not a `Budget` or ``costs`` not a `GroupCosts`.
      ValueError: if the costs have another group count, or a target is below the smallest
        reachable fraction (named in the message with the unprunable share).
    """
    if not isinstance(budget, Budget):
        raise TypeError(f"{who}: expected a hesso_jax.Budget, got {type(budget).__name__}")
    if not isinstance(costs, GroupCosts):
        raise TypeError(f"{who}: costs must be a GroupCosts, got {type(costs).__name__}")
    if costs.num_groups != groups.num_groups:
        raise ValueError(f"{who}: costs has {costs.num_groups} groups, groups has "
                         f"{groups.num_groups}; were they computed for other groups?")
    items = budget.items()
    floors = resolve_min_keep(budget_min_keep(min_keep), groups, who=who)
    dense = np.asarray([float(costs.terms(n).dense()) for n, _ in items])
    norm = sum(costs.terms(n).marginal() / max(d, 1.0) for (n, _), d in zip(items, dense,
                                                                           strict=True))
    drop_max = ~_floor_keep(groups, floors, np.asarray(norm, np.float64))
    reachable = np.asarray([1.0 - costs.terms(n).removed(drop_max) / max(d, 1.0)
                            for (n, _), d in zip(items, dense, strict=True)])
    for (name, frac), least, d in zip(items, reachable, dense, strict=True):
        if frac < least - 1e-12:
            unprunable = costs.terms(name).value(np.ones(groups.num_groups, bool))
            raise ValueError(
                f"{who}: {budget} cannot be met: with min_keep={min_keep} the smallest "
                f"reachable {name} fraction is {least:.4f} (the unprunable part alone is "
                f"{unprunable / max(d, 1.0):.4f} of the dense {name})")
    required = np.asarray([(1.0 - f) * d for (_, f), d in zip(items, dense, strict=True)])
    tables = tuple(CostTable.from_terms(costs.terms(n)) for n, _ in items)
    granularity = np.asarray([costs.terms(n).marginal().max(initial=0) / max(d, 1.0)
                              for (n, _), d in zip(items, dense, strict=True)])
    return ResolvedBudget(tuple(n for n, _ in items), tuple(f for _, f in items), dense,
                          required, tables, reachable, granularity)
