"""Group saliency scores (HESSO, arXiv 2409.09085, Appendix B). Lowest = most redundant.

Notation: ``x_g`` is group ``g``'s member slice of the parameters, ``d_g`` the same slice of
the *update direction* and ``|g|`` its element count. HESSO sits last in an ``optax.chain``,
so the direction it sees is the base optimizer's update ``u = -η·g̃`` (``g̃`` the raw
gradient for SGD, the momentum / Adam-preconditioned gradient otherwise — the same
"gradient variant" the reference implementation scores with). The five scores:

* ``magnitude``            ``‖x_g‖₂``
* ``avg_magnitude``        ``‖x_g‖₂ / |g|``
* ``cosine_similarity``    ``1 + cos(x_g, u_g) = 1 + ⟨x_g, u_g⟩ / (‖x_g‖ ‖u_g‖)`` ∈ [0, 2]
* ``taylor_first_order``   ``|⟨x_g, u_g⟩|``
* ``taylor_second_order``  ``½ ⟨x_g, u_g⟩²``

Sign conventions. Magnitudes: a group near the origin changes the function least when it
is set to zero. Taylor: removing group ``g`` moves the parameters by ``-x_g``; to first
order the loss changes by ``-⟨∇f_g, x_g⟩`` and, with the Fisher (outer-product)
approximation of the Hessian, by ``½⟨∇f_g, x_g⟩²`` at second order. Only the size of the
change matters, so both use absolute values and are invariant to the sign (and, after
normalisation, the positive scale ``η``) of the direction; using ``u`` instead of ``∇f``
only swaps the metric for the optimizer's diagonal preconditioner. Cosine: when the
optimizer's own step points at the origin (``cos(x_g, u_g) = -1``) training is already
shrinking the group, so projecting it to zero works *with* the optimizer: score 0, the
most redundant; a group the optimizer is growing scores 2. (The PyTorch reference scores
``1 + cos(x_g, ∇f_g) = 1 - cos(x_g, u_g)``, which ranks groups the optimizer shrinks as
the most important; we use the orientation that agrees with the first-order argument.)

Mixing. ``weighted(w, normalize=...)`` mixes the scores with weights ``w`` (default 0.2
each) after one of two normalisations:

* ``normalize="norm"`` (the default, as in the reference): each score vector ``s`` is
  divided by its Euclidean norm over the live groups (``x_g ≠ 0``),
  ``score = Σ_k w_k s_k / ‖s_k‖``. Groups that are already exactly zero keep the raw mix;
  HESSO never re-selects them.
* ``normalize="additive"`` (loss units, for cost budgets): every score is first replaced
  by an *additive estimate of the loss increase from removing the group*
  (`additive_scores`), then divided by its **sum** over the live groups, so that each
  normalised score is the group's share of the total estimate and the mix
  ``score = Σ_k w_k a_k / Σ_live a_k`` is a share of loss as well.

Why "additive". Let a group ``g`` be replicated ``m`` times (the same slice repeated, as a
head of ``m``·32 columns is to a neuron's one): a quantity measured per group in loss
units must grow ``m``-fold, as its cost (params, FLOPs) does. Under that replication the
five raw scores grow like ``m^½`` (magnitude), ``m^−½`` (average magnitude), ``m⁰``
(cosine), ``m¹`` (Taylor-1) and ``m²`` (Taylor-2). Count-K selection ignores sizes, but a
`hesso_jax.Budget` ranks by ``s_g / c_g`` (`hesso_jax.budget.budget_select`), the greedy
rule of the fractional knapsack ``min Σ_{g∈R} s_g  s.t.  Σ_{g∈R} c_g ≥ Q``, which is only
meaningful for an ``s`` additive over the removed set; with degree ½ or 0 scores the
ratio is ``∝ m^{-½}`` or ``m^{-1}``, so large groups (heads, early channels) look cheap
per FLOP whatever their importance. The additive estimates (all degree 1):

* magnitude, average magnitude → ``½‖x_g‖²``: the loss increase of removing ``g`` under
  an isotropic quadratic model ``f(x + δ) ≈ f(x) + ½‖δ‖²`` (in loss units the two
  magnitudes coincide: the average is a per-element density, times ``|g|`` it is this
  total);
* cosine → ``½(1 + cos(x_g, u_g)) · ½‖x_g‖²`` ∈ ``[0, ½‖x_g‖²]``: the unitless agreement
  factor (0 when the optimizer is already shrinking the group) times the isotropic loss;
* Taylor-1 → ``|⟨x_g, u_g⟩|``, the first-order loss change (unchanged);
* Taylor-2 → ``½ Σ_{e∈g} x_e² u_e²``: the second-order change with the *diagonal* of the
  outer-product (Fisher) approximation, as in Optimal Brain Damage — the rank-one
  ``½⟨x_g, u_g⟩²`` ranks like Taylor-1 and is degree 2.

Magnitude and Taylor-2 are exactly additive over a partition of a group's elements,
Taylor-1 sub-additive (``|a + b| ≤ |a| + |b|``, equal when the parts' first-order terms
share a sign); all five are invariant to the positive scale of ``u`` after the
normalisation, and the magnitudes to that of ``x``.

Budgets: which estimate carries curvature. Additivity puts a head and a neuron on one
scale, but the knapsack also needs the *level* of each group's loss to be right, and of
the five only Taylor-2 on the **raw gradient** measures curvature. With Adam the update is
``u_e = −η m̂_e / (√v̂_e + ε)``, so ``|u_e| ≲ η`` for every element: on ``u`` Taylor-2 is
``½ Σ_e x_e² u_e² ≈ ½ η² Σ_e x_e² (m̂_e² / v̂_e)``, a magnitude weighted by the gradient's
signal-to-noise ratio, and Taylor-1, cosine and the magnitudes (``½‖x_g‖²``: an isotropic
Hessian) carry no curvature at all. On the raw gradient ``g = ∇f`` of a batch,
``½ Σ_e x_e² g_e²`` is Optimal Brain Damage's loss increase with the *empirical-Fisher*
diagonal ``E[g_e²] ≈ H_ee``. Measured on the pretrained Llama decoder
(``benchmarks/llm_ablation.py --parts oneshot``: one `hesso_jax.budget.budget_select` at
84.4 % of the FLOPs from the checkpoint, no training), each of the norm mix, the additive
mix and Taylor-2 alone on an Adam-like direction removes kv-head groups (2 query heads +
their kv head) first, 3–4 of them, and zeroing that selection raises the held-out loss by
about 2.0 nats/token; Taylor-2 on the raw gradient removes SwiGLU neurons only, +0.062,
less than count-K's +0.146. Trained (HESSO, same recipes), it reaches held-out perplexity
4.393 under ``Budget(flops=0.844)`` (count-K at the same FLOPs 4.439, the additive mix
4.992) and on MiniLM cosine 0.875 under ``Budget(flops=0.5)`` (count-K 0.840, additive
0.847). `budget_saliency` is that score (it brings ``direction="gradient"``), and
`hesso_jax.hesso` / `hesso_jax.cric` rank by it under a ``hj.Budget`` unless given
``saliency=`` (`hesso_jax.budget.target_saliency`).

Sharding. Every per-group vector is *replicated*: a member leaf sharded along a mesh axis
(FSDP) is first reduced over its non-channel axes to one value per channel (``O(channels)``,
sharded like the channel axis), that channel vector is resharded to replicated
(`replicate`, ``jax.sharding.reshard`` under an ``AxisType.Explicit`` mesh; a no-op
otherwise), and only then segment-summed into ``G`` groups. Sorting and selection
(`hesso_jax.projection.bottom_k`) therefore run on replicated vectors on every device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hesso_jax.groups import Groups, replicate

SCORES = (
    "magnitude",
    "avg_magnitude",
    "cosine_similarity",
    "taylor_first_order",
    "taylor_second_order",
)

SaliencyFn = Callable[[Any, Any, Groups], jax.Array]
"""``fn(params, direction, groups) -> float32[G]``; lowest = most redundant.

A callable may carry the attribute ``needs_direction = False`` (as `weighted` sets when
only magnitude scores have weight): it is then called with ``direction=None``, and HESSO's
period start does not read the base update at all (`needs_direction`)."""

DIRECTION_SCORES = ("cosine_similarity", "taylor_first_order", "taylor_second_order")
"""The scores that read the update direction ``d`` (the others read only ``x``)."""

NORMALIZATIONS = ("norm", "additive")
"""The ``normalize=`` modes of `weighted` (module docstring, "Mixing")."""

__all__ = ["BUDGET_WEIGHTS", "DIRECTION_SCORES", "NORMALIZATIONS", "SCORES", "GroupStats",
           "SaliencyFn", "additive_scores", "budget_saliency", "evaluate", "group_reduce",
           "group_stats", "needs_direction", "raw_scores", "replicate", "resolve_saliency",
           "weighted"]


def group_reduce(groups: Groups, fn: Callable[..., jax.Array], *trees: Any) -> jax.Array:
    """``float32[G]`` (replicated): per group ``g``, ``Σ_{e ∈ g} fn(*trees)_e``.

    `Groups.reduce`: per member leaf a reduction over the non-channel axes, the
    per-channel partial sums replicated (`replicate`), then one ``segment_sum``.
    """
    return groups.reduce(fn, *trees)


def _sq(x: jax.Array) -> jax.Array:
    return jnp.square(x.astype(jnp.float32))


def _mul(x: jax.Array, y: jax.Array) -> jax.Array:
    return x.astype(jnp.float32) * y.astype(jnp.float32)


def nonzero_counts(groups: Groups, tree: Any) -> jax.Array:
    """``float32[G]`` (replicated): member elements of each group that are not exactly 0."""
    return group_reduce(groups, lambda x: (x != 0).astype(jnp.float32), tree)


class GroupStats(NamedTuple):
    """Per-group sufficient statistics of the five scores (each ``float32[G]``)."""

    xx: jax.Array  # ‖x_g‖²
    dd: jax.Array  # ‖d_g‖²
    xd: jax.Array  # ⟨x_g, d_g⟩
    count: jax.Array  # |g|
    xxdd: jax.Array | None = None  # Σ_{e∈g} x_e² d_e² (only with group_stats(diagonal=True))


def group_stats(groups: Groups, params: Any, direction: Any = None, *,
                diagonal: bool = False) -> GroupStats:
    """Per-group sufficient statistics of ``params`` ``x`` and ``direction`` ``d``.

    ``‖x_g‖² = Σ_{e∈g} x_e²``, ``‖d_g‖² = Σ_{e∈g} d_e²``, ``⟨x_g, d_g⟩ = Σ_{e∈g} x_e d_e``
    (float32 accumulation, replicated) and the static element count ``|g|``, all sums
    from one `Groups.reduce_many` over the parameters and the direction. Without a
    direction (``None``) ``‖d_g‖² = ⟨x_g, d_g⟩ = 0``: only the magnitude scores are
    meaningful. With ``diagonal=True`` also ``Σ_{e∈g} x_e² d_e²`` (`additive_scores`'
    Taylor-2), else ``xxdd`` is None.
    """
    count = jnp.asarray(groups.counts(params), jnp.float32)
    if direction is None:
        xx = group_reduce(groups, _sq, params)
        zero = jnp.zeros_like(xx)
        return GroupStats(xx, zero, zero, count, zero if diagonal else None)

    def terms(x: jax.Array, d: jax.Array) -> tuple[jax.Array, ...]:
        xd = _mul(x, d)
        return (_sq(x), _sq(d), xd, jnp.square(xd)) if diagonal else (_sq(x), _sq(d), xd)

    sums = groups.reduce_many(terms, params, direction)
    return GroupStats(sums[0], sums[1], sums[2], count, sums[3] if diagonal else None)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def raw_scores(stats: GroupStats) -> dict[str, jax.Array]:
    """The five unnormalised scores from `GroupStats` (formulas in the module docstring)."""
    norm_x = jnp.sqrt(stats.xx)
    norm_d = jnp.sqrt(stats.dd)
    return {
        "magnitude": norm_x,
        "avg_magnitude": _safe_div(norm_x, stats.count),
        "cosine_similarity": 1.0 + jnp.clip(_safe_div(stats.xd, norm_x * norm_d), -1.0, 1.0),
        "taylor_first_order": jnp.abs(stats.xd),
        "taylor_second_order": 0.5 * jnp.square(stats.xd),
    }


def additive_scores(stats: GroupStats) -> dict[str, jax.Array]:
    """The five scores as additive loss-increase estimates (module docstring, "Mixing").

    ``½‖x_g‖²`` (both magnitudes), ``½(1 + cos)·½‖x_g‖²``, ``|⟨x_g, d_g⟩|`` and
    ``½ Σ_e x_e² d_e²``: each grows ``m``-fold when a group is replicated ``m`` times, as
    its params and FLOPs do, so ``score / cost`` is a loss per unit of cost.

    Taylor-2 needs ``stats.xxdd`` (``group_stats(..., diagonal=True)``); without it the
    dict has no ``"taylor_second_order"`` entry.

    Example:
      >>> import jax.numpy as jnp
      >>> import hesso_jax as hj
      >>> groups = hj.Groups.from_families([               # one group of 2, one of 4 elements
      ...     hj.GroupFamily(1, (hj.Member(("a",), 0, block=2),)),
      ...     hj.GroupFamily(1, (hj.Member(("b",), 0, block=4),))])
      >>> x = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([1.0, 2.0, 1.0, 2.0])}  # b = a twice
      >>> d = {"a": jnp.array([0.5, 1.0]), "b": jnp.array([0.5, 1.0, 0.5, 1.0])}
      >>> stats = group_stats(groups, x, d, diagonal=True)
      >>> a = additive_scores(stats)
      >>> [a[k].tolist() for k in ("magnitude", "taylor_first_order", "taylor_second_order")]
      [[2.5, 5.0], [2.5, 5.0], [2.125, 4.25]]
      >>> (raw_scores(stats)["magnitude"] ** 2).tolist()   # ‖x_g‖ itself grows like √m
      [5.0, 10.0]
    """
    half_sq = 0.5 * stats.xx
    cos = raw_scores(stats)["cosine_similarity"]  # 1 + cos ∈ [0, 2]
    out = {
        "magnitude": half_sq,
        "avg_magnitude": half_sq,
        "cosine_similarity": 0.5 * cos * half_sq,
        "taylor_first_order": jnp.abs(stats.xd),
    }
    if stats.xxdd is not None:
        out["taylor_second_order"] = 0.5 * stats.xxdd
    return out


def _check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(weights, Mapping):
        raise TypeError(f"saliency weights must be a mapping name -> weight, got {weights!r}")
    out = {}
    for name, w in weights.items():
        if name not in SCORES:
            raise ValueError(f"unknown saliency score {name!r}; choose from {SCORES}")
        if isinstance(w, bool) or not isinstance(w, int | float | np.floating | np.integer):
            raise TypeError(f"saliency weight for {name!r} must be a number, got {w!r}")
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"saliency weight for {name!r} must be finite and >= 0, got {w}")
        if w > 0:
            out[name] = float(w)
    if not out:
        raise ValueError("saliency weights are all zero: at least one must be positive")
    return out


def _check_normalize(normalize: Any) -> str:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    return normalize


def weighted(weights: Mapping[str, float] | None = None, *,
             normalize: str = "norm") -> SaliencyFn:
    """The normalised weighted mix of the five scores (default: 0.2 each).

    ``normalize="norm"``: ``Σ_k w_k s_k / ‖s_k‖`` over the live groups (the reference's
    mix, HESSO's default). ``normalize="additive"``: ``Σ_k w_k a_k / Σ_live a_k`` with
    ``a_k`` the additive loss-increase estimates of `additive_scores`, so the mix is each
    group's share of the estimated loss and ``score / cost`` under a `hesso_jax.Budget`
    compares a head with a neuron per FLOP or parameter (module docstring, "Mixing").

    Args:
      weights: ``{score name: weight >= 0}``; omitted scores get weight 0.
      normalize: ``"norm"`` or ``"additive"``.

    Returns:
      ``fn(params, direction, groups) -> float32[G]``, with attributes ``weights``,
      ``normalize`` and ``needs_direction``.

    Raises:
      TypeError / ValueError: for bad weights or an unknown ``normalize``.

    Example:
      >>> import jax.numpy as jnp
      >>> import hesso_jax as hj
      >>> groups = hj.Groups.from_families([
      ...     hj.GroupFamily(1, (hj.Member(("a",), 0, block=2),)),
      ...     hj.GroupFamily(1, (hj.Member(("b",), 0, block=4),))])
      >>> x = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([1.0, 2.0, 1.0, 2.0])}
      >>> fn = weighted({"magnitude": 1.0}, normalize="additive")
      >>> [round(float(v), 4) for v in fn(x, None, groups)]  # shares of ½‖x‖²: b = a twice
      [0.3333, 0.6667]
      >>> [round(float(v), 4) for v in weighted({"magnitude": 1.0})(x, None, groups)]  # √2
      [0.5774, 0.8165]
    """
    w = _check_weights(weights if weights is not None else dict.fromkeys(SCORES, 0.2))
    mode = _check_normalize(normalize)
    directional = any(name in DIRECTION_SCORES for name in w)
    additive = mode == "additive"
    diagonal = additive and "taylor_second_order" in w

    def saliency(params: Any, direction: Any, groups: Groups) -> jax.Array:
        if directional and direction is None:
            raise ValueError(f"saliency {sorted(w)} needs the update direction, got None")
        stats = group_stats(groups, params, direction if directional else None,
                            diagonal=diagonal)
        scores = additive_scores(stats) if additive else raw_scores(stats)
        live = stats.xx > 0
        total = jnp.zeros_like(stats.xx)
        for name, weight in w.items():  # ≤ 5 scores, each a vector over all groups
            s = scores[name]
            scale = (jnp.sum(jnp.where(live, s, 0.0)) if additive
                     else jnp.sqrt(jnp.sum(jnp.where(live, jnp.square(s), 0.0))))
            total = total + weight * _safe_div(s, scale)
        return total

    saliency.weights = dict(w)  # type: ignore[attr-defined]
    saliency.normalize = mode  # type: ignore[attr-defined]
    saliency.needs_direction = directional  # type: ignore[attr-defined]
    return saliency


BUDGET_WEIGHTS = {"taylor_second_order": 1.0}
"""`budget_saliency`'s weights: additive Taylor-2 alone."""


def budget_saliency() -> SaliencyFn:
    """The score a cost budget should rank by: additive Taylor-2 on the raw gradient.

    ``s_g = a_g / Σ_live a_h`` with ``a_g = ½ Σ_{e∈g} x_e² d_e²`` (`weighted` of
    `BUDGET_WEIGHTS`, ``normalize="additive"``). With ``d = −∇f(x)`` of the current batch
    (``hj.hesso(..., direction="gradient")``), ``a_g`` is Optimal Brain Damage's
    loss increase of removing ``g`` with the empirical-Fisher diagonal ``H_ee ≈ g_e²``, so
    ``s_g / c_g`` under a `hesso_jax.Budget` is a share of loss per unit of cost that
    carries curvature; on Adam's update it is a signal-to-noise-weighted magnitude
    (module docstring, "Budgets"). The callable carries ``direction = "gradient"``, the
    direction it is meant for, which `hesso_jax.hesso` uses unless its ``direction=`` is
    given (the update then needs ``grad=`` or ``value_fn``; with ``base=`` it has ``g``).

    Example:
      >>> import jax.numpy as jnp
      >>> import hesso_jax as hj
      >>> groups = hj.Groups.from_families([hj.GroupFamily(2, (hj.Member(("w",), 0),))])
      >>> x = {"w": jnp.array([2.0, 1.0])}
      >>> g = {"w": jnp.array([0.1, 1.0])}   # the larger weight sits in a flat direction
      >>> fn = budget_saliency()
      >>> fn.direction, [round(float(v), 3) for v in fn(x, g, groups)]
      ('gradient', [0.038, 0.962])
    """
    fn = weighted(BUDGET_WEIGHTS, normalize="additive")
    fn.direction = "gradient"  # type: ignore[attr-defined]
    return fn


def needs_direction(fn: SaliencyFn) -> bool:
    """Whether ``fn`` reads its ``direction`` argument (``fn.needs_direction``, default True).

    HESSO passes the base update into the period start's ``lax.cond`` only when it does:
    any reader of the update besides the fused ``apply_updates`` makes XLA keep it in a
    parameter-sized buffer on *every* step (a ``cond`` operand must be materialised).
    """
    return bool(getattr(fn, "needs_direction", True))


def evaluate(fn: SaliencyFn, params: Any, direction: Any, groups: Groups) -> jax.Array:
    """``fn(params, direction, groups)`` as a replicated ``float32[G]``.

    Raises:
      ValueError: if the scores do not have shape ``(G,)``.
    """
    scores = replicate(jnp.asarray(fn(params, direction, groups), jnp.float32))
    if scores.shape != (groups.num_groups,):
        raise ValueError(
            f"saliency returned shape {scores.shape}, expected ({groups.num_groups},)")
    return scores


def resolve_saliency(saliency: Any, *, normalize: str = "norm") -> SaliencyFn:
    """Turns the ``saliency=`` argument of `hesso` into a callable.

    Accepts ``None`` (equal mix of the five), a score name, a ``{name: weight}`` mapping, or
    any callable ``fn(params, direction, groups) -> float32[G]`` (returned as is).
    ``normalize`` is `weighted`'s, for the first three.

    Example:
      >>> resolve_saliency("magnitude", normalize="additive").normalize
      'additive'
    """
    if saliency is None:
        return weighted(normalize=normalize)
    if isinstance(saliency, str):
        return weighted({saliency: 1.0}, normalize=normalize)
    if isinstance(saliency, Mapping):
        return weighted(saliency, normalize=normalize)
    if callable(saliency):
        return saliency
    raise TypeError(
        "saliency must be None, a score name, a {name: weight} mapping or a callable "
        f"fn(params, direction, groups) -> scores; got {type(saliency).__name__}")
