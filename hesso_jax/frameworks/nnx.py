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
from flax.core import unfreeze
from flax.nnx import bridge
from flax.nnx.bridge import variables as bridge_variables

from hesso_jax.frameworks import linen as linen_surgery
from hesso_jax.frameworks.common import Site, grouped_conv_count, whole_blocks
from hesso_jax.frameworks.verify import (
    KeepMasks,
    Runner,
    compiled_call,
    keep_by_path,
    masked_tree,
    patched_calls,
    resolve_example,
)
from hesso_jax.frameworks.verify import verify as verify_outputs
from hesso_jax.groups import Groups, Path, format_path, tree_paths
from hesso_jax.surgery import KeepPlan, shrink

Call = tuple[tuple[Any, ...], dict[str, Any]]

__all__ = ["shrink_model"]


@dataclasses.dataclass(frozen=True)
class _Site(Site):
    """One NNX module of the shrunk model (`hesso_jax.frameworks.common.Site`)."""

    def expect(self, name: str, shape: tuple[int, ...]) -> None:
        """Raises unless the variable ``name`` is None or has ``shape``."""
        got = self.shape(name)
        if got is not None and got != tuple(shape):
            raise self.error(f"{name} has shape {got} but the other parameters imply "
                             f"{tuple(shape)}; its groups and dependents disagree")


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
    """``in_features``, ``out_features``, ``feature_group_count``, ``kernel_shape`` (HWIO).

    A grouped conv (depthwise included) gets ``feature_group_count`` from
    `grouped_conv_count` and ``in_features = feature_group_count * kernel.shape[-2]``.
    """
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
    if groups_ > 1:
        try:
            groups_ = grouped_conv_count(
                site.kept("kernel", axis=len(shape) - 1, length=old[-1]), groups_)
        except ValueError as e:
            raise site.error(str(e)) from None
    m.in_features, m.out_features = groups_ * per_group_in, out
    m.feature_group_count, m.kernel_shape = groups_, shape


def _fix_conv_transpose(site: _Site) -> None:
    """``in_features``, ``out_features``, ``kernel_shape`` (``transpose_kernel`` swaps)."""
    m = site.module
    shape = site.shape("kernel")
    fan_in, out = shape[-2:]
    if m.transpose_kernel:
        fan_in, out = out, fan_in
    site.expect("bias", (out,))
    if m.mask is not None and tuple(m.mask.shape) != shape:
        raise site.error(f"its mask has shape {tuple(m.mask.shape)} but the kernel now has "
                         f"{shape}; add the mask to the groups' dependents")
    m.in_features, m.out_features, m.kernel_shape = fan_in, out, shape


_GATES = {nnx.GRUCell: 3, nnx.OptimizedLSTMCell: 4, nnx.SimpleCell: 1}


def _fix_fused_cell(site: _Site) -> None:
    """``in_features``, ``hidden_features`` of a cell with fused gate kernels.

    ``dense_i.kernel: (in, k * hidden)``, ``dense_h.kernel: (hidden, k * hidden)`` (k = 3
    for GRU, 4 for LSTM, 1 for the simple cell); a hidden unit must go from every gate.
    """
    m = site.module
    k = next(v for c, v in _GATES.items() if isinstance(m, c))
    fan_in, gates_i = site.shape("dense_i", "kernel")
    hidden, gates_h = site.shape("dense_h", "kernel")
    if gates_i != k * hidden or gates_h != k * hidden:
        raise site.error(
            f"{k} gates of {hidden} hidden units need dense_i/dense_h kernels with "
            f"{k * hidden} columns, got {gates_i} and {gates_h}; a hidden unit must be "
            "removed from every gate (and from dense_h's rows) together")
    for name in ("dense_i", "dense_h"):
        cols = site.kept(name, "kernel", axis=1, length=k * m.hidden_features)
        rows = cols.reshape(k, -1)
        if not (rows == rows[:1]).all():
            raise site.error(f"{name}.kernel: the {k} gates keep different hidden units")
    m.in_features, m.hidden_features = fan_in, hidden


def _fix_lstm_cell(site: _Site) -> None:
    """``in_features``, ``hidden_features`` of ``nnx.LSTMCell`` (one Linear per gate)."""
    m = site.module
    ins = {site.shape(n, "kernel") for n in ("ii", "if_", "ig", "io")}
    hid = {site.shape(n, "kernel") for n in ("hi", "hf", "hg", "ho")}
    if len(ins) != 1 or len(hid) != 1:
        raise site.error(f"its gate kernels disagree after shrinking: inputs {ins}, hidden "
                         f"{hid}; a hidden unit must be removed from every gate")
    (fan_in, hidden), = ins
    if next(iter(hid)) != (hidden, hidden):
        raise site.error(f"hidden kernels {next(iter(hid))} are not ({hidden}, {hidden})")
    m.in_features, m.hidden_features = fan_in, hidden


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
    kept = whole_blocks(site.kept(name, axis=0, length=old), m.num_groups)
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
    per_kv = whole_blocks(query_keep, m.num_kv_heads)
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


class _Stop(Exception):
    """Ends a run once the input of the ``ToNNX`` module being resized is known."""


def _bridge_input(model: nnx.Module, path: Path, call: Call) -> Call:
    """The abstract call arguments of the ``ToNNX`` at ``path`` when ``model`` runs.

    Runs a copy of ``model`` (eval mode) and stops it at that module's call, so modules
    after it (and the module itself, not resized yet) do not run.
    """
    copy = nnx.merge(*nnx.split(model))
    target = dict((tuple(p), m) for p, m in nnx.iter_modules(copy))[path]
    copy.eval()
    seen: list[Call] = []
    orig = bridge.ToNNX.__call__

    def record(self: bridge.ToNNX, *args: Any, **kwargs: Any) -> Any:
        if self is target:
            inputs = {k: v for k, v in kwargs.items() if k not in ("rngs", "method", "mutable")}
            seen.append(jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                                     (args, inputs)))
            raise _Stop
        return orig(self, *args, **kwargs)

    bridge.ToNNX.__call__ = record
    try:
        copy(*call[0], **call[1])
    except _Stop:
        pass
    finally:
        bridge.ToNNX.__call__ = orig
    if not seen:
        raise ValueError(f"shrink_model: ToNNX at {format_path(path)!r} is not called on "
                         "the example input, so it cannot be resized")
    return seen[0]


def _resize_bridges(small: nnx.Module, keep: KeepMasks, call: Call | None) -> None:
    """Resizes every linen module inside ``nnx.bridge.ToNNX`` whose variables were cut.

    In call order: each one is resized from its input in the shrunk model (whose modules
    before it are already consistent), with `hesso_jax.frameworks.linen.resize`.
    """
    for path, m in nnx.iter_modules(small):
        if not isinstance(m, bridge.ToNNX):
            continue
        site = _Site(m, tuple(path), keep)
        linen_keep = {("params", *p[len(site.path):]): axes for p, axes in keep.items()
                      if p[:len(site.path)] == site.path}
        if not linen_keep:
            continue
        if call is None:
            raise site.error("a linen module inside NNX creates its layers while it runs; "
                             "pass an example input to shrink_model so it can be resized")
        attrs = {k: v for k, v in vars(m).items()
                 if not k.startswith(("to_nnx__", "_pytree__"))}
        linen_vars = bridge_variables.nnx_attrs_to_linen_vars(attrs)
        new_shapes = unfreeze(jax.tree.map(lambda x: tuple(np.shape(x)), linen_vars))
        inputs = _bridge_input(small, site.path, call)
        try:
            m.to_nnx__module = linen_surgery.resize(m.to_nnx__module, inputs, new_shapes,
                                                    linen_keep)
        except ValueError as e:
            raise site.error(str(e)) from None


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
    nnx.ConvTranspose: _fix_conv_transpose,
    nnx.GRUCell: _fix_fused_cell,
    nnx.OptimizedLSTMCell: _fix_fused_cell,
    nnx.SimpleCell: _fix_fused_cell,
    nnx.LSTMCell: _fix_lstm_cell,
}


def _fixer(cls: type) -> Callable[[_Site], None] | None:
    """The fixer of ``cls`` or of its nearest base class in `_FIXERS`."""
    return next((_FIXERS[c] for c in cls.__mro__ if c in _FIXERS), None)


def shrink_model(model: nnx.Module, groups: Groups, *inputs: Any, example: Any = None,
                 verify: bool = True, plan: KeepPlan | None = None, round_to: int = 1,
                 tolerance: float | None = None) -> nnx.Module:
    """A smaller NNX module computing what ``model`` (with its zero groups) does.

    See `hesso_jax.shrink_model` (the dispatching entry point) for the arguments.
    ``graphdef, state = nnx.split(model)``; the whole state (parameters and BatchNorm
    statistics) is cut by `shrink`; the result is merged into a new module whose layers
    get their static sizes from the new shapes (`_FIXERS`); then, given an example input,
    the result is verified by running (`hesso_jax.frameworks.verify`, in eval mode on
    copies, so dropout is off and no statistics change).
    """
    graphdef, state = nnx.split(model)
    small_state, plan = shrink(state, groups, plan=plan, round_to=round_to,
                               tolerance=tolerance)
    keep = keep_by_path(state, groups, plan)
    call = resolve_example(groups, inputs, example)
    old_shapes = {p: tuple(np.shape(x)) for p, x in zip(tree_paths(state),
                                                         jax.tree.leaves(state), strict=True)}
    small = nnx.merge(graphdef, small_state)
    for path, module in nnx.iter_modules(small):
        if not isinstance(module, bridge.ToNNX):
            _fix(_Site(module, tuple(path), keep), old_shapes)
    _resize_bridges(small, keep, call)
    if verify and call is not None:
        masked = nnx.merge(graphdef, masked_tree(state, groups, plan))
        verify_outputs("shrink_model", _runner(masked, call),
                       _runner(nnx.merge(*nnx.split(small)), call), keep)
    return small


def _fix(site: _Site, old_shapes: dict[Path, tuple[int, ...]]) -> None:
    """Runs the module's fixer; a Flax layer without one must keep its variable shapes."""
    module = site.module
    fixer = _fixer(type(module))
    if fixer is not None:
        fixer(site)
        return
    if not type(module).__module__.startswith("flax."):
        return
    changed = [name for name, var in vars(module).items()
               if isinstance(var, nnx.Variable)
               and old_shapes.get((*site.path, name), tuple(var.shape)) != tuple(var.shape)]
    if changed:
        raise site.error(
            f"variables {changed} changed shape but shrink_model has no rule for "
            f"{type(module).__name__}'s static attributes (supported: "
            f"{', '.join(sorted(c.__name__ for c in _FIXERS))})")


@dataclasses.dataclass(frozen=True)
class _Apply:
    """``_Apply(graphdef)(state, *args)``: the model's call (hashable: compiled once)."""

    graphdef: Any

    def __call__(self, state: Any, *args: Any, **kwargs: Any) -> Any:
        return nnx.merge(self.graphdef, state)(*args, **kwargs)


def _runner(model: nnx.Module, call: Call) -> Runner:
    """Runs ``model`` (a copy, put in eval mode) on the example, recording submodules."""
    model.eval()
    args, kwargs = call
    graphdef, state = nnx.split(model)
    return Runner(lambda: compiled_call(_Apply(graphdef), state, args, kwargs),
                  lambda: model(*args, **kwargs),
                  lambda tape: patched_calls(list(nnx.iter_modules(model)), tape))
