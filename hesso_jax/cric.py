"""CRIC: the corrective redundant identification cycle (HESSO paper, Algorithm 2).

Greedy saliency is measured once, far from the origin; a group whose removal is cheap to
first order there can still be indispensable (the paper's CARN and Phi-2 collapses). CRIC
*tests* the candidates: it projects them towards zero along short trial trajectories and
measures the saliency of every group at every sample point on the way.

With ``x⁰`` the given parameters, ``η`` the trial learning rate, ``S`` the sample steps,
``s(·)`` the saliency (lowest = most redundant) and ``bottom_K(·)`` the ``K`` lowest
candidates:

1. ``V ← bottom_K(s(x⁰, −η∇f(x⁰)))``, ``H ← ∅``, ``A ← 0``.
2. *Trial*: ``x ← x⁰``; for ``j = 0..S−1``: ``u = −η∇f(x)``, ``A ← A + s(x, u)``,
   ``x ← γ_j(x + u)`` on ``V`` and ``x + u`` elsewhere, with ``γ_j = (S−j−1)/(S−j)``, so
   ``V`` reaches zero at the end of the trial (the same projection as HESSO's periods).
3. ``H ← H ∪ V``; the next violating set is ``V ← bottom_K(A) ∖ H``: groups that have
   newly entered the bottom-K and were never tested. If ``|V| ≤ tolerance`` (or the cycle
   cap is reached) stop; otherwise correct again from step 2.
4. Result: ``bottom_K(A)``.

Non-finite trials. A trial whose loss ``f(x)`` at a sample point, or whose accumulated
saliency, is NaN/±inf (a diverging trial step, a NaN batch) is *rejected*: its scores are
discarded, the cycle stops, and the result is the selection before it — ``bottom_K(A)`` of
the trials accepted so far, or the greedy ``V`` of step 1 when the first trial is rejected
(``scores`` are then the greedy ones). `CricResult.rejected` records it (1, else 0), and
HESSO-CRIC counts such period starts in ``HessoState.cric_rejected``. A trial is never
allowed to turn NaN scores into a selection.

Every correction adds ``|V| > tolerance`` never-tested groups to ``H ⊆ candidates``, and
the first trial already put ``K`` there, so the number of corrective cycles (trials after
the first) is at most ``⌊(G − K)/(tolerance + 1)⌋ ≤ (G − K)/max(tolerance, 1)``
(Corollary 3.4).

Cost. Every trial starts at ``x⁰``, so its first step ``u₀ = −η∇f(x⁰)`` and score
``s(x⁰, u₀)`` are those of step 1 and are computed once: a call evaluates
``1 + trials·(S − 1)`` gradients (`CricConfig.gradient_count`; the selection is the same as
recomputing them). The gradients run inside the loops with every convolution in canonical
channels-last layout (`hesso_jax.jaxpr.conv_layout.canonical_convs`: same values; XLA:CPU
runs the transposed gradient convolutions JAX emits tens of times slower inside loop
bodies than at the top level).

The trials are sequentially dependent — trial ``c + 1`` projects ``V_{c+1}``, which is read
from the scores ``A`` accumulated through trial ``c`` — and the ``S − 1`` steps of a trial
are too (``x_{j+1}`` needs ``∇f(x_j)``), so ``gradient_count`` gradients one after the
other is the floor of a call for the trials it runs; every trial adds its whole score
vector to ``A``, so stopping earlier (a cap, a larger tolerance) changes the selection in
general. Measured (``benchmarks/cric_cost.py``, 2 shared CPU cores, interleaved medians):
a HESSO-CRIC period start costs what its gradients alone cost back to back in a
``fori_loop`` — digits CNN 9.0× an ordinary step vs 7.8× (1 corrective cycle, 9
gradients), BERT-like 4×256 at initialisation 81.5× vs 81.7× (25 cycles of 1–24 new
groups, 105 gradients) — and the gradients inside the loops run at least as fast as at
the top level (the same HLO dots; no layout rewrite is needed for ``dot_general``).

Memory: one working copy of the parameters (the trial iterate ``x``; ``x⁰`` is the input
itself, never copied) and the shared first step ``u₀``, plus the transient gradient and
length-``G`` vectors. The PyTorch reference keeps two copies. The cycle loop is a
``lax.while_loop`` and the trial a ``lax.fori_loop``, so `cric` is pure and jittable.

Sharding: the trial iterate keeps the parameters' sharding through the ``fori_loop``
(``x + u'`` of two arrays sharded like the parameters), and every length-``G`` carry of the
``while_loop`` (violating and tested sets, accumulated scores) is replicated, since the
scores come from `hesso_jax.saliency.evaluate` and the sets from
`hesso_jax.projection.bottom_k`; so both loops keep identical carry shardings on Auto and
Explicit meshes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hesso_jax.budget import (
    Budget,
    budget_min_keep,
    budget_select,
    resolve_budget,
    target_saliency,
)
from hesso_jax.costs import GroupCosts
from hesso_jax.groups import Groups, check_int, resolve_count
from hesso_jax.jaxpr.conv_layout import canonical_convs
from hesso_jax.projection import FamilyFloor, bottom_k, gamma, project
from hesso_jax.saliency import SaliencyFn, evaluate, resolve_saliency

__all__ = ["CricConfig", "CricResult", "cric", "cric_select"]


@dataclasses.dataclass(frozen=True)
class CricConfig:
    """CRIC settings, for `cric` and for ``hesso(..., cric=CricConfig(...))``.

    Attributes:
      sample_steps: trial steps ``S`` per cycle (>= 1).
      learning_rate: trial gradient-step size ``η`` (> 0).
      tolerance: stop once at most this many new violating groups appear (>= 0).
      max_cycles: cap on corrective cycles; ``None`` = the Corollary 3.4 bound
        ``⌊(G − K)/max(tolerance, 1)⌋``, which the loop never exceeds.
      saliency: as in `hesso` (``None``: HESSO's own score inside `hesso`, else the equal
        mix of the five scores).

    Example:
      >>> import hesso_jax as hj
      >>> config = hj.CricConfig(sample_steps=4, learning_rate=0.1, tolerance=2)
      >>> config.cycle_cap(10, 4)  # ⌊(G − K) / tolerance⌋ corrective cycles at most
      3
    """

    sample_steps: int
    learning_rate: float
    tolerance: int = 0
    max_cycles: int | None = None
    saliency: Any = None

    def __post_init__(self) -> None:
        check_int("sample_steps", self.sample_steps, 1)
        if isinstance(self.learning_rate, bool) or not isinstance(
                self.learning_rate, int | float | np.floating | np.integer):
            raise TypeError(f"learning_rate must be a number, got {self.learning_rate!r}")
        if not (np.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be finite and > 0, got {self.learning_rate}")
        check_int("tolerance", self.tolerance, 0)
        if self.max_cycles is not None:
            check_int("max_cycles", self.max_cycles, 0)
        if self.saliency is not None:
            resolve_saliency(self.saliency)

    def cycle_cap(self, num_groups: int, K: int) -> int:
        """Static cap on corrective cycles for ``G`` groups and ``K`` to select."""
        bound = max(num_groups - K, 0) // max(self.tolerance, 1)
        return bound if self.max_cycles is None else min(self.max_cycles, bound)

    def gradient_count(self, trials: int) -> int:
        """Loss gradients `cric` evaluates for ``trials`` trials (``cycles + 1``).

        The greedy pick needs ``∇f(x⁰)``; every trial takes ``S`` steps from ``x⁰``, the
        first of which reuses that gradient: ``1 + trials·(S − 1)``.

        Example:
          >>> import hesso_jax as hj
          >>> hj.CricConfig(sample_steps=5, learning_rate=0.1).gradient_count(3)
          13
        """
        check_int("trials", trials, 0)
        return 1 + trials * (self.sample_steps - 1)


class CricResult(NamedTuple):
    """What `cric` found.

    Attributes:
      redundant: ``bool[G]`` the ``K`` groups selected (bottom-K of the accumulated scores).
      cycles: ``int32[]`` corrective cycles run (trials after the first).
      violating_sizes: ``int32[cap + 1]``; entry ``i`` is ``|V|`` found after trial ``i``
        (entry 0 after the greedy trial), ``-1`` for trials that did not run.
      scores: ``float32[G]`` the accumulated saliency ``A`` of the accepted trials (the
        greedy scores when the first trial was rejected).
      rejected: ``int32[]`` 1 when a trial was rejected for a non-finite loss or score
        (the result is then the selection before that trial), else 0.
    """

    redundant: jax.Array
    cycles: jax.Array
    violating_sizes: jax.Array
    scores: jax.Array
    rejected: jax.Array


Select = Callable[[jax.Array, jax.Array], jax.Array]


def cric_select(loss_fn: Callable[[Any], jax.Array], params: Any, groups: Groups,
                k: jax.Array | int, candidates: jax.Array, config: CricConfig,
                saliency: SaliencyFn, cap: int, *, select: Select | None = None
                ) -> CricResult:
    """The CRIC loop for ``k`` groups among ``candidates`` (traced ``k`` allowed).

    Used by `cric` and by HESSO-CRIC at period starts (where ``candidates`` excludes the
    groups already pruned). ``cap`` is the static corrective-cycle cap. ``select(scores,
    candidates) -> bool[G]`` is the selection rule used for the greedy pick and after every
    trial (default ``bottom_k(scores, candidates, k)``; a `hesso_jax.Budget` passes
    `hesso_jax.budget.budget_select`, and ``k`` is then ignored).
    """
    layout = groups.layout(params, dependents="present")
    G = groups.num_groups
    S = config.sample_steps
    lr = config.learning_rate
    k = jnp.asarray(k, jnp.int32)
    custom = select is not None
    if select is None:
        def select(scores: jax.Array, cand: jax.Array) -> jax.Array:
            return bottom_k(scores, cand, k)

    value_and_grad = canonical_convs(jax.value_and_grad(loss_fn))

    def direction(x: Any) -> tuple[jax.Array, Any]:
        loss, grads = value_and_grad(x)
        return loss, jax.tree.map(lambda g: (-lr * g).astype(g.dtype), grads)

    loss0, u0 = direction(params)
    greedy = evaluate(saliency, params, u0, groups)
    trial = _trial_fn(direction, saliency, groups, layout, params, S, (loss0, u0, greedy))
    first = select(greedy, candidates)
    has_work = jnp.any(first) if custom else k > 0

    class Carry(NamedTuple):
        violating: jax.Array
        tested: jax.Array
        acc: jax.Array
        trials: jax.Array
        sizes: jax.Array
        rejected: jax.Array

    def cond(c: Carry) -> jax.Array:
        first_trial = (c.trials == 0) & has_work
        pending = (jnp.sum(c.violating) > config.tolerance) & (c.trials > 0)
        return ~c.rejected & (first_trial | (pending & (c.trials <= cap)))

    def body(c: Carry) -> Carry:
        acc, finite = trial(c.violating, c.acc)
        acc = jnp.where(finite, acc, c.acc)  # a rejected trial leaves A as it was
        tested = c.tested | c.violating
        violating = jnp.where(finite, select(acc, candidates) & ~tested, False)
        sizes = c.sizes.at[c.trials].set(jnp.sum(violating, dtype=jnp.int32))
        return Carry(violating, tested, acc, c.trials + finite.astype(jnp.int32), sizes,
                     ~finite)

    init = Carry(first, jnp.zeros([G], bool), jnp.zeros([G], jnp.float32),
                 jnp.zeros([], jnp.int32), jnp.full([cap + 1], -1, jnp.int32),
                 jnp.asarray(False))
    out = jax.lax.while_loop(cond, body, init)
    cycles = jnp.maximum(out.trials - 1, 0)
    none_accepted = out.trials == 0
    redundant = jnp.where(none_accepted, first, select(out.acc, candidates))
    scores = jnp.where(none_accepted & out.rejected, greedy, out.acc)
    return CricResult(redundant, cycles, out.sizes, scores, out.rejected.astype(jnp.int32))


Direction = Callable[[Any], tuple[jax.Array, Any]]


def _trial_fn(direction: Direction, saliency: SaliencyFn, groups: Groups, layout: Any,
              params: Any, S: int, start: tuple[jax.Array, Any, jax.Array]
              ) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """``trial(V, A) -> (A + Σ_j s(x_j, u_j), finite)``: one trial from ``x⁰`` projecting V.

    Every trial starts at ``x⁰``, so its first sample point is the same for all of them:
    ``start = (f(x⁰), u₀ = −η∇f(x⁰), s(x⁰, u₀))`` is computed once (the greedy pick needs
    it too) and each trial evaluates ``S − 1`` gradients, not ``S``.
    """
    loss0, u0, score0 = start

    def move(j: jax.Array | int, x: Any, u: Any, violating: jax.Array) -> Any:
        """``x + u`` elsewhere, ``γ_j(x + u)`` on ``V`` (the HESSO projection)."""
        coef = jnp.where(violating, gamma(j, S), 1.0)
        u = project(layout, u, x, violating, coef)
        return jax.tree.map(lambda a, b: (a + b).astype(a.dtype), x, u)

    def trial(violating: jax.Array, acc: jax.Array) -> tuple[jax.Array, jax.Array]:
        def step(j: jax.Array, carry: tuple[Any, jax.Array, jax.Array]
                 ) -> tuple[Any, jax.Array, jax.Array]:
            x, acc, finite = carry
            loss, u = direction(x)
            acc = acc + evaluate(saliency, x, u, groups)
            return move(j, x, u, violating), acc, finite & jnp.isfinite(loss)

        carry = (move(0, params, u0, violating), acc + score0, jnp.isfinite(loss0))
        _, acc, finite = jax.lax.fori_loop(1, S, step, carry)
        return acc, finite & jnp.all(jnp.isfinite(acc))

    return trial


def cric(loss_fn: Callable[[Any], jax.Array], params: Any, groups: Groups,
         K: int | float | Budget, *, sample_steps: int, learning_rate: float,
         tolerance: int = 0, max_cycles: int | None = None, saliency: Any = None,
         costs: GroupCosts | None = None) -> CricResult:
    """Selects ``K`` redundant groups with the corrective cycle (Algorithm 2).

    Pure and jittable (wrap it in ``jax.jit`` with ``loss_fn`` closed over; ``K`` and the
    keyword arguments are static).

    Args:
      loss_fn: ``params -> scalar`` loss (e.g. on a calibration batch).
      params: the parameters to start every trial from.
      groups: the prunable `Groups`.
      K: groups to select: an int in ``[0, G)`` or a fraction in (0, 1); or a
        `hesso_jax.Budget`: every selection (greedy and after each trial) is then
        `hesso_jax.budget.budget_select` with the whole requirement as target, so the
        result keeps at most that fraction of the dense params / FLOPs.
      sample_steps: trial steps per cycle.
      learning_rate: trial gradient-step size.
      tolerance: stop when at most this many new violating groups appear.
      max_cycles: cap on corrective cycles (default: the Corollary 3.4 bound).
      saliency: see `hesso` (default: equal mix of the five scores; under a
        `hesso_jax.Budget`, `hesso_jax.saliency.budget_saliency` on the trial's gradient
        direction, `hesso_jax.budget.target_saliency`); as there, a name or mapping is
        mixed with ``normalize="norm"`` for a count ``K`` and with
        ``normalize="additive"`` for a `hesso_jax.Budget`.
      costs: the groups' `hesso_jax.GroupCosts` for a `Budget` (default
        ``groups.costs``, recorded by `hesso_jax.discover_groups`).

    Returns:
      A `CricResult`.

    Raises:
      ValueError: for a `Budget` without costs or one that cannot be met.

    Example:
      The loss needs ``w[0] = 1`` although ``w[0]`` is the smallest weight: greedy
      magnitude would remove groups 0 and 1; one corrective cycle moves the selection to
      group 2, which the trial drives towards zero on its own.

      >>> import jax.numpy as jnp, numpy as np, hesso_jax as hj
      >>> groups = hj.Groups.from_families([hj.GroupFamily(4, (hj.Member(("w",), 0),))])
      >>> params = {"w": jnp.array([0.1, 0.2, 1.0, 2.0])}
      >>> loss = lambda p: jnp.sum((p["w"] - jnp.array([1.0, 0.0, 0.0, 2.0])) ** 2)
      >>> res = hj.cric(loss, params, groups, 2, sample_steps=4, learning_rate=0.45,
      ...               saliency="magnitude")
      >>> np.asarray(res.redundant).tolist(), int(res.cycles)
      ([False, True, True, False], 1)
    """
    if not isinstance(groups, Groups):
        raise TypeError(f"groups must be a hesso_jax.Groups, got {type(groups).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    config = CricConfig(sample_steps, learning_rate, tolerance, max_cycles, saliency)
    G = groups.num_groups
    select = None
    if isinstance(K, Budget):
        select, k = _budget_rule(K, groups, costs), 0
    else:
        k = resolve_count(K, G)
    groups.validate(params, dependents="present")
    return cric_select(loss_fn, params, groups, k, jnp.ones([G], bool), config,
                       target_saliency(saliency, K), config.cycle_cap(G, k), select=select)


def _budget_rule(budget: Budget, groups: Groups, costs: GroupCosts | None) -> Select:
    """One-shot `budget_select` rule of `cric` (all groups alive, whole requirement)."""
    costs = costs if costs is not None else getattr(groups, "costs", None)
    if costs is None:
        raise ValueError("cric with a Budget needs the groups' costs: use groups from "
                         "hj.discover_groups(model, x) or pass "
                         "costs=hj.group_costs(model, groups, x)")
    rb = resolve_budget(budget, groups, costs, who="cric")
    alive = jnp.ones([groups.num_groups], bool)
    target = rb.period_target(0, 1)
    floor = FamilyFloor.build(groups, budget_min_keep(0), who="cric")  # one group a family

    def select(scores: jax.Array, candidates: jax.Array) -> jax.Array:
        protected = floor.protected(scores, alive) | (alive & ~candidates)
        return budget_select(scores, rb.tables, alive, protected, target)

    return select
