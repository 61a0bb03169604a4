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

`shrink_model` (in `hesso_jax.frameworks`, re-exported here) does the same to a model
object and rewrites its layers' static sizes from the new parameter shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
from hesso_jax.hesso import HessoSchedule, HessoState

__all__ = ["KeepPlan", "apply_plan", "remaining_schedule", "shrink", "shrink_groups",
           "shrink_model", "shrink_opt_state"]  # noqa: F822 (shrink_model: __getattr__)


@dataclasses.dataclass(frozen=True)
class KeepPlan:
    """Which groups of each family survive surgery.

    Every family keeps at least one group. A family whose groups are all zero (fully
    pruned) keeps its lowest-indexed group as an exactly-zero placeholder: its channel is
    zero for every input, so the function is unchanged, and no leaf of the shrunk tree gets
    a zero-size axis (orbax refuses to save zero-size arrays, and several layers cannot be
    built with zero features). The cost is one channel per emptied family.

    Attributes:
      sizes: the original size of each family.
      keep: per family, the sorted local indices of the kept groups (never empty).

    Example:
      >>> import numpy as np, hesso_jax as hj
      >>> fams = [hj.GroupFamily(n, (hj.Member((k,), 0),)) for n, k in ((3, "a"), (2, "b"))]
      >>> groups = hj.Groups.from_families(fams)
      >>> plan = hj.KeepPlan.from_mask(groups, np.array([True, False, True, False, False]))
      >>> plan.keep, plan.keep_mask().tolist()  # family "b" keeps a zero placeholder
      (((0, 2), (0,)), [True, False, True, True, False])
    """

    sizes: tuple[int, ...]
    keep: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        sizes = tuple(int(s) for s in self.sizes)
        keep = tuple(tuple(int(i) for i in k) for k in self.keep)
        if len(sizes) != len(keep):
            raise ValueError(f"KeepPlan: {len(sizes)} sizes but {len(keep)} keep lists")
        for f, (n, k) in enumerate(zip(sizes, keep, strict=True)):
            if not k:
                raise ValueError(
                    f"KeepPlan family {f} keeps no group: every family keeps at least one, "
                    "so that no leaf of the shrunk tree has a zero-size axis (a fully "
                    "pruned family keeps one exactly-zero group; KeepPlan.from_mask does "
                    "this)")
            if list(k) != sorted(set(k)) or k[0] < 0 or k[-1] >= n:
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
            ``min(size, round_to * ceil(max(k, 1) / round_to))`` by also keeping the
            family's lowest-indexed removed groups, so that shrunk sizes divide a mesh
            axis. A family with nothing kept keeps ``min(size, round_to)`` groups
            (exactly-zero placeholders, see the class docstring). Keeping more groups never
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
            target = min(fam.size, -(-max(kept, 1) // round_to) * round_to)
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
        """Inverse of `to_json`.

        An empty keep list (written before every family kept a group) becomes ``[0]``,
        the placeholder `from_mask` keeps today.
        """
        d = json.loads(text)
        if d.get("format") != "hesso_jax.KeepPlan":
            raise ValueError("not a hesso_jax.KeepPlan document (missing format tag)")
        return cls(tuple(d["sizes"]), tuple(tuple(k) if k else (0,) for k in d["keep"]))


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
      ``tree`` with smaller leaves; structure and dtypes are unchanged, except that
      equinox modules get static fields that fit their new shapes
      (`hesso_jax.frameworks.equinox.fix_static`).

    Example:
      Cutting Adam's first moment (not zero, so `shrink` would refuse) like the params:

      >>> import numpy as np, hesso_jax as hj
      >>> groups = hj.Groups.from_families([hj.GroupFamily(3, (hj.Member(("w",), 1),))])
      >>> plan = hj.KeepPlan.from_mask(groups, np.array([True, False, True]))
      >>> hj.apply_plan({"w": np.arange(6.0).reshape(2, 3)}, groups, plan)["w"]
      array([[0., 2.],
             [3., 5.]])
    """
    plan.check(groups)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    for (leaf, axis), mask in sorted(_channel_keep(tree, groups, plan, dependents).items()):
        if not mask.all():
            take = np.take if isinstance(leaves[leaf], np.ndarray) else jnp.take
            leaves[leaf] = take(leaves[leaf], np.flatnonzero(mask), axis=axis)
    out = jax.tree_util.tree_unflatten(treedef, leaves)
    if "equinox" in sys.modules:  # equinox modules keep their sizes in static fields
        from hesso_jax.frameworks.equinox import restatic

        out = restatic(out, tree, groups, plan)
    return out


def _channel_keep(tree: Any, groups: Groups, plan: KeepPlan,
                  dependents: DependentsMode) -> dict[tuple[int, int], np.ndarray]:
    """``{(leaf, axis): bool[length]}``: the channels the plan keeps on each touched axis."""
    return groups.channel_keep(tree, plan.keep_mask(), dependents=dependents)


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
    function unchanged; a tolerance trades exactness for size. A family whose groups are
    all zero keeps one of them (its lowest-indexed group, still exactly zero): the function
    is unchanged and no leaf gets a zero-size axis, so the result can always be saved with
    orbax and rebuilt into layers (see `KeepPlan`).

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

    Example:
      Hidden neuron 1 of a two-layer MLP is exactly zero: its column of ``w1`` goes, and
      with it the dependent row of ``w2``.

      >>> import numpy as np, hesso_jax as hj
      >>> fam = hj.GroupFamily(3, (hj.Member(("w1",), 1),), dependents=(hj.Member(("w2",), 0),))
      >>> groups = hj.Groups.from_families([fam])
      >>> params = {"w1": np.array([[1., 0., 2.], [3., 0., 4.]]), "w2": np.ones((3, 5))}
      >>> small, plan = hj.shrink(params, groups)
      >>> small["w1"].shape, small["w2"].shape, plan.keep
      ((2, 2), (2, 5), ((0, 2),))
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

    Each family shrinks to its kept groups (at least one, see `KeepPlan`); member and
    dependent offsets move down by the channels removed before them on the same axis. The
    result records no structure fingerprint and no ``costs`` (the shrunk tree is a new
    structure; ``hj.group_costs(small_model, new_groups, x)`` recomputes them).

    Args:
      groups: the groups the plan was made for.
      plan: the `KeepPlan`.
      tree: the tree *before* surgery (or its ``jax.eval_shape``). Needed only when one
        leaf's axis is written with both signs (``1`` and ``-1``): it resolves them to the
        same axis. Without it such groups raise a ValueError instead of shifting wrongly.

    Example:
      Two heads of width 2 after two other channels; head 0 is removed, so head 1's
      offset moves down by its width:

      >>> import numpy as np, hesso_jax as hj
      >>> m = hj.Member(("qkv",), 1, block=2, offset=2)
      >>> groups = hj.Groups.from_families([hj.GroupFamily(2, (m,))])
      >>> plan = hj.KeepPlan.from_mask(groups, np.array([False, True]))
      >>> hj.shrink_groups(groups, plan).families[0].members[0]
      Member(path=('qkv',), axis=1, block=2, offset=2, repeat=1, stride=0)
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

    return Groups.from_families(
        GroupFamily(len(kept), tuple(moved(m) for m in fam.members),
                    tuple(moved(m) for m in fam.dependents), fam.name)
        for fam, kept in zip(groups.families, plan.keep, strict=True))


def _is_leaf(tree: Any) -> bool:
    return jax.tree_util.treedef_is_leaf(jax.tree.structure(tree))


Cuts = dict[Path, list[tuple[int, np.ndarray]]]


def _param_cuts(params: Any, groups: Groups, plan: KeepPlan) -> Cuts:
    """Per parameter path, the ``(axis, keep mask)`` cuts the plan makes on that leaf."""
    paths = tree_paths(params)
    cuts: Cuts = {}
    for (leaf, axis), mask in sorted(_channel_keep(params, groups, plan, "present").items()):
        if not mask.all():
            cuts.setdefault(paths[leaf], []).append((axis, mask))
    return cuts


def _cut_leaf(x: Any, cuts: list[tuple[int, np.ndarray]]) -> Any:
    """``x`` with the channels each ``(axis, keep mask)`` of ``cuts`` drops deleted."""
    take = np.take if isinstance(x, np.ndarray) else jnp.take
    for axis, mask in cuts:
        x = take(x, np.flatnonzero(mask), axis=axis)
    return x


def _cut_shape(shape: tuple[int, ...], cuts: list[tuple[int, np.ndarray]]) -> tuple[int, ...]:
    """The shape `_cut_leaf` gives a leaf of ``shape``."""
    out = list(shape)
    for axis, mask in cuts:
        out[axis] = int(mask.sum())
    return tuple(out)


def _remaining_schedule(schedule: np.ndarray, count: int, num_pruned: int) -> np.ndarray:
    """``(Tw', P', Tp, K')``: the part of a HESSO schedule still ahead at step ``count``.

    At a period boundary (or in warm-up) the ``P' = P - p`` periods left start after
    ``Tw' = Tw + p·Tp`` steps and select the ``K' = K - num_pruned`` groups not selected
    yet; after the schedule it is ``(Tw, P, Tp, 0)``. So ``hesso(shrunk groups, K', P', Tp,
    warmup_steps=Tw')`` continues the run: same step counter, same phase, same total.

    Raises:
      ValueError: in the middle of a pruning period (its selected groups are still on
        their way to zero and the periods after it would get another split of ``K``).
    """
    Tw, P, Tp, K = HessoSchedule.from_array(schedule)
    k = count - Tw
    if k >= P * Tp:
        return HessoSchedule(Tw, P, Tp, 0).as_array()
    p = max(k, 0) // Tp
    if k > 0 and k % Tp:
        raise ValueError(
            f"shrink_opt_state: HESSO is in the middle of pruning period {p} (step "
            f"{k % Tp} of {Tp}); shrink at a period boundary (step {Tw + (p + 1) * Tp}) or "
            f"after the schedule (step {Tw + P * Tp}), when the selected groups are zero")
    if K < 0:
        raise ValueError(
            "shrink_opt_state: this HESSO prunes to a Budget, whose fractions are of the "
            "dense model; the shrunk model's remaining budget is not a budget of the same "
            f"form, so shrink after the schedule (step {Tw + P * Tp})")
    return HessoSchedule(Tw + p * Tp, P - p, Tp, K - num_pruned).as_array()


def _shrunk_hesso_state(node: HessoState, keep: np.ndarray) -> HessoState:
    """The kept groups' entries of ``node`` and the schedule still ahead.

    Every field is rebuilt in its wrapper (an ``nnx.Optimizer`` keeps each in a Variable,
    a mutable reference), so the result shares no Variable with ``node``.
    """
    host = HessoState(*(np.asarray(jax.tree.leaves(field)[0]) for field in node))
    schedule = _remaining_schedule(host.schedule, int(host.count), int(host.pruned.sum()))
    # the placement probe sampled elements of the old layout: disarmed, it re-arms at the
    # next update (hesso_jax.placement)
    new = host._replace(redundant=host.redundant[keep], pruned=host.pruned[keep],
                        scores=host.scores[keep], schedule=schedule,
                        probe_key=np.zeros_like(host.probe_key))
    return HessoState(*(jax.tree.map(lambda _, v=value: jnp.asarray(v), field)
                        for field, value in zip(node, new, strict=True)))


def shrink_opt_state(opt_state: Any, params: Any, groups: Groups, *,
                     plan: KeepPlan | None = None) -> Any:
    """Shrinks an optimizer state the way `shrink` shrinks ``params``, to keep training.

    Walks ``opt_state`` from the root. A sub-tree whose leaf paths (`tree_paths`, which
    look through ``nnx.Variable`` wrappers) are parameter paths, each leaf with that
    parameter's shape, is parameter-shaped (Adam's ``mu``/``nu``, momentum traces, a
    partial tree such as an ``optax.masked`` state): each of its leaves is cut like the
    parameter at its path, whatever its leaf kind (arrays, ``nnx.Param``,
    ``nnx.OptVariable``, other ``nnx.Variable``; the wrappers are kept). A `HessoState`
    keeps the kept groups' ``redundant``/``pruned``/``scores`` entries (a fully pruned
    family's placeholder group stays pruned, so HESSO holds it at zero) and gets the
    schedule still ahead, ``schedule = (Tw', P', Tp, K')`` (below); its placement probe,
    which sampled the old layout, is disarmed. Counters and every other leaf are
    unchanged. A leaf outside such sub-trees that still has the pre-surgery
    shape of a cut parameter raises a ValueError: nothing is returned half cut.

    Continuing a HESSO run: rebuild the transformation on the shrunk groups with the
    schedule the shrunk state carries, ``hj.hesso(hj.shrink_groups(groups, plan),
    **remaining_schedule(small_state))``, after the same base optimizer. After the
    schedule (``K' = 0``) it only holds the pruned groups at zero; at a period boundary
    (period ``p`` next) the ``P' = P - p`` periods left, after ``Tw' = Tw + p·Tp`` steps,
    select the ``K' = K - pruned`` groups still due, split by `schedule_counts` (the
    original split when ``K mod P < P'``). `hesso_status` of the shrunk state reports the
    same step and phase and this schedule. In the middle of a period a ValueError says
    when to shrink instead. The shrunk run then equals the masked run continued with
    HESSO, to float rounding (the shrunk reductions are shorter).

    For an ``nnx.Optimizer``::

        plan = hj.KeepPlan.from_mask(groups, ~groups.zero_groups(nnx.state(model)))
        small = hj.shrink_model(model, groups, plan=plan)
        small_state = hj.shrink_opt_state(optimizer.opt_state,
                                          nnx.state(model, nnx.Param), groups, plan=plan)
        tx = optax.chain(optax.adam(lr), hj.hesso(hj.shrink_groups(groups, plan),
                                                  **remaining_schedule(small_state)))
        small_optimizer = nnx.Optimizer(small, tx, wrt=nnx.Param)
        small_optimizer.opt_state = small_state
        small_optimizer.step.value = optimizer.step.value

    Args:
      opt_state: the state of any optax transformation built on ``params``.
      params: the parameters *before* surgery (used for structure and, without ``plan``,
        to find the zero groups).
      groups: the `Groups`.
      plan: the `KeepPlan` returned by `shrink` (without it, `KeepPlan.from_mask` of the
        groups of ``params`` that are not exactly zero).

    Returns:
      The smaller optimizer state, for the transformation rebuilt on the shrunk params.

    Raises:
      ValueError: if a parameter-shaped leaf could not be cut (naming its path and the
        parameter), if the plan was made for other groups, or mid-period (see above).

    Example:
      >>> import jax.numpy as jnp, optax, hesso_jax as hj
      >>> groups = hj.Groups.from_families([hj.GroupFamily(3, (hj.Member(("w",), 1),))])
      >>> params = {"w": jnp.array([[1., 0., 2.]])}
      >>> state = optax.adam(1e-3).init(params)
      >>> small = hj.shrink_opt_state(state, params, groups)
      >>> small[0].mu["w"].shape, small[0].nu["w"].shape
      ((1, 2), (1, 2))
    """
    if plan is None:
        groups.validate(params, dependents="present")
        plan = KeepPlan.from_mask(groups, ~groups.zero_groups(params))
    plan.check(groups)
    shapes = {p: tuple(np.shape(x)) for p, x in zip(tree_paths(params),
                                                    jax.tree.leaves(params), strict=True)}
    cuts = _param_cuts(params, groups, plan)
    # pre-surgery shapes of cut parameters that no parameter has after surgery
    after = {_cut_shape(shape, cuts.get(p, [])) for p, shape in shapes.items()}
    stale = {shapes[p]: p for p in cuts if shapes[p] not in after}
    keep = plan.keep_mask()

    def param_like(node: Any) -> bool:
        leaves = jax.tree.leaves(node)
        return bool(leaves) and all(shapes.get(p) == tuple(np.shape(x)) for p, x in
                                    zip(tree_paths(node), leaves, strict=True))

    def cut_tree(node: Any) -> Any:
        leaves, tdef = jax.tree_util.tree_flatten(node)
        return jax.tree_util.tree_unflatten(tdef, [
            _cut_leaf(x, cuts.get(p, [])) for p, x in zip(tree_paths(node), leaves,
                                                           strict=True)])

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, HessoState):
            return _shrunk_hesso_state(node, keep)
        if param_like(node):
            return cut_tree(node)
        if node is None or _is_leaf(node):
            shape = None if node is None else tuple(np.shape(node))
            if shape in stale:
                raise ValueError(
                    f"shrink_opt_state: opt_state{where} has shape {shape}, the pre-surgery "
                    f"shape of parameter {format_path(stale[shape])!r}, but is not inside a "
                    "sub-tree with the parameters' paths and shapes, so it cannot be cut; "
                    "nothing was returned. Cut it yourself with hj.apply_plan, or re-create "
                    "that part of the state")
            return node
        children, tdef = jax.tree_util.tree_flatten_with_path(
            node, is_leaf=lambda x: x is not node)
        return jax.tree_util.tree_unflatten(
            tdef, [walk(c, where + jax.tree_util.keystr(k)) for k, c in children])

    return walk(opt_state, "")


def remaining_schedule(opt_state: Any) -> dict[str, int]:
    """``{'K', 'P', 'Tp', 'warmup_steps'}`` of the one `HessoState` in ``opt_state``.

    On a state returned by `shrink_opt_state` these are the `hesso` arguments that continue
    the run on the shrunk groups (see there); on any other HESSO state, the arguments the
    transformation was built with (``K`` as a count).

    Raises:
      ValueError: unless ``opt_state`` holds exactly one `HessoState`.
    """
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, HessoState))
             if isinstance(x, HessoState)]
    if len(found) != 1:
        raise ValueError(f"remaining_schedule: expected one HessoState in opt_state, found "
                         f"{len(found)}")
    Tw, P, Tp, K = HessoSchedule.from_array(jax.tree.leaves(found[0].schedule)[0])
    return {"K": K, "P": P, "Tp": Tp, "warmup_steps": Tw}


def __getattr__(name: str) -> Any:
    """``shrink_model`` lives in `hesso_jax.frameworks` (built on this module)."""
    if name == "shrink_model":
        from hesso_jax.frameworks import shrink_model

        return shrink_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
