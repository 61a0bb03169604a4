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

Mixing (as in the reference): each score vector ``s`` is divided by its Euclidean norm
over the live groups (``x_g ≠ 0``), then the normalised vectors are mixed with weights
``w`` (default 0.2 each): ``score = Σ_k w_k s_k / ‖s_k‖``. Groups that are already exactly
zero keep the raw mix; HESSO never re-selects them.

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

__all__ = ["DIRECTION_SCORES", "SCORES", "GroupStats", "SaliencyFn", "evaluate", "group_reduce",
           "group_stats", "needs_direction", "raw_scores", "replicate", "resolve_saliency",
           "weighted"]


def group_reduce(groups: Groups, fn: Callable[..., jax.Array], *trees: Any) -> jax.Array:
    """``float32[G]`` (replicated): per group ``g``, ``Σ_{e ∈ g} fn(*trees)_e``.

    `Groups.reduce`: one reduction over the non-channel axes and one ``segment_sum`` per
    member leaf, with the per-channel partial sums replicated first (`replicate`).
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


def group_stats(groups: Groups, params: Any, direction: Any = None) -> GroupStats:
    """Per-group sufficient statistics of ``params`` ``x`` and ``direction`` ``d``.

    ``‖x_g‖²``, ``‖d_g‖²``, ``⟨x_g, d_g⟩`` (float32 accumulation, replicated, via
    `group_reduce`) and the static element count ``|g|``. Without a direction
    (``None``) ``‖d_g‖² = ⟨x_g, d_g⟩ = 0``: only the magnitude scores are meaningful.
    """
    count = jnp.asarray(groups.counts(params), jnp.float32)
    xx = group_reduce(groups, _sq, params)
    if direction is None:
        return GroupStats(xx, jnp.zeros_like(xx), jnp.zeros_like(xx), count)
    return GroupStats(xx, group_reduce(groups, _sq, direction),
                      group_reduce(groups, _mul, params, direction), count)


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


def weighted(weights: Mapping[str, float] | None = None) -> SaliencyFn:
    """The normalised weighted mix of the five scores (default: 0.2 each).

    Args:
      weights: ``{score name: weight >= 0}``; omitted scores get weight 0.

    Returns:
      ``fn(params, direction, groups) -> float32[G]``.
    """
    w = _check_weights(weights if weights is not None else dict.fromkeys(SCORES, 0.2))

    directional = any(name in DIRECTION_SCORES for name in w)

    def saliency(params: Any, direction: Any, groups: Groups) -> jax.Array:
        if directional and direction is None:
            raise ValueError(f"saliency {sorted(w)} needs the update direction, got None")
        stats = group_stats(groups, params, direction if directional else None)
        scores = raw_scores(stats)
        live = stats.xx > 0
        total = jnp.zeros_like(stats.xx)
        for name, weight in w.items():
            s = scores[name]
            norm = jnp.sqrt(jnp.sum(jnp.where(live, jnp.square(s), 0.0)))
            total = total + weight * _safe_div(s, norm)
        return total

    saliency.weights = dict(w)  # type: ignore[attr-defined]
    saliency.needs_direction = directional  # type: ignore[attr-defined]
    return saliency


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


def resolve_saliency(saliency: Any) -> SaliencyFn:
    """Turns the ``saliency=`` argument of `hesso` into a callable.

    Accepts ``None`` (equal mix of the five), a score name, a ``{name: weight}`` mapping, or
    any callable ``fn(params, direction, groups) -> float32[G]``.
    """
    if saliency is None:
        return weighted()
    if isinstance(saliency, str):
        return weighted({saliency: 1.0})
    if isinstance(saliency, Mapping):
        return weighted(saliency)
    if callable(saliency):
        return saliency
    raise TypeError(
        "saliency must be None, a score name, a {name: weight} mapping or a callable "
        f"fn(params, direction, groups) -> scores; got {type(saliency).__name__}")
