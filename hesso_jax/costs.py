"""Per-group parameter and FLOP costs, read from the model's jaxpr.

`group_costs(model_or_fn, [params,] groups, *inputs)` walks the traced forward pass and
returns a `GroupCosts`: for every group the parameters and FLOPs its removal saves, the
dense totals, and the exact cost of removing any *set* of groups.

**What is counted.** Parameters: the elements of the parameter leaves (``nnx.Param`` for
a module; for a pure function every floating-point leaf of ``params`` not under a
``'batch_stats'`` key). FLOPs: ``dot_general`` and ``conv_general_dilated`` only, as
XLA's ``HloCostAnalysis`` counts them (one FMA = 2 FLOPs):

* ``dot_general``: ``2 · Π(batch) · Π(lhs free) · Π(rhs free) · Π(contracted)``;
* ``conv_general_dilated``: ``2 · (N / batch_group_count) · C_out · (C_in /
  feature_group_count) · Π_s V_s`` where ``V_s`` is the number of (output, kernel)
  position pairs of spatial dimension ``s`` that read a real (not padded, not dilated)
  input element — XLA's count, so ``SAME`` borders cost less than ``H·W·k²``.

Elementwise operations, reductions and transcendentals (also in XLA's total) are not
counted; on the reference models they are a few percent of XLA's ``flops``
(``tests/test_costs.py`` bounds the difference). ``lax.scan`` bodies count ``length``
times; ``cond`` counts every branch and ``while`` its body once (with a `CostWarning`).

**The exact set cost (multilinear model).** Every counted quantity is a product over its
*dimensions*: a kernel leaf's axes, or a linear op's iteration dimensions (batch,
contracted, free; for a conv the batch, ``C_out`` and per-group ``C_in``). A dimension
``d`` of size ``n_d`` is *mapped* when some of its channels belong to groups: channel
``c`` of the dimension belongs to group ``m_d[c]`` (a member or dependent slice of a leaf,
or an activation axis those slices produce, followed through reshapes, transposes,
concatenations, ...). Removing a set ``R`` of groups keeps ``n_d(R) = n_d − Σ_{g∈R}
c_{d,g}`` channels (``c_{d,g}``: channels of ``g`` in ``d``), so each *term* ``t`` (a leaf
or a linear op) costs ``a_t · Π_{d∈t} n_d(R)`` (``a_t``: product of its unmapped sizes,
times 2 for FLOPs) and

    cost(R) = const + Σ_t a_t Π_{d∈t} (n_d − r_d(R)),   r_d(R) = Σ_{g∈R} c_{d,g}.

This is exact for every ``R``: the shrunk model's cost (``hj.shrink_model``) is
``cost(R)``. For a dense layer ``x W`` with ``W: (C_in, C_out)``, ``C_in`` the channels of
family ``A`` and ``C_out`` of family ``B``, the term is bilinear:

    F(r_A, r_B) = 2 N (C_in − r_A)(C_out − r_B),
    F(0, 0) − F(r_A, r_B) = 2N (r_A C_out + r_B C_in − r_A r_B),

so the per-group costs ``GroupCosts.flops`` (removal of one group from the dense model:
``2N C_out`` for a group of ``A``, ``2N C_in`` for one of ``B``) *over-count* a set that
spans both families by the cross term ``2N r_A r_B``: the marginal cost of a group of
``A`` once ``r_B`` channels of ``B`` are gone is ``2N (C_out − r_B)``. `GroupCosts.removed`
evaluates the exact formula for any set, and `GroupCosts.marginal` gives the exact
marginal costs from any current state.

Example:
  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from hesso_jax.groups import GroupFamily, Groups, Member
  >>> params = {"w1": jnp.ones((3, 4)), "w2": jnp.ones((4, 2))}
  >>> groups = Groups.from_families([GroupFamily(
  ...     4, (Member(("w1",), 1),), (Member(("w2",), 0),))])
  >>> fn = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
  >>> c = group_costs(fn, params, groups, jnp.ones((5, 3)))
  >>> c.dense_flops, c.flops.tolist()        # 2·5·(3·4 + 4·2) ; 2·5·(3 + 2) per neuron
  (200, [50, 50, 50, 50])
  >>> c.dense_params, c.params.tolist()
  (20, [5, 5, 5, 5])
  >>> c.removed(np.array([True, True, False, False]))   # (params, flops) of a set
  (10, 100)
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from hesso_jax.groups import Groups, Path, tree_paths
from hesso_jax.jaxpr.interpreter import Interpreter
from hesso_jax.jaxpr.trace import trace_call

__all__ = ["CostTerms", "CostWarning", "GroupCosts", "costs_from_jaxpr", "group_costs"]

FMA_FLOPS = 2
"""FLOPs per multiply-accumulate, as XLA's ``HloCostAnalysis`` counts them."""


class CostWarning(UserWarning):
    """FLOPs the cost model could only bound (control flow with unknown trip counts)."""


Map = np.ndarray | None
"""Per-channel group ids of one dimension (``G`` = no group), or None: no group at all."""

Dim = tuple[int, Map]
"""``(size, map)`` of one dimension of a term."""


# ------------------------------------------------------------------------------ terms
@dataclasses.dataclass(frozen=True, eq=False)
class CostTerms:
    """One cost as ``const + Σ_t coef_t Π_m (size_{t,m} − r_{t,m}(R))`` (module docstring).

    Mapped dimensions are padded to ``M`` slots per term (padding slots: size 1, no
    entries). Entry ``e`` says that group ``group[e]`` owns ``count[e]`` channels of slot
    ``slot[e]`` (flat index ``t·M + m``).

    Attributes:
      num_groups: G.
      coef: ``int64[T]`` product of each term's unmapped sizes (and ``2`` for FLOPs).
      size: ``int64[T, M]`` sizes of the mapped dimensions.
      slot: ``int32[E]``; group: ``int32[E]``; count: ``int64[E]``.
      constant: the cost of everything no group touches.
    """

    num_groups: int
    coef: np.ndarray
    size: np.ndarray
    slot: np.ndarray
    group: np.ndarray
    count: np.ndarray
    constant: int

    @classmethod
    def build(cls, terms: Sequence[tuple[int, Sequence[Dim]]], num_groups: int) -> CostTerms:
        """From ``(coef, dims)`` pairs; dims whose map owns no channel fold into coef."""
        G = num_groups
        constant, kept = 0, []
        for coef, dims in terms:
            mapped = []
            for size, m in dims:
                if m is not None and bool((m < G).any()):
                    mapped.append((size, m))
                else:
                    coef *= size
            if mapped:
                kept.append((coef, mapped))
            else:
                constant += coef
        M = max((len(d) for _, d in kept), default=1)
        size = np.ones((len(kept), M), np.int64)
        slots, grps, cnts = [], [], []
        for t, (_, dims) in enumerate(kept):
            for j, (n, m) in enumerate(dims):
                size[t, j] = n
                ids, counts = np.unique(m[m < G], return_counts=True)
                slots.append(np.full(len(ids), t * M + j, np.int32))
                grps.append(ids.astype(np.int32))
                cnts.append(counts.astype(np.int64))

        def cat(xs: list[np.ndarray], dt: Any) -> np.ndarray:
            return np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)

        return cls(G, np.asarray([c for c, _ in kept], np.int64).reshape(-1), size,
                   cat(slots, np.int32), cat(grps, np.int32), cat(cnts, np.int64),
                   int(constant))

    @property
    def num_slots(self) -> int:
        """M, mapped dimensions per term (padded)."""
        return int(self.size.shape[1])

    def kept_sizes(self, drop: np.ndarray) -> np.ndarray:
        """``int64[T, M]``: ``n_{t,m}(R)`` with ``R`` = the groups where ``drop`` is True."""
        drop = np.asarray(drop, bool).reshape(self.num_groups)
        removed = np.bincount(self.slot, weights=self.count * drop[self.group],
                              minlength=self.size.size)
        return self.size - np.rint(removed).astype(np.int64).reshape(self.size.shape)

    def dense(self) -> int:
        """The cost with every group kept."""
        return self.value(np.zeros(self.num_groups, bool))

    def value(self, drop: np.ndarray) -> int:
        """The exact cost after removing the groups where ``drop`` is True."""
        kept = np.maximum(self.kept_sizes(drop), 0)
        return self.constant + int(np.sum(self.coef * np.prod(kept, axis=1)))

    def removed(self, drop: np.ndarray) -> int:
        """``dense() − value(drop)``: the cost the set removes (exact)."""
        return self.dense() - self.value(drop)

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(term[P], group[P], delta[P, M])``: the (term, group) pairs that meet.

        ``delta[p, m]`` is how many channels of slot ``m`` of the term the group owns.
        """
        M = self.num_slots
        term = self.slot // M
        key = term.astype(np.int64) * (self.num_groups + 1) + self.group
        uniq, pair = np.unique(key, return_inverse=True)
        delta = np.zeros((len(uniq), M), np.int64)
        np.add.at(delta, (pair, self.slot % M), self.count)
        return ((uniq // (self.num_groups + 1)).astype(np.int32),
                (uniq % (self.num_groups + 1)).astype(np.int32), delta)

    def marginal(self, drop: np.ndarray | None = None) -> np.ndarray:
        """``int64[G]``: exact cost of removing each kept group alone, after ``drop``.

        ``Δ_g = Σ_{t∋g} coef_t (Π_m n_{t,m} − Π_m max(n_{t,m} − δ_{t,g,m}, 0))`` with the
        kept sizes ``n`` of the current state; 0 for groups already in ``drop``.
        """
        drop = np.zeros(self.num_groups, bool) if drop is None else np.asarray(drop, bool)
        kept = np.maximum(self.kept_sizes(drop), 0)
        term, group, delta = self.pairs()
        before = np.prod(kept[term], axis=1)
        after = np.prod(np.maximum(kept[term] - delta, 0), axis=1)
        out = np.zeros(self.num_groups, np.int64)
        np.add.at(out, group, self.coef[term] * (before - after))
        return np.where(drop, 0, out)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"num_groups": self.num_groups, "coef": self.coef.tolist(),
                "size": self.size.tolist(), "slot": self.slot.tolist(),
                "group": self.group.tolist(), "count": self.count.tolist(),
                "constant": self.constant}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostTerms:
        """Inverse of `to_dict`."""
        size = np.asarray(d["size"], np.int64).reshape(len(d["coef"]), -1)
        return cls(int(d["num_groups"]), np.asarray(d["coef"], np.int64), size,
                   np.asarray(d["slot"], np.int32), np.asarray(d["group"], np.int32),
                   np.asarray(d["count"], np.int64), int(d["constant"]))


@dataclasses.dataclass(frozen=True, eq=False)
class GroupCosts:
    """Per-group parameter and FLOP costs of one model at one input shape.

    Attributes:
      params: ``int64[G]`` parameters removed by removing group ``g`` alone from the dense
        model (its member and dependent elements).
      flops: ``int64[G]`` FLOPs removed likewise (its share of every dot/conv it takes part
        in as producer and consumer).
      dense_params / dense_flops: totals of the dense model.
      prunable_params / prunable_flops: what removing *every* group would remove (the rest,
        `unprunable_params` / `unprunable_flops`, stays whatever is pruned).
      param_terms / flop_terms: the exact multilinear models (`CostTerms`).
    """

    params: np.ndarray
    flops: np.ndarray
    dense_params: int
    dense_flops: int
    prunable_params: int
    prunable_flops: int
    param_terms: CostTerms
    flop_terms: CostTerms

    @classmethod
    def from_terms(cls, param_terms: CostTerms, flop_terms: CostTerms) -> GroupCosts:
        """Totals and per-group costs of two `CostTerms`."""
        everything = np.ones(param_terms.num_groups, bool)
        return cls(param_terms.marginal(), flop_terms.marginal(), param_terms.dense(),
                   flop_terms.dense(), param_terms.removed(everything),
                   flop_terms.removed(everything), param_terms, flop_terms)

    @property
    def num_groups(self) -> int:
        """G."""
        return self.param_terms.num_groups

    @property
    def unprunable_params(self) -> int:
        """Parameters that no group removal can remove."""
        return self.dense_params - self.prunable_params

    @property
    def unprunable_flops(self) -> int:
        """FLOPs that no group removal can remove."""
        return self.dense_flops - self.prunable_flops

    def terms(self, metric: str) -> CostTerms:
        """`CostTerms` of ``'params'`` or ``'flops'``."""
        if metric not in ("params", "flops"):
            raise ValueError(f"metric must be 'params' or 'flops', got {metric!r}")
        return self.param_terms if metric == "params" else self.flop_terms

    def removed(self, drop: np.ndarray) -> tuple[int, int]:
        """``(params, flops)`` removed by the set ``drop`` (``bool[G]``), exact."""
        return self.param_terms.removed(drop), self.flop_terms.removed(drop)

    def kept_fraction(self, drop: np.ndarray) -> tuple[float, float]:
        """``(params, flops)`` fractions of the dense model kept after removing ``drop``."""
        p, f = self.removed(drop)
        return (1.0 - p / max(self.dense_params, 1), 1.0 - f / max(self.dense_flops, 1))

    def marginal(self, drop: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(params[G], flops[G])`` exact marginal costs after removing ``drop``."""
        return self.param_terms.marginal(drop), self.flop_terms.marginal(drop)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (per-group vectors, totals and both term tables)."""
        return {"format": "hesso_jax.GroupCosts", "version": 1,
                "params": self.params.tolist(), "flops": self.flops.tolist(),
                "dense_params": self.dense_params, "dense_flops": self.dense_flops,
                "prunable_params": self.prunable_params,
                "prunable_flops": self.prunable_flops,
                "param_terms": self.param_terms.to_dict(),
                "flop_terms": self.flop_terms.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroupCosts:
        """Inverse of `to_dict`."""
        if d.get("format") != "hesso_jax.GroupCosts":
            raise ValueError("not a hesso_jax.GroupCosts document (missing format tag)")
        return cls.from_terms(CostTerms.from_dict(d["param_terms"]),
                              CostTerms.from_dict(d["flop_terms"]))

    def to_json(self, **kwargs: Any) -> str:
        """JSON text (round-trips through `from_json`)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> GroupCosts:
        """Inverse of `to_json`."""
        return cls.from_dict(json.loads(text))


# ------------------------------------------------------------------------------ tracer
@dataclasses.dataclass(frozen=True, eq=False)
class _Val:
    """Abstract value: a shape and one `Map` per axis."""

    shape: tuple[int, ...]
    maps: tuple[Map, ...]


def _blank(shape: Sequence[int]) -> _Val:
    return _Val(tuple(shape), (None,) * len(shape))


def _combine(a: Map, b: Map, G: int) -> Map:
    """Per channel, the group of ``a`` where it has one, else ``b``'s."""
    if a is None:
        return b
    if b is None:
        return a
    return np.where(a < G, a, b)


def _valid_positions(out: int, kernel: int, inp: int, stride: int, lo: int,
                     base_dil: int, win_dil: int) -> int:
    """(output, kernel) index pairs of one spatial dim that read a real input element."""
    o = np.arange(out)[:, None]
    k = np.arange(kernel)[None, :]
    undilated = o * stride - lo + k * win_dil
    ok = (undilated % base_dil == 0)
    idx = undilated // base_dil
    return int(np.sum(ok & (idx >= 0) & (idx < inp)))


class _CostTracer(Interpreter):
    """Follows channel maps through the jaxpr and records one term per dot/conv."""

    rules: dict = {}

    def __init__(self, num_groups: int):
        super().__init__()
        self.G = num_groups
        self.mult = 1
        self.terms: list[tuple[int, list[Dim]]] = []

    def literal(self, value: Any, aval: Any) -> _Val:
        """Literals own no channels."""
        return _blank(getattr(aval, "shape", ()))

    def const(self, value: Any) -> _Val:
        """Constants own no channels."""
        return _blank(np.shape(value))

    def fallback(self, eqn: Any, invals: list[_Val]) -> Any:
        """Default rule: same-shape operands pass their maps on.

        Covers elementwise ops, ``select_n`` and casts; a primitive acting along an
        ``axis``/``dimension`` parameter drops that axis' map; anything else owns no
        channels.
        """
        outs = []
        for v in eqn.outvars:
            shape = tuple(v.aval.shape)
            maps: list[Map] = [None] * len(shape)
            for x in invals:
                if x.shape == shape:
                    maps = [_combine(a, b, self.G) for a, b in zip(maps, x.maps, strict=True)]
            for key in ("axis", "dimension"):
                ax = eqn.params.get(key)
                if isinstance(ax, int) and shape:
                    maps[ax % len(shape)] = None
            outs.append(_Val(shape, tuple(maps)))
        return outs if eqn.primitive.multiple_results else outs[0]

    def record(self, coef: int, dims: list[Dim]) -> None:
        """One linear op's FLOPs: ``coef · Π sizes`` (times the enclosing scan lengths)."""
        self.terms.append((coef * self.mult, dims))


def _rule(*names: str) -> Callable[[Callable], Callable]:
    def register(fn: Callable) -> Callable:
        for n in names:
            _CostTracer.rules[n] = fn
        return fn
    return register


def _out_shape(eqn: Any, i: int = 0) -> tuple[int, ...]:
    return tuple(eqn.outvars[i].aval.shape)


@_rule("dot_general")
def _dot_general(tr: _CostTracer, eqn: Any, invals: list[_Val]) -> _Val:
    lhs, rhs = invals
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    G = tr.G
    dims: list[Dim] = []
    for a, b in (*zip(lb, rb, strict=True), *zip(lc, rc, strict=True)):
        dims.append((lhs.shape[a], _combine(rhs.maps[b], lhs.maps[a], G)))
    lfree = [a for a in range(len(lhs.shape)) if a not in lc and a not in lb]
    rfree = [b for b in range(len(rhs.shape)) if b not in rc and b not in rb]
    dims += [(lhs.shape[a], lhs.maps[a]) for a in lfree]
    dims += [(rhs.shape[b], rhs.maps[b]) for b in rfree]
    tr.record(FMA_FLOPS, dims)
    out_maps = [m for _, m in dims[:len(lb)]] + [lhs.maps[a] for a in lfree] + [
        rhs.maps[b] for b in rfree]
    return _Val(_out_shape(eqn), tuple(out_maps))


@_rule("conv_general_dilated")
def _conv(tr: _CostTracer, eqn: Any, invals: list[_Val]) -> _Val:
    lhs, rhs = invals
    p = eqn.params
    dn = p["dimension_numbers"]
    ls, rs, os_ = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    out = _out_shape(eqn)
    fgc, bgc = p["feature_group_count"], p["batch_group_count"]
    G = tr.G
    valid = 1
    for s in range(len(ls) - 2):
        lo = p["padding"][s][0]
        valid *= _valid_positions(out[os_[2 + s]], rhs.shape[rs[2 + s]], lhs.shape[ls[2 + s]],
                                  p["window_strides"][s], lo, p["lhs_dilation"][s],
                                  p["rhs_dilation"][s])
    c_in, c_out = rhs.shape[rs[1]], rhs.shape[rs[0]]
    in_map = _combine(rhs.maps[rs[1]], lhs.maps[ls[1]] if fgc == 1 else None, G)
    out_map = rhs.maps[rs[0]]
    if fgc > 1 and c_out == lhs.shape[ls[1]]:  # depthwise: out channel c reads in channel c
        out_map = _combine(out_map, lhs.maps[ls[1]], G)
    batch_map = lhs.maps[ls[0]] if bgc == 1 else None
    tr.record(FMA_FLOPS * valid, [(lhs.shape[ls[0]] // bgc, batch_map), (c_in, in_map),
                                  (c_out, out_map)])
    maps: list[Map] = [None] * len(out)
    maps[os_[0]], maps[os_[1]] = batch_map, out_map
    return _Val(out, tuple(maps))


@_rule("transpose")
def _transpose(tr: _CostTracer, eqn: Any, invals: list[_Val]) -> _Val:
    perm = eqn.params["permutation"]
    return _Val(_out_shape(eqn), tuple(invals[0].maps[p] for p in perm))


@_rule("broadcast_in_dim")
def _broadcast(tr: _CostTracer, eqn: Any, invals: list[_Val]) -> _Val:
    out = _out_shape(eqn)
    maps: list[Map] = [None] * len(out)
    x = invals[0]
    for a, d in enumerate(eqn.params["broadcast_dimensions"]):
        if x.shape[a] == out[d]:
            maps[d] = x.maps[a]
    return _Val(out, tuple(maps))


@_rule("squeeze", "reshape", "expand_dims")
def _reshape(tr: _CostTracer, eqn: Any, invals: list[_Val]) -> _Val:
    return _Val(_out_shape(eqn), _reshape_maps(invals[0], _out_shape(eqn), tr.G))


def _reshape_maps(x: _Val, new: tuple[int, ...], G: int) -> tuple[Map, ...]:
    """Maps after a row-major reshape, block of axes by block of axes with equal products."""
    old = x.shape
    out: list[Map] = [None] * len(new)
    i = j = 0
    while i < len(old) or j < len(new):
        i0, j0, p_old, p_new = i, j, 1, 1
        if i < len(old):
            p_old, i = old[i], i + 1
        if j < len(new):
            p_new, j = new[j], j + 1
        while p_old != p_new:
            if p_old < p_new and i < len(old):
                p_old, i = p_old * old[i], i + 1
            elif j < len(new):
                p_new, j = p_new * new[j], j + 1
            else:
                return tuple(out)
        out[j0:j] = _split_block(x.maps[i0:i], old[i0:i], new[j0:j], G)
    return tuple(out)


def _split_block(maps: Sequence[Map], old: Sequence[int], new: Sequence[int],
                 G: int) -> list[Map]:
    """Maps of the new axes of one reshape block (None where not separable)."""
    mapped = [k for k, m in enumerate(maps) if m is not None]
    if len(mapped) != 1 or not new:
        return [None] * len(new)
    k = mapped[0]
    shape = [1] * len(old)
    shape[k] = old[k]
    joint = np.broadcast_to(maps[k].reshape(shape), tuple(old)).reshape(tuple(new))
    for a in range(len(new)):
        lead = np.moveaxis(joint, a, 0).reshape(new[a], -1)
        if np.all(lead == lead[:, :1]):
            res: list[Map] = [None] * len(new)
            res[a] = np.ascontiguousarray(lead[:, 0])
            return res
    return [None] * len(new)


@_rule("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
       "argmax", "argmin")
def _reduce(tr: _CostTracer, eqn: Any, invals: list[_Val]) -> _Val:
    axes = set(eqn.params["axes"])
    x = invals[0]
    return _Val(_out_shape(eqn), tuple(m for a, m in enumerate(x.maps) if a not in axes))


@_rule("concatenate")
def _concatenate(tr: _CostTracer, eqn: Any, invals: list[_Val]) -> _Val:
    d = eqn.params["dimension"]
    out = _out_shape(eqn)
    maps: list[Map] = []
    for a in range(len(out)):
        if a == d:
            parts = [x.maps[a] if x.maps[a] is not None else np.full(x.shape[a], tr.G, np.int32)
                     for x in invals]
            maps.append(np.concatenate(parts).astype(np.int32))
        else:
            m: Map = None
            for x in invals:
                m = _combine(m, x.maps[a], tr.G)
            maps.append(m)
    return _Val(out, tuple(maps))


@_rule("slice")
def _slice(tr: _CostTracer, eqn: Any, invals: list[_Val]) -> _Val:
    x = invals[0]
    p = eqn.params
    strides = p["strides"] or (1,) * len(x.shape)
    maps = tuple(None if m is None else m[lo:hi:st] for m, lo, hi, st in
                 zip(x.maps, p["start_indices"], p["limit_indices"], strides, strict=True))
    return _Val(_out_shape(eqn), maps)


@_rule("split")
def _split(tr: _CostTracer, eqn: Any, invals: list[_Val]) -> list[_Val]:
    x = invals[0]
    axis = eqn.params["axis"]
    outs, lo = [], 0
    for k, size in enumerate(eqn.params["sizes"]):
        maps = list(x.maps)
        if maps[axis] is not None:
            maps[axis] = maps[axis][lo:lo + size]
        outs.append(_Val(_out_shape(eqn, k), tuple(maps)))
        lo += size
    return outs


@_rule("pad")
def _pad(tr: _CostTracer, eqn: Any, invals: list[_Val]) -> _Val:
    x = invals[0]
    maps = tuple(m if cfg == (0, 0, 0) else None
                 for m, cfg in zip(x.maps, eqn.params["padding_config"], strict=True))
    return _Val(_out_shape(eqn), maps)


@_rule("dynamic_slice", "gather", "iota", "rev", "rng_bit_generator", "random_bits",
       "sort", "top_k")
def _opaque_axes(tr: _CostTracer, eqn: Any, invals: list[_Val]) -> Any:
    """Index maps the model does not follow: the outputs own no channels."""
    if eqn.primitive.name == "dynamic_slice":
        x = invals[0]
        out = _out_shape(eqn)
        return _Val(out, tuple(m if n == o else None
                               for m, n, o in zip(x.maps, x.shape, out, strict=True)))
    outs = [_blank(v.aval.shape) for v in eqn.outvars]
    return outs if eqn.primitive.multiple_results else outs[0]


@_rule("scan")
def _scan(tr: _CostTracer, eqn: Any, invals: list[_Val]) -> list[_Val]:
    p = eqn.params
    n_fixed = p["num_consts"] + p["num_carry"]
    xs = [_Val(x.shape[1:], x.maps[1:]) for x in invals[n_fixed:]]
    tr.mult *= p["length"]
    try:
        outs = tr.enter("scan", p["jaxpr"], [*invals[:n_fixed], *xs])
    finally:
        tr.mult //= p["length"]
    ncar = p["num_carry"]
    ys = [_Val((p["length"], *y.shape), (None, *y.maps)) for y in outs[ncar:]]
    return [*outs[:ncar], *ys]


@_rule("cond")
def _cond(tr: _CostTracer, eqn: Any, invals: list[_Val]) -> list[_Val]:
    branches = eqn.params["branches"]
    if len(branches) > 1:
        warnings.warn("cost model: lax.cond counts the FLOPs of every branch (an upper "
                      "bound)", CostWarning, stacklevel=2)
    results = [tr.enter("cond", b, invals[1:]) for b in branches]
    return [_Val(r[0].shape, tuple(
        _combine_all([x.maps[a] for x in r], tr.G) for a in range(len(r[0].shape))))
        for r in zip(*results, strict=True)]


def _combine_all(maps: Sequence[Map], G: int) -> Map:
    out: Map = None
    for m in maps:
        out = _combine(out, m, G)
    return out


@_rule("while")
def _while(tr: _CostTracer, eqn: Any, invals: list[_Val]) -> list[_Val]:
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    warnings.warn("cost model: a while loop's trip count is unknown; its body's FLOPs are "
                  "counted once", CostWarning, stacklevel=2)
    carry = invals[nc + nb:]
    tr.enter("while", p["body_jaxpr"], [*invals[nc:nc + nb], *carry])
    return list(carry)


# ------------------------------------------------------------------------------ entry
def _leaf_maps(groups: Groups | None, state: Any) -> list[list[Map]]:
    """Per leaf, per axis: the group of each channel (members and dependents merged)."""
    leaves = jax.tree.leaves(state)
    maps: list[list[Map]] = [[None] * len(np.shape(x)) for x in leaves]
    if groups is None:
        return maps
    layout = groups.layout(state, dependents="present")
    for am in (*layout.members, *layout.dependents):
        maps[am.leaf][am.axis] = _combine(maps[am.leaf][am.axis], am.index, groups.num_groups)
    return maps


def costs_from_jaxpr(closed: Any, state: Any, groups: Groups | None,
                     counted: Sequence[bool]) -> GroupCosts:
    """`GroupCosts` of a traced function whose first inputs are ``state``'s leaves.

    Args:
      closed: the ``ClosedJaxpr`` of ``f(*state_leaves, *flat_inputs)`` (what
        `hesso_jax.discover_groups` traces).
      state: the parameter/state pytree (its leaves' paths are the groups' paths).
      groups: the groups (None: totals only, ``G = 0``).
      counted: per leaf of ``state``, whether its elements count as parameters.
    """
    leaves = jax.tree.leaves(state)
    if len(counted) != len(leaves):
        raise ValueError(f"counted has {len(counted)} entries for {len(leaves)} leaves")
    G = 0 if groups is None else groups.num_groups
    maps = _leaf_maps(groups, state)
    param_terms = [(1, [(int(n), m) for n, m in zip(np.shape(x), mp, strict=True)])
                   for x, mp, c in zip(leaves, maps, counted, strict=True) if c]
    tracer = _CostTracer(G)
    jaxpr = closed.jaxpr
    args = [_Val(tuple(np.shape(x)), tuple(mp)) for x, mp in zip(leaves, maps, strict=True)]
    args += [_blank(v.aval.shape) for v in jaxpr.invars[len(leaves):]]
    tracer.run_closed(closed, args)
    return GroupCosts.from_terms(CostTerms.build(param_terms, G),
                                 CostTerms.build(tracer.terms, G))


def _split_args(model_or_fn: Any, args: tuple) -> tuple[Callable, Any, Groups, tuple,
                                                        Callable[[Path], bool]]:
    """``(fn(state, *inputs), state, groups, inputs, is_param)`` of either call form."""
    if isinstance(model_or_fn, nnx.Module):
        if not args:
            raise TypeError("group_costs(model, groups, *inputs): groups is missing")
        graphdef, state = nnx.split(model_or_fn)
        params = set(tree_paths(nnx.state(model_or_fn, nnx.Param)))

        def fn(st: Any, *a: Any, **k: Any) -> Any:
            return nnx.merge(graphdef, st)(*a, **k)

        return fn, state, args[0], args[1:], params.__contains__
    if callable(model_or_fn):
        if len(args) < 2:
            raise TypeError("group_costs(fn, params, groups, *inputs): the pure-function "
                            "form needs the parameter pytree and the groups")
        return model_or_fn, args[0], args[1], args[2:], lambda p: "batch_stats" not in p
    raise TypeError(f"group_costs takes an nnx.Module or a callable, got "
                    f"{type(model_or_fn).__name__}")


def group_costs(model_or_fn: Any, *args: Any, counted: Callable[[Path], bool] | None = None,
                **kwargs: Any) -> GroupCosts:
    """Per-group parameters and FLOPs of ``groups`` for the example inputs.

    Two forms, as `hesso_jax.discover_groups`: ``group_costs(model, groups, *inputs)`` for
    an ``nnx.Module`` (traced in its current train/eval mode; ``nnx.Param`` leaves are
    parameters) and ``group_costs(fn, params, groups, *inputs)`` for a pure
    ``fn(params, *inputs)`` (floating-point leaves not under ``'batch_stats'`` are
    parameters). Non-array inputs are static. See the module docstring for what is counted
    and for the exact (multilinear) cost of removing several groups.

    Args:
      model_or_fn: an ``nnx.Module`` or a callable.
      *args: ``[params,] groups, *inputs``; ``groups=None`` gives the totals only
        (``G = 0``), e.g. of a shrunk model.
      counted: optional predicate on a leaf path: which leaves are parameters.
      **kwargs: keyword inputs of the model / function.

    Returns:
      `GroupCosts` (FLOPs for one call on exactly these input shapes, batch included).

    Raises:
      TypeError: for a wrong call form; ValueError if the groups do not fit the tree.

    Example:
      A hidden neuron of ``tanh(x @ w1) @ w2`` owns a column of ``w1`` (8 weights) and a
      row of ``w2`` (3): 11 parameters, and ``2·B·(8 + 3) = 44`` FLOPs for a batch of 2:

      >>> import jax.numpy as jnp, numpy as np, hesso_jax as hj
      >>> fam = hj.GroupFamily(16, (hj.Member(("w1",), 1),),
      ...                      dependents=(hj.Member(("w2",), 0),))
      >>> groups = hj.Groups.from_families([fam])
      >>> params = {"w1": jnp.ones((8, 16)), "w2": jnp.ones((16, 3))}
      >>> fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
      >>> costs = hj.group_costs(fn, params, groups, jnp.ones((2, 8)))
      >>> int(costs.params[0]), int(costs.flops[0]), costs.dense_flops
      (11, 44, 704)
      >>> costs.kept_fraction(np.arange(16) < 8)  # remove half the neurons
      (0.5, 0.5)
    """
    fn, state, groups, inputs, is_param = _split_args(model_or_fn, args)
    if groups is not None and not isinstance(groups, Groups):
        raise TypeError(f"group_costs: expected a hesso_jax.Groups, got {type(groups).__name__}")
    pred = counted or is_param
    closed = trace_call(fn, state, inputs, kwargs)
    leaves = jax.tree.leaves(state)
    counted_leaves = [bool(pred(p)) and np.issubdtype(getattr(x, "dtype", np.int32),
                                                       np.inexact)
                      for p, x in zip(tree_paths(state), leaves, strict=True)]
    return costs_from_jaxpr(closed, state, groups, counted_leaves)

