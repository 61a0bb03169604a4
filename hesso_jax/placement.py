"""HESSO's placement checks: HESSO last in the chain, parameters finite.

HESSO (Algorithm 1) projects *parameters*: its update ``u'_t`` is meant to be applied as
is, ``x_{t+1} = x_t + u'_t`` (``optax.apply_updates``). Two checks, decided on the device
under a ``lax.cond`` that is taken only when something is wrong or a period has just
ended, and raised from one ``jax.pure_callback`` there (``hesso(..., on_fault="raise")``,
the default) or packed into the state (``on_fault="record"``: `record`, raised on the host
by `raise_recorded` through ``hj.check_faults``):

* *Probe* (every update, ``O(1)``): a handful of sampled elements of the parameters
  (`PROBE_SIZE` of them, on up to 4 cheap member leaves, positions fixed by the shapes)
  are compared with ``x_{t−1} + u'_{t−1}``, computed at the previous update with
  ``apply_updates``' arithmetic (``(x + u).astype(x.dtype)``) and kept in the state, to
  within ``τ = 2·ulp + 16·ε₃₂·|u'|`` (`tolerance`): XLA may compute ``u'`` in two fusions
  that round differently, so a bit-for-bit test gives false alarms (seen on the Llama
  decoder's cross-entropy step, 1 ulp apart).
  A transformation after HESSO (``chain(hesso, adam)``, ``chain(adam, hesso,
  scale(0.5))``) changes the applied update, so the misuse is reported at the second
  update. The probe is armed only by a previous update of the same transformation on
  parameters of the same shapes (``probe_key``), so a fresh ``init``, a state restored for
  other shapes (e.g. after surgery) or several inits never raise; ``optax.apply_if_finite``
  (a skipped step keeps the parameters and HESSO's state) and ``optax.MultiSteps`` (the
  inner chain runs only on emitting steps, the parameters move only then) keep the
  relation exact.
* *Period end* (``P`` times per run): every pruned group must be exactly zero, decided
  by one masked ``Σ |x|`` per member leaf (NaN when any of its elements is not finite)
  and the finiteness sum of the other leaves (two scalars); the per-group operands of
  the message (which groups, how many) are computed only when those flag a fault.

Non-finite parameters are told apart from misplacement: if a sampled element is NaN/±inf
(or, at a period end, any parameter is) the error says since when and to wrap the chain
in ``optax.apply_if_finite``; when HESSO was initialised as the first transformation of its
chain or outside any chain, the error adds that its input is then the raw gradient
(``x + ∇f`` is gradient *ascent*) and a base optimizer must come first.

Cost of an ordinary step: one small gather per sampled leaf of the parameters and of the
rewritten update (at most 4 cheap member leaves, bias-like or small: a reader of ``u'``
besides ``apply_updates`` makes XLA keep that leaf's update in a buffer, so no big
kernel's update is kept), one vectorised compare of ``PROBE_SIZE`` values, and a wider
predicate for the ``lax.cond`` that already holds the period-end check: no extra
parameter-sized buffer (tested on the compiled step's memory analysis against the base
optimizer alone). The callback itself is never run on such a step, but its presence costs
every step: JAX dispatches a program holding a host callback on its Python path, with
tokens, and on CPU runs it synchronously, so the Python work of the next step no longer
overlaps this one (TinyTransformer on 2 CPU cores: 1.34× Adam's step with the callback,
1.03× with ``on_fault="record"``, `benchmarks/step_cost.py`). ``"record"`` holds no host
callback; the price is that a fault is raised where the host asks (`raise_recorded`), not
by the step.

Wrappers keeping a second copy of the parameters. ``optax.contrib.schedule_free`` (the
evaluation parameters are computed from its ``z``) and ``optax.lookahead`` (slow
parameters) cannot be pruned by a transformation inside their chain: `check_context`
refuses them at ``init``.
"""

from __future__ import annotations

import functools
import inspect
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from hesso_jax.groups import Layout, format_path, replicate, tree_paths

__all__ = ["FAULT_SIZE", "PROBE_SIZE", "Hints", "ProbeSites", "check_context", "diagnose",
           "faulty", "mismatch", "placement_check", "probe_sites", "raise_recorded",
           "record", "recorded", "tolerance"]

PROBE_SIZE = 8
"""Sampled parameter elements compared at every update."""

_PROBE_LEAVES = 4  # member leaves sampled (largest cheap ones first)

SMALL_LEAF = 2**16
"""Member leaves of at most this many elements are cheap for the probe to sample
(keeping their update costs at most 256 KiB in float32)."""

_SECOND_COPY = {
    "optax.contrib._schedule_free": (
        "optax.contrib.schedule_free (schedule_free_adamw, schedule_free_sgd) keeps its own "
        "copy z of the parameters, and the evaluation parameters "
        "(optax.contrib.schedule_free_eval_params, what you evaluate and ship) are computed "
        "from it; HESSO cannot project z, so the evaluated model would have no zero groups. "
        "Use a base optimizer without a second copy of the parameters, e.g. "
        "optax.chain(optax.adamw(optax.cosine_decay_schedule(lr, steps)), hj.hesso(...))."),
    "optax._src.lookahead": (
        "optax.lookahead keeps slow parameters and moves the fast ones back towards them "
        "at every sync step; HESSO cannot project the slow copy, so neither copy keeps its "
        "groups at zero. Use the fast optimizer alone: optax.chain(base, hj.hesso(...))."),
}


class Hints(NamedTuple):
    """Static context for the error messages.

    Attributes:
      paths: path of the leaf of each probe site (``PROBE_SIZE`` entries, '' for padding).
      dtypes: dtype name of each probe site's leaf.
      no_base: HESSO was initialised first in its chain or outside any chain (``None``:
        unknown, e.g. a transformation that never ran ``init``).
    """

    paths: tuple[str, ...]
    dtypes: tuple[str, ...]
    no_base: bool | None


class ProbeSites(NamedTuple):
    """Where the probe samples: ``(leaf index, element index)`` pairs and their key."""

    sites: tuple[tuple[int, tuple[int, ...]], ...]
    key: int  # > 0; stored in the state once armed, so other shapes never compare


def _probe_leaves(leaves: list[Any], layout: Layout) -> list[int]:
    """The member leaves the probe samples: the (up to 4) largest *cheap* ones.

    The probe reads HESSO's update ``u'`` of the sampled leaves, and any reader of ``u'``
    besides ``apply_updates`` makes XLA keep that leaf's update in a buffer (the base
    optimizer's ``sqrt``/``div`` producer is not duplicated into a gather): sampling a
    big kernel would cost a kernel-sized buffer on every step. Cheap: at most two
    elements per channel (biases, norm scales, per-head vectors: ``O(channels)``) or at
    most `SMALL_LEAF` elements. The largest of those, as larger leaves see the larger
    values (weight clipping, say, changes only those); without a cheap member leaf, the
    single smallest member leaf.
    """
    channels = {m.leaf: int(m.shape[m.axis]) for m in layout.members}
    by_size = sorted(channels, key=lambda i: (-int(np.size(leaves[i])), i))
    cheap = [i for i in by_size
             if int(np.size(leaves[i])) <= max(2 * channels[i], SMALL_LEAF)]
    return cheap[:_PROBE_LEAVES] or by_size[-1:]


def probe_sites(params: Any, layout: Layout) -> ProbeSites:
    """``PROBE_SIZE`` elements spread over the sampled member leaves (`_probe_leaves`).

    Positions are fixed by the shapes: on a leaf of ``N`` elements with ``n`` samples,
    the flat indices ``⌊(2j+1)·N / 2n⌋``, ``j < min(n, N)``. The key hashes the sites and
    the leaves' shapes and dtypes, so a state armed for other parameters is not compared.
    """
    leaves = jax.tree.leaves(params)
    member_leaves = _probe_leaves(leaves, layout)
    sites: list[tuple[int, tuple[int, ...]]] = []
    for rank, leaf in enumerate(member_leaves):
        n = PROBE_SIZE // len(member_leaves) + (rank < PROBE_SIZE % len(member_leaves))
        shape = tuple(jnp.shape(leaves[leaf]))
        size = int(np.prod(shape, dtype=np.int64))
        for j in range(min(n, size)):
            flat = (2 * j + 1) * size // (2 * n)
            sites.append((leaf, tuple(int(i) for i in np.unravel_index(flat, shape))))
    signature = tuple((tuple(jnp.shape(x)), str(jnp.result_type(x))) for x in leaves)
    key = zlib.crc32(repr((sites, signature)).encode()) % (2**31 - 2) + 1
    return ProbeSites(tuple(sites), key)


def _element(leaf: jax.Array, index: tuple[int, ...]) -> jax.Array:
    """``leaf[index]`` (its dtype, replicated) of an Explicit-sharded leaf.

    Slicing a sharded dimension down to one element is not defined under an
    ``AxisType.Explicit`` mesh, so such a dimension is kept whole (sharded), the other
    dimensions are sliced, and the element is picked by a masked sum (``x + 0 = x``,
    exact; one scalar all-reduce).
    """
    spec = tuple(jax.typeof(leaf).sharding.spec)
    spec = spec + (None,) * (leaf.ndim - len(spec))
    slab = leaf[tuple(i if entry is None else slice(None) for i, entry in zip(index, spec,
                                                                               strict=True))]
    mask = np.zeros(slab.shape, bool)
    mask[tuple(i for i, entry in zip(index, spec, strict=True) if entry is not None)] = True
    mask = jax.sharding.reshard(jnp.asarray(mask), jax.typeof(slab).sharding)
    return jnp.sum(jnp.where(mask, slab, jnp.zeros([], slab.dtype)), dtype=slab.dtype)


def _sharded(leaf: jax.Array) -> bool:
    spec = getattr(getattr(jax.typeof(leaf), "sharding", None), "spec", None)
    return any(entry is not None for entry in (spec or ()))


def sample(tree: Any, probe: ProbeSites) -> list[jax.Array]:
    """The probe's elements of ``tree``: one 1-D array per sampled leaf (its dtype).

    One gather per leaf (its few sites at once, no reshape of the leaf), in the order of
    ``probe.sites``; element by element on Explicit-sharded leaves.
    """
    leaves = jax.tree.leaves(tree)
    chunks: list[jax.Array] = []
    for leaf_index in dict.fromkeys(leaf for leaf, _ in probe.sites):
        leaf = leaves[leaf_index]
        index = [i for j, i in probe.sites if j == leaf_index]
        if _sharded(leaf):
            chunks.append(jnp.stack([_element(leaf, i) for i in index]))
        else:
            coords = np.asarray(index, np.int32).reshape(len(index), leaf.ndim)
            chunks.append(leaf[tuple(coords.T)])
    return chunks


def _bits(v: jax.Array) -> jax.Array:
    """``uint32`` bit patterns of 16- or 32-bit floats (others: of their float32).

    Taking the bits forces the value to be rounded to its dtype: XLA may otherwise keep a
    bfloat16 sum in float32 (``xla_allow_excess_precision``), whereas the parameters
    ``apply_updates`` writes are rounded.
    """
    v = jnp.asarray(v)
    if v.dtype.itemsize == 2:
        return jax.lax.bitcast_convert_type(v, jnp.uint16).astype(jnp.uint32)
    if v.dtype.itemsize != 4:
        v = v.astype(jnp.float32)
    return jax.lax.bitcast_convert_type(v, jnp.uint32)


def _padded(parts: list[jax.Array], dtype: Any) -> jax.Array:
    """The 1-D ``parts`` concatenated and zero-padded to ``PROBE_SIZE`` entries."""
    parts = [p.reshape(-1) for p in parts]
    size = sum(int(p.shape[0]) for p in parts)
    return jnp.concatenate(parts + [jnp.zeros([PROBE_SIZE - size], dtype)])


def as_probe(values: list[jax.Array]) -> jax.Array:
    """``uint32[PROBE_SIZE]``: the bit patterns of the sampled values, zero-padded."""
    return _padded([_bits(v) for v in values], jnp.uint32)


def finite(values: list[jax.Array]) -> jax.Array:
    """``bool[]``: every sampled value is finite."""
    return jnp.all(jnp.concatenate([jnp.isfinite(v).reshape(-1) for v in values]
                                   + [jnp.ones([1], bool)]))


def predicted(x: list[jax.Array], u: list[jax.Array]) -> jax.Array:
    """``uint32[PROBE_SIZE]``: bits of ``x + u`` as ``optax.apply_updates`` computes it."""
    return as_probe([jnp.asarray(a + b).astype(jnp.asarray(a).dtype) for a, b in
                     zip(x, u, strict=True)])


RECOMPUTE_EPS = 16 * float(jnp.finfo(jnp.float32).eps)
"""Relative error allowed in ``u'`` between HESSO's copy and the one ``apply_updates`` adds.

Inside one jitted step XLA may compute the update element twice, in two fusions (the
probe's gather and ``apply_updates``' add), with different instruction sequences
(vectorised vs scalar division, fused multiply-add): the two ``u'`` then differ by a few
float32 rounding errors, ``|Δu'| ≤ c·ε·|u'|``."""


def tolerance(x: list[jax.Array], u: list[jax.Array]) -> jax.Array:
    """``float32[PROBE_SIZE]``: the largest ``|x_t − (x_{t−1} + u'_{t−1})|`` not an alarm.

    ``τ = 2·ulp(x + u') + RECOMPUTE_EPS·|u'|``: the recomputed update's error, plus one
    rounding of each sum to the parameter dtype. A transformation after HESSO changes the
    applied update by a fraction of itself (``scale(0.5)``: ``|u'|/2``) or replaces it
    (``chain(hesso, adam)``), far above ``τ`` wherever the parameter moves at all.
    """
    out = []
    for a, b in zip(x, u, strict=True):
        a = jnp.asarray(a)
        total = jnp.asarray(a + b).astype(a.dtype)
        ulp = jnp.spacing(jnp.abs(total)).astype(jnp.float32)
        out.append(2 * ulp + RECOMPUTE_EPS * jnp.abs(jnp.asarray(b).astype(jnp.float32)))
    return _padded(out, jnp.float32)


def _as_float(bits: jax.Array, dtypes: tuple[str, ...]) -> jax.Array:
    """``float32[PROBE_SIZE]``: the values whose `_bits` are ``bits`` (one dtype each)."""
    out = []
    for j, name in enumerate(dtypes):
        dt = jnp.dtype(name)
        b = bits[j]
        if dt.itemsize == 2:
            v = jax.lax.bitcast_convert_type(b.astype(jnp.uint16), dt)
        else:
            v = jax.lax.bitcast_convert_type(b, jnp.float32)
        out.append(v.astype(jnp.float32))
    return jnp.stack(out)


def mismatch(found: jax.Array, expected: jax.Array, tol: jax.Array,
             dtypes: tuple[str, ...]) -> jax.Array:
    """``bool[PROBE_SIZE]``: the sampled ``x_t`` is not ``x_{t−1} + u'_{t−1}`` within ``τ``."""
    gap = jnp.abs(_as_float(found, dtypes) - _as_float(expected, dtypes))
    return (found != expected) & ~(gap <= tol)


def hints_for(params: Any, probe: ProbeSites, no_base: bool | None) -> Hints:
    leaves = jax.tree.leaves(params)
    paths = [format_path(p) for p in tree_paths(params)]
    pad = PROBE_SIZE - len(probe.sites)
    names = tuple(paths[leaf] for leaf, _ in probe.sites) + ("",) * pad
    dtypes = tuple(str(jnp.result_type(leaves[leaf])) for leaf, _ in probe.sites)
    return Hints(names, dtypes + ("float32",) * pad, no_base)


def _value(bits: int, dtype: str) -> float:
    """The float whose `_bits` are ``bits`` (host side, for messages)."""
    dt = np.dtype(jnp.dtype(dtype))
    if dt.itemsize == 2:
        return float(np.asarray(bits, np.uint16).view(dt))
    return float(np.asarray(bits, np.uint32).view(np.float32))


# ---------------------------------------------------------------- host side
_NO_BASE = (
    " hesso was initialised as the first transformation of its optax.chain (or outside "
    "any chain), so the updates it projects are the raw gradients, and x + ∇f is gradient "
    "ascent: put a base optimizer first, e.g. optax.chain(optax.adam(1e-3), "
    "hj.hesso(...)).")

LAST = ("HESSO projects parameters and must be the LAST transformation of the optax.chain "
        "(after the base optimizer and any scaling), and its updates must be applied "
        "unchanged with optax.apply_updates.")


def _nonfinite_message(step: int, sampled: bool, hints: Hints) -> str:
    since = f"since step ~{step}" if sampled else f"since step {step} or earlier"
    msg = (f"hesso: parameters are NaN/inf {since}; wrap the chain in "
           "optax.apply_if_finite(optax.chain(base, hj.hesso(...)), max_consecutive_errors) "
           "to skip non-finite updates, and lower the learning rate if the loss diverges.")
    return msg + (_NO_BASE if hints.no_base else "")


def diagnose(bad: np.ndarray, info: np.ndarray, expected: np.ndarray, found: np.ndarray,
             missed: np.ndarray, hints: Hints) -> np.ndarray:
    """Host check: raises a ValueError naming the fault; otherwise returns ``int32 0``.

    Args:
      bad: ``bool[G]`` pruned groups not exactly zero (only on a period-end step).
      info: ``int32[4]``: HESSO updates applied so far, probe mismatch, sampled
        parameters non-finite, any parameter non-finite (period-end steps only).
      expected: ``uint32[PROBE_SIZE]`` bits of ``x_{t−1} + u'_{t−1}`` at the probe.
      found: ``uint32[PROBE_SIZE]`` bits of ``x_t`` at the probe.
      missed: ``bool[PROBE_SIZE]`` the probe elements outside the tolerance (`mismatch`).
      hints: static `Hints`.
    """
    ids = np.flatnonzero(np.asarray(bad))
    return _raise_fault(info, expected, found, missed, ids[:8], ids.size, hints)


def _raise_fault(info: np.ndarray, expected: np.ndarray, found: np.ndarray,
                 missed: np.ndarray, bad_ids: np.ndarray, num_bad: int, hints: Hints
                 ) -> np.ndarray:
    """`diagnose` given the first pruned groups not zero (``bad_ids``) and their number."""
    step, mismatch, sampled_nonfinite, any_nonfinite = (int(v) for v in np.asarray(info))
    if sampled_nonfinite or any_nonfinite:
        raise ValueError(_nonfinite_message(step, bool(sampled_nonfinite), hints))
    if mismatch:
        expected, found = np.asarray(expected), np.asarray(found)
        j = int(np.flatnonzero(np.asarray(missed))[0])
        now, then = (_value(int(v[j]), hints.dtypes[j]) for v in (found, expected))
        raise ValueError(
            f"hesso: the parameters did not move by HESSO's last update: at step {step} a "
            f"sampled element of {hints.paths[j]!r} is {now!r}, but the previous parameters "
            f"plus HESSO's update give {then!r}. {LAST} Nothing "
            "else may change the parameters between updates (pass check_updates=False to "
            "hj.hesso if you do so on purpose, e.g. weight clipping).")
    if num_bad:
        raise ValueError(
            f"hesso: {num_bad} pruned group(s) (e.g. {np.asarray(bad_ids).tolist()}) are "
            f"not exactly zero in the parameters after their projection period. {LAST}")
    return np.zeros((), np.int32)


def _mesh_of(params: Any) -> Any:
    """The abstract mesh the update runs on.

    ``jax.set_mesh``'s mesh, else the one carried by an explicitly sharded parameter's type;
    an empty mesh when neither says (one device, or Auto-sharded arrays without a mesh
    context).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh
    for leaf in jax.tree.leaves(params):
        leaf_mesh = getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None)
        if leaf_mesh is not None and not leaf_mesh.empty:
            return leaf_mesh
    return mesh


def faulty(operands: tuple[jax.Array, ...]) -> jax.Array:
    """``bool[]``: whether `diagnose` would raise on ``operands`` (decided on the device).

    ``operands = (bad, info, expected, found, missed)``: `diagnose` raises exactly when a
    pruned group is not zero (``bad``) or ``info`` flags a probe mismatch or a non-finite
    parameter (its entries after the step counter).
    """
    bad, info = operands[0], operands[1]
    return jnp.any(bad) | jnp.any(info[1:] != 0)


def placement_check(operands: tuple[jax.Array, ...], params: Any, hints: Hints) -> jax.Array:
    """Runs `diagnose` on the host from inside a jitted update; returns ``int32[] 0``.

    The host round trip (most of the period-end check's cost on a small step) is taken
    only when `faulty` says `diagnose` would raise; otherwise the result is ``0`` at once.
    Without a mesh a ``pure_callback`` runs once (on device 0). On a multi-device mesh
    (set with ``jax.set_mesh``, or carried by Explicit-sharded parameters) it runs inside a
    ``jax.shard_map`` over every mesh axis with replicated operands, i.e. once *per
    device*, so a misuse raises on every device at the same point of the program. (A
    callback pinned to device 0 that raised would leave the other devices waiting in the
    next collective until XLA aborts the process.)
    """
    host = functools.partial(diagnose, hints=hints)

    def call(*ops: jax.Array) -> jax.Array:
        return jax.pure_callback(host, jax.ShapeDtypeStruct((), jnp.int32), *ops)

    def on_host() -> jax.Array:
        mesh = _mesh_of(params)
        if mesh.empty or mesh.size == 1:
            return call(*operands)
        specs = (PartitionSpec(),) * len(operands)
        return jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(),
                             check_vma=False)(*(replicate(op) for op in operands))

    return jax.lax.cond(faulty(operands), on_host, lambda: jnp.zeros([], jnp.int32))


# ---------------------------------------------------------------- recorded faults
_NUM_BAD = 4 + 4 * PROBE_SIZE + 1  # where the count of non-zero pruned groups sits
FAULT_SIZE = _NUM_BAD + 1 + 8
"""Length of ``HessoState.fault`` (``int32``): ``info`` (4); ``expected``, ``found``,
``missed`` and the probe sites' leaf indices (``PROBE_SIZE`` each); ``no_base``; the number
of pruned groups not zero and the first 8 of them (``-1``: none)."""


def record(operands: tuple[jax.Array, ...], probe: ProbeSites, no_base: bool | None
           ) -> jax.Array:
    """``int32[FAULT_SIZE]``: `diagnose`'s operands packed for the state.

    ``hesso(..., on_fault="record")`` keeps them instead of calling the host, so the step
    holds no host callback; `raise_recorded` unpacks them and raises what `diagnose` would
    have raised. The probe sites' leaves and ``no_base`` (static) ride along, so the host
    can name the leaf from the parameters alone; of ``bad`` (``bool[G]``) only what the
    message shows is kept, so the state stays ``O(1)`` here.
    """
    bad, info, expected, found, missed = operands
    leaves = [leaf for leaf, _ in probe.sites] + [0] * (PROBE_SIZE - len(probe.sites))
    bad = replicate(bad)
    first = jnp.nonzero(bad, size=8, fill_value=-1)[0].astype(jnp.int32)
    as_int = jax.lax.bitcast_convert_type
    return jnp.concatenate([
        info.astype(jnp.int32), as_int(expected, jnp.int32), as_int(found, jnp.int32),
        missed.astype(jnp.int32), jnp.asarray(leaves, jnp.int32),
        jnp.asarray([int(bool(no_base))], jnp.int32),
        jnp.sum(bad, dtype=jnp.int32)[None], first])


def recorded(fault: jax.Array) -> jax.Array:
    """``bool[]``: ``fault`` (`record`'s output) holds a fault `diagnose` raises on."""
    return jnp.any(fault[1:4] != 0) | (fault[_NUM_BAD] > 0)


def raise_recorded(fault: np.ndarray, params: Any) -> None:
    """Raises the ValueError `diagnose` raises on a recorded fault; returns if there is none.

    ``params``: the parameters (any step's: only their leaves' paths and dtypes are read),
    to name the probed leaf in a probe-mismatch message.
    """
    fault = np.asarray(fault, np.int32)
    if not bool(recorded(fault)):
        return
    n = PROBE_SIZE
    info, rest = fault[:4], fault[4:]
    expected, found, missed, leaves = (rest[i * n:(i + 1) * n] for i in range(4))
    no_base, num_bad, bad_ids = fault[_NUM_BAD - 1], fault[_NUM_BAD], fault[_NUM_BAD + 1:]
    paths = [format_path(p) for p in tree_paths(params)]
    dtypes = [str(jnp.result_type(x)) for x in jax.tree.leaves(params)]
    if int(leaves.max(initial=0)) >= len(paths):
        raise ValueError(f"hesso: a fault was recorded at step {int(info[0])}, but these "
                         "parameters are not the ones it was recorded for")
    hints = Hints(tuple(paths[i] for i in leaves), tuple(dtypes[i] for i in leaves),
                  bool(no_base))
    _raise_fault(info, expected.view(np.uint32), found.view(np.uint32), missed.astype(bool),
                 bad_ids[bad_ids >= 0], int(num_bad), hints)


# ---------------------------------------------------------------- chain context at init
def _init_fns(value: Any) -> list[Any]:
    """The init functions held by a combinator's local (a tuple of inits or transforms)."""
    if not isinstance(value, tuple | list):
        return []
    out = []
    for item in value:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            item = item[1]  # named_chain: (name, transformation)
        init = getattr(item, "init", item)
        if callable(init):
            out.append(init)
    return out


def check_context(init: Callable[..., Any]) -> bool:
    """Where HESSO's ``init`` was called from; returns ``no_base``.

    Walks the Python frames above ``init`` (optax combinators run each member's ``init``
    from their own ``init``): raises a ValueError when HESSO sits inside, or after, a
    wrapper that keeps a second copy of the parameters (schedule-free, lookahead), and
    returns True when HESSO is the first transformation of its chain or in no chain at
    all (its input is then the raw gradient). Only Python frames are read: nothing runs
    under ``jit``, and an unknown combinator simply finds nothing.
    """
    frame = inspect.currentframe()
    position = None
    for _ in range(64):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            break
        module = frame.f_globals.get("__name__", "")
        if module in _SECOND_COPY and frame.f_code.co_name == "init_fn":
            raise ValueError(f"hesso cannot be used inside this wrapper: {_SECOND_COPY[module]}")
        if position is not None or not module.startswith("optax"):
            continue
        for value in list(frame.f_locals.values()):
            fns = _init_fns(value)
            if init not in fns:
                continue
            position = fns.index(init)
            for fn in fns[:position]:
                before = getattr(fn, "__module__", "")
                if before in _SECOND_COPY:
                    raise ValueError(f"hesso cannot follow this optimizer: {_SECOND_COPY[before]}")
            break
    return position is None or position == 0
