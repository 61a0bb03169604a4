"""Surgery on equinox modules: static fields that fit the shrunk arrays.

An equinox module is a pytree whose arrays are leaves and whose sizes (``num_heads``,
``GroupNorm.groups``, ``Conv.groups``, ``Linear.in_features``, ...) are static fields, kept
in the tree structure. Cutting the arrays alone leaves them stale, and some are read at
call time (``MultiheadAttention`` splits heads with ``num_heads``, ``GroupNorm`` with
``groups``): the output is then silently wrong. `fix_static` rebuilds every module of a
tree bottom-up with static fields computed from the new array shapes, one fixer per layer
type (`_FIXERS`); `hesso_jax.apply_plan` (and so `hesso_jax.shrink`) applies it to any tree
holding equinox modules, e.g. the array half of ``eqx.partition(model, eqx.is_array)``.
Such a half no longer combines with the old static half (their tree structures differ);
shrink the whole model with `shrink_model` instead, which also verifies it by running.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax

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
from hesso_jax.groups import Groups, Path
from hesso_jax.surgery import KeepPlan, shrink

__all__ = ["fix_static", "has_modules", "restatic", "shrink_model"]


@dataclasses.dataclass(frozen=True)
class _Site(Site):
    """One rebuilt equinox module (new children, old static fields) as its fixer sees it."""

    framework: ClassVar[str] = "equinox "

    def set(self, **fields: Any) -> None:
        for name, value in fields.items():
            object.__setattr__(self.module, name, value)


def _size(old: Any, new: int) -> Any:
    return old if old == "scalar" else new


def _fix_linear(site: _Site) -> None:
    """``in_features``, ``out_features`` from ``weight: (out, in)``."""
    m = site.module
    if site.shape("weight") is None:
        return
    out, fan_in = site.shape("weight")
    site.set(in_features=_size(m.in_features, fan_in),
             out_features=_size(m.out_features, out))


def _fix_conv(site: _Site) -> None:
    """``in_channels``, ``out_channels``, ``groups`` from ``weight: (out, in/groups, *k)``."""
    m = site.module
    out, per_group = site.shape("weight")[:2]
    groups = m.groups
    if groups > 1:
        try:
            groups = grouped_conv_count(site.kept("weight", axis=0, length=m.out_channels),
                                        groups)
        except ValueError as e:
            raise site.error(str(e)) from None
    site.set(in_channels=groups * per_group, out_channels=out, groups=groups)


def _fix_attention(site: _Site) -> None:
    """``num_heads``, ``vo_size`` and the four sizes from the projections (whole heads)."""
    m = site.module
    q = site.shape("query_proj", "weight")
    k, v = site.shape("key_proj", "weight"), site.shape("value_proj", "weight")
    out = site.shape("output_proj", "weight")
    heads = whole_blocks(site.kept("query_proj", "weight", axis=0,
                                   length=m.num_heads * m.qk_size), m.num_heads)
    if heads is None or q[0] != int(heads.sum()) * m.qk_size or k[0] != q[0]:
        raise site.error(
            f"query/key projections must lose whole heads of qk_size={m.qk_size} (their "
            "1/sqrt(qk_size) logit scale would change otherwise); got query rows "
            f"{q[0]}, key rows {k[0]}")
    n = int(heads.sum())
    if n == 0 or v[0] % n or out[1] != v[0]:
        raise site.error(f"value/output projections {v}, {out} do not fit {n} heads")
    site.set(num_heads=n, qk_size=m.qk_size, vo_size=v[0] // n, query_size=q[1],
             key_size=k[1], value_size=v[1], output_size=out[0])


def _fix_group_norm(site: _Site) -> None:
    """``groups``, ``channels``: the normalisation groups left (each removed whole)."""
    m = site.module
    shape = site.shape("weight") or site.shape("bias")
    if shape is None or shape[0] == m.channels:
        return
    name = "weight" if site.shape("weight") is not None else "bias"
    kept = whole_blocks(site.kept(name, axis=0, length=m.channels), m.groups)
    if kept is None:
        raise site.error(f"removed channels must form whole normalisation groups of "
                         f"{m.channels // m.groups} channels")
    site.set(groups=int(kept.sum()), channels=shape[0])


def _fix_layer_norm(site: _Site) -> None:
    """``shape`` from ``weight`` (or ``bias``)."""
    shape = site.shape("weight") or site.shape("bias")
    if shape is not None:
        site.set(shape=shape)


def _fix_cell(site: _Site) -> None:
    """``input_size``, ``hidden_size`` of a GRU (3 gates) or LSTM (4 gates) cell."""
    m = site.module
    gates = 3 if isinstance(m, eqx.nn.GRUCell) else 4
    rows, fan_in = site.shape("weight_ih")
    hidden = site.shape("weight_hh")[1]
    if rows != gates * hidden or site.shape("weight_hh")[0] != rows:
        raise site.error(f"{gates} gates of {hidden} hidden units need {gates * hidden} "
                         f"rows in weight_ih/weight_hh, got {rows}; remove a hidden unit "
                         "from every gate together")
    site.set(input_size=fan_in, hidden_size=hidden)


def _fix_embedding(site: _Site) -> None:
    """``num_embeddings``, ``embedding_size`` from ``weight``."""
    n, size = site.shape("weight")
    site.set(num_embeddings=n, embedding_size=size)


def _fix_mlp(site: _Site) -> None:
    """``in_size``, ``out_size``, ``width_size`` (a tuple when hidden widths differ)."""
    m = site.module
    if m.scan:
        return
    layers = m.layers
    widths = tuple(lay.out_features for lay in layers[:-1])
    site.set(in_size=layers[0].in_features, out_size=layers[-1].out_features)
    if widths:
        site.set(width_size=widths[0] if len(set(widths)) == 1 else widths)


def _refuse_batch_norm(site: _Site) -> None:
    m = site.module
    if site.shape("weight") not in (None, (m.input_size,)):
        raise site.error("its running statistics live in an eqx.nn.State outside the "
                         "module; shrinking it is not supported")


_FIXERS: dict[type, Callable[[_Site], None]] = {
    eqx.nn.Linear: _fix_linear,
    eqx.nn.Conv: _fix_conv,
    eqx.nn.ConvTranspose: _fix_conv,
    eqx.nn.MultiheadAttention: _fix_attention,
    eqx.nn.GroupNorm: _fix_group_norm,
    eqx.nn.LayerNorm: _fix_layer_norm,
    eqx.nn.RMSNorm: _fix_layer_norm,
    eqx.nn.GRUCell: _fix_cell,
    eqx.nn.LSTMCell: _fix_cell,
    eqx.nn.Embedding: _fix_embedding,
    eqx.nn.MLP: _fix_mlp,
    eqx.nn.BatchNorm: _refuse_batch_norm,
}


def _fixer(cls: type) -> Callable[[_Site], None] | None:
    return next((_FIXERS[c] for c in cls.__mro__ if c in _FIXERS), None)


def _rebuild(node: Any, path: Path, keep: KeepMasks) -> Any:
    """``node`` with every equinox module rebuilt bottom-up and its static fields fixed."""
    if isinstance(node, eqx.Module):
        new = object.__new__(type(node))
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if not f.metadata.get("static", False):
                value = _rebuild(value, (*path, f.name), keep)
            object.__setattr__(new, f.name, value)
        fixer = _fixer(type(node))
        if fixer is not None:
            fixer(_Site(new, path, keep))
        return new
    if isinstance(node, list | tuple) and not hasattr(node, "_fields"):
        return type(node)(_rebuild(v, (*path, i), keep) for i, v in enumerate(node))
    if isinstance(node, dict):
        return type(node)({k: _rebuild(v, (*path, k), keep) for k, v in node.items()})
    return node


def has_modules(tree: Any) -> bool:
    """Whether ``tree`` holds an equinox module anywhere."""
    nodes = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, eqx.Module))
    return any(isinstance(x, eqx.Module) for x in nodes)


def fix_static(tree: Any, keep: KeepMasks) -> Any:
    """``tree`` (already cut) with its equinox modules' static fields fitting the shapes.

    Args:
      tree: any pytree; its equinox modules are rebuilt (others returned unchanged).
      keep: the plan's keep masks by path (`hesso_jax.frameworks.verify.keep_by_path`),
        for the rules that depend on which channels went (whole heads, whole groups).

    Returns:
      The tree with consistent static fields.

    Raises:
      ValueError: naming the module and field when no consistent value exists.

    Example:
      >>> import equinox as eqx, jax, numpy as np, hesso_jax as hj
      >>> lin = eqx.nn.Linear(3, 4, key=jax.random.key(0))
      >>> g = hj.Groups.from_families([hj.GroupFamily(
      ...     4, (hj.Member(("weight",), 0), hj.Member(("bias",), 0)))])
      >>> small = hj.apply_plan(lin, g, hj.KeepPlan((4,), ((0, 1),)))   # calls fix_static
      >>> small.out_features, small.weight.shape
      (2, (2, 3))
    """
    if not has_modules(tree):
        return tree
    return _rebuild(tree, (), keep)


def restatic(new: Any, old: Any, groups: Groups, plan: KeepPlan) -> Any:
    """`fix_static` of ``new`` (``old`` cut by ``plan``) if it holds equinox modules."""
    return fix_static(new, keep_by_path(old, groups, plan)) if has_modules(new) else new


def _modules(tree: Any, path: Path = ()) -> list[tuple[Path, Any]]:
    """``(path, module)`` of every equinox module in ``tree`` (pre-order)."""
    out: list[tuple[Path, Any]] = []
    if isinstance(tree, eqx.Module):
        out.append((path, tree))
        for f in dataclasses.fields(tree):
            if not f.metadata.get("static", False):
                out += _modules(getattr(tree, f.name), (*path, f.name))
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            out += _modules(v, (*path, i))
    elif isinstance(tree, dict):
        for k, v in tree.items():
            out += _modules(v, (*path, k))
    return out


@dataclasses.dataclass(frozen=True)
class _Apply:
    """``_Apply(static)(params, *args)``: the model's call (hashable: compiled once)."""

    static: Any

    def __call__(self, params: Any, *args: Any, **kwargs: Any) -> Any:
        return eqx.combine(params, self.static)(*args, **kwargs)


def _runner(model: Any, call: tuple[tuple[Any, ...], dict[str, Any]]) -> Runner:
    model = eqx.nn.inference_mode(model)
    args, kwargs = call
    params, static = eqx.partition(model, eqx.is_array)
    return Runner(lambda: compiled_call(_Apply(static), params, args, kwargs),
                  lambda: model(*args, **kwargs),
                  lambda tape: patched_calls(_modules(model), tape))


def shrink_model(model: eqx.Module, groups: Groups, *inputs: Any, example: Any = None,
                 verify: bool = True, plan: KeepPlan | None = None, round_to: int = 1,
                 tolerance: float | None = None) -> eqx.Module:
    """A smaller equinox module computing what ``model`` (with its zero groups) does.

    See `hesso_jax.shrink_model`. The groups' paths are those of the module's array leaves
    (``hj.tree_paths(eqx.filter(model, eqx.is_array))``). Verification runs both models in
    ``eqx.nn.inference_mode``.
    """
    params, static = eqx.partition(model, eqx.is_array)
    small, plan = shrink(params, groups, plan=plan, round_to=round_to, tolerance=tolerance)
    keep = keep_by_path(params, groups, plan)
    leaves, treedef = jax.tree_util.tree_flatten(model)
    cut = iter(jax.tree.leaves(small))
    leaves = [next(cut) if eqx.is_array(x) else x for x in leaves]
    new = fix_static(jax.tree_util.tree_unflatten(treedef, leaves), keep)
    call = resolve_example(groups, inputs, example)
    if verify and call is not None:
        masked = eqx.combine(masked_tree(params, groups, plan), static)
        verify_outputs("shrink_model", _runner(masked, call), _runner(new, call), keep)
    return new
