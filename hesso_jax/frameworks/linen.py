"""Surgery on Flax linen modules: a cloned module whose size attributes fit the shrunk tree.

A linen module stores its layers' sizes as dataclass attributes (``Dense.features``,
``Conv.features``, ``MultiHeadDotProductAttention.num_heads``, ...) and checks every stored
parameter's shape against them, so a shrunk variable tree needs a module with new sizes.
Layers are created while the module runs (``@nn.compact``) or in ``setup``, from the
attributes of their parents, so `resize`:

1. traces the module on the example input (abstractly, ``jax.eval_shape`` of ``init``)
   with every layer's ``__call__`` intercepted, recording each layer's size attributes by
   scope path;
2. computes, per layer type, the attributes the shrunk variable shapes need (the
   *targets*: one fixer per layer type, see `_LAYER_FIXERS`);
3. finds the integer attributes (*slots*) of the root module, of modules held in its
   fields and of tuples there (``features: tuple[int, ...]``) whose values are the old
   sizes, and changes them one at a time, keeping a change only when the re-traced module
   then differs from the current one in target attributes only and reaches more targets
   without losing any (so a slot shared by several layers is changed only when all of
   them need it);
4. checks that the resized module initialises variables of exactly the shrunk shapes.

Sizes computed from attributes (``4 * self.d``), literal constants and global config
objects (Hugging Face ``config=``) are out of scope: `resize` raises a ValueError naming
the layer and attribute it could not reach. Use `hesso_jax.shrink` on the variables and
rebuild such a module yourself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from hesso_jax.frameworks.common import grouped_conv_count
from hesso_jax.frameworks.verify import (
    KeepMasks,
    Runner,
    Tape,
    compiled_call,
    keep_by_path,
    masked_tree,
    resolve_example,
)
from hesso_jax.frameworks.verify import verify as verify_outputs
from hesso_jax.groups import Groups, Path, format_path, tree_paths
from hesso_jax.surgery import KeepPlan, shrink

__all__ = ["resize", "shrink_model"]

Attrs = dict[tuple[Path, str], Any]
"""``{(layer scope path, attribute): value}``."""

Call = tuple[tuple[Any, ...], dict[str, Any]]


# ------------------------------------------------------------------------ recording


def _size_attrs(module: nn.Module) -> dict[str, Any]:
    names = _SIZE_ATTRS.get(type(module)) or next(
        (v for c, v in _SIZE_ATTRS.items() if isinstance(module, c)), ())
    return {n: getattr(module, n) for n in names}


def _layers(module: nn.Module, call: Call) -> dict[Path, tuple[type, dict[str, Any]]]:
    """``{scope path: (layer type, size attributes)}`` of every layer ``module`` creates."""
    seen: dict[Path, tuple[type, dict[str, Any]]] = {}

    def record(next_fun: Callable, args: Any, kwargs: Any, ctx: Any) -> Any:
        m = ctx.module
        if ctx.method_name == "__call__" and m.scope is not None and m.scope.path:
            seen.setdefault(tuple(m.scope.path), (type(m), _size_attrs(m)))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        _abstract_init(module, call)
    return seen


def _abstract_init(module: nn.Module, call: Call) -> Any:
    """``jax.eval_shape`` of ``module.init`` on ``call`` (non-array arguments static)."""
    leaves, treedef = jax.tree_util.tree_flatten(call)
    dynamic = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array | np.ndarray
                                                              | jax.ShapeDtypeStruct)]

    def init(*arrays: Any) -> Any:
        full = list(leaves)
        for i, a in zip(dynamic, arrays, strict=True):
            full[i] = a
        args, kwargs = jax.tree_util.tree_unflatten(treedef, full)
        return module.init(jax.random.key(0), *args, **kwargs)

    return jax.eval_shape(init, *[leaves[i] for i in dynamic])


def _attrs(layers: dict[Path, tuple[type, dict[str, Any]]]) -> Attrs:
    return {(p, n): v for p, (_, d) in layers.items() for n, v in d.items()}


def _init_shapes(module: nn.Module, call: Call) -> dict[str, Any]:
    out = _abstract_init(module, call)
    return _shapes(out)


# -------------------------------------------------------------------- layer targets


def _shape(shapes: dict[str, Any], path: Path, name: str) -> tuple[int, ...] | None:
    node: Any = shapes.get("params", {})
    for key in (*path, name):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return tuple(node)


def _features_like(old: Any, new: tuple[int, ...]) -> Any:
    return new[0] if isinstance(old, int) and len(new) == 1 else tuple(new)


def _dense(path: Path, attrs: dict[str, Any], new: dict[str, Any], keep: KeepMasks
           ) -> dict[str, Any]:
    kernel = _shape(new, path, "kernel")
    return {} if kernel is None else {"features": kernel[-1]}


def _dense_general(path: Path, attrs: dict[str, Any], new: dict[str, Any], keep: KeepMasks
                   ) -> dict[str, Any]:
    kernel = _shape(new, path, "kernel")
    old = attrs["features"]
    n = 1 if isinstance(old, int) else len(old)
    return {} if kernel is None else {"features": _features_like(old, kernel[-n:])}


def _conv(path: Path, attrs: dict[str, Any], new: dict[str, Any], keep: KeepMasks
          ) -> dict[str, Any]:
    kernel = _shape(new, path, "kernel")
    if kernel is None:
        return {}
    out = {"features": kernel[-1]}
    groups = attrs.get("feature_group_count", 1)
    mask = keep.get(("params", *path, "kernel"), {}).get(len(kernel) - 1)
    if groups > 1 and mask is not None:
        out["feature_group_count"] = grouped_conv_count(mask, groups)
    return out


def _embed(path: Path, attrs: dict[str, Any], new: dict[str, Any], keep: KeepMasks
           ) -> dict[str, Any]:
    table = _shape(new, path, "embedding")
    return {} if table is None else {"num_embeddings": table[0], "features": table[1]}


def _attention(path: Path, attrs: dict[str, Any], new: dict[str, Any], keep: KeepMasks
               ) -> dict[str, Any]:
    q, out = _shape(new, (*path, "query"), "kernel"), _shape(new, (*path, "out"), "kernel")
    if q is None or out is None:
        return {}
    _, heads, dim = q
    targets = {"num_heads": heads, "qkv_features": heads * dim}
    if attrs["qkv_features"] is None and heads == attrs["num_heads"]:
        targets.pop("qkv_features")
    if attrs["out_features"] is not None:
        targets["out_features"] = out[-1]
    return targets


def _group_norm(path: Path, attrs: dict[str, Any], new: dict[str, Any], keep: KeepMasks
                ) -> dict[str, Any]:
    scale = _shape(new, path, "scale") or _shape(new, path, "bias")
    old_keep = keep.get(("params", *path, "scale"), keep.get(("params", *path, "bias"), {}))
    if scale is None or attrs["num_groups"] is None or 0 not in old_keep:
        return {}
    size = old_keep[0].size // attrs["num_groups"]
    if scale[0] % size:
        raise ValueError(f"GroupNorm at {format_path(path)!r}: {scale[0]} channels left, "
                         f"not whole normalisation groups of {size}")
    return {"num_groups": scale[0] // size}


_SIZE_ATTRS: dict[type, tuple[str, ...]] = {
    nn.Dense: ("features",),
    nn.DenseGeneral: ("features",),
    nn.Conv: ("features", "feature_group_count"),
    nn.ConvTranspose: ("features",),
    nn.ConvLocal: ("features",),
    nn.Embed: ("num_embeddings", "features"),
    nn.MultiHeadDotProductAttention: ("num_heads", "qkv_features", "out_features"),
    nn.GroupNorm: ("num_groups",),
}

_LAYER_FIXERS: dict[type, Callable[..., dict[str, Any]]] = {
    nn.Dense: _dense, nn.DenseGeneral: _dense_general, nn.Conv: _conv,
    nn.ConvTranspose: _conv, nn.ConvLocal: _conv, nn.Embed: _embed,
    nn.MultiHeadDotProductAttention: _attention, nn.GroupNorm: _group_norm,
}


def _targets(layers: dict[Path, tuple[type, dict[str, Any]]], new: dict[str, Any],
             keep: KeepMasks) -> Attrs:
    """The attribute values the shrunk shapes need, where they differ from the old ones."""
    out: Attrs = {}
    for path, (cls, attrs) in layers.items():
        fixer = next((f for c, f in _LAYER_FIXERS.items() if issubclass(cls, c)), None)
        if fixer is None:
            continue
        for name, value in fixer(path, attrs, new, keep).items():
            if attrs.get(name) != value:
                out[(path, name)] = value
    return out


# --------------------------------------------------------------------------- slots


def _slots(node: Any, address: tuple = ()) -> Iterator[tuple[tuple, int]]:
    """``(address, value)`` of every int reachable through module fields and sequences."""
    if isinstance(node, nn.Module):
        for f in dataclasses.fields(node):
            if f.name not in ("parent", "name"):
                yield from _slots(getattr(node, f.name), (*address, f.name))
    elif isinstance(node, tuple | list):
        for i, v in enumerate(node):
            yield from _slots(v, (*address, i))
    elif isinstance(node, int) and not isinstance(node, bool):
        yield address, node


def _set(node: Any, address: tuple, value: Any) -> Any:
    """``node`` with the slot at ``address`` set to ``value`` (modules are cloned)."""
    if not address:
        return value
    head, rest = address[0], address[1:]
    if isinstance(node, nn.Module):
        return node.clone(**{head: _set(getattr(node, head), rest, value)})
    items = list(node)
    items[head] = _set(items[head], rest, value)
    return type(node)(items)


def _try(module: nn.Module, call: Call) -> Attrs | None:
    try:
        return _attrs(_layers(module, call))
    except Exception:  # a partial assignment may be invalid (heads not dividing features)
        return None


def _step(module: nn.Module, call: Call, current: Attrs, targets: Attrs
          ) -> tuple[nn.Module, Attrs] | None:
    """One slot change that touches only target attributes and reaches more targets.

    (Attributes on their way may pass through other values: ``qkv_features`` first,
    with ``head_dim`` changing until ``num_heads`` follows.)
    """
    pending = {k: v for k, v in targets.items() if current.get(k) != v}
    for address, value in _slots(module):
        for new in sorted({v for k, v in pending.items() if current.get(k) == value}):
            trial = _set(module, address, new)
            attrs = _try(trial, call)
            if attrs is None:
                continue
            changed = {k for k in set(attrs) | set(current) if attrs.get(k) != current.get(k)}
            done = {k for k, v in targets.items() if attrs.get(k) == v}
            if (changed <= set(targets) and done >= set(targets) - set(pending)
                    and len(done) > len(targets) - len(pending)):
                return trial, attrs
    return None


def resize(module: nn.Module, call: Call, new_shapes: dict[str, Any], keep: KeepMasks
           ) -> nn.Module:
    """A clone of ``module`` whose layers create variables of ``new_shapes``.

    Args:
      module: the linen module.
      call: ``(args, kwargs)``: an example call (arrays or ``jax.ShapeDtypeStruct``).
      new_shapes: the shrunk variables' shapes (``{collection: {...: shape tuple}}``).
      keep: the plan's keep masks by variable path (for grouped convs, GroupNorm).

    Returns:
      The resized module (``module`` itself when nothing changes).

    Raises:
      ValueError: naming a layer attribute no module field holds, or when the resized
        module still creates variables of other shapes.
    """
    layers = _layers(module, call)
    targets = _targets(layers, new_shapes, keep)
    current = _attrs(layers)
    while any(current.get(k) != v for k, v in targets.items()):
        step = _step(module, call, current, targets)
        if step is None:
            break
        module, current = step
    missing = [f"{layers[p][0].__name__}.{n} = {v} at {format_path(p)!r} (now "
               f"{current.get((p, n))})" for (p, n), v in targets.items()
               if current.get((p, n)) != v]
    if missing:
        raise ValueError(
            f"shrink_model: cannot resize the linen module {type(module).__name__}: "
            f"{'; '.join(missing)}: no int attribute of the module or of the modules and "
            "tuples in its fields holds that size alone (it is a constant, computed from "
            "other attributes, or read from a config object). Shrink the variables with "
            "hj.shrink and rebuild the module with the new sizes yourself")
    got = _init_shapes(module, call)
    want = {c: new_shapes[c] for c in got if c in new_shapes}
    if {c: got[c] for c in want} != want:
        raise ValueError(
            f"shrink_model: the resized linen module {type(module).__name__} creates "
            "variables of other shapes than the shrunk ones (a size it derives from its "
            "attributes in a way resize cannot follow); rebuild it yourself")
    return module


# ------------------------------------------------------------------------- entry point


def _shapes(tree: Any) -> dict[str, Any]:
    from flax.core import unfreeze

    return unfreeze(jax.tree.map(lambda x: tuple(np.shape(x)), tree))


@dataclasses.dataclass(frozen=True)
class _Apply:
    """``_Apply(module)(variables, *args)``: ``module.apply`` (hashable: compiled once)."""

    module: nn.Module

    def __call__(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        return self.module.apply(variables, *args, **kwargs)


def _runner(module: nn.Module, variables: Any, call: Call) -> Runner:
    args, kwargs = call

    def record(tape: Tape) -> Any:
        def icpt(next_fun: Callable, a: Any, k: Any, ctx: Any) -> Any:
            m = ctx.module
            if ctx.method_name != "__call__" or m.scope is None:
                return next_fun(*a, **k)
            return tape.call((tuple(m.scope.path), type(m).__name__), lambda: next_fun(*a, **k))
        return nn.intercept_methods(icpt)

    return Runner(lambda: compiled_call(_Apply(module), variables, args, kwargs),
                  lambda: module.apply(variables, *args, **kwargs), record)


def _params_relative(variables: Any, groups: Groups) -> bool:
    """Whether the groups' paths are relative to ``variables['params']``."""
    paths = set(tree_paths(variables))
    first = next((m.path for f in groups.families for m in f.members), None)
    return first is not None and first not in paths and ("params", *first) in paths


def shrink_model(module: nn.Module, groups: Groups, *inputs: Any, variables: Any,
                 example: Any = None, verify: bool = True, plan: KeepPlan | None = None,
                 round_to: int = 1, tolerance: float | None = None
                 ) -> tuple[nn.Module, Any]:
    """``(new_module, new_variables)``: a linen module resized to its shrunk variables.

    See `hesso_jax.shrink_model`; the example input is required (layers are created
    while the module runs, see `resize`).
    """
    call = resolve_example(groups, inputs, example)
    if call is None:
        raise ValueError(
            "shrink_model: a linen module creates its layers while it runs, so resizing it "
            "needs an example input: shrink_model(module, groups, x, variables=variables)")
    tree = variables
    if _params_relative(variables, groups):    # groups discovered over variables['params']
        tree = variables["params"]
    small, plan = shrink(tree, groups, plan=plan, round_to=round_to, tolerance=tolerance)
    keep = keep_by_path(tree, groups, plan)
    masked = masked_tree(tree, groups, plan)
    if tree is not variables:
        small, masked = ({**variables, "params": t} for t in (small, masked))
        keep = {("params", *p): axes for p, axes in keep.items()}
    new_module = resize(module, call, _shapes(small), keep)
    if verify:
        verify_outputs("shrink_model", _runner(module, masked, call),
               _runner(new_module, small, call), keep)
    return new_module, small

