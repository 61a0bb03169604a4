"""Parameter surgery: a physically smaller tree that computes what the masked tree did.

A group whose member slices are all exactly zero contributes a channel that is zero for
every input (zero invariance), so its member slices and its dependents (consumer
in-channels, running statistics) can be deleted without changing the function. Surgery
keeps, along every axis a family touches, channel ``c`` iff
``concat(keep, True)[channel_map][c]`` (see `hesso_jax.groups`): channels of removed
groups go, every other channel stays.

The decision is recorded in a `KeepPlan` (kept group indices per family, JSON), which can
be saved beside a checkpoint and re-applied to any tree carrying the same paths: the
parameters, an optimizer state's parameter-shaped parts, BatchNorm statistics.

`shrink_model` does the same to a Flax NNX module and then rewrites the static size
attributes of the standard layers (``in_features``, ``num_heads``, ...) from the new
parameter shapes, through one table of per-layer-type attribute fixers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hesso_jax.groups import (
    DependentsMode,
    GroupFamily,
    Groups,
    Member,
    Path,
    check_int,
    format_path,
    tree_paths,
)
from hesso_jax.hesso import HessoState

__all__ = ["KeepPlan", "apply_plan", "shrink", "shrink_groups", "shrink_model",
           "shrink_opt_state"]


@dataclasses.dataclass(frozen=True)
class KeepPlan:
    """Which groups of each family survive surgery.

    Attributes:
      sizes: the original size of each family.
      keep: per family, the sorted local indices of the kept groups.
    """

    sizes: tuple[int, ...]
    keep: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        sizes = tuple(int(s) for s in self.sizes)
        keep = tuple(tuple(int(i) for i in k) for k in self.keep)
        if len(sizes) != len(keep):
            raise ValueError(f"KeepPlan: {len(sizes)} sizes but {len(keep)} keep lists")
        for f, (n, k) in enumerate(zip(sizes, keep, strict=True)):
            if list(k) != sorted(set(k)) or (k and (k[0] < 0 or k[-1] >= n)):
                raise ValueError(
                    f"KeepPlan family {f}: kept indices must be sorted, unique and in [0, {n})")
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "keep", keep)

    @classmethod
    def from_mask(cls, groups: Groups, keep: np.ndarray, *, round_to: int = 1) -> KeepPlan:
        """Plan from a ``bool[G]`` keep mask in global group order.

        Args:
          groups: the `Groups` the mask is over.
          keep: ``bool[G]``, True for groups that survive.
          round_to: each family's kept count ``k`` is rounded up to
            ``min(size, round_to * ceil(k / round_to))`` by also keeping the family's
            lowest-indexed removed groups, so that shrunk sizes divide a mesh axis. A family
            with nothing kept stays empty (0 is a multiple). Keeping more groups never
            changes the function, so surgery stays exact.

        Raises:
          ValueError: if the mask has the wrong shape or ``round_to < 1``.
          TypeError: if ``round_to`` is not an int.
        """
        round_to = check_int("round_to", round_to, 1)
        keep = np.array(keep, bool)
        if keep.shape != (groups.num_groups,):
            raise ValueError(f"keep mask has shape {keep.shape}, expected ({groups.num_groups},)")
        per_family = []
        for fam, start in zip(groups.families, groups.starts, strict=True):
            seg = keep[start:start + fam.size]
            kept = int(seg.sum())
            target = min(fam.size, -(-kept // round_to) * round_to)
            seg[np.flatnonzero(~seg)[:target - kept]] = True
            per_family.append(tuple(np.flatnonzero(seg).tolist()))
        return cls(tuple(f.size for f in groups.families), tuple(per_family))

    def keep_mask(self) -> np.ndarray:
        """``bool[G]``: kept groups in global group order."""
        parts = []
        for n, k in zip(self.sizes, self.keep, strict=True):
            m = np.zeros(n, bool)
            m[list(k)] = True
            parts.append(m)
        return np.concatenate(parts) if parts else np.zeros(0, bool)

    @property
    def num_removed(self) -> int:
        """Groups removed in total."""
        return sum(self.sizes) - sum(len(k) for k in self.keep)

    def check(self, groups: Groups) -> None:
        """Raises a ValueError unless the plan was made for ``groups``."""
        sizes = tuple(f.size for f in groups.families)
        if sizes != self.sizes:
            raise ValueError(
                f"KeepPlan was made for family sizes {self.sizes}, groups have {sizes}")

    def to_json(self, **kwargs: Any) -> str:
        """JSON text; round-trips through `from_json`."""
        return json.dumps({"format": "hesso_jax.KeepPlan", "version": 1,
                           "sizes": list(self.sizes), "keep": [list(k) for k in self.keep]},
                          **kwargs)

    @classmethod
    def from_json(cls, text: str) -> KeepPlan:
        """Inverse of `to_json`."""
        d = json.loads(text)
        if d.get("format") != "hesso_jax.KeepPlan":
            raise ValueError("not a hesso_jax.KeepPlan document (missing format tag)")
        return cls(tuple(d["sizes"]), tuple(tuple(k) for k in d["keep"]))


def apply_plan(tree: Any, groups: Groups, plan: KeepPlan, *,
               dependents: DependentsMode = "require") -> Any:
    """Deletes the channels of removed groups from ``tree`` (members and dependents).

    Args:
      tree: any pytree with the groups' paths (params, ``nnx.State``, Adam moments).
      groups: the groups the plan was made for.
      plan: the `KeepPlan`.
      dependents: ``'require'`` (every dependent path must be in ``tree``) or ``'present'``
        (absent dependents are skipped, for trees holding only part of the state).

    Returns:
      ``tree`` with smaller leaves; structure and dtypes are unchanged.
    """
    plan.check(groups)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    for (leaf, axis), mask in sorted(_channel_keep(tree, groups, plan, dependents).items()):
        if not mask.all():
            take = np.take if isinstance(leaves[leaf], np.ndarray) else jnp.take
            leaves[leaf] = take(leaves[leaf], np.flatnonzero(mask), axis=axis)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _channel_keep(tree: Any, groups: Groups, plan: KeepPlan,
                  dependents: DependentsMode) -> dict[tuple[int, int], np.ndarray]:
    """``{(leaf, axis): bool[length]}``: the channels the plan keeps on each touched axis."""
    layout = groups.layout(tree, dependents=dependents)
    keep_ext = np.concatenate([plan.keep_mask(), [True]])
    keep: dict[tuple[int, int], np.ndarray] = {}
    for m in (*layout.members, *layout.dependents):
        key = (m.leaf, m.axis)
        channel_keep = keep_ext[m.index]
        keep[key] = channel_keep if key not in keep else keep[key] & channel_keep
    return keep


@functools.partial(jax.jit, static_argnums=0)
def _group_max_abs(groups: Groups, tree: Any) -> jax.Array:
    """``float32[G]``: the largest ``|x|`` over each group's member elements (NaN → inf)."""
    layout = groups.layout(tree, dependents="present")
    leaves = jax.tree.leaves(tree)
    out = jnp.zeros((groups.num_groups + 1,), jnp.float32)
    for m in layout.members:
        x = leaves[m.leaf].astype(jnp.float32)
        x = jnp.where(jnp.isnan(x), jnp.inf, jnp.abs(x))
        others = tuple(a for a in range(x.ndim) if a != m.axis)
        out = out.at[m.index].max(jnp.max(x, axis=others, initial=0.0))
    return out[: groups.num_groups]


def _check_tolerance(tolerance: Any) -> float | None:
    """``tolerance`` as a float (``None`` passes); TypeError/ValueError if not a real >= 0."""
    if tolerance is None:
        return None
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float | np.integer
                                                     | np.floating):
        raise TypeError(f"tolerance must be None or a real number, got {tolerance!r}")
    tolerance = float(tolerance)
    if not tolerance >= 0.0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    return tolerance


def _family_label(groups: Groups, fi: int) -> str:
    name = groups.families[fi].name
    return f"family {name!r}" if name else f"family {fi}"


def shrink(params: Any, groups: Groups, *, plan: KeepPlan | None = None,
           dependents: DependentsMode = "require", round_to: int = 1,
           tolerance: float | None = None) -> tuple[Any, KeepPlan]:
    """Removes every zero group (members and dependents) from ``params``.

    Without ``plan``, group ``g`` is *zero* iff every member element has ``x == 0``
    (``tolerance=None``) or ``|x| <= tolerance``; the plan keeps every other group (rounded
    up per family by ``round_to``, see `KeepPlan.from_mask`). Only exact zeros keep the
    function unchanged; a tolerance trades exactness for size.

    With ``plan``, the plan is applied as given after checking that every group it removes
    is zero in that sense, so a plan cannot silently change the function. To cut a tree
    whose removed groups are not zero (a fresh initialisation, optimizer moments) use
    `apply_plan`, or pass ``tolerance=math.inf``.

    For an ``nnx`` model pass the whole state (``nnx.state(model)``) so BatchNorm running
    statistics shrink too, then ``nnx.merge(graphdef, small)``, or use `shrink_model`,
    which also updates the layers' static sizes.

    Args:
      params: the parameter tree (members must be present).
      groups: the `Groups`.
      plan: apply this plan instead of detecting zero groups.
      dependents: see `apply_plan`.
      round_to: without ``plan``: round each family's kept count up to a multiple of this
        (capped at the family size). Must be 1 with ``plan``.
      tolerance: largest ``|x|`` still counted as zero (``None``: exactly zero).

    Returns:
      ``(small, plan)``: the smaller tree and the `KeepPlan` that produced it.

    Raises:
      ValueError: if ``plan`` removes a group that is not zero (naming the family, the
        group and its largest ``|x|``), if the plan was made for other groups, or if
        ``round_to`` is given with a plan.
      TypeError: for a non-int ``round_to`` or a non-real ``tolerance``.
    """
    round_to = check_int("round_to", round_to, 1)
    tolerance = _check_tolerance(tolerance)
    if plan is not None:
        plan.check(groups)
        if round_to != 1:
            raise ValueError(f"shrink: round_to={round_to} applies only when shrink computes "
                             "the plan; a given plan is applied as it is")
    groups.validate(params, dependents=dependents)
    max_abs = np.asarray(_group_max_abs(groups, params))
    zero = max_abs <= (0.0 if tolerance is None else tolerance)
    if plan is None:
        plan = KeepPlan.from_mask(groups, ~zero, round_to=round_to)
    else:
        bad = np.flatnonzero(~plan.keep_mask() & ~zero)
        if bad.size:
            fam = groups.family_index()
            where = [f"{_family_label(groups, int(fam[g]))} group "
                     f"{int(g) - groups.starts[int(fam[g])]} (max |x| = {max_abs[g]:.3g})"
                     for g in bad[:8]]
            more = f", ... ({bad.size} groups in all)" if bad.size > 8 else ""
            limit = "exactly 0" if tolerance is None else f"|x| <= {tolerance:g}"
            raise ValueError(
                f"shrink: plan removes groups that are not zero ({limit}): "
                f"{', '.join(where)}{more}. Removing them would change the function; use "
                "apply_plan to cut such a tree unchecked, or pass tolerance=")
    return apply_plan(params, groups, plan, dependents=dependents), plan


def shrink_groups(groups: Groups, plan: KeepPlan, tree: Any = None) -> Groups:
    """The `Groups` of the tree that `apply_plan` returns (removed groups gone).

    Each family shrinks to its kept groups (families with none left are dropped); member
    and dependent offsets move down by the channels removed before them on the same axis.

    Args:
      groups: the groups the plan was made for.
      plan: the `KeepPlan`.
      tree: the tree *before* surgery (or its ``jax.eval_shape``). Needed only when one
        leaf's axis is written with both signs (``1`` and ``-1``): it resolves them to the
        same axis. Without it such groups raise a ValueError instead of shifting wrongly.
    """
    plan.check(groups)
    ndim: dict[Any, int] = {}
    if tree is not None:
        groups.validate(tree, dependents="present")
        ndim = {p: len(getattr(x, "shape", ())) for p, x in zip(tree_paths(tree),
                                                               jax.tree.leaves(tree),
                                                               strict=True)}
    signs: dict[Any, set[bool]] = {}
    for fam in groups.families:
        for m in (*fam.members, *fam.dependents):
            signs.setdefault(m.path, set()).add(m.axis < 0)

    def axis_key(m: Member) -> tuple[Any, int]:
        if m.path in ndim:
            return m.path, m.axis % ndim[m.path]
        if len(signs[m.path]) > 1:
            raise ValueError(
                f"shrink_groups: {format_path(m.path)!r} is addressed with both negative and "
                "non-negative axes; pass tree= so they can be resolved")
        return m.path, m.axis

    # every channel removed on each (path, axis): the kept-channel count before any old
    # position gives its new position
    removed: dict[tuple[Any, int], list[np.ndarray]] = {}
    for fam, kept in zip(groups.families, plan.keep, strict=True):
        gone = np.setdiff1d(np.arange(fam.size), np.asarray(kept, int))
        for m in (*fam.members, *fam.dependents):
            local = (gone[:, None] * m.block + np.arange(m.block)[None, :]).ravel()
            for lo in m.starts():
                removed.setdefault(axis_key(m), []).append(lo + local)
    cut = {k: np.sort(np.concatenate(v)) for k, v in removed.items()}

    def moved(m: Member) -> Member:
        gone = cut[axis_key(m)]
        starts = [lo - int(np.searchsorted(gone, lo)) for lo in m.starts()]
        steps = set(np.diff(starts).tolist())
        if len(steps) > 1:
            raise ValueError(
                f"shrink_groups: {format_path(m.path)!r} axis {m.axis}: the recurrences of a "
                "repeated member lose different numbers of channels; the shrunk pattern is "
                "not periodic")
        return dataclasses.replace(m, offset=starts[0], stride=steps.pop() if steps else 0)

    families = []
    for fam, kept in zip(groups.families, plan.keep, strict=True):
        if kept:
            families.append(GroupFamily(len(kept), tuple(moved(m) for m in fam.members),
                                        tuple(moved(m) for m in fam.dependents), fam.name))
    return Groups.from_families(families)


def _is_leaf(tree: Any) -> bool:
    return jax.tree_util.treedef_is_leaf(jax.tree.structure(tree))


def shrink_opt_state(opt_state: Any, params: Any, groups: Groups, *,
                     plan: KeepPlan | None = None) -> Any:
    """Shrinks an optimizer state the way `shrink` shrinks ``params``, to keep training.

    Every sub-tree of ``opt_state`` with the structure and leaf shapes of ``params`` (Adam's
    moments, momentum traces, …) is cut by the plan; a `HessoState` keeps the entries of the
    kept groups; counters and other non-parameter fields are unchanged.

    Args:
      opt_state: the state of any optax transformation built on ``params``.
      params: the parameters *before* surgery (used for structure and, without ``plan``,
        to find the zero groups).
      groups: the `Groups`.
      plan: the `KeepPlan` returned by `shrink` (recomputed from ``params`` if omitted).

    Returns:
      The smaller optimizer state, for the transformation rebuilt on the shrunk params.
    """
    if plan is None:
        groups.validate(params, dependents="present")
        plan = KeepPlan.from_mask(groups, ~groups.zero_groups(params))
    plan.check(groups)
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    p_shapes = [jnp.shape(x) for x in p_leaves]
    keep = plan.keep_mask()

    def param_like(node: Any) -> bool:
        leaves, tdef = jax.tree_util.tree_flatten(node)
        return tdef == p_def and [jnp.shape(x) for x in leaves] == p_shapes

    def walk(node: Any) -> Any:
        if isinstance(node, HessoState):
            removed = plan.num_removed
            sched = np.asarray(node.schedule).copy()
            sched[3] = max(int(sched[3]) - removed, 0)
            # map through wrappers (an nnx.Optimizer keeps each field in a Variable)
            def cut(field: Any) -> Any:
                return jax.tree.map(lambda a: a[keep], field)

            return node._replace(redundant=cut(node.redundant), pruned=cut(node.pruned),
                                 scores=cut(node.scores),
                                 schedule=jax.tree.map(lambda a: jnp.asarray(sched),
                                                       node.schedule))
        if param_like(node):
            return apply_plan(node, groups, plan, dependents="present")
        if node is None or _is_leaf(node):
            return node
        children, tdef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
        return jax.tree_util.tree_unflatten(tdef, [walk(c) for c in children])

    return walk(opt_state)


# --------------------------------------------------------------------------- NNX modules


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
