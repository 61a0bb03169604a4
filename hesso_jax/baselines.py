"""One-shot structured pruning baselines over the same `Groups` (for benchmarks).

What a Torch-Pruning user would do: train, score every group once, remove the ``K``
lowest-scoring groups, fine-tune with the same optimizer for the rest of the step budget.
Two scores (Torch-Pruning's group importances, over the members of each group):

* ``'magnitude'``: ``s_g = ‖x_g‖₂`` (the group's L2 norm);
* ``'taylor'``: ``s_g = Σ_{i∈g} |x_i · ∂L/∂x_i|`` (first-order Taylor estimate of the loss
  change when the group is removed, taken elementwise then summed, averaged over the
  gradient batches given).

``K`` may also be a `hesso_jax.budget.Budget` (keep at most a fraction of the dense
params / FLOPs): the groups are then chosen by `hesso_jax.budget.budget_select` (lowest
score per unit of exact marginal cost, until the target is met) from the model's
`hesso_jax.costs.GroupCosts` (``costs=``).

The pruned groups are set to exactly ``0.0`` and `keep_pruned` wraps the fine-tuning
optimizer so their updates are zero: they stay removed and `hesso_jax.shrink` deletes them.
These are comparison points for HESSO, not a second pruning product.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hesso_jax.budget import Budget, budget_min_keep, budget_select, resolve_budget
from hesso_jax.costs import GroupCosts
from hesso_jax.groups import Groups, resolve_count
from hesso_jax.projection import FamilyFloor, bottom_k

__all__ = ["Criterion", "group_scores", "keep_pruned", "one_shot_prune"]

Criterion = Literal["magnitude", "taylor"]


def group_scores(groups: Groups, params: Any, criterion: Criterion = "magnitude",
                 grads: Sequence[Any] = ()) -> jax.Array:
    """``float32[G]`` importance of every group (lowest = pruned first).

    Args:
      groups: the groups.
      params: the trained parameters.
      criterion: ``'magnitude'`` or ``'taylor'``.
      grads: for ``'taylor'``, one or more gradient trees (e.g. of a few batches); the
        scores are averaged over them.

    Raises:
      ValueError: for an unknown criterion, or ``'taylor'`` without gradients.
    """
    if criterion == "magnitude":
        return jnp.sqrt(groups.sq_norms(params))
    if criterion == "taylor":
        if not grads:
            raise ValueError("criterion='taylor' needs at least one gradient tree in grads=")
        total = sum(groups.reduce(lambda x, g: jnp.abs(x.astype(jnp.float32)
                                                       * g.astype(jnp.float32)), params, g)
                    for g in grads)
        return total / len(grads)
    raise ValueError(f"criterion must be 'magnitude' or 'taylor', got {criterion!r}")


def one_shot_prune(params: Any, groups: Groups, K: int | float | Budget,
                   criterion: Criterion = "magnitude",
                   grads: Sequence[Any] = (), *,
                   min_keep: int | float = 0,
                   costs: GroupCosts | None = None) -> tuple[Any, np.ndarray]:
    """Zeroes the ``K`` lowest-scoring groups at once (or enough groups for a `Budget`).

    Args:
      params: the trained parameters.
      groups: the groups.
      K: int count or fraction in (0, 1) of the groups, as for `hesso_jax.hesso`; or a
        `hesso_jax.budget.Budget`: keep at most that fraction of the dense params / FLOPs
        (one `budget_select` with the whole requirement as target).
      criterion: see `group_scores`.
      grads: gradient trees for ``'taylor'``.
      min_keep: per-family floor, as for `hesso_jax.hesso`: each family keeps at least
        its ``m_f`` highest-scoring groups.
      costs: the groups' `hesso_jax.costs.GroupCosts` (``hj.group_costs(model, groups,
        x)``); required with a `Budget` unless ``groups`` carries them (``groups.costs``).

    Returns:
      ``(pruned_params, keep)``: the parameters with every member of the pruned groups at
      exactly 0.0, and the ``bool[G]`` keep mask (exactly ``K`` False entries for a count).

    Raises:
      ValueError: for a bad ``K``/``min_keep``, a `Budget` without costs, or a budget the
        floors and unprunable parts make unreachable (see `resolve_budget`).
    """
    groups.validate(params, dependents="present")
    scores = group_scores(groups, params, criterion, grads)
    if isinstance(K, Budget):
        drop = _budget_drop(groups, K, scores, min_keep,
                            costs if costs is not None else getattr(groups, "costs", None))
    else:
        k = resolve_count(K, groups.num_groups)
        floor = FamilyFloor.build(groups, min_keep, k, who="one_shot_prune")
        candidates = jnp.ones(groups.num_groups, bool)
        if floor is not None:
            candidates = floor.candidates(scores, candidates)
        drop = np.asarray(bottom_k(scores, candidates, k))
    keep = ~drop
    return groups.mask(params, keep), keep


def _budget_drop(groups: Groups, budget: Budget, scores: jax.Array,
                 min_keep: int | float, costs: GroupCosts | None) -> np.ndarray:
    """``bool[G]``: the groups `budget_select` removes to meet ``budget`` in one shot."""
    if costs is None:
        raise ValueError("one_shot_prune with a Budget needs the groups' costs: pass "
                         "costs=hj.group_costs(model, groups, x_example)")
    resolved = resolve_budget(budget, groups, costs, min_keep=min_keep, who="one_shot_prune")
    alive = jnp.ones(groups.num_groups, bool)
    floor = FamilyFloor.build(groups, budget_min_keep(min_keep), who="one_shot_prune")
    protected = (floor.protected(scores, alive) if floor is not None
                 else jnp.zeros(groups.num_groups, bool))
    return np.asarray(budget_select(scores, resolved.tables, alive, protected,
                                    resolved.period_target(0, 1)))


def keep_pruned(groups: Groups, keep: np.ndarray) -> optax.GradientTransformation:
    """A transformation (put last in a chain) that zeroes the updates of pruned groups.

    With the pruned parameters at 0.0 and their updates 0.0, fine-tuning keeps them
    exactly zero.
    """
    keep_vec = np.asarray(keep, bool)
    if keep_vec.shape != (groups.num_groups,):
        raise ValueError(f"keep has shape {keep_vec.shape}, expected ({groups.num_groups},)")

    def init(params: Any) -> optax.EmptyState:
        groups.validate(params, dependents="present")
        return optax.EmptyState()

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        return groups.mask(updates, keep_vec), state

    return optax.GradientTransformation(init, update)
