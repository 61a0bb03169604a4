"""Parameter groups: the structures HESSO scores, projects to zero and surgery removes.

A *group family* is ``n`` groups of the same shape. Each member ``Member(path, axis,
block, offset, repeat, stride)`` contributes, to group ``i`` of the family, the slices

    [offset + r * stride + i * block : offset + r * stride + (i + 1) * block],  r < repeat,

along ``axis`` of the leaf at ``path`` (``repeat=1`` by default: one slice),

so one family can cover the out-channels of a kernel together with the matching bias,
BatchNorm scale and shift (``block=1``), the heads of an attention projection
(``block=head_dim`` when heads are folded into one axis) or one segment of a
concatenation (``offset``); ``repeat``/``stride`` describe a channel that is the inner
factor of a merged axis (a ``(h, w, C)`` feature map flattened before a Dense layer: the
Dense kernel's rows of channel ``i`` are ``p * C + i`` for every position ``p``).
Members are the *zero-invariant* part: when every member
slice of group ``i`` is zero, the family's output channel ``i`` is zero for every input.
*Dependents* (consumer in-channels, BatchNorm running statistics) are not projected by the
optimizer; they are only removed by surgery.

Groups are numbered family by family, in the order the families were given: family ``f``
owns the global indices ``[start_f, start_f + size_f)``. Every per-group quantity in this
library is a vector of length ``G = num_groups`` in that order.

The one mechanism behind every per-group computation is a static *channel map*: for each
(leaf, axis) that a family touches, an ``int32`` vector of the axis length whose entry
``c`` is the global group owning channel ``c`` (or ``G`` when no group does). With it

* a per-group reduction of an elementwise quantity ``q(x)`` is
  ``segment_sum(sum_{other axes} q(x), channel_map, G + 1)[:G]`` — one reduction and one
  segment sum per leaf, no Python loop over groups;
* a length-``G`` vector ``v`` is broadcast onto a leaf as ``concat(v, fill)[channel_map]``
  reshaped along the axis;
* surgery keeps channel ``c`` iff ``concat(keep, True)[channel_map][c]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from hesso_jax.jaxpr.trace import trace_call

if TYPE_CHECKING:
    from hesso_jax.costs import GroupCosts

PathKey = str | int
Path = tuple[PathKey, ...]

__all__ = [
    "AxisMap",
    "Fingerprint",
    "resolve_count",
    "resolve_min_keep",
    "GroupFamily",
    "Groups",
    "Layout",
    "Member",
    "Path",
    "format_path",
    "replicate",
    "structure_fingerprint",
    "tree_paths",
]


def _key_name(key: Any) -> PathKey:
    """Turns one ``jax.tree_util`` key entry into a plain ``str``/``int`` path key."""
    if isinstance(key, jax.tree_util.DictKey):
        k = key.key
        return k if isinstance(k, int) and not isinstance(k, bool) else str(k)
    if isinstance(key, jax.tree_util.SequenceKey):
        return key.idx
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return key.key
    return str(key)


def tree_paths(tree: Any) -> list[Path]:
    """Paths of a pytree's leaves, in ``jax.tree.leaves`` order.

    A path is a tuple of plain keys, as ``flax.traverse_util.flatten_dict`` and
    ``nnx.to_flat_state`` write them, e.g. ``('block1', 'conv', 'kernel')``. The trailing
    ``.value`` attribute through which a ``flax.nnx.Variable`` exposes its array is dropped,
    so an ``nnx.State`` and the equivalent nested dict give the same paths.

    Example:
      >>> import numpy as np, hesso_jax as hj
      >>> hj.tree_paths({"conv": {"kernel": np.zeros(3), "bias": np.zeros(1)}, "w": [0.0]})
      [('conv', 'bias'), ('conv', 'kernel'), ('w', 0)]
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    paths = []
    for key_path, _leaf in flat:
        keys = list(key_path)
        if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
            keys = keys[:-1]
        paths.append(tuple(_key_name(k) for k in keys))
    return paths


def _shape(x: Any) -> tuple[int, ...]:
    """Shape of an array, tracer or ShapeDtypeStruct without materialising it."""
    shape = getattr(x, "shape", None)
    return tuple(shape) if shape is not None else tuple(np.shape(x))


ONE_PASS_ROWS = 64
"""Leaves of at most this many rows (the product of the axes before the channel axis) are
summed by `_sum_rows` in one multi-output reduction; taller ones block by block."""

ROW_BLOCK = 32
"""Rows per block of `_sum_rows`' reductions of a leaf taller than `ONE_PASS_ROWS`."""


def _channel_sums(m: AxisMap, terms: Sequence[jax.Array]) -> jax.Array:
    """``float32[k, C]``: the ``k`` leaf-shaped ``terms`` summed over all axes but ``m.axis``.

    Row ``j``, channel ``c``: ``Σ_{e : e[axis] = c} terms[j]_e`` (float32), ``C`` the
    length of member leaf ``m``'s channel axis. With the leaf viewed as ``(A, C, B)``
    (``A`` rows before the channel axis, ``B`` elements after it), `_sum_rows` sums all
    ``k`` terms with one multi-output reduction per stage, so each term has one consumer
    and XLA computes it inside that reduction: a term such as the Adam update ``u`` that
    the period start recomputes (`hesso_jax.hesso`'s fused form) is never held in a
    leaf-sized buffer, only the per-block partial sums are (``k·⌈A/32⌉·C`` floats).

    Why this form (XLA:CPU, jax 0.10; RESULTS.md, "Saliency sums of tall leaves"): a
    one-output sum over the major axis of an ``(A, C)`` array goes to a library kernel
    (YNNPACK) that slows from ~1 to ~10 ns per element beyond ``C ≈ 10⁴`` (``(64, 10⁵)``:
    85 ms a term) and needs its operand in a buffer: the earlier rule sent leaves of over
    64 rows and under 8192 channels there, and the 10.7 M-parameter MLP's donated step
    held ``u`` of its ``10⁴ × 10³`` kernel (+35.1 MB of scratch). Blocks of 32 rows cost
    what blocks of 16 cost there (period starts within noise, interleaved) and leave half
    the partial sums, which no longer raise the peak of XLA's buffer assignment: that
    step's scratch over Adam's is +0.01 MB (blocks of 16: +3.04 MB).
    """
    shape, axis = m.shape, m.axis
    A, C = int(np.prod(shape[:axis])), shape[axis]
    B = int(np.prod(shape[axis + 1:]))
    if A * B == 1:
        return jnp.stack([t.astype(jnp.float32).reshape(C) for t in terms])
    return jnp.stack(_sum_rows([t.astype(jnp.float32).reshape(A, C, B) for t in terms]))


def _sum_rows(terms: list[jax.Array]) -> list[jax.Array]:
    """``Σ_{a, b} t[a, :, b]`` (each ``float32[C]``) of each ``(A, C, B)`` term ``t``.

    One multi-output ``lax.reduce`` over ``(a, b)`` for all terms when ``A`` is at most
    `ONE_PASS_ROWS`. Taller: the rows are padded with zeros to ``n = ⌈A/R⌉`` whole blocks (``R =
    ROW_BLOCK``), reduced block by block to ``(n, C)`` partial sums, which are summed the
    same way (recursively): ``Σ_a = Σ_{blocks} Σ_{a ∈ block}``, the padding adding ``0``.
    Padding rather than a separate remainder keeps one consumer per term (two would make
    XLA materialise an expensive term such as ``u`` once for both). A single term gets a
    second output (``Σ t`` twice) and an optimisation barrier, so XLA does not turn it back
    into a one-output sum (`_channel_sums`: the slow library kernel).
    """
    A, C, B = terms[0].shape
    single = len(terms) == 1
    if single:
        terms = [terms[0], terms[0]]
    zero = jnp.zeros((), jnp.float32)

    def add(a: tuple, b: tuple) -> tuple:
        return tuple(x + y for x, y in zip(a, b, strict=True))

    def reduce(ts: list[jax.Array], dims: tuple[int, ...]) -> list[jax.Array]:
        out = jax.lax.reduce(tuple(ts), (zero,) * len(ts), add, dims)
        return list(jax.lax.optimization_barrier(out))

    if A <= ONE_PASS_ROWS:
        sums = reduce(terms, (0, 2))
    else:  # zero rows pad A to whole blocks: one consumer of each term, so XLA fuses it
        n = -(-A // ROW_BLOCK)
        pad = ((0, n * ROW_BLOCK - A), (0, 0), (0, 0))
        blocks = reduce([jnp.pad(t, pad).reshape(n, ROW_BLOCK, C, B) for t in terms], (1, 3))
        sums = _sum_rows([b.reshape(n, C, 1) for b in blocks])
    return sums[:1] if single else sums


def replicate(x: jax.Array) -> jax.Array:
    """``x`` resharded to fully replicated when its type carries explicit mesh axes.

    Under an ``AxisType.Explicit`` mesh the sharding is part of the array's type, and a
    scatter (``segment_sum``), ``concatenate`` or sort of differently sharded operands is a
    type error; ``jax.sharding.reshard(x, P())`` all-gathers the (small) vector first. Under
    ``AxisType.Auto`` meshes and on one device the type has no mesh axes and ``x`` is
    returned unchanged (the compiler chooses the layout).
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(entry is None for entry in spec):
        return x
    return jax.sharding.reshard(x, sharding.update(spec=PartitionSpec()))


def format_path(path: Path) -> str:
    """Human-readable path, e.g. ``'block1/conv/kernel'``."""
    return "/".join(str(k) for k in path) if path else "<root>"


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int; TypeError unless an int (bool excluded), ValueError if < minimum."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class Member:
    """One parameter slice pattern of a group family.

    Group ``i`` of the family owns, for every ``r < repeat``,
    ``[offset + r*stride + i*block : offset + r*stride + (i+1)*block]`` along ``axis`` of
    the leaf at ``path``.

    Attributes:
      path: tuple of dict keys / attribute names / sequence indices (see `tree_paths`).
      axis: the channel axis of that leaf (negative values count from the end).
      block: consecutive channels per group (e.g. ``head_dim`` for heads folded in one axis).
      offset: first channel of group 0 (a segment of a concatenation starts later).
      repeat: how many times the family's span recurs along the axis (inner factor of a
        merged axis, e.g. the rows of a Dense layer after a flatten).
      stride: distance between two recurrences; at least ``size * block`` of the family
        (checked by `Groups.validate`). Ignored (and stored as 0) when ``repeat == 1``.

    Example:
      Two heads of width 4 in the output axis of a fused projection, after 8 other
      channels (group ``i`` owns columns ``8 + 4i … 8 + 4i + 3``):

      >>> import hesso_jax as hj
      >>> m = hj.Member(("attn", "qkv", "kernel"), axis=1, block=4, offset=8)
      >>> m.starts(), m.to_dict()["block"]
      ([8], 4)
    """

    path: Path
    axis: int
    block: int = 1
    offset: int = 0
    repeat: int = 1
    stride: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.path, str) or not isinstance(self.path, Sequence):
            raise TypeError(f"Member path must be a tuple of keys, got {self.path!r}")
        path = tuple(self.path)
        for key in path:
            if isinstance(key, bool) or not isinstance(key, str | int):
                raise TypeError(f"Member path {path!r}: keys must be str or int, got {key!r}")
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "axis", check_int(f"axis of {path!r}", self.axis))
        object.__setattr__(self, "block", check_int(f"block of {path!r}", self.block, 1))
        object.__setattr__(self, "offset", check_int(f"offset of {path!r}", self.offset, 0))
        object.__setattr__(self, "repeat", check_int(f"repeat of {path!r}", self.repeat, 1))
        stride = check_int(f"stride of {path!r}", self.stride, 0)
        if self.repeat > 1 and stride < 1:
            raise ValueError(f"Member {path!r}: repeat={self.repeat} needs a stride >= 1")
        object.__setattr__(self, "stride", stride if self.repeat > 1 else 0)

    def starts(self) -> list[int]:
        """First channel of group 0 in each recurrence: ``offset + r * stride``."""
        return [self.offset + r * self.stride for r in range(self.repeat)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``repeat``/``stride`` only when the member recurs)."""
        d = {"path": list(self.path), "axis": self.axis, "block": self.block,
             "offset": self.offset}
        if self.repeat > 1:
            d.update(repeat=self.repeat, stride=self.stride)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Member:
        """Inverse of `to_dict`."""
        return cls(tuple(d["path"]), d["axis"], d.get("block", 1), d.get("offset", 0),
                   d.get("repeat", 1), d.get("stride", 0))


@dataclasses.dataclass(frozen=True)
class GroupFamily:
    """``size`` groups of identical shape: see the module docstring.

    Attributes:
      size: number of groups ``n`` in the family.
      members: slices that are projected to zero (the zero-invariant part).
      dependents: slices removed only at surgery (consumer in-channels, running stats).
      name: optional label used in reports and error messages.

    Example:
      The hidden neurons of a two-layer MLP: neuron ``i`` is column ``i`` of ``w1`` and
      entry ``i`` of ``b1`` (members, zeroed by HESSO) and row ``i`` of ``w2`` (a
      dependent, removed with it by surgery):

      >>> import hesso_jax as hj
      >>> fam = hj.GroupFamily(16, (hj.Member(("w1",), 1), hj.Member(("b1",), 0)),
      ...                      dependents=(hj.Member(("w2",), 0),), name="hidden")
      >>> fam.size, len(fam.members), hj.GroupFamily.from_dict(fam.to_dict()) == fam
      (16, 2, True)
    """

    size: int
    members: tuple[Member, ...]
    dependents: tuple[Member, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", check_int("GroupFamily size", self.size))
        for field in ("members", "dependents"):
            items = getattr(self, field)
            if isinstance(items, Member) or not isinstance(items, Iterable):
                raise TypeError(f"GroupFamily {field} must be a sequence of Member")
            items = tuple(items)
            for item in items:
                if not isinstance(item, Member):
                    raise TypeError(f"GroupFamily {field} must hold Member, got {item!r}")
            object.__setattr__(self, field, items)
        if not isinstance(self.name, str):
            raise TypeError(f"GroupFamily name must be a str, got {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "size": self.size,
            "name": self.name,
            "members": [m.to_dict() for m in self.members],
            "dependents": [m.to_dict() for m in self.dependents],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroupFamily:
        """Inverse of `to_dict`."""
        return cls(
            d["size"],
            tuple(Member.from_dict(m) for m in d["members"]),
            tuple(Member.from_dict(m) for m in d.get("dependents", ())),
            d.get("name", ""),
        )


InputSpec = tuple[tuple[int, ...], str]


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """A digest of the traced structure a `Groups` was discovered on.

    Groups are a static analysis of one program: the same paths and shapes under another
    activation (``sigmoid(0) != 0``) or an extra residual connection break zero
    invariance, and surgery would then silently change the function. `discover_groups`
    records this fingerprint of the program it traced; `Groups.check_structure` retraces
    a model and refuses one whose structure differs.

    Attributes:
      digest: SHA-256 (hex) of the canonical program text: every parameter leaf's path,
        shape and dtype, then the jaxpr as JAX prints it, with object addresses
        (``at 0x…``) removed so that the text is the same in every process.
      inputs: ``(shape, dtype)`` of each positional example input when they were all
        arrays (and no keyword inputs), so the structure can be retraced without them;
        ``None`` otherwise.
    """

    digest: str
    inputs: tuple[InputSpec, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"digest": self.digest,
                "inputs": None if self.inputs is None else [[list(s), d] for s, d in
                                                             self.inputs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fingerprint:
        """Inverse of `to_dict`."""
        inputs = d.get("inputs")
        return cls(str(d["digest"]), None if inputs is None else tuple(
            (tuple(int(n) for n in s), str(t)) for s, t in inputs))


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _as_pure(model_or_fn: Any, args: tuple) -> tuple[Callable, Any, tuple]:
    """``(fn, state, inputs)`` for the two forms of `discover_groups`."""
    from flax import nnx

    if isinstance(model_or_fn, nnx.Module):
        graphdef, state = nnx.split(model_or_fn)

        def fn(st: Any, *a: Any, **k: Any) -> Any:
            return nnx.merge(graphdef, st)(*a, **k)

        return fn, state, args
    if not callable(model_or_fn) or not args:
        raise TypeError("structure_fingerprint takes (model, *inputs) or (fn, params, *inputs)")
    return model_or_fn, args[0], args[1:]


def structure_fingerprint(model_or_fn: Any, *args: Any, **kwargs: Any) -> Fingerprint:
    """The `Fingerprint` of ``model(*args, **kwargs)`` or ``fn(params, *args, **kwargs)``.

    Same two forms and the same tracing as `discover_groups` (the whole ``nnx.state`` of a
    module; inputs that are not arrays are static). Values do not matter, only the program:
    ``jax.ShapeDtypeStruct`` inputs give the same fingerprint as arrays of that shape.
    """
    fn, state, inputs = _as_pure(model_or_fn, args)
    closed = trace_call(fn, state, inputs, kwargs)
    lines = [f"{format_path(p)} {tuple(_shape(x))} {getattr(x, 'dtype', type(x).__name__)}"
             for p, x in zip(tree_paths(state), jax.tree.leaves(state), strict=True)]
    text = "\n".join([*lines, _ADDRESS.sub("", str(closed.jaxpr))])
    specs = None
    if not kwargs and all(isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct)
                          for x in inputs):
        specs = tuple((tuple(_shape(x)), str(x.dtype)) for x in inputs)
    return Fingerprint(hashlib.sha256(text.encode()).hexdigest(), specs)


def _other_mode_matches(model: Any, args: tuple, kwargs: dict, digest: str) -> bool:
    """Whether a copy of an NNX ``model`` in train or in eval mode has ``digest``.

    Train/eval mode (BatchNorm statistics, dropout) is part of the traced program, and a
    model is often discovered in one mode and shrunk in the other; the model itself is
    not changed.
    """
    from flax import nnx

    if not isinstance(model, nnx.Module):
        return False
    for mode in ("train", "eval"):
        copy = nnx.clone(model)
        getattr(copy, mode)()
        if structure_fingerprint(copy, *args, **kwargs).digest == digest:
            return True
    return False


@dataclasses.dataclass(frozen=True, eq=False)
class AxisMap:
    """Static channel → global-group map of one axis of one leaf.

    Attributes:
      leaf: position of the leaf in ``jax.tree.leaves(tree)``.
      path: the leaf's path.
      axis: non-negative axis.
      shape: the leaf's shape.
      index: ``int32[shape[axis]]``; ``index[c]`` is the global group owning channel ``c``,
        or ``G`` (the number of groups) when channel ``c`` belongs to no group.
    """

    leaf: int
    path: Path
    axis: int
    shape: tuple[int, ...]
    index: np.ndarray

    def expand(self, ext: jax.Array) -> jax.Array:
        """Per-element view of ``ext[index]`` (``ext`` has ``G + 1`` entries).

        Returns an array of ``len(shape)`` dims that broadcasts against the leaf: the
        mapped values along ``axis`` and size 1 elsewhere.
        """
        per_channel = ext[self.index]
        shape = [1] * len(self.shape)
        shape[self.axis] = self.shape[self.axis]
        return per_channel.reshape(shape)

    def channel_sum(self, values: jax.Array) -> jax.Array:
        """``values`` summed over every axis but ``axis`` (float32)."""
        others = tuple(a for a in range(values.ndim) if a != self.axis)
        return jnp.sum(values.astype(jnp.float32), axis=others)


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """The channel maps of a `Groups` on one concrete tree structure.

    Attributes:
      num_groups: G.
      treedef: the tree's structure.
      num_leaves: number of leaves.
      members: one `AxisMap` per leaf that holds member slices (one axis per leaf).
      dependents: one `AxisMap` per (leaf, axis) that holds dependent slices.
      missing: dependent paths absent from the tree (only when validated leniently).
    """

    num_groups: int
    treedef: Any
    num_leaves: int
    members: tuple[AxisMap, ...]
    dependents: tuple[AxisMap, ...]
    missing: tuple[Path, ...]


DependentsMode = Literal["require", "present"]


class Groups:
    """An ordered collection of `GroupFamily` with vectorised per-group operations.

    Build with `Groups.from_families`. All methods that take a tree accept any pytree whose
    leaf paths (see `tree_paths`) contain the member paths: nested dicts, ``nnx.State``,
    NamedTuples, lists.

    ``fingerprint`` (optional, set by `discover_groups`) identifies the program the groups
    were found on; `check_structure` compares a model against it. ``costs`` (a
    `hesso_jax.GroupCosts` or None, also set by `discover_groups`) holds the groups'
    parameter and FLOP costs for the example input, used by ``hj.hesso(groups,
    hj.Budget(...), ...)``. Equality and hashing compare the families only; neither
    survives `hesso_jax.shrink_groups` (both describe the program before surgery).
    """

    costs: GroupCosts | None

    def __init__(self, families: Iterable[GroupFamily], *,
                 fingerprint: Fingerprint | None = None):
        families = tuple(families)
        for fam in families:
            if not isinstance(fam, GroupFamily):
                raise TypeError(f"Groups takes GroupFamily objects, got {fam!r}")
        if fingerprint is not None and not isinstance(fingerprint, Fingerprint):
            raise TypeError(f"fingerprint must be a Fingerprint or None, got {fingerprint!r}")
        self._families = families
        self._fingerprint = fingerprint
        self.costs = None
        sizes = [f.size for f in families]
        self._starts = tuple(int(s) for s in np.cumsum([0, *sizes])[:-1])
        self._num_groups = int(sum(sizes))
        self._layouts: dict[Any, Layout] = {}

    @classmethod
    def from_families(cls, families: Iterable[GroupFamily], *,
                      fingerprint: Fingerprint | None = None) -> Groups:
        """Groups from families; global group order is family by family, in this order."""
        return cls(families, fingerprint=fingerprint)

    @property
    def fingerprint(self) -> Fingerprint | None:
        """The `Fingerprint` of the program these groups were discovered on, if recorded."""
        return self._fingerprint

    def with_fingerprint(self, fingerprint: Fingerprint | None) -> Groups:
        """The same families with ``fingerprint`` recorded."""
        return Groups(self._families, fingerprint=fingerprint)

    def check_structure(self, model_or_fn: Any, *args: Any, who: str = "check_structure",
                        **kwargs: Any) -> None:
        """Raises a ValueError unless ``model_or_fn`` traces to the recorded structure.

        Forms as in `discover_groups`: ``(model, *inputs)`` or ``(fn, params, *inputs)``.
        Without inputs (``(model,)`` or ``(fn, params)``) the recorded input shapes are
        used; given inputs must have the shapes and dtypes used at discovery (the program
        depends on them, batch size included). An NNX model also matches when a copy of it
        in the other train/eval mode does. Nothing is checked when no fingerprint was
        recorded (hand-written groups).

        Raises:
          ValueError: the structure (program, parameter paths, shapes or dtypes) differs,
            naming ``who``.
          TypeError: no inputs given and none recorded.
        """
        if self._fingerprint is None:
            return
        from flax import nnx

        given = args if isinstance(model_or_fn, nnx.Module) else args[1:]
        if not given and not kwargs:
            if self._fingerprint.inputs is None:
                raise TypeError(f"{who}: pass the example inputs the groups were discovered "
                                "with (they were not all arrays, so none were recorded)")
            args = (*args, *(jax.ShapeDtypeStruct(s, d) for s, d in
                             self._fingerprint.inputs))
        got = structure_fingerprint(model_or_fn, *args, **kwargs)
        if got.digest == self._fingerprint.digest or _other_mode_matches(
                model_or_fn, args, kwargs, self._fingerprint.digest):
            return
        raise ValueError(
            f"{who}: these groups were discovered on a different model: its traced program "
            f"(jaxpr, parameter paths, shapes and dtypes) has fingerprint {got.digest[:12]}, "
            f"the groups record {self._fingerprint.digest[:12]}. Groups of another program "
            "(another activation, an extra residual connection) can make surgery change the "
            "function; run hj.discover_groups on this model")

    @property
    def families(self) -> tuple[GroupFamily, ...]:
        """The families, in global group order."""
        return self._families

    @property
    def num_groups(self) -> int:
        """G, the total number of prunable groups."""
        return self._num_groups

    @property
    def starts(self) -> tuple[int, ...]:
        """Global index of each family's group 0."""
        return self._starts

    def family_index(self) -> np.ndarray:
        """``int32[G]``: the family each global group belongs to."""
        return np.repeat(np.arange(len(self._families), dtype=np.int32),
                         [f.size for f in self._families])

    def __len__(self) -> int:
        return len(self._families)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Groups) and self._families == other._families

    def __hash__(self) -> int:
        return hash(self._families)

    def __repr__(self) -> str:
        return f"Groups(num_groups={self._num_groups}, families={len(self._families)})"

    # ------------------------------------------------------------------ validation
    def _label(self, fi: int) -> str:
        name = self._families[fi].name
        return f"family {fi}" + (f" ({name!r})" if name else "")

    def validate(self, tree: Any, *, dependents: DependentsMode = "require") -> None:
        """Checks that the groups fit ``tree``; raises a ValueError naming what does not.

        Checks: every family is non-empty (``size >= 1``, at least one member); every member
        path exists (dependents too when ``dependents='require'``; with ``'present'`` absent
        dependents are allowed, e.g. BatchNorm statistics outside an optimizer's params);
        each axis is in range; each slice ends inside its axis
        (``offset + (repeat - 1) * stride + size * block <= length``); a recurring member's
        stride is at least its span (``size * block``); no slice is claimed twice, and no leaf holds
        member slices on two different axes (an element belongs to at most one group).

        Args:
          tree: the parameter pytree.
          dependents: ``'require'`` or ``'present'``.

        Raises:
          ValueError: with the offending family, path, axis or value.
          TypeError: if a member leaf is not a floating-point array.
        """
        self.layout(tree, dependents=dependents)

    def layout(self, tree: Any, *, dependents: DependentsMode = "require") -> Layout:
        """Validated channel maps for ``tree``'s structure and shapes (cached)."""
        if dependents not in ("require", "present"):
            raise ValueError(f"dependents must be 'require' or 'present', got {dependents!r}")
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        shapes = tuple(tuple(_shape(x)) for x in leaves)
        dtypes = tuple(str(getattr(x, "dtype", type(x).__name__)) for x in leaves)
        key = (treedef, shapes, dtypes, dependents)
        cached = self._layouts.get(key)
        if cached is None:
            cached = self._build_layout(tree, leaves, treedef, dependents)
            self._layouts[key] = cached
        return cached

    def _check_overlaps(self, claims: dict[tuple[int, int], list[tuple[int, int, int, str]]],
                        paths: list[Path]) -> None:
        """Raises if two claimed ``[lo, hi)`` channel spans on one leaf axis overlap."""
        for (leaf, axis), spans in claims.items():
            spans.sort()
            for (_lo1, hi1, f1, k1), (lo2, hi2, f2, k2) in zip(spans, spans[1:], strict=False):
                if lo2 < hi1:
                    raise ValueError(
                        f"{format_path(paths[leaf])!r} axis {axis}: channels [{lo2}, "
                        f"{min(hi1, hi2)}) are claimed twice ({self._label(f1)} as {k1}, "
                        f"{self._label(f2)} as {k2})")

    def _build_layout(self, tree: Any, leaves: list[Any], treedef: Any,
                      mode: DependentsMode) -> Layout:
        paths = tree_paths(tree)
        where = {p: i for i, p in enumerate(paths)}
        G = self._num_groups
        if not self._families:
            raise ValueError("Groups has no families: there is nothing to prune")
        # claims[(leaf, axis)] -> list of (lo, hi, family, kind)
        claims: dict[tuple[int, int], list[tuple[int, int, int, str]]] = {}
        member_axis: dict[int, tuple[int, int]] = {}
        missing: list[Path] = []
        for fi, fam in enumerate(self._families):
            label = self._label(fi)
            if fam.size < 1:
                raise ValueError(f"{label} is empty: size={fam.size} (must be >= 1)")
            if not fam.members:
                raise ValueError(f"{label} is empty: it has no members")
            for kind, items in (("member", fam.members), ("dependent", fam.dependents)):
                for m in items:
                    leaf = where.get(m.path)
                    if leaf is None:
                        if kind == "dependent" and mode == "present":
                            missing.append(m.path)
                            continue
                        near = [format_path(p) for p in paths if p[-1:] == m.path[-1:]][:5]
                        hint = f"; leaves with that name: {near}" if near else ""
                        raise ValueError(
                            f"{label}: {kind} path {format_path(m.path)!r} is not in the "
                            f"parameter tree{hint}")
                    shape = _shape(leaves[leaf])
                    ndim = len(shape)
                    if not -ndim <= m.axis < ndim:
                        raise ValueError(
                            f"{label}: {kind} {format_path(m.path)!r} axis {m.axis} is out of "
                            f"range for a leaf of shape {tuple(shape)} (ndim {ndim})")
                    axis = m.axis % ndim
                    length = shape[axis]
                    span = _check_span(label, kind, m, fam.size, axis, length)
                    if kind == "member":
                        dtype = getattr(leaves[leaf], "dtype", None)
                        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
                            raise TypeError(
                                f"{label}: member {format_path(m.path)!r} must be a "
                                f"floating-point array, got dtype {dtype}")
                        prev = member_axis.get(leaf)
                        if prev is not None and prev[0] != axis:
                            raise ValueError(
                                f"{format_path(m.path)!r} holds member slices on axis "
                                f"{prev[0]} ({self._label(prev[1])}) and axis {axis} "
                                f"({label}): an element can belong to one group only")
                        member_axis[leaf] = (axis, fi)
                    for lo in m.starts():
                        claims.setdefault((leaf, axis), []).append((lo, lo + span, fi, kind))
        self._check_overlaps(claims, paths)

        def build(kind: str) -> list[AxisMap]:
            maps: dict[tuple[int, int], np.ndarray] = {}
            for fi, fam in enumerate(self._families):
                items = fam.members if kind == "member" else fam.dependents
                start = self._starts[fi]
                for m in items:
                    leaf = where.get(m.path)
                    if leaf is None:
                        continue
                    shape = _shape(leaves[leaf])
                    axis = m.axis % len(shape)
                    index = maps.setdefault((leaf, axis), np.full(shape[axis], G, np.int32))
                    ids = start + np.repeat(np.arange(fam.size, dtype=np.int32), m.block)
                    for lo in m.starts():
                        index[lo:lo + fam.size * m.block] = ids
            return [
                AxisMap(leaf, paths[leaf], axis, tuple(_shape(leaves[leaf])), index)
                for (leaf, axis), index in sorted(maps.items())
            ]

        return Layout(G, treedef, len(leaves), tuple(build("member")),
                      tuple(build("dependent")), tuple(missing))

    # ------------------------------------------------------------------ reductions
    def reduce(self, fn: Callable[..., jax.Array], *trees: Any) -> jax.Array:
        """``float32[G]``: per group, the sum of ``fn(*leaves)`` over its member elements.

        ``fn`` is elementwise (e.g. ``lambda x: x * x``); the trees share one structure.
        `reduce_many` with one statistic.
        """
        return self.reduce_many(lambda *leaves: (fn(*leaves),), *trees)[0]

    def reduce_many(self, fn: Callable[..., Sequence[jax.Array]], *trees: Any) -> jax.Array:
        """``float32[k, G]``: row ``j`` is, per group ``g``, ``Σ_{e ∈ g} fn(*trees)[j]_e``.

        ``fn`` is elementwise and returns ``k`` arrays (e.g. ``lambda x, d: (x * x, x * d)``);
        the trees share one structure. Per member leaf, the ``k`` terms are summed over the
        non-channel axes to ``float32[k, C]`` (`_channel_sums`); the per-channel partial
        sums are made replicated (`replicate`) and added into their groups by one
        ``segment_sum`` over the concatenated channel maps. The result is replicated, so
        leaves sharded on an ``AxisType.Explicit`` mesh work too.
        """
        layout = self.layout(trees[0], dependents="present")
        leaves = [jax.tree.leaves(t) for t in trees]
        k = len(jax.eval_shape(fn, *(jax.ShapeDtypeStruct((), jnp.float32) for _ in trees)))
        if not layout.members:
            return jnp.zeros((k, self._num_groups), jnp.float32)
        parts = [replicate(_channel_sums(m, fn(*(lv[m.leaf] for lv in leaves))))
                 for m in layout.members]
        index = np.concatenate([m.index for m in layout.members])
        sums = jax.ops.segment_sum(jnp.concatenate(parts, axis=1).T, index,
                                   num_segments=self._num_groups + 1)
        return sums[: self._num_groups].T

    def sq_norms(self, tree: Any) -> jax.Array:
        """``float32[G]``: ``‖x_g‖²`` over each group's member elements."""
        return self.reduce(lambda x: jnp.square(x.astype(jnp.float32)), tree)

    def dots(self, a: Any, b: Any) -> jax.Array:
        """``float32[G]``: ``⟨a_g, b_g⟩`` over each group's member elements."""
        return self.reduce(lambda x, y: x.astype(jnp.float32) * y.astype(jnp.float32), a, b)

    def nonzero_counts(self, tree: Any) -> jax.Array:
        """``float32[G]``: number of member elements of each group that are not exactly 0."""
        return self.reduce(lambda x: (x != 0).astype(jnp.float32), tree)

    def counts(self, tree: Any) -> np.ndarray:
        """``int64[G]``: number of member elements in each group (static, host-side)."""
        layout = self.layout(tree, dependents="present")
        counts = np.zeros(self._num_groups + 1, np.int64)
        for m in layout.members:
            per_channel = int(np.prod(m.shape)) // m.shape[m.axis]
            np.add.at(counts, m.index, per_channel)
        return counts[: self._num_groups]

    def zero_groups(self, tree: Any) -> np.ndarray:
        """``bool[G]`` (host): groups whose member elements are all exactly 0.0."""
        return np.asarray(self.nonzero_counts(tree)) == 0

    def broadcast(self, vec: jax.Array, tree: Any, fill: Any = 0) -> Any:
        """Spreads a length-G vector onto ``tree``: each member element gets its group's value.

        Elements of no group (and leaves without members) get ``fill``. The result has
        ``tree``'s structure, each leaf of the leaf's shape and ``vec``'s dtype.
        """
        vec = jnp.asarray(vec)
        if vec.shape != (self._num_groups,):
            raise ValueError(f"expected a vector of shape ({self._num_groups},), got {vec.shape}")
        layout = self.layout(tree, dependents="present")
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        ext = jnp.concatenate([vec, jnp.full((1,), fill, vec.dtype)])
        out = [jnp.full(_shape(x), fill, vec.dtype) for x in leaves]
        for m in layout.members:
            out[m.leaf] = jnp.broadcast_to(m.expand(ext), m.shape)
        return jax.tree_util.tree_unflatten(treedef, out)

    def mask(self, tree: Any, keep: Any, *, dependents: bool = False) -> Any:
        """``tree`` with every member slice of the removed groups set to exactly ``0``.

        The one keep-mask operation: element ``e`` of a leaf becomes
        ``where(concat(keep, True)[index(e)], e, 0)``, with ``index`` the channel → group
        map of each axis the groups touch (channels of no group are kept). A ``where``,
        not a product, so a removed element is ``0`` even when it was NaN or inf.
        Jittable: ``keep`` may be traced; leaf dtypes and shapes are unchanged.

        Args:
          tree: a pytree holding the member paths (params, updates, an ``nnx.State``).
          keep: ``bool[G]`` in global group order, True for the groups that stay.
          dependents: also zero the dependents' slices of removed groups (consumer
            in-channels, norm statistics), i.e. everything `hesso_jax.shrink` would cut.

        Example:
          >>> import numpy as np, hesso_jax as hj
          >>> g = hj.Groups.from_families([hj.GroupFamily(3, (hj.Member(("w",), 1),))])
          >>> g.mask({"w": np.ones((2, 3))}, np.array([True, False, True]))["w"]
          Array([[1., 0., 1.],
                 [1., 0., 1.]], dtype=float32)
        """
        keep = jnp.asarray(keep)
        if keep.shape != (self._num_groups,) or keep.dtype != jnp.bool_:
            raise ValueError(f"keep must be bool[{self._num_groups}], got "
                             f"{keep.dtype}{list(keep.shape)}")
        layout = self.layout(tree, dependents="present")
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        ext = jnp.concatenate([keep, jnp.ones((1,), bool)])
        for m in (*layout.members, *(layout.dependents if dependents else ())):
            x = jnp.asarray(leaves[m.leaf])
            leaves[m.leaf] = jnp.where(m.expand(ext), x, jnp.zeros((), x.dtype))
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def channel_keep(self, tree: Any, keep: np.ndarray, *,
                     dependents: DependentsMode | None = "present"
                     ) -> dict[tuple[int, int], np.ndarray]:
        """Host-side keep masks per touched axis: ``{(leaf, axis): bool[length]}``.

        Channel ``c`` of axis ``axis`` of leaf number ``leaf`` (in ``jax.tree.leaves``
        order) is kept iff ``concat(keep, True)[index][c]`` for every family touching that
        axis, the same rule as `mask`; what `hesso_jax.shrink` keeps.

        Args:
          tree: the tree whose leaves are indexed.
          keep: ``bool[G]`` (host), True for the groups that stay.
          dependents: ``None`` for members only, else how missing dependent paths are
            treated (``"present"``: skipped, ``"require"``: a ValueError).
        """
        keep = np.asarray(keep, bool)
        if keep.shape != (self._num_groups,):
            raise ValueError(f"keep must be bool[{self._num_groups}], got shape {keep.shape}")
        layout = self.layout(tree, dependents=dependents or "present")
        ext = np.concatenate([keep, [True]])
        out: dict[tuple[int, int], np.ndarray] = {}
        for m in (*layout.members, *(layout.dependents if dependents else ())):
            key, channel = (m.leaf, m.axis), ext[m.index]
            out[key] = channel if key not in out else out[key] & channel
        return out

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``fingerprint`` only when one is recorded)."""
        d: dict[str, Any] = {"format": "hesso_jax.Groups", "version": 1,
                             "families": [f.to_dict() for f in self._families]}
        if self._fingerprint is not None:
            d["fingerprint"] = self._fingerprint.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Groups:
        """Inverse of `to_dict`."""
        if d.get("format") != "hesso_jax.Groups":
            raise ValueError("not a hesso_jax.Groups document (missing format tag)")
        fp = d.get("fingerprint")
        return cls((GroupFamily.from_dict(f) for f in d["families"]),
                   fingerprint=None if fp is None else Fingerprint.from_dict(fp))

    def to_json(self, **kwargs: Any) -> str:
        """JSON text; round-trips through `from_json` (str and int path keys are kept)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> Groups:
        """Inverse of `to_json`."""
        return cls.from_dict(json.loads(text))


def resolve_count(K: int | float, num_groups: int) -> int:
    """Number of groups to prune from an int count or a float fraction in (0, 1).

    A fraction is rounded to the nearest count (``round(K * G)``); one that rounds to 0
    groups is an error (``K=0``, an int, prunes nothing on purpose).

    Raises:
      ValueError: if the count is negative or not below ``num_groups``, or a fraction is
        outside (0, 1) or rounds to no group at all.
      TypeError: if ``K`` is neither an int nor a float.
    """
    if isinstance(K, bool) or not isinstance(K, int | float | np.integer | np.floating):
        raise TypeError(f"K must be an int count or a float fraction, got {K!r}")
    if isinstance(K, float | np.floating):
        if not 0.0 < K < 1.0:
            raise ValueError(f"K as a fraction must lie in (0, 1), got {K}")
        count = int(round(float(K) * num_groups))
        if count == 0:
            raise ValueError(
                f"K={K} of G={num_groups} groups rounds to 0 groups, so nothing would be "
                f"pruned; pass a fraction of at least 1/G = {1 / num_groups:.2g} or an int "
                "count (K=0 prunes nothing on purpose)")
    else:
        count = int(K)
    if count < 0:
        raise ValueError(f"K must be >= 0, got {count}")
    if count >= num_groups:
        raise ValueError(
            f"K={count} must be smaller than the number of groups G={num_groups}: pruning "
            "every group would remove the whole network")
    return count


def resolve_min_keep(min_keep: int | float, groups: Groups, k: int | None = None,
                     who: str = "hesso") -> np.ndarray:
    """``int32[F]``: the fewest groups each family keeps (its floor).

    ``min_keep`` is an int count (a family smaller than it keeps all its groups) or a float
    fraction in (0, 1) of each family's size, rounded up: ``m_f = min(m, n_f)`` or
    ``⌈m · n_f⌉``. With ``k`` the number of groups to prune, checks that the floors leave
    enough: ``k ≤ G − Σ_f m_f``.

    Raises:
      TypeError: if ``min_keep`` is neither an int nor a float.
      ValueError: for a negative count, a fraction outside (0, 1), or a ``k`` the floors
        do not leave room for (the message names the largest possible ``k``).
    """
    sizes = np.asarray([f.size for f in groups.families], np.int64)
    if isinstance(min_keep, bool) or not isinstance(
            min_keep, int | float | np.integer | np.floating):
        raise TypeError(f"min_keep must be an int count or a float fraction, got {min_keep!r}")
    if isinstance(min_keep, float | np.floating):
        if not 0.0 < min_keep < 1.0:
            raise ValueError(f"min_keep as a fraction must lie in (0, 1), got {min_keep}")
        floors = np.ceil(float(min_keep) * sizes - 1e-9).astype(np.int64)
    else:
        if min_keep < 0:
            raise ValueError(f"min_keep must be >= 0, got {min_keep}")
        floors = np.minimum(int(min_keep), sizes)
    if k is not None and k > groups.num_groups - int(floors.sum()):
        raise ValueError(
            f"{who}: K={k} groups cannot be pruned with min_keep={min_keep}: the "
            f"{len(sizes)} families keep at least {int(floors.sum())} of the "
            f"{groups.num_groups} groups, so K can be at most "
            f"{groups.num_groups - int(floors.sum())}")
    return floors.astype(np.int32)


def _check_span(label: str, kind: str, m: Member, size: int, axis: int, length: int) -> int:
    """The span ``size · block`` of ``m``'s slices; raises if they overlap or overrun."""
    span = size * m.block
    if m.repeat > 1 and m.stride < span:
        raise ValueError(
            f"{label}: {kind} {format_path(m.path)!r} axis {axis}: stride "
            f"{m.stride} is shorter than the span size {size} * block "
            f"{m.block} = {span}, so recurrences would overlap")
    hi = m.starts()[-1] + span
    if hi > length:
        raise ValueError(
            f"{label}: {kind} {format_path(m.path)!r} axis {axis}: slice "
            f"offset {m.offset} + (repeat {m.repeat} - 1) * stride "
            f"{m.stride} + size {size} * block {m.block} = {hi} "
            f"runs past the axis length {length}")
    return span
