"""Surgery on Flax NNX modules: `shrink` on the state, then static sizes from the shapes.

`shrink_model` cuts ``nnx.state(model)`` with `hesso_jax.surgery.shrink` and rewrites the
static size attributes of the standard layers (``in_features``, ``num_heads``, ...) from
the new parameter shapes, through one table of per-layer-type attribute fixers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from hesso_jax.groups import Groups, Path, format_path, tree_paths
from hesso_jax.surgery import KeepPlan, _channel_keep, shrink

__all__ = ["shrink_model"]


@dataclasses.dataclass(frozen=True)
class _Site:
    """One module of the shrunk model, as its attribute fixer sees it.

    Attributes:
      module: the module (already holding the smaller variables).
      path: its path in the model (as `nnx.iter_modules` gives it).
      keep: ``{variable path: {axis: bool[old length]}}``, the channels the plan kept on
        every axis it touched (axes it did not touch are absent).
    """

    module: nnx.Module
    path: Path
    keep: dict[Path, dict[int, np.ndarray]]

    def error(self, message: str) -> ValueError:
        """A ValueError naming the module's type and path."""
        return ValueError(f"shrink_model: {type(self.module).__name__} at "
                          f"{format_path(self.path)!r}: {message}")

    def shape(self, *names: str) -> tuple[int, ...] | None:
        """Shape of the variable at ``module.<names...>`` (None when it is None)."""
        node: Any = self.module
        for name in names:
            node = getattr(node, name, None)
            if node is None:
                return None
        return tuple(node.shape)

    def expect(self, name: str, shape: tuple[int, ...]) -> None:
        """Raises unless the variable ``name`` is None or has ``shape``."""
        got = self.shape(name)
        if got is not None and got != tuple(shape):
            raise self.error(f"{name} has shape {got} but the other parameters imply "
                             f"{tuple(shape)}; its groups and dependents disagree")

    def kept(self, *names: str, axis: int, length: int) -> np.ndarray:
        """``bool[length]``: the old channels kept on ``axis`` of ``module.<names...>``."""
        mask = self.keep.get((*self.path, *names), {}).get(axis)
        return np.ones(length, bool) if mask is None else mask


def _whole_blocks(mask: np.ndarray, blocks: int) -> np.ndarray | None:
    """Per block, whether it is kept; None unless every block is kept or removed whole."""
    rows = mask.reshape(blocks, -1)
    return rows[:, 0] if (rows == rows[:, :1]).all() else None


def _fix_linear(site: _Site) -> None:
    """``in_features, out_features = kernel.shape``."""
    m = site.module
    fan_in, fan_out = site.shape("kernel")
    site.expect("bias", (fan_out,))
    m.in_features, m.out_features = fan_in, fan_out


def _fix_linear_general(site: _Site) -> None:
    """``batch_axis`` sizes, ``in_features``, ``out_features``: the kernel's dim groups."""
    m = site.module
    nb, ni = len(m.batch_axis), len(m.in_features)
    shape = site.shape("kernel")
    batch, fan_in, fan_out = shape[:nb], shape[nb:nb + ni], shape[nb + ni:]
    site.expect("bias", (*batch, *fan_out))
    m.batch_axis = type(m.batch_axis)(zip(m.batch_axis.keys(), batch, strict=True))
    m.in_features, m.out_features = fan_in, fan_out


def _fix_conv(site: _Site) -> None:
    """``in_features``, ``out_features``, ``feature_group_count``, ``kernel_shape`` (HWIO)."""
    m = site.module
    shape = site.shape("kernel")
    old = tuple(m.kernel_shape)
    per_group_in, out = shape[-2:]
    site.expect("bias", (out,))
    if m.mask is not None and tuple(m.mask.shape) != shape:
        raise site.error(f"its mask has shape {tuple(m.mask.shape)} but the kernel now has "
                         f"{shape}; add the mask to the groups' dependents")
    if shape == old:
        return
    groups_ = m.feature_group_count
    if groups_ == 1:
        fan_in = per_group_in
    elif groups_ == m.in_features and per_group_in == 1:
        # depthwise: input channel c feeds outputs [c * mult, (c + 1) * mult)
        mult = m.out_features // groups_
        kept = _whole_blocks(site.kept("kernel", axis=len(shape) - 1, length=old[-1]),
                             groups_)
        if kept is None or not kept.any():
            raise site.error(
                f"depthwise conv (feature_group_count == in_features == {groups_}, channel "
                f"multiplier {mult}): its output channels must be removed in whole blocks of "
                f"{mult} (all outputs of one input channel), keeping at least one")
        fan_in = groups_ = int(kept.sum())
    else:
        raise site.error(
            f"grouped conv with 1 < feature_group_count={groups_} < in_features="
            f"{m.in_features}: shrinking it (kernel {old} -> {shape}) is not supported")
    m.in_features, m.out_features = fan_in, out
    m.feature_group_count, m.kernel_shape = groups_, shape


def _feature_count(site: _Site, names: tuple[str, ...]) -> int | None:
    """The common length of the 1-D variables ``names`` (None when all are None)."""
    shapes = {n: site.shape(n) for n in names if site.shape(n) is not None}
    if not shapes:
        return None
    if len(set(shapes.values())) > 1 or any(len(s) != 1 for s in shapes.values()):
        raise site.error(f"its feature variables must be 1-D of one length, got {shapes}")
    return next(iter(shapes.values()))[0]


def _fix_norm(site: _Site) -> None:
    """``num_features``: the length of scale/bias/mean/var."""
    count = _feature_count(site, ("scale", "bias", "mean", "var"))
    if count is not None:
        site.module.num_features = count


def _fix_group_norm(site: _Site) -> None:
    """``num_groups``: the normalisation groups left (each removed whole)."""
    m = site.module
    count = _feature_count(site, ("scale", "bias"))
    old = m.num_groups * m.group_size
    if count is None or count == old:
        return
    name = "scale" if site.shape("scale") is not None else "bias"
    kept = _whole_blocks(site.kept(name, axis=0, length=old), m.num_groups)
    if kept is None:
        raise site.error(
            f"removed channels must form whole normalisation groups of {m.group_size} "
            "channels (a partial group changes that group's statistics)")
    m.num_groups = int(kept.sum())


def _fix_embed(site: _Site) -> None:
    """``num_embeddings, features = embedding.shape``."""
    site.module.num_embeddings, site.module.features = site.shape("embedding")


def _fix_attention(site: _Site) -> None:
    """Head counts and feature sizes from the query/key/value/out kernels (whole heads)."""
    m = site.module
    q, k, v = (site.shape(n, "kernel") for n in ("query", "key", "value"))
    out = site.shape("out", "kernel")
    (fan_in, heads, dim), (kv_in, kv_heads, _) = q, k
    if dim != m.head_dim:
        raise site.error(
            f"head_dim changed from {m.head_dim} to {dim}: attention scales its logits by "
            "1/sqrt(head_dim), so removing head_dim channels changes the function; prune "
            "whole heads (axis 1 of the query/key/value kernels)")
    if k != v or k[2] != dim or out[:2] != (heads, dim):
        raise site.error(
            f"query/key/value/out kernels disagree after shrinking: query {q}, key {k}, "
            f"value {v}, out {out}; heads must be removed from all four together")
    rep = m.num_heads // m.num_kv_heads
    query_keep = site.kept("query", "kernel", axis=1, length=m.num_heads)
    per_kv = _whole_blocks(query_keep, m.num_kv_heads)
    kv_keep = [site.kept(n, "kernel", axis=1, length=m.num_kv_heads) for n in ("key", "value")]
    if per_kv is None or any(not np.array_equal(per_kv, x) for x in kv_keep):
        raise site.error(
            f"kept query heads {np.flatnonzero(query_keep).tolist()} do not match the kept "
            f"key/value heads {[np.flatnonzero(x).tolist() for x in kv_keep]} (each key/value "
            f"head serves {rep} consecutive query heads)")
    for name in ("cached_key", "cached_value"):
        cache = site.shape(name)
        if cache is not None and cache[-2:] != (kv_heads, dim):
            raise site.error(f"{name} has shape {cache}; re-run init_cache after shrinking")
    m.num_heads, m.num_kv_heads, m.qkv_features = heads, kv_heads, heads * dim
    m.in_features, m.in_kv_features, m.out_features = fan_in, kv_in, out[-1]


_FIXERS: dict[type, Callable[[_Site], None]] = {
    nnx.Linear: _fix_linear,
    nnx.LinearGeneral: _fix_linear_general,
    nnx.Conv: _fix_conv,
    nnx.BatchNorm: _fix_norm,
    nnx.LayerNorm: _fix_norm,
    nnx.RMSNorm: _fix_norm,
    nnx.GroupNorm: _fix_group_norm,
    nnx.Embed: _fix_embed,
    nnx.MultiHeadAttention: _fix_attention,
}


def _fixer(cls: type) -> Callable[[_Site], None] | None:
    """The fixer of ``cls`` or of its nearest base class in `_FIXERS`."""
    return next((_FIXERS[c] for c in cls.__mro__ if c in _FIXERS), None)


def shrink_model(model: nnx.Module, groups: Groups, *, plan: KeepPlan | None = None,
                 round_to: int = 1, tolerance: float | None = None) -> nnx.Module:
    """A new, smaller NNX module that computes what ``model`` (with its zero groups) does.

    ``graphdef, state = nnx.split(model)``; the whole state (parameters and BatchNorm
    statistics) is cut by `shrink` (every dependent path must be in it); the result is
    merged into a new module whose standard layers then get their static sizes rewritten
    from the new parameter shapes, one fixer per layer type:

    * ``nnx.Linear``: ``in_features``, ``out_features`` from the kernel;
    * ``nnx.LinearGeneral``: ``in_features``/``out_features`` tuples and ``batch_axis``
      sizes (``axis`` keeps its length);
    * ``nnx.Conv``: ``in_features``, ``out_features``, ``kernel_shape`` (HWIO); a depthwise
      conv (``feature_group_count == in_features``) keeps ``feature_group_count ==
      in_features`` and must lose whole blocks of its channel multiplier;
    * ``nnx.BatchNorm``, ``nnx.LayerNorm``, ``nnx.RMSNorm``: ``num_features``;
      ``nnx.GroupNorm``: ``num_groups`` (whole normalisation groups only);
    * ``nnx.Embed``: ``num_embeddings``, ``features``;
    * ``nnx.MultiHeadAttention``: ``num_heads``, ``num_kv_heads``, ``qkv_features``,
      ``in_features``, ``in_kv_features``, ``out_features`` (``head_dim`` may not change).

    Subclasses use their nearest listed base's fixer. User modules composed of these need
    nothing more; a user module with its own parameters must take its sizes from their
    shapes (as `hesso_jax.models.transformer.SelfAttention` does). A built-in Flax layer
    without a fixer whose parameters changed shape, and any change a fixer cannot express
    (grouped convs, partial GroupNorm groups, mismatched heads), raise a ValueError naming
    the module; nothing is returned half-consistent.

    Re-applying a plan (a pruning history): save ``plan.to_json()`` from a pruned run;
    later, ``shrink_model(fresh_model, groups, plan=KeepPlan.from_json(text))`` rebuilds
    the small architecture from a freshly built model of the same architecture. The removed
    groups of ``fresh_model`` must be zero (e.g. after loading the pruned checkpoint into
    it); for a structure-only rebuild of a random initialisation pass
    ``tolerance=math.inf`` and then load the small checkpoint with ``nnx.update``.

    Args:
      model: the module (not modified; the result shares no variables with it).
      groups: the `Groups` over ``nnx.state(model)`` paths.
      plan: a `KeepPlan` to apply instead of detecting zero groups (checked, see `shrink`).
      round_to: round each family's kept count up to a multiple of this (see
        `KeepPlan.from_mask`).
      tolerance: largest ``|x|`` counted as zero (``None``: exactly zero; see `shrink`).

    Returns:
      The smaller module; on the kept channels its outputs (and train-mode BatchNorm
      statistics updates) equal those of ``model``.

    Raises:
      ValueError: from `shrink`, or when a layer's static attributes cannot be made
        consistent with its new parameter shapes.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"shrink_model takes an nnx.Module, got {type(model).__name__}")
    graphdef, state = nnx.split(model)
    small_state, plan = shrink(state, groups, plan=plan, round_to=round_to,
                               tolerance=tolerance)
    paths = tree_paths(state)
    old_shapes = {p: tuple(np.shape(x)) for p, x in zip(paths, jax.tree.leaves(state),
                                                         strict=True)}
    keep: dict[Path, dict[int, np.ndarray]] = {}
    for (leaf, axis), mask in _channel_keep(state, groups, plan, "require").items():
        keep.setdefault(paths[leaf], {})[axis] = mask
    small = nnx.merge(graphdef, small_state)
    for path, module in nnx.iter_modules(small):
        site = _Site(module, tuple(path), keep)
        fixer = _fixer(type(module))
        if fixer is not None:
            fixer(site)
        elif type(module).__module__.startswith("flax."):
            changed = [name for name, var in vars(module).items()
                       if isinstance(var, nnx.Variable)
                       and old_shapes.get((*site.path, name), tuple(var.shape))
                       != tuple(var.shape)]
            if changed:
                raise site.error(
                    f"variables {changed} changed shape but shrink_model has no rule for "
                    f"{type(module).__name__}'s static attributes (supported: "
                    f"{', '.join(sorted(c.__name__ for c in _FIXERS))})")
    return small
