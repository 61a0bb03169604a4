"""HESSO as an optax gradient transformation (arXiv 2409.09085, Algorithm 1).

``hesso(groups, K, P, Tp, warmup_steps=Tw)`` goes **last** in an ``optax.chain``, after the
base optimizer, and rewrites the base update ``u`` so that, with ``x`` the parameters:

1. *Warm-up* (steps ``t < Tw``): ``x ← x + u`` (the update passes through unchanged).
2. *Pruning*: ``P`` periods of ``Tp`` steps. At the first step of period ``p`` the
   saliency ``s = saliency(x, u)`` (`hesso_jax.saliency`) is computed, and the ``K̂_p``
   still-important groups with the lowest scores become the period's redundant set
   ``G_R`` (ties broken by group index). ``K̂_p = ⌊K/P⌋``, the remainder going to the last
   period, so ``Σ_p K̂_p = K``. During step ``s = 0..Tp-1`` of the period

       [x]_{G_R} ← γ_s · ([x]_{G_R} + [u]_{G_R}),   γ_s = (Tp − s − 1) / (Tp − s),

   so ``γ_{Tp−1} = 0`` and the redundant groups are exactly ``0.0`` at the period's end
   (the product ``Π_{j≤s} γ_j = (Tp − s − 1)/Tp`` telescopes: a steady shrink towards 0).
   They then join the pruned set, which is held at exactly ``0.0`` for ever after.
3. *Fine-tune*: ``x ← x + u`` for the important groups, pruned groups stay ``0.0``.

Every element outside ``G_R`` and the pruned set receives ``u`` bit-for-bit. The rewritten
update of a projected element is ``u' = c·(x + u) − x`` with ``c = γ_s`` (or ``0`` once
pruned); ``optax.apply_updates`` then computes ``x + u'``, which is exactly ``0`` when
``c = 0`` because ``x + (−x) = 0`` in IEEE arithmetic, for every float dtype.

The period logic is a state machine on the step counter inside the jitted update: the
period start (saliency + selection, ``O(params + G log G)``) runs under ``lax.cond``; an
ordinary step costs one gather of a length-``G`` mask per grouped leaf and one ``where``,
fused into ``apply_updates``.

Cost of an ordinary step (issue 14; ``benchmarks/step_cost.py``, ``benchmarks/overhead.py``,
``tests/test_step_structure.py``). A base step such as Adam's is memory-bound: one fused
pass reads ``g, m, v, x`` and writes ``m, v, x`` (``≈ 7N`` words), and its update ``u`` is
never written to memory. Every operand of a ``lax.cond`` is a buffer on *every* step, and
XLA:CPU fuses no reduction into the elementwise pass, so a period start that reads ``u``
makes every step write it (``+4N`` bytes of scratch, 1.1–1.3× Adam's step on a 10 M
parameter MLP); computing the statistics outside the ``lax.cond`` is worse (two more
passes). Hence the period start reads only what is in memory anyway:

* ``hesso(..., base=optax.adam(lr))`` (the *fused form*, recommended): HESSO is given the
  base optimizer and recomputes ``u = base.update(g, s_t, x_t)`` inside the period start's
  ``lax.cond`` from the gradient, the base state and the parameters, so the default
  direction ``u`` (the reference's: Only-Train-Once scores with the base optimizer's
  "gradient variant", Adam's ``m̂/(√v̂ + ε) ∝ −u``) costs no buffer; ``direction="gradient"``
  reads the gradient it is given. Same state structure and updates as
  ``optax.chain(base, hesso(...))``.
* In ``optax.chain(base, hesso(...))`` HESSO sees only ``u``: ``direction="gradient"`` with
  ``update(..., grad=grads)``, or a saliency of magnitudes only, read no ``u``; the default
  ``direction="update"`` reads ``u`` and pays the ``+4N`` above on every step.

With donated buffers the parameters and moments are overwritten in place, and XLA copies
a donated buffer that a ``lax.cond`` reads unless the overwrite provably comes after it;
every write is therefore made data-dependent on every read of the old values, the
``lax.cond`` results and the probe's gathers (`_after`, a bit-exact ``u − (+0)``), so no
parameter, moment or state array is copied.

Placement check (`hesso_jax.placement`). HESSO projects *parameters*, so it must see the
final update and its update must be applied unchanged. Every update compares a few sampled
parameter elements bit for bit with ``x_{t−1} + u'_{t−1}`` (kept in the state), so a
transformation after HESSO is reported at the second update; the first update after every
period end verifies that each pruned group is exactly zero. Non-finite parameters get their
own error (since when; wrap the chain in ``optax.apply_if_finite``; a missing base
optimizer when HESSO is first in its chain). Both run from one ``jax.pure_callback`` under
a ``lax.cond`` taken only on those steps, so a run never ends as a silently unpruned model.
Wrappers that keep a second copy of the parameters (``optax.contrib.schedule_free``,
``optax.lookahead``) are refused at ``init``.

Sharding. Under ``jax.jit`` with ``NamedSharding`` parameters (data parallel or FSDP, on
``AxisType.Auto`` or ``AxisType.Explicit`` meshes) the per-group vectors (scores, masks,
``γ``) are replicated (`hesso_jax.saliency.replicate`) before any sort, so every device
selects the same groups; parameter-shaped arrays (the rewritten update) keep the
parameters' sharding, and so does the base optimizer's state. The ``lax.cond`` branches
return replicated vectors on both sides.

Checkpoints. The state is arrays only: ``optax.chain``'s whole state (base optimizer, period
state, masks, scores) round-trips through orbax restored against
``jax.eval_shape(tx.init, params)``, and a restored run continues bit for bit (the state
machine reads nothing but ``count`` and the masks).

Non-finite gradients. Wrap the *whole* chain, ``optax.apply_if_finite(optax.chain(base,
hesso(...)), max_consecutive_errors)``: a skipped step then leaves HESSO's state (step
counter, masks) and the parameters unchanged, so the pruning schedule neither advances nor
projects on it. Wrapping only the base optimizer would feed HESSO zero updates that still
count as steps (and still shrink the redundant groups).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hesso_jax import placement
from hesso_jax.budget import (
    METRICS,
    Budget,
    ResolvedBudget,
    budget_min_keep,
    budget_select,
    resolve_budget,
    target_saliency,
)
from hesso_jax.costs import GroupCosts
from hesso_jax.cric import CricConfig, cric_select
from hesso_jax.groups import (
    Groups,
    Layout,
    check_int,
    format_path,
    resolve_count,
    tree_paths,
)
from hesso_jax.projection import FamilyFloor, bottom_k, gamma, project
from hesso_jax.saliency import (
    SaliencyFn,
    evaluate,
    needs_direction,
    nonzero_counts,
    replicate,
    resolve_saliency,
)

__all__ = ["HessoSchedule", "HessoState", "HessoStatus", "hesso", "hesso_status",
           "resolve_count", "schedule_counts"]


class HessoState(NamedTuple):
    """HESSO's optimizer state: arrays only, so orbax and ``lax.cond`` handle it.

    Attributes:
      count: ``int32[]`` HESSO updates applied so far.
      redundant: ``bool[G]`` groups being projected during the current period.
      pruned: ``bool[G]`` groups held at exactly 0.0.
      scores: ``float32[G]`` saliency computed at the last period start (accumulated over
        the trials when CRIC selects).
      cric_cycles: ``int32[]`` corrective cycles CRIC ran at the last period start (0 when
        CRIC is off).
      schedule: ``int32[4]`` the `HessoSchedule` ``(warmup_steps, periods, period_len,
        k)`` (`HessoSchedule.as_array`), for `hesso_status`; with a `Budget` ``k`` is
        negative, ``-1 − code`` (`_budget_code`).
      probe: ``uint32[PROBE_SIZE]`` bits of ``x + u'`` at the sampled elements after the
        last update: what the parameters must hold at the next one (`hesso_jax.placement`).
      probe_tol: ``float32[PROBE_SIZE]`` how far the parameters may be from ``probe``
        (rounding of a recomputed update, `hesso_jax.placement.tolerance`).
      probe_key: ``int32[]`` the probe layout it was written for (0: not armed).
      cric_rejected: ``int32[]`` period starts whose CRIC selection rejected a trial with a
        non-finite loss or score (`hesso_jax.cric`).
      fault: ``int32[FAULT_SIZE]`` the first placement fault found by
        ``hesso(..., on_fault="record")`` (`hesso_jax.placement.record`; zeros: none, and
        always with the default ``on_fault="raise"``), raised by `check_faults`.
    """

    count: jax.Array
    redundant: jax.Array
    pruned: jax.Array
    scores: jax.Array
    cric_cycles: jax.Array
    schedule: jax.Array
    probe: jax.Array
    probe_tol: jax.Array
    probe_key: jax.Array
    cric_rejected: jax.Array
    fault: jax.Array


class HessoSchedule(NamedTuple):
    """The schedule constants of Algorithm 1, as stored in ``HessoState.schedule``.

    The state keeps them as one ``int32[4]`` array in this field order (checkpoints stay
    arrays only); `from_array` / `as_array` convert, so no code reads them by position.

    Attributes:
      warmup_steps: ``T_w``, plain steps before the first period.
      periods: ``P``, the number of pruning periods.
      period_len: ``T_p``, steps per period.
      k: ``K``, the total number of groups pruned; ``-1 − code`` (negative) when K is a
        `Budget` (`_budget_code`).
    """

    warmup_steps: int
    periods: int
    period_len: int
    k: int

    @classmethod
    def from_array(cls, schedule: Any) -> HessoSchedule:
        """The schedule recorded in a state's ``int32[4]`` ``schedule`` field (host)."""
        return cls(*(int(v) for v in np.asarray(schedule).reshape(-1)))

    def as_array(self) -> np.ndarray:
        """``int32[4]``: the state's ``schedule`` field."""
        return np.asarray([self.warmup_steps, self.periods, self.period_len, self.k],
                          np.int32)


def schedule_counts(K: int, P: int) -> tuple[int, ...]:
    """``K̂_p`` for each period: ``⌊K/P⌋`` each, the remainder in the last period."""
    base = K // P
    return tuple([base] * (P - 1) + [K - base * (P - 1)])


def _check_updates(updates: Any, params: Any, what: str = "update") -> None:
    """Raises a ValueError unless ``updates`` (the update, or ``grad``) matches ``params``."""
    u_leaves, p_leaves = jax.tree.leaves(updates), jax.tree.leaves(params)
    if len(u_leaves) != len(p_leaves):
        raise ValueError(
            f"hesso: {what}s have {len(u_leaves)} leaves but params have {len(p_leaves)}")
    for path, u, p in zip(tree_paths(params), u_leaves, p_leaves, strict=True):
        if jnp.shape(u) != jnp.shape(p):
            raise ValueError(
                f"hesso: {what} {format_path(path)!r} has shape {jnp.shape(u)} but the "
                f"parameter has shape {jnp.shape(p)}")


Signature = tuple[tuple[tuple[int, ...], str], ...]


def _signature(params: Any) -> Signature:
    """Static ``(shape, dtype)`` of every leaf (arrays, tracers or ShapeDtypeStructs)."""
    return tuple((tuple(jnp.shape(x)), str(getattr(x, "dtype", type(x).__name__)))
                 for x in jax.tree.leaves(params))


def _check_signature(seen: list[Signature], params: Any) -> None:
    """Raises a ValueError if ``params`` differs from every tree given to ``init``.

    Compared: number of leaves, each leaf's shape and dtype. No check when the
    transformation never saw an init (e.g. a checkpoint restored into a fresh process
    without ``eval_shape(tx.init, ...)``).
    """
    if not seen:
        return
    sig = _signature(params)
    if sig in seen:
        return
    ref = seen[-1]
    if len(sig) != len(ref):
        raise ValueError(
            f"hesso: params have {len(sig)} leaves but the tree given to init had "
            f"{len(ref)}; params must keep their structure between init and update")
    for path, (shape, dtype), (ref_shape, ref_dtype) in zip(tree_paths(params), sig, ref,
                                                             strict=True):
        if (shape, dtype) != (ref_shape, ref_dtype):
            raise ValueError(
                f"hesso: parameter {format_path(path)!r} is {dtype}{list(shape)} but was "
                f"{ref_dtype}{list(ref_shape)} at init; params must keep their shapes and "
                "dtypes between init and update (re-create the optimizer state after "
                "surgery or a dtype cast)")


def _nan_unless_finite(x: jax.Array) -> jax.Array:
    """``x − x`` in float32: ``0`` where ``x`` is finite, NaN where it is NaN or ±inf."""
    x = x.astype(jnp.float32)
    return x - x


def _pruned_magnitude(layout: Layout, leaves: list[Any], pruned: jax.Array) -> jax.Array:
    """``float32[]``: ``Σ_e |x_e|·1[e ∈ pruned group]`` over the member elements ``e``.

    ``leaves`` are the parameters' leaves, ``layout`` the groups' layout of them. A sum of
    non-negative terms is ``0`` only when every term is, so for finite parameters the
    result is ``0`` exactly when every member element of a ``pruned`` group is ``±0``
    (``+inf`` when the sum overflows: never ``0`` otherwise; subnormals read as ``0``, as
    ``x != 0`` reads them on XLA:CPU). A non-finite element of any member leaf makes it
    NaN (``inf·0``). The mask is a float factor, not a ``where``: XLA:CPU then fuses
    ``|x|·mask`` into the library reduction that sums it, where a ``select`` on the
    broadcast mask is first written to a leaf-sized buffer (``(64, 10⁴)``: 0.57 vs 0.83 ms
    with the finiteness sum).
    """
    ext = jnp.concatenate([pruned, jnp.zeros([1], bool)]).astype(jnp.float32)
    total = jnp.zeros([], jnp.float32)
    for m in layout.members:
        x = jnp.abs(jnp.asarray(leaves[m.leaf]).astype(jnp.float32))
        total = total + jnp.sum(x * m.expand(ext))
    return total


def _all_finite(tree: Any) -> jax.Array:
    """``bool[]``: every float element of ``tree`` is finite.

    ``Σ (x − x)`` is ``0`` when every ``x`` is finite and NaN otherwise
    (``inf − inf = NaN``), so each leaf is one fused subtract-reduce: no array the size
    of the leaf (``all(isfinite(x))`` materialises a ``bool`` one on XLA:CPU, and
    ``Σ x·0`` a broadcast zero).
    """
    sums = [jnp.sum(_nan_unless_finite(leaf)) for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.isfinite(sum(sums, jnp.zeros([], jnp.float32)))


def _clean_period_end(groups: Groups, params: Any, pruned: jax.Array) -> jax.Array:
    """``bool[]``: the period-end check's cheap verdict.

    True when every member element of a ``pruned`` group is ``±0`` and every float
    element of ``params`` is finite. `_pruned_magnitude` multiplies every element of
    each member leaf by its group's mask, so a non-finite element anywhere in such a
    leaf already makes it NaN (``inf·0``): only the other leaves need `_all_finite`.
    One read of each leaf.
    """
    layout = groups.layout(params, dependents="present")
    leaves = jax.tree.leaves(params)
    members = {m.leaf for m in layout.members}
    others = [leaf for i, leaf in enumerate(leaves) if i not in members]
    return (_pruned_magnitude(layout, leaves, pruned) == 0) & _all_finite(others)


def _is_params_placeholder(params: Any) -> bool:
    """True for the one object ``optax.tree.map_params`` inits a transformation with.

    It stands for the whole parameter tree, so there is nothing to validate; HESSO's state
    (length-``G`` vectors and scalars) holds no parameter-shaped leaf for it to map.
    """
    return type(params).__name__ == "_ParamsPlaceholder"


def _concrete(*trees: Any) -> bool:
    """True when no leaf is a tracer (the update runs eagerly, outside jit/scan)."""
    return not any(isinstance(x, jax.core.Tracer) for t in trees for x in jax.tree.leaves(t))


class _Extra(NamedTuple):
    """The keyword-only extra arguments of ``update`` that HESSO reads."""

    value_fn: Callable[[Any], jax.Array] | None
    grad: Any


class _Phase(NamedTuple):
    """Where the update with counter ``count`` falls in the schedule (traced scalars).

    With ``k = count − Tw`` (Algorithm 1): ``in_prune = 0 ≤ k < P·Tp``, ``s = k mod Tp``
    (step inside the period), ``period = ⌊k/Tp⌋`` clipped to ``[0, P)``, ``start`` the
    first and ``end`` the last step of a period, ``after_end`` the first update after a
    period end (``Tp ≤ k ≤ P·Tp``, ``k mod Tp = 0``), where the placement check runs.
    """

    in_prune: jax.Array
    s: jax.Array
    period: jax.Array
    start: jax.Array
    end: jax.Array
    after_end: jax.Array


class _Prologue(NamedTuple):
    """What `_Hesso._prologue` computed before the projection (traced values)."""

    layout: Layout
    phase: _Phase
    state: HessoState  # with its per-group vectors replicated
    probe: placement.ProbeSites
    x_sample: list[jax.Array]
    check: jax.Array  # int32[] 0: the placement check's result
    redundant: jax.Array  # G_R (the period start's selection, or the state's)
    scores: jax.Array
    cycles: jax.Array
    rejected: jax.Array
    fault: jax.Array  # HessoState.fault after the check


def _phase(count: jax.Array, Tw: int, P: int, Tp: int) -> _Phase:
    """The `_Phase` of the update whose HESSO counter is ``count``."""
    k = count - Tw
    in_prune = (k >= 0) & (k < P * Tp)
    s = jnp.where(k >= 0, k % Tp, 0)
    return _Phase(in_prune=in_prune, s=s, period=jnp.clip(k // Tp, 0, P - 1),
                  start=in_prune & (s == 0), end=in_prune & (s == Tp - 1),
                  after_end=(k >= Tp) & (k <= P * Tp) & (k % Tp == 0))


_CODE_BASE = 10002  # a fraction's code: 0 = not set, else round(fraction · 10⁴) + 1


def _budget_code(budget: Budget) -> int:
    """The schedule's K entry for ``budget``: ``-1 − (c_params · 10002 + c_flops)``.

    Each code is ``round(fraction · 10⁴) + 1`` (0 when unset), so the state's ``int32``
    schedule records the budget to 10⁻⁴ and `hesso_status` can report it.
    """
    codes = [0 if getattr(budget, m) is None else round(getattr(budget, m) * 1e4) + 1
             for m in METRICS]
    return -1 - (codes[0] * _CODE_BASE + codes[1])


def _decode_budget(k: int) -> Budget | None:
    """The `Budget` a negative schedule K entry records (None for a count)."""
    if k >= 0:
        return None
    fracs = [(c - 1) / 1e4 if c else None for c in divmod(-1 - k, _CODE_BASE)]
    return Budget(params=fracs[0], flops=fracs[1])


def _budget_rule(rb: ResolvedBudget, alive: jax.Array, period: jax.Array,
                 P: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``select(scores, candidates) -> bool[G]``: `budget_select` towards period's target.

    ``alive`` are the unpruned groups; those of them outside ``candidates`` (the floors)
    are protected. The cumulative target after ``period`` is ``(period + 1)/P`` of the
    required removal, so an overshoot is taken off the next period.
    """
    target = rb.period_target(period, P)

    def select(scores: jax.Array, candidates: jax.Array) -> jax.Array:
        return budget_select(scores, rb.tables, alive, alive & ~candidates, target)

    return select


@dataclasses.dataclass(frozen=True)
class _Hesso:
    """The static configuration of one `hesso` transformation and its init/update.

    ``update`` runs Algorithm 1 in four steps: `_phase` (where the counter is in the
    schedule), ``_select`` (the period start's redundant set ``G_R``, under ``lax.cond``),
    ``_project`` (``u' = c·(x + u) − x`` on ``G_R`` and the pruned set) and ``_advance``
    (the next state); ``_check`` runs the placement checks (`hesso_jax.placement`).
    """

    groups: Groups
    Tw: int
    P: int
    Tp: int
    per_period: np.ndarray  # int32[P]: K̂_p
    score_fn: SaliencyFn
    floor: FamilyFloor | None
    cric: CricConfig | None
    cric_score: SaliencyFn | None
    cric_cap: int
    schedule: HessoSchedule  # k < 0 for a budget
    check_updates: bool = True
    on_fault: str = "raise"  # "record": faults go to the state, no host callback
    budget: ResolvedBudget | None = None  # K = hj.Budget(...): budget_select per period
    direction: str = "update"  # the saliency's d: "update" (u_t) or "gradient" (−∇f(x_t))
    fallback: SaliencyFn | None = None  # the default budget score without a gradient
    seen: list[Signature] = dataclasses.field(default_factory=list)  # trees given to init
    context: dict[str, bool] = dataclasses.field(default_factory=dict)  # from init's callers

    @property
    def G(self) -> int:
        return self.groups.num_groups

    def init(self, params: Any, *, fused: Callable[..., Any] | None = None) -> HessoState:
        """The initial `HessoState`; ``fused``: the init of `_fused`'s transformation."""
        if not _is_params_placeholder(params):
            self.groups.validate(params, dependents="present")
            no_base = placement.check_context(fused or self.init)
            self.context["no_base"] = no_base and fused is None
            sig = _signature(params)
            if sig not in self.seen:
                self.seen.append(sig)
        G = self.G
        return HessoState(
            count=jnp.zeros([], jnp.int32),
            redundant=jnp.zeros([G], bool),
            pruned=jnp.zeros([G], bool),
            scores=jnp.zeros([G], jnp.float32),
            cric_cycles=jnp.zeros([], jnp.int32),
            schedule=jnp.asarray(self.schedule.as_array()),
            probe=jnp.zeros([placement.PROBE_SIZE], jnp.uint32),
            probe_tol=jnp.zeros([placement.PROBE_SIZE], jnp.float32),
            probe_key=jnp.zeros([], jnp.int32),
            cric_rejected=jnp.zeros([], jnp.int32),
            fault=jnp.zeros([placement.FAULT_SIZE], jnp.int32),
        )

    def update(self, updates: Any, state: HessoState, params: Any = None, *,
               value_fn: Callable[[Any], jax.Array] | None = None, grad: Any = None,
               **extra_args: Any) -> tuple[Any, HessoState]:
        """One HESSO update: phase → select → project → advance (Algorithm 1).

        Keyword-only: ``value_fn`` (``params -> scalar`` loss; CRIC, and
        ``direction="gradient"`` without ``grad``) and ``grad`` (the raw gradient ``∇f(x_t)``,
        read by ``direction="gradient"``); other extra arguments are ignored.
        """
        del extra_args  # optax passes the chain's extra arguments to every member
        extra = _Extra(value_fn, grad)
        impl = self._given(extra)
        return impl._finish(impl._prologue(updates, state, params, extra), params, updates)

    def _given(self, extra: _Extra) -> _Hesso:
        """Returns self, or self with its ``fallback`` when the update brings no gradient.

        Under a `Budget` the default score, `hesso_jax.saliency.budget_saliency`, reads
        ``−∇f(x_t)``; a chain's update without ``grad`` or ``value_fn`` has only ``u_t``,
        so it scores with the additive mix on ``u_t`` instead, and says so (at trace time).
        """
        if self.fallback is None or extra.grad is not None or callable(extra.value_fn):
            return self
        warnings.warn(
            "hesso with a hj.Budget ranks groups by budget_saliency() on the raw gradient, "
            "which this update does not get, so it scores with the additive mix on the "
            "update u instead. Pass the gradient, free: tx.update(grads, state, params, "
            "grad=grads); or use hj.hesso(..., base=optimizer), which has it; or choose "
            "saliency= explicitly.", UserWarning, stacklevel=4)
        return dataclasses.replace(self, score_fn=self.fallback, direction="update",
                                   fallback=None)

    def _prologue(self, updates: Any, state: HessoState, params: Any, extra: _Extra,
                  recompute: Callable[[], Any] | None = None) -> _Prologue:
        """Everything before the projection: checks, phase, placement check, selection.

        ``recompute`` (the fused form, `_fused`): returns the base update ``u`` inside the
        period start's ``lax.cond``, for ``direction="update"``; ``updates`` then serves
        only for its shapes.
        """
        layout = self._validate(updates, state, params, extra)
        # Per-group vectors stay replicated, so both lax.cond branches agree on sharding.
        state = state._replace(redundant=replicate(state.redundant),
                               pruned=replicate(state.pruned),
                               scores=replicate(state.scores))
        ph = _phase(state.count, self.Tw, self.P, self.Tp)
        probe = placement.probe_sites(params, layout)
        x_sample = placement.sample(params, probe)
        check, fault = self._check(ph, state, params, probe, x_sample)
        selected = jax.lax.cond(
            ph.start, lambda: self._select(ph, state, params, updates, extra, recompute),
            lambda: (state.redundant, state.scores, state.cric_cycles,
                     jnp.zeros([], jnp.int32)))
        return _Prologue(layout, ph, state, probe, x_sample, check, *selected, fault)

    def _finish(self, pro: _Prologue, params: Any, updates: Any) -> tuple[Any, HessoState]:
        """The projection ``u' = c·(x + u) − x`` of ``updates`` and the next state."""
        layout, ph, state, probe, x_sample, check = pro[:6]
        redundant, scores, cycles, rejected = pro.redundant, pro.scores, pro.cycles, pro.rejected
        coef = jnp.where(redundant & ph.in_prune, gamma(ph.s, self.Tp), 0.0)
        new_updates = project(layout, updates, params, redundant | state.pruned, coef)
        u_sample = placement.sample(new_updates, probe)
        expected = placement.predicted(x_sample, u_sample)
        tol = placement.tolerance(x_sample, u_sample)
        new_state = self._advance(ph, state, redundant, scores, cycles, check)._replace(
            probe=expected, probe_tol=tol, probe_key=jnp.asarray(probe.key, jnp.int32),
            cric_rejected=state.cric_rejected + rejected, fault=pro.fault)
        # Every in-place write (parameters, state) after every read of the old values:
        # the conds' results and the probe's gathers (they recompute u' from x_t).
        last = _tie(check, rejected, pro.fault, expected, tol)
        return _after(new_updates, last), _after(new_state, last)

    def _validate(self, updates: Any, state: Any, params: Any, extra: _Extra) -> Layout:
        """Trace-time checks of one update call; returns the groups' layout of ``params``."""
        if params is None:
            raise ValueError("hesso needs the parameters: call update(updates, state, params)")
        if not isinstance(state, HessoState):
            raise TypeError(f"hesso: expected a HessoState, got {type(state).__name__}")
        layout = self.groups.layout(params, dependents="present")
        _check_signature(self.seen, params)
        _check_updates(updates, params)
        if jnp.shape(state.redundant) != (self.G,):
            raise ValueError(
                f"hesso: the state's masks have shape {jnp.shape(state.redundant)} but groups "
                f"has {self.G} groups; was the state created for other groups?")
        if self.cric is not None and not callable(extra.value_fn):
            raise ValueError(
                "hesso(cric=...) needs the loss: pass the extra argument value_fn "
                "(params -> scalar loss on the current batch) to update, e.g. "
                "tx.update(grads, state, params, value_fn=loss_fn)")
        if self.direction == "gradient" and extra.grad is not None:
            _check_updates(extra.grad, params, "grad")
        elif self.direction == "gradient" and not callable(extra.value_fn):
            raise ValueError(
                'hesso(direction="gradient") needs the gradient: pass the extra argument '
                "grad (the raw gradient, free: it is already in memory) or value_fn (the "
                "loss, recomputed at period starts) to update, e.g. "
                "tx.update(grads, state, params, grad=grads)")
        return layout

    def _check(self, ph: _Phase, state: HessoState, params: Any,
               probe: placement.ProbeSites, x_sample: list[jax.Array]
               ) -> tuple[jax.Array, jax.Array]:
        """The placement checks (`hesso_jax.placement`).

        ``x_sample`` holds the probe's elements of ``params``. The ``lax.cond`` is taken
        right after each period end (P times per run) and whenever the probe shows a
        mismatch or a non-finite parameter: the step then raises (``on_fault="raise"``),
        or the first fault is kept in the state (``"record"``, `_record`). Inside it a
        cheap verdict (``suspect``: the probe's flags and `_clean_period_end`) gates a
        second ``lax.cond`` that computes `diagnose`'s operands (per-group nonzero
        counts), so a clean period end never computes them. Returns
        ``(int32[] 0, fault)``, the state's ``fault`` after the check.
        """
        found = placement.as_probe(x_sample)
        armed = state.probe_key == probe.key
        sampled_nonfinite = ~placement.finite(x_sample)
        hints = placement.hints_for(params, probe, self.context.get("no_base"))
        missed = placement.mismatch(found, state.probe, state.probe_tol, hints.dtypes)
        mismatch = armed & ~sampled_nonfinite & jnp.any(missed)
        if not self.check_updates:
            mismatch = jnp.zeros([], bool)

        def diagnose_operands() -> tuple[jax.Array, ...]:
            bad = ph.after_end & state.pruned & (nonzero_counts(self.groups, params) > 0)
            finite = _all_finite(params)
            info = jnp.stack([state.count, mismatch, sampled_nonfinite,
                              ph.after_end & ~finite]).astype(jnp.int32)
            return bad, info, state.probe, found, missed

        def suspect() -> jax.Array:  # cheap verdict first: the operands only on a fault
            clean = _clean_period_end(self.groups, params, state.pruned)
            return mismatch | sampled_nonfinite | (ph.after_end & ~clean)

        alarm = ph.after_end | mismatch | sampled_nonfinite
        kept = state.fault
        if self.on_fault == "record":
            return jnp.zeros([], jnp.int32), self._record(alarm, suspect, diagnose_operands,
                                                          kept, probe)
        if _concrete(state.count, params):  # eager call: a plain ValueError
            if bool(alarm):
                placement.diagnose(*(np.asarray(op) for op in diagnose_operands()),
                                   hints=hints)
            return jnp.zeros([], jnp.int32), kept
        # The callback's result (always 0) feeds the counter so it cannot be optimised
        # away. Its presence alone costs every step: JAX runs a program holding a host
        # callback on its slow dispatch path and, on CPU, synchronously (on_fault="record").
        zero = jnp.zeros([], jnp.int32)

        def check() -> jax.Array:
            return jax.lax.cond(
                suspect(), lambda: placement.placement_check(diagnose_operands(), params,
                                                             hints), lambda: zero)

        return jax.lax.cond(alarm, check, lambda: zero), kept

    def _record(self, alarm: jax.Array, suspect: Callable[[], jax.Array],
                operands: Callable[[], tuple[jax.Array, ...]], kept: jax.Array,
                probe: placement.ProbeSites) -> jax.Array:
        """``on_fault="record"``: the state's first fault, or this step's (no host call).

        The operands of `hesso_jax.placement.diagnose` are computed under the same
        ``lax.cond`` s as in ``"raise"`` mode (``alarm``, then ``suspect()``) and packed
        (`hesso_jax.placement.record`); a fault already kept stays (and no later step
        computes them), so `check_faults` reports the first one. A check that finds
        nothing leaves ``kept`` as it was.
        """
        no_base = self.context.get("no_base")

        def check() -> jax.Array:
            return jax.lax.cond(suspect(),
                                lambda: placement.record(operands(), probe, no_base),
                                lambda: kept)

        return jax.lax.cond(alarm & ~placement.recorded(kept), check, lambda: kept)

    def _select(self, ph: _Phase, state: HessoState, params: Any, updates: Any,
                extra: _Extra, recompute: Callable[[], Any] | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Period start: ``G_R`` = the ``K̂_p`` lowest-scoring unpruned groups (or CRIC's).

        With a budget, ``G_R`` is `budget_select`'s knapsack greedy towards the period's
        cumulative target instead of a fixed count (also as CRIC's selection rule).
        Returns ``(G_R, scores, CRIC cycles, CRIC rejected trials)``.
        """
        k_hat = jnp.asarray(self.per_period)[ph.period]
        alive = ~state.pruned
        candidates = alive
        scores = None
        if self.floor is not None or self.cric is None:
            scores = evaluate(self.score_fn, params,
                              self._direction(params, updates, extra, recompute),
                              self.groups)
        if self.floor is not None:
            candidates = self.floor.candidates(scores, candidates)
        select = None
        if self.budget is not None:
            select = _budget_rule(self.budget, alive, ph.period, self.P)
        if self.cric is not None:
            res = cric_select(extra.value_fn, params, self.groups, k_hat, candidates, self.cric,
                              self.cric_score, self.cric_cap, select=select)
            return res.redundant, res.scores, res.cycles, res.rejected
        zero = jnp.zeros([], jnp.int32)
        if select is not None:
            return select(scores, candidates), scores, zero, zero
        return bottom_k(scores, candidates, k_hat), scores, zero, zero

    def _direction(self, params: Any, updates: Any, extra: _Extra,
                   recompute: Callable[[], Any] | None = None) -> Any:
        """The saliency's direction ``d`` at a period start (inside its ``lax.cond``).

        ``u_t`` (``direction="update"``); ``−∇f(x_t)`` (``"gradient"``): ``−grad``, or
        recomputed from ``value_fn``; ``None`` when the saliency reads no direction.
        Whatever is read here is an operand of the ``lax.cond``, which XLA keeps in a
        buffer on every step: ``u_t`` is not otherwise (it fuses into ``apply_updates``),
        the gradient (an output of the backward pass) and the parameters already are.
        """
        if not needs_direction(self.score_fn):
            return None
        if self.direction == "update":
            return updates if recompute is None else recompute()
        grads = extra.grad
        if grads is None:
            assert extra.value_fn is not None  # _validate
            grads = jax.grad(extra.value_fn)(params)
        return jax.tree.map(lambda g: -g, grads)

    def _advance(self, ph: _Phase, state: HessoState, redundant: jax.Array,
                 scores: jax.Array, cycles: jax.Array, check: jax.Array) -> HessoState:
        """The next state: ``G_R`` joins the pruned set at the period's last step."""
        return state._replace(
            count=optax.safe_increment(state.count) + check,
            redundant=redundant & ~ph.end,
            pruned=state.pruned | (redundant & ph.end),
            scores=scores,
            cric_cycles=cycles,
        )


def hesso(
    groups: Groups,
    K: int | float | Budget,
    P: int,
    Tp: int,
    *,
    warmup_steps: int = 0,
    saliency: SaliencyFn | str | Mapping[str, float] | None = None,
    cric: CricConfig | None = None,
    total_steps: int | None = None,
    min_keep: int | float = 0,
    check_updates: bool = True,
    on_fault: str = "raise",
    costs: GroupCosts | None = None,
    direction: str | None = None,
    base: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    """HESSO (Algorithm 1): progressive projection of the least salient groups to zero.

    With ``u_t`` the base optimizer's update (HESSO's input), ``k = t − T_w`` and, during
    period ``p = ⌊k/T_p⌋``, ``s = k mod T_p``, Algorithm 1 of arXiv 2409.09085 applies

        x_{t+1} = x_t + u_t                                  t < T_w, or g ∉ G_R ∪ G_P
        [x_{t+1}]_g = γ_s · ([x_t]_g + [u_t]_g),  g ∈ G_R,   γ_s = (T_p − s − 1)/(T_p − s)
        [x_{t+1}]_g = 0,                          g ∈ G_P (pruned)

    where, at each period start (``s = 0``), ``G_R`` is the ``K̂_p`` unpruned groups of
    lowest ``saliency(x_t, u_t)`` (ties → lower index), ``K̂_p = ⌊K/P⌋`` (the remainder in
    the last period); ``G_R`` joins ``G_P`` at the period's last step, where ``γ = 0``
    makes it exactly ``0.0``. The emitted update is ``u' = c·(x + u) − x`` on
    ``G_R ∪ G_P`` (``c = γ_s``, or 0) and ``u`` bit for bit elsewhere.

    Args:
      groups: the prunable `Groups` (validated against ``params`` at ``init``).
      K: total groups to prune: an int count in ``[0, G)`` or a fraction in (0, 1); or a
        `hesso_jax.Budget`: the shrunk model keeps at most that fraction of the dense
        model's parameters / FLOPs (whole model, unprunable parts included). Each period
        start ``p`` then selects, among the unpruned groups outside the floors, the
        groups of lowest saliency per unit of exact marginal cost until the removed cost
        reaches the cumulative target ``(p+1)/P · (1 − fraction) · dense``
        (`hesso_jax.budget.budget_select`, a jitted knapsack greedy), so the final
        fraction lands in ``[fraction − one group's cost, fraction]``. The costs come
        from ``costs=`` or from ``groups.costs`` (recorded by `discover_groups`).
      P: number of pruning periods (>= 1).
      Tp: steps per pruning period (>= 1); the schedule spans ``warmup_steps + P*Tp``.
      warmup_steps: plain steps before the first period.
      saliency: ``None`` (equal mix of the five scores), a score name, a
        ``{name: weight}`` mapping, or a callable ``fn(params, direction, groups) -> [G]``
        (see `hesso_jax.saliency`). Lowest score = most redundant. With a count ``K`` a
        name, mapping or ``None`` is mixed with ``normalize="norm"`` (the reference's mix).
        With a `hesso_jax.Budget` a name or mapping is mixed with ``normalize="additive"``
        (each score an additive loss-increase estimate, so saliency per unit of cost
        compares heads with neurons; pass ``hesso_jax.saliency.weighted(w,
        normalize="norm")`` for the other), and ``None`` is
        `hesso_jax.saliency.budget_saliency` (additive Taylor-2 on the raw gradient,
        `hesso_jax.budget.target_saliency`): with ``base`` it reads the gradient HESSO is
        given; in ``optax.chain`` pass ``grad=grads`` (free) or ``value_fn`` to
        ``update``; an update with neither scores with the additive mix on ``u_t``
        instead and warns (and ``direction="update"`` asks for that mix).
      cric: ``None`` (greedy bottom-K̂ at period starts) or a `CricConfig`: HESSO-CRIC,
        where each period start selects its K̂ groups with the corrective cycle
        (`hesso_jax.cric`) among the groups not yet pruned. The update then needs the
        keyword-only extra argument ``value_fn`` (``params -> scalar`` loss on the current
        batch), e.g. ``tx.update(grads, state, params, value_fn=loss)`` or
        ``nnx.Optimizer.update(model, grads, value_fn=...)``.
      total_steps: optional step budget of the run (HESSO updates, i.e. optimizer steps
        actually applied). When given, the schedule must fit in it:
        ``warmup_steps + P * Tp <= total_steps``, otherwise the last groups would never
        reach exactly zero (or, with a warm-up longer than the budget, none would) and
        a ValueError is raised here instead of a silently under-pruned model.
      min_keep: per-family floor. Every family keeps at least ``m_f`` groups:
        ``min(min_keep, n_f)`` for an int, ``⌈min_keep · n_f⌉`` for a fraction in (0, 1).
        At each period start the ``m_f`` highest-scoring unpruned groups of every family
        (by the greedy saliency, also under CRIC) are withdrawn from the selection, so a
        high ``K`` cannot remove a whole layer (and with it every path through the
        network). ``0`` (default) is Algorithm 1 as published. Raises a ValueError when
        ``K > G − Σ_f m_f``.
      check_updates: compare, at every update, a few sampled parameter elements bit for
        bit with the previous parameters plus HESSO's previous update, so a HESSO that is
        not last in the chain is reported at the second update (`hesso_jax.placement`).
        Pass False only if you change the parameters between updates on purpose (weight
        clipping, say); the period-end check and the non-finite check stay on.
      on_fault: what the step does when a placement check fails (HESSO not last in the
        chain, a pruned group not zero after its period, NaN/inf parameters).
        ``"raise"`` (default): the step raises (a ``jax.pure_callback`` under a
        ``lax.cond`` taken only then). ``"record"``: the step keeps the first fault in
        its state and training goes on; `check_faults` raises it (the same ValueError),
        so call it where you read results (`hesso_jax.train.train_classifier` does). The
        step then holds no host callback: JAX dispatches a program with one on its slow
        path and, on CPU, synchronously, which costs every step of a dispatch-bound
        model (TinyTransformer on 2 CPU cores: 1.34× Adam's step vs 1.03× with
        ``"record"``, ``benchmarks/step_cost.py``).
      costs: the groups' `hesso_jax.GroupCosts` for a `Budget` ``K`` (default
        ``groups.costs``); e.g. ``hj.group_costs(model, groups, x)`` for hand-made groups.
        `hesso_status` then reports ``target = -1`` and the budget in ``budget``.
      direction: the saliency's direction ``d`` at a period start. ``None`` (default):
        the saliency's own ``direction`` attribute if it has one
        (`hesso_jax.saliency.budget_saliency` carries ``"gradient"``), else ``"update"``.
        ``"update"``: the base optimizer's update ``u_t``, HESSO's input. ``"gradient"``:
        ``−∇f(x_t)``, the quantity Algorithm 1 scores with: the keyword-only extra
        argument ``grad`` of ``update`` (the raw gradient, e.g.
        ``tx.update(grads, state, params, grad=grads)``), or, without it, recomputed from
        ``value_fn`` inside the period start's ``lax.cond`` (one more forward and
        backward pass there). Cost: XLA keeps every operand of a ``lax.cond`` in a
        buffer, on every step, so with ``"update"`` (and a saliency that reads ``d``)
        every step writes ``u`` to a parameter-sized buffer instead of fusing it into
        ``apply_updates`` (``+4·N`` bytes; 1.2–1.3× Adam's step on a memory-bound
        10 M-parameter MLP on CPU); the gradient is a buffer anyway (the backward pass's
        output), so with ``"gradient"``, or a saliency of magnitudes only, an ordinary
        step costs what the base step costs (``benchmarks/step_cost.py``). With ``base``
        the default ``"update"`` costs no buffer either, and ``"gradient"`` reads the
        gradient HESSO is given (no ``grad`` needed).
      base: optional base optimizer, e.g. ``optax.adam(1e-3)``. Given, ``hesso`` returns
        the whole optimizer, ``base`` then HESSO, with the state ``(base_state,
        HessoState)`` of ``optax.chain(base, hesso(...))`` and the same updates; its
        period start recomputes ``u = base.update(g, s_t, x_t)`` inside its ``lax.cond``
        (one more base update there, on period starts only), so an ordinary step never
        writes ``u`` to memory and costs what the base step costs (module docstring).
        ``base`` must be a pure function of its inputs (every optax optimizer is).
        Scratch memory: the period start's branch computes ``u`` into scratch (XLA:CPU
        materialises it for the saliency's several reductions), which XLA shares with
        the base step's buffers where it can (no extra scratch without donation on the
        10 M-parameter MLP, BERT-like, CNN, TinyTransformer); otherwise, e.g. with
        donated buffers, it adds up to one copy of ``u`` that ordinary steps never touch
        (``benchmarks/overhead_targets.md``); ``direction="gradient"`` needs none.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. ``update`` requires ``params``;
      unknown extra keyword arguments are ignored (with ``base`` they are passed on to
      it). Place it last in ``optax.chain``.

    Raises:
      TypeError / ValueError: on bad arguments, before any tracing (a `Budget` without
        costs, or one the floors and unprunable parts make unreachable); at ``init`` inside or
        after ``optax.contrib.schedule_free`` / ``optax.lookahead`` (a second copy of the
        parameters HESSO cannot prune); at ``update`` (at trace time) when the params'
        leaves changed shape or dtype since ``init``, do not match the groups, or the
        updates do not match the params; from the step (a ``ValueError`` inside the
        callback's runtime error under ``jit``) when HESSO is not last in the chain, or the
        parameters are NaN/inf (with ``on_fault="record"``: from `check_faults`).

    Examples:
      Four units (kernel column + bias entry); prune two of them in one period of two steps
      (zero gradients, so only HESSO moves the parameters):

      >>> import jax, jax.numpy as jnp, optax
      >>> import hesso_jax as hj
      >>> params = {"w": jnp.arange(1.0, 13.0).reshape(3, 4), "b": jnp.ones(4)}
      >>> groups = hj.Groups.from_families([hj.GroupFamily(
      ...     4, (hj.Member(("w",), 1), hj.Member(("b",), 0)), name="units")])
      >>> tx = optax.chain(optax.sgd(0.1), hj.hesso(groups, 2, 1, 2))
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.zeros_like, params)
      >>> for _ in range(2):  # γ_0 = 1/2, then γ_1 = 0
      ...     updates, state = tx.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> hj.hesso_status(state).pruned  # the two columns of smallest norm
      array([ True,  True, False, False])
      >>> params["w"].tolist()
      [[0.0, 0.0, 3.0, 4.0], [0.0, 0.0, 7.0, 8.0], [0.0, 0.0, 11.0, 12.0]]

      The fused form: the same run with ``base`` (an ordinary step never writes ``u``):

      >>> tx = hj.hesso(groups, 2, 1, 2, base=optax.sgd(0.1))
      >>> params = {"w": jnp.arange(1.0, 13.0).reshape(3, 4), "b": jnp.ones(4)}
      >>> state = tx.init(params)
      >>> for _ in range(2):
      ...     updates, state = tx.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> hj.hesso_status(state).pruned
      array([ True,  True, False, False])
    """
    if not isinstance(groups, Groups):
        raise TypeError(f"groups must be a hesso_jax.Groups, got {type(groups).__name__}")
    G = groups.num_groups
    if G < 1:
        raise ValueError("groups has no prunable groups (G = 0)")
    P = check_int("P (number of pruning periods)", P, 1)
    Tp = check_int("Tp (steps per pruning period)", Tp, 1)
    Tw = check_int("warmup_steps", warmup_steps, 0)
    _check_fits(Tw, P, Tp, total_steps)
    if cric is not None and not isinstance(cric, CricConfig):
        raise TypeError(f"cric must be None or a hesso_jax.CricConfig, got {cric!r}")
    score_fn, fallback = _default_saliency(saliency, K, direction)
    rb, k_code = None, 0
    if isinstance(K, Budget):
        rb = _resolve_hesso_budget(K, groups, costs, min_keep)
        floor = FamilyFloor.build(groups, budget_min_keep(min_keep))
        per_period = np.zeros(P, np.int32)  # unused: budget_select sizes each period
        k_code = _budget_code(K)
    else:
        k_code = resolve_count(K, G)
        floor = FamilyFloor.build(groups, min_keep, k_code)
        per_period = np.asarray(schedule_counts(k_code, P), np.int32)
    cric_score, cric_cap = None, 0
    if cric is not None:
        cric_score = target_saliency(cric.saliency, K) if cric.saliency else score_fn
        cric_cap = cric.cycle_cap(G, int(per_period.max()))
    schedule = HessoSchedule(warmup_steps=Tw, periods=P, period_len=Tp, k=k_code)
    if not isinstance(check_updates, bool):
        raise TypeError(f"check_updates must be a bool, got {check_updates!r}")
    if on_fault not in ("raise", "record"):
        raise ValueError(f'on_fault must be "raise" or "record", got {on_fault!r}')
    if direction is None:  # the saliency says which direction it is meant for
        direction = getattr(score_fn, "direction", "update")
    if direction not in ("update", "gradient"):
        raise ValueError(f'direction must be "update" or "gradient", got {direction!r}')
    impl = _Hesso(groups, Tw, P, Tp, per_period, score_fn, floor, cric, cric_score, cric_cap,
                  schedule, check_updates, on_fault, budget=rb, direction=direction,
                  fallback=fallback)
    if base is not None:
        if not (callable(getattr(base, "init", None)) and callable(getattr(base, "update", None))):
            raise TypeError(f"base must be an optax.GradientTransformation, got {base!r}")
        return _fused(impl, base)
    return optax.GradientTransformationExtraArgs(impl.init, impl.update)


def _default_saliency(saliency: Any, K: Any, direction: str | None
                      ) -> tuple[SaliencyFn, SaliencyFn | None]:
    """``(score_fn, fallback)``: `hesso_jax.budget.target_saliency` of ``saliency``.

    ``saliency=None`` under a `Budget` is `hesso_jax.saliency.budget_saliency` (meant for
    the gradient) with the additive mix as the ``fallback`` for an update that brings no
    gradient (`_Hesso._given`); with an explicit ``direction="update"``, the mix itself.
    """
    score_fn = target_saliency(saliency, K)
    if saliency is not None or not isinstance(K, Budget):
        return score_fn, None
    mix = resolve_saliency(None, normalize="additive")  # what None means under a Budget
    if direction == "update":
        return mix, None
    return score_fn, mix if direction is None else None


def _check_fits(Tw: int, P: int, Tp: int, total_steps: int | None) -> None:
    """ValueError unless the schedule ``Tw + P·Tp`` fits in ``total_steps`` (if given)."""
    if total_steps is None:
        return
    total = check_int("total_steps", total_steps, 1)
    if Tw >= total:
        raise ValueError(
            f"warmup_steps={Tw} is not shorter than total_steps={total}: the run would "
            "end before the first pruning period starts")
    if Tw + P * Tp > total:
        raise ValueError(
            f"the pruning schedule ends at step warmup_steps + P * Tp = {Tw} + {P} * {Tp} "
            f"= {Tw + P * Tp}, after total_steps={total}: the last period's groups would "
            "never reach exactly zero; shorten warmup_steps, P or Tp")


def _tie(*values: jax.Array) -> jax.Array:
    """``+0.0`` (float32) computed from ``values`` (any shapes and dtypes): a data dependence.

    Each value is summed (float32), a non-finite sum read as ``0``, then ``|s|·0 = +0``;
    XLA folds ``v·0`` only for integers, so the result stays a consumer of every value
    (the ``lax.cond`` results, the probe's gathers), whatever they hold.
    """
    total = jnp.zeros([], jnp.float32)
    for v in values:
        s = jnp.sum(jnp.asarray(v).astype(jnp.float32))
        total = total + jnp.abs(jnp.where(jnp.isfinite(s), s, 0.0))
    return total * 0.0


def _after(tree: Any, tie: jax.Array) -> Any:
    """``tree`` unchanged bit for bit, each leaf now computed after ``tie`` (``+0.0``).

    Float leaves ``a − (+0)`` (``a`` in IEEE arithmetic, also ``−0 − (+0) = −0``), integer
    leaves ``a + int(+0)``, booleans ``a ≠ (+0 ≠ 0)``. Every consumer (fused into the base
    optimizer's or ``apply_updates``' elementwise pass, no extra buffer) now runs after
    what ``tie`` depends on. Why: with donated buffers the parameters, the moments and the
    state are overwritten in place, and XLA copies a donated buffer that an instruction
    reads (a ``lax.cond``, a gather of the probe) unless the overwrite provably follows
    that read, i.e. depends on its result: a copy per leaf on every step (one more kernel
    launch each, parameter-sized for the parameters).
    """

    def one(a: Any) -> Any:
        dtype = jnp.result_type(a)
        if jnp.issubdtype(dtype, jnp.inexact):
            return a - tie.astype(dtype)
        if jnp.issubdtype(dtype, jnp.integer):
            return a + tie.astype(dtype)
        if dtype == jnp.bool_:
            return a != (tie != 0)
        return a

    return jax.tree.map(one, tree)


def _fused(impl: _Hesso, base: optax.GradientTransformation
           ) -> optax.GradientTransformationExtraArgs:
    """``base`` then HESSO as one transformation (``hesso(..., base=base)``).

    The state is ``(base_state, HessoState)``, the structure of ``optax.chain(base,
    hesso(...))``'s, and the update is the chain's: ``u = base.update(g, s, x)`` then
    HESSO's projection of ``u``. The difference is where the period start gets ``u``: it
    recomputes ``u = base.update(g, s_t, x_t)`` *inside* its ``lax.cond`` from the
    gradient, the base state and the parameters (buffers on every step anyway), so ``u``
    itself has one reader, the fused elementwise pass that writes ``x + u'``. The base
    update and the in-place writes of the moments run after both ``lax.cond`` s
    (`_after`), so donated moments are not copied either.
    """
    base = optax.with_extra_args_support(base)

    def init(params: Any) -> tuple[Any, HessoState]:
        return base.init(params), impl.init(params, fused=init)

    def update(grads: Any, state: tuple[Any, HessoState], params: Any = None, *,
               value_fn: Callable[[Any], jax.Array] | None = None, grad: Any = None,
               **extra_args: Any) -> tuple[Any, tuple[Any, HessoState]]:
        base_state, h_state = state
        kw = {**extra_args, **({} if value_fn is None else {"value_fn": value_fn}),
              **({} if grad is None else {"grad": grad})}

        def recompute() -> Any:  # traced inside the period start's lax.cond
            return base.update(grads, base_state, params, **kw)[0]

        extra = _Extra(value_fn, grads if grad is None else grad)
        pro = impl._prologue(grads, h_state, params, extra, recompute)
        # The moments' in-place writes run after both lax.conds (the state is tied); the
        # parameters' after them too (`_finish` ties the update), so the gradient is not.
        tie = _tie(pro.check, pro.rejected, pro.fault)
        updates, base_state = base.update(grads, _after(base_state, tie), params, **kw)
        _check_updates(updates, params)
        new_updates, h_state = impl._finish(pro, params, updates)
        return new_updates, (base_state, h_state)

    return optax.GradientTransformationExtraArgs(init, update)


def _resolve_hesso_budget(budget: Budget, groups: Groups, costs: GroupCosts | None,
                          min_keep: int | float) -> ResolvedBudget:
    """`resolve_budget` with ``costs`` defaulting to ``groups.costs``; raises if none."""
    costs = costs if costs is not None else getattr(groups, "costs", None)
    if costs is None:
        raise ValueError(
            "hesso with a Budget needs the groups' costs: use groups from "
            "hj.discover_groups(model, x) (they record them), or pass "
            "costs=hj.group_costs(model, groups, x)")
    return resolve_budget(budget, groups, costs, min_keep=min_keep, who="hesso")


@dataclasses.dataclass(frozen=True)
class HessoStatus:
    """Where a HESSO run stands, read from its optimizer state (host values).

    Attributes:
      step: HESSO updates applied so far.
      phase: phase of the *next* update: ``'warmup'``, ``'pruning'`` or ``'finetune'``.
      period: 0-based pruning period of the next update (``-1`` in warm-up, ``P`` after).
      num_redundant: groups being projected in the current period.
      num_pruned: groups held at exactly 0.0.
      redundant: ``bool[G]`` in global group order.
      pruned: ``bool[G]`` in global group order.
      scores: ``float32[G]`` saliency from the last period start.
      target: K, the total number of groups the schedule prunes; ``-1`` when K is a
        `hesso_jax.Budget` (see ``budget``).
      cric_cycles: corrective cycles CRIC ran at the last period start (0 without CRIC).
      cric_rejected: period starts at which CRIC rejected a trial whose loss or scores were
        non-finite (and kept the selection made before it).
      budget: the `hesso_jax.Budget` the schedule prunes to (fractions to 10⁻⁴), or None
        when K is a count.
    """

    step: int
    phase: str
    period: int
    num_redundant: int
    num_pruned: int
    redundant: np.ndarray
    pruned: np.ndarray
    scores: np.ndarray
    target: int
    cric_cycles: int = 0
    cric_rejected: int = 0
    budget: Budget | None = None


def _find_states(opt_state: Any) -> list[HessoState]:
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, HessoState))
             if isinstance(x, HessoState)]
    return found


def hesso_status(opt_state: Any) -> HessoStatus:
    """Phase, period, counts and per-group masks of the HESSO state inside ``opt_state``.

    Args:
      opt_state: a `HessoState`, the state of an ``optax.chain`` containing `hesso`, or an
        ``nnx.Optimizer``'s ``opt_state``.

    Returns:
      A `HessoStatus`: ``phase`` and ``period`` of the *next* update (``count`` against the
      `HessoSchedule` ``T_w, P, T_p``: warm-up while ``count < T_w``, pruning period
      ``⌊(count − T_w)/T_p⌋`` while ``count < T_w + P·T_p``, then fine-tune).

    Raises:
      ValueError: if ``opt_state`` holds no HESSO state, or more than one.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import hesso_jax as hj
      >>> params = {"w": jnp.ones((3, 4))}
      >>> groups = hj.Groups.from_families([hj.GroupFamily(4, (hj.Member(("w",), 1),))])
      >>> state = optax.chain(optax.sgd(0.1), hj.hesso(groups, 2, 2, 5,
      ...                                              warmup_steps=3)).init(params)
      >>> status = hj.hesso_status(state)
      >>> status.phase, status.period, status.num_pruned, status.target
      ('warmup', -1, 0, 2)
    """
    st = _host_state(opt_state, "hesso_status")
    step = int(st.count)
    sch = HessoSchedule.from_array(st.schedule)
    Tw, P, Tp = sch.warmup_steps, sch.periods, sch.period_len
    if step < Tw:
        phase, period = "warmup", -1
    elif step < Tw + P * Tp:
        phase, period = "pruning", (step - Tw) // Tp
    else:
        phase, period = "finetune", P
    redundant = np.asarray(st.redundant, bool)
    pruned = np.asarray(st.pruned, bool)
    return HessoStatus(step, phase, period, int(redundant.sum()), int(pruned.sum()),
                       redundant, pruned, np.asarray(st.scores), max(sch.k, -1),
                       int(st.cric_cycles), int(st.cric_rejected), _decode_budget(sch.k))


def _host_state(opt_state: Any, who: str) -> HessoState:
    """The one `HessoState` inside ``opt_state``, each field as a numpy array."""
    found = _find_states(opt_state)
    if not found:
        raise ValueError(f"{who}: no HessoState found in opt_state")
    if len(found) > 1:
        raise ValueError(f"{who}: {len(found)} HessoStates found; expected exactly one")
    # Each field is one array, possibly wrapped (an nnx.Optimizer wraps state leaves).
    return HessoState(*(np.asarray(jax.tree.leaves(field)[0]) for field in found[0]))


def check_faults(opt_state: Any, params: Any) -> None:
    """Raises the placement fault a ``hesso(..., on_fault="record")`` run has recorded.

    The step of such a run keeps the first failed placement check in its state
    (``HessoState.fault``) instead of raising; this raises the ValueError the default
    ``on_fault="raise"`` step would have raised there (HESSO not last in the chain, a
    pruned group not exactly zero after its period, NaN/inf parameters, with the step it
    happened at), and returns None when no check failed (always, for ``"raise"`` runs).

    Args:
      opt_state: the optimizer state holding the `HessoState` (as for `hesso_status`).
      params: the parameters the run trains (their leaves' paths name the probed leaf).

    Raises:
      ValueError: the recorded fault; or ``opt_state`` holds no or several HESSO states.

    Example:
      A transformation after HESSO changes its update, so the parameters do not land where
      HESSO put them; the run goes on and the fault is raised here:

      >>> import jax.numpy as jnp, optax, pytest
      >>> import hesso_jax as hj
      >>> params = {"w": jnp.ones((3, 4))}
      >>> groups = hj.Groups.from_families([hj.GroupFamily(4, (hj.Member(("w",), 1),))])
      >>> tx = optax.chain(optax.sgd(0.1), hj.hesso(groups, 2, 1, 2, on_fault="record"),
      ...                  optax.scale(0.5))
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.full((3, 4), 0.3)}
      >>> for _ in range(3):
      ...     updates, state = tx.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> with pytest.raises(ValueError, match="did not move by HESSO's last update"):
      ...     hj.check_faults(state, params)
    """
    st = _host_state(opt_state, "check_faults")
    placement.raise_recorded(st.fault, params)
