"""Activation capture and partial re-evaluation over a model's jaxpr (the SNOWS client).

Two clients of `hesso_jax.jaxpr.interpreter.Interpreter` share one addressing scheme:

* `Analyzer` walks the jaxpr with symbolic `Node` values and writes a *flat program*: the
  ordered list of executed (non-inlined) equations, every value named by a stable key —
  ``('in', k)`` for the k-th input of the traced function, ``('eqn', i, j)`` for output
  ``j`` of the ``i``-th executed equation. Call-like primitives (``jit``, ``custom_jvp``,
  …) are inlined by the interpreter core, so the keys number ordinary primitives in
  execution order; since that order is deterministic, the same key names the same value
  in every later concrete run. Along the way it tracks which values are a parameter leaf
  seen through ``convert_element_type``/``copy``/``transpose``/``reshape``/``squeeze``
  (with the map from the value's axes back to the leaf's axes) and records every
  *linear operation*: a ``dot_general`` or ``conv_general_dilated`` with exactly one
  operand derived from a parameter leaf (the kernel) and the other not (the activation).
* `Evaluator` runs the same jaxpr on real arrays (or tracers, inside ``jit``/``grad``). It
  can record any keys (``capture``), and can re-evaluate only a subset of equations
  (``recompute``) while every other needed value is read from ``provided`` — so
  ``outputs of ops l..l+K as a function of op l's weight`` is one evaluator call whose
  recompute set is the slice between them (`Program.segment`).

Control flow (``cond``, ``scan``, ``while``) is evaluated opaquely (``bind`` with its
bodies), so linear operations *inside* loops or branches are neither captured nor pruned;
a parameter consumed only there is not a SNOWS layer. Its outputs still take part in the
objective of upstream layers through the opaque equation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from hesso_jax.groups import Path, format_path, tree_paths
from hesso_jax.jaxpr.interpreter import Interpreter, make_closed_jaxpr
from hesso_jax.jaxpr.views import view_axes

__all__ = ["Analyzer", "Evaluator", "FlatEqn", "LinearOp", "Node", "Program", "Segment",
           "trace"]

Key = tuple
"""``('in', k)`` or ``('eqn', i, j)``: a value of the flat program."""

_PASSTHROUGH = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision",
                          "transpose", "reshape", "squeeze"})
_LINEAR = frozenset({"dot_general", "conv_general_dilated"})

AxisOrigin = tuple[tuple[int, ...], ...]
"""For each axis of a value, the leaf axes it covers (a merge of reshape covers several)."""


@dataclasses.dataclass(frozen=True)
class Node:
    """Symbolic value of the `Analyzer`.

    Attributes:
      key: the value's key, or None for literals and closed-over constants (always
        available, never provided).
      shape: its shape.
      origin: ``(leaf, axis_origin)`` when the value is parameter leaf ``leaf`` seen through
        pass-through primitives, else None.
    """

    key: Key | None
    shape: tuple[int, ...]
    origin: tuple[int, AxisOrigin] | None = None


@dataclasses.dataclass(frozen=True)
class FlatEqn:
    """One executed equation of the flat program.

    Attributes:
      index: execution index ``i`` (its outputs are ``('eqn', i, j)``).
      primitive: primitive name.
      inputs: keys of its operands (None for literals/constants).
      outputs: keys of its results.
    """

    index: int
    primitive: str
    inputs: tuple[Key | None, ...]
    outputs: tuple[Key, ...]


@dataclasses.dataclass(frozen=True)
class LinearOp:
    """A ``dot_general``/``conv_general_dilated`` whose kernel is a parameter leaf.

    Attributes:
      index: position among the linear ops (forward/execution order).
      eqn: execution index of the equation.
      primitive: ``'dot_general'`` or ``'conv_general_dilated'``.
      leaf: index of the kernel's leaf among the traced parameter leaves.
      path: the kernel's path (see `hesso_jax.groups.tree_paths`).
      reduction_axes: leaf axes summed over by the op (dot_general: the contracted axes;
        conv: spatial and input-feature axes).
      nm_axes: leaf axes along which N:M patterns run (dot_general: the contracted axes,
        flattened row-major; conv: the input-feature axis only).
      kernel_key: key of the kernel operand as the op sees it.
      act_key: key of the activation operand (None if it is a literal/constant).
      out_key: key of the op's output (the pre-activation).
      out_shape: its shape.
    """

    index: int
    eqn: int
    primitive: str
    leaf: int
    path: Path
    reduction_axes: tuple[int, ...]
    nm_axes: tuple[int, ...]
    kernel_key: Key
    act_key: Key | None
    out_key: Key
    out_shape: tuple[int, ...]


def _pass_origin(eqn: Any, node: Node) -> AxisOrigin | None:
    """Axis origin of the output of a pass-through equation applied to ``node``.

    The parameter-view tracker of discovery (`hesso_jax.jaxpr.views.view_axes`), with
    reshapes that split an axis not counted as views (no axis-to-axis map exists).
    """
    assert node.origin is not None
    leaf, origin = node.origin
    src = tuple(frozenset((leaf, a) for a in axes) for axes in origin)
    out = view_axes(eqn, src, node.shape, eqn.outvars[0].aval.shape, split=False)
    if out is None:
        return None
    return tuple(tuple(sorted(a for _leaf, a in pairs)) for pairs in out)


class Analyzer(Interpreter):
    """Builds the flat program and finds the linear operations (symbolic `Node` values).

    Args:
      num_leaves: how many leading inputs of the traced function are parameter leaves.
      paths: their paths.
    """

    rules: dict = {}

    def __init__(self, num_leaves: int, paths: Sequence[Path]):
        super().__init__()
        self.num_leaves = num_leaves
        self.paths = list(paths)
        self.eqns: list[FlatEqn] = []
        self.ops: list[LinearOp] = []
        self.opaque: list[str] = []

    def literal(self, value: Any, aval: Any) -> Node:
        """Literals are always available: no key, no origin."""
        return Node(None, tuple(getattr(aval, "shape", ())))

    def const(self, value: Any) -> Node:
        """Closed-over constants are always available: no key, no origin."""
        return Node(None, tuple(np.shape(value)))

    def fallback(self, eqn: Any, invals: list[Node]) -> Any:
        """Records the equation, propagates parameter origins, detects linear ops."""
        i = len(self.eqns)
        name = eqn.primitive.name
        outs = [Node(("eqn", i, j), tuple(getattr(v.aval, "shape", ())))
                for j, v in enumerate(eqn.outvars)]
        self.eqns.append(FlatEqn(i, name, tuple(n.key for n in invals),
                                 tuple(n.key for n in outs)))
        if name in ("cond", "scan", "while"):
            self.opaque.append(f"{name} (eqn {i})")
        if name in _PASSTHROUGH and invals[0].origin is not None:
            origin = _pass_origin(eqn, invals[0])
            if origin is not None:
                outs[0] = dataclasses.replace(outs[0], origin=(invals[0].origin[0], origin))
        elif name in _LINEAR and len(invals) == 2:
            self._linear(eqn, i, invals, outs[0])
        return outs if eqn.primitive.multiple_results else outs[0]

    def _linear(self, eqn: Any, i: int, invals: list[Node], out: Node) -> None:
        has = [n.origin is not None for n in invals]
        if has[0] == has[1]:
            return
        k = 1 if has[1] else 0
        kernel = invals[k]
        leaf, origin = kernel.origin  # type: ignore[misc]
        if eqn.primitive.name == "dot_general":
            (contract, _), _batch = eqn.params["dimension_numbers"]
            contract_k = eqn.params["dimension_numbers"][0][k]
            if eqn.params["dimension_numbers"][1][k]:
                return  # batched over the kernel: not a plain linear layer
            red = tuple(sorted({a for d in contract_k for a in origin[d]}))
            nm = red
        else:
            if k != 1 or eqn.params.get("batch_group_count", 1) != 1:
                return
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec
            red = tuple(sorted({a for d in rhs_spec[1:] for a in origin[d]}))
            nm = tuple(sorted(origin[rhs_spec[1]]))
        if not nm:
            return
        act = invals[1 - k]
        self.ops.append(LinearOp(len(self.ops), i, eqn.primitive.name, leaf,
                                 tuple(self.paths[leaf]), red, nm, kernel.key, act.key,
                                 out.key, out.shape))


class Evaluator(Interpreter):
    """Concrete (or traced) evaluation of the flat program with capture and slicing.

    Args:
      recompute: execution indices to evaluate (``bind``); None evaluates everything.
      provided: values for keys whose producing equation is not recomputed.
      capture: keys to record into `captured`.
    """

    rules: dict = {}

    def __init__(self, recompute: frozenset[int] | None = None,
                 provided: dict[Key, Any] | None = None,
                 capture: frozenset[Key] | set[Key] = frozenset()):
        super().__init__()
        self.recompute = recompute
        self.provided = provided or {}
        self.capture = capture
        self.captured: dict[Key, Any] = {}
        self.count = 0

    def literal(self, value: Any, aval: Any) -> Any:
        """The literal's value."""
        return value

    def const(self, value: Any) -> Any:
        """The constant's value."""
        return value

    def fallback(self, eqn: Any, invals: list[Any]) -> Any:
        """``bind`` the equation if it is recomputed, else read its outputs from `provided`."""
        i = self.count
        self.count += 1
        if self.recompute is None or i in self.recompute:
            out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outs = list(out) if eqn.primitive.multiple_results else [out]
        else:
            outs = [self.provided.get(("eqn", i, j)) for j in range(len(eqn.outvars))]
        for j, x in enumerate(outs):
            if ("eqn", i, j) in self.capture:
                self.captured[("eqn", i, j)] = x
        return outs if eqn.primitive.multiple_results else outs[0]


@dataclasses.dataclass(frozen=True)
class Segment:
    """The slice of the program between a leaf and some op outputs.

    Attributes:
      leaf: the varied parameter leaf.
      targets: output keys, in order.
      recompute: equations to re-evaluate (depend on the leaf, needed for the targets).
      boundary: keys whose values must be provided (needed by ``recompute``, independent of
        the leaf), sorted.
    """

    leaf: int
    targets: tuple[Key, ...]
    recompute: frozenset[int]
    boundary: tuple[Key, ...]


@dataclasses.dataclass(eq=False)
class Program:
    """A traced function ``fn(leaves, *args)`` as a flat program with its linear ops.

    Attributes:
      closed: the closed jaxpr of ``lambda *leaves_and_args: fn(...)`` (flat inputs: the
        parameter leaves, then the flattened example args).
      num_leaves: number of parameter leaves.
      num_inputs: total flat inputs.
      paths: parameter leaf paths.
      treedef: parameter tree structure.
      eqns: the flat program.
      ops: linear ops in execution order.
      opaque: control-flow equations evaluated opaquely (their linear ops are not seen).
    """

    closed: Any
    num_leaves: int
    num_inputs: int
    paths: list[Path]
    treedef: Any
    eqns: list[FlatEqn]
    ops: list[LinearOp]
    opaque: list[str]

    def __post_init__(self) -> None:
        self._cache: dict[Any, Any] = {}

    def memo(self, key: Any, make: Callable[[], Any]) -> Any:
        """A per-program cache (jitted solvers and capture functions are built once)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # ------------------------------------------------------------------ dataflow
    def tainted(self, leaf: int) -> set[Key]:
        """Keys whose value depends on parameter leaf ``leaf``."""
        def build() -> set[Key]:
            dirty: set[Key] = {("in", leaf)}
            for e in self.eqns:
                if any(k in dirty for k in e.inputs):
                    dirty.update(e.outputs)
            return dirty
        return self.memo(("tainted", leaf), build)

    def downstream_ops(self, leaf: int) -> list[LinearOp]:
        """Linear ops whose output depends on ``leaf``, in forward order."""
        dirty = self.tainted(leaf)
        return [op for op in self.ops if op.out_key in dirty]

    def segment(self, leaf: int, targets: Sequence[Key]) -> Segment:
        """Equations to recompute and values to provide for ``targets`` as f(leaf)."""
        dirty = self.tainted(leaf)
        needed: set[Key] = set(targets)
        recompute: set[int] = set()
        for e in reversed(self.eqns):
            if any(k in needed for k in e.outputs) and any(k in dirty for k in e.outputs):
                recompute.add(e.index)
                needed.update(k for k in e.inputs if k is not None)
        produced = {k for i in recompute for k in self.eqns[i].outputs}
        boundary = sorted((k for k in needed if k not in produced and k != ("in", leaf)),
                          key=_key_order)
        missing = [k for k in targets if k not in dirty]
        if missing:
            raise ValueError(f"targets {missing} do not depend on leaf "
                             f"{format_path(self.paths[leaf])!r}")
        return Segment(leaf, tuple(targets), frozenset(recompute), tuple(boundary))

    # ------------------------------------------------------------------ evaluation
    def run(self, inputs: Sequence[Any], *, recompute: frozenset[int] | None = None,
            provided: dict[Key, Any] | None = None,
            capture: frozenset[Key] | set[Key] = frozenset()) -> tuple[list[Any], dict]:
        """Evaluates the program on flat ``inputs`` (None where a segment needs none).

        Returns:
          ``(outputs, captured)``.
        """
        ev = Evaluator(recompute, provided, capture)
        outs = ev.run_closed(self.closed, list(inputs))
        captured = dict(ev.captured)
        for k in capture:
            if k[0] == "in":
                captured[k] = inputs[k[1]]
        return outs, captured

    def capture_all(self, leaves: Sequence[Any], args: Sequence[Any],
                    keys: Sequence[Key]) -> list[Any]:
        """Full forward pass on ``leaves`` and flat ``args``, returning the ``keys``' values."""
        _, cap = self.run([*leaves, *args], capture=frozenset(keys))
        return [cap[k] for k in keys]

    def eval_segment(self, seg: Segment, weight: Any, boundary: Sequence[Any]) -> list[Any]:
        """Values of ``seg.targets`` with leaf ``seg.leaf`` = ``weight``.

        ``boundary`` holds the values of ``seg.boundary`` (same order). Differentiable and
        jittable in ``weight`` and ``boundary``.
        """
        provided = dict(zip(seg.boundary, boundary, strict=True))
        inputs: list[Any] = [provided.get(("in", k)) for k in range(self.num_inputs)]
        inputs[seg.leaf] = weight
        _, cap = self.run(inputs, recompute=seg.recompute, provided=provided,
                          capture=frozenset(seg.targets))
        return [cap[k] for k in seg.targets]


def _key_order(k: Key) -> tuple:
    return (0 if k[0] == "in" else 1, *k[1:])


def trace(fn: Callable[..., Any], params: Any, *args: Any) -> Program:
    """Traces ``fn(params, *args)`` and analyses it (see the module docstring).

    Args:
      fn: a pure function of a parameter pytree and positional array arguments.
      params: the parameter pytree (leaf paths via `hesso_jax.groups.tree_paths`).
      *args: example arguments with the shapes the program will be evaluated at.

    Returns:
      The `Program`. Programs of jaxprs without constants are cached by the jaxpr's text,
      so retracing an equal model (another seed, another sparsity) reuses the per-layer
      jitted functions memoised on it.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    paths = tree_paths(params)
    flat_args, args_def = jax.tree_util.tree_flatten(args)

    def flat_fn(*xs: Any) -> Any:
        p = jax.tree_util.tree_unflatten(treedef, xs[:len(leaves)])
        a = jax.tree_util.tree_unflatten(args_def, xs[len(leaves):])
        return fn(p, *a)

    closed = make_closed_jaxpr(jax.make_jaxpr(flat_fn)(*leaves, *flat_args))
    cache_key = None
    if not closed.consts:
        cache_key = (str(closed.jaxpr), treedef, tuple(map(tuple, paths)))
        hit = _PROGRAMS.get(cache_key)
        if hit is not None:
            return hit
    an = Analyzer(len(leaves), paths)
    n_in = len(leaves) + len(flat_args)
    an.run_closed(closed, [Node(("in", k), tuple(np.shape(x)),
                                (k, tuple((a,) for a in range(np.ndim(x))))
                                if k < len(leaves) else None)
                           for k, x in enumerate([*leaves, *flat_args])])
    prog = Program(closed, len(leaves), n_in, paths, treedef, an.eqns, an.ops, an.opaque)
    if cache_key is not None:
        if len(_PROGRAMS) >= _MAX_PROGRAMS:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))
        _PROGRAMS[cache_key] = prog
    return prog


_PROGRAMS: dict[Any, Program] = {}
"""Programs by jaxpr text (no consts): equal models share their jitted solvers."""
_MAX_PROGRAMS = 16
