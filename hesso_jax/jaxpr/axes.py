"""Axis tracking over a jaxpr: stage 1 of group discovery (see `hesso_jax.discovery`).

`AxisTracer` is a client of `hesso_jax.jaxpr.interpreter.Interpreter` whose abstract
value (`Value`) names every axis of a traced value by a node id. Each primitive's rule

* joins, in a union-find, the axes that share one channel index (the aligned axes of
  elementwise ops, free/batch axes of ``dot_general``/``conv``, contracted pairs, ...);
* records the other index maps: ``embeds`` (a segment of a concatenation or a slice)
  and ``products`` (a reshape that merges or splits axes);
* *blocks* the axes it treats non-uniformly (convolution windows, max/argmax/sort/cumsum
  axes, indexed gather axes, constants, anything without a rule);
* records which parameter axes are contracted and which are used otherwise (through
  views such as transposes and reshapes);
* appends an *event*: a closure that, given the zero analysis of stage 3
  (`hesso_jax.jaxpr.zeros.ZeroAnalysis`), computes which channel slices of the outputs are
  exactly zero from those of the inputs, and checks every contraction.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import jax
import numpy as np

from hesso_jax.jaxpr.interpreter import Interpreter
from hesso_jax.jaxpr.values import UnionFind, Value
from hesso_jax.jaxpr.views import reshape_groups, view_axes
from hesso_jax.jaxpr.zeros import Event, ZeroAnalysis

__all__ = ["BLOCK_REDUCED", "CUMULATIVE", "IDENTITY", "RANDOM", "RULES", "VIEW", "ZERO_ALL",
           "ZERO_ANY", "ZERO_FIRST", "ZERO_KINDS", "ZERO_NONE", "AxisRule", "AxisTracer",
           "Event", "UnionFind", "Value", "ZeroKind", "def_blocked", "def_elementwise",
           "def_identity", "def_source", "default_rule", "elementwise_rule", "register_rule"]


ZeroKind = Literal["any", "all", "first", "none"]
"""How an elementwise primitive keeps zeros: ``any`` (zero where some operand is: ``x·y``),
``all`` (where every operand is: ``x+y``, ``max``), ``first`` (where the first operand is:
``x/y``, ``f(x)`` with ``f(0) = 0``), ``none`` (``exp``, ``cos``: zeros are not kept)."""

# primitives by zero behaviour (all are elementwise with numpy-style size-1 broadcasting)
ZERO_FIRST: frozenset[str] = frozenset({
    "neg", "abs", "sign", "sin", "tan", "tanh", "atan", "asin", "sinh", "asinh", "atanh",
    "erf", "sqrt", "cbrt", "expm1", "log1p", "square", "real", "conj", "copy", "copy_p",
    "convert_element_type", "reduce_precision", "stop_gradient", "floor", "ceil", "round",
    "div", "rem", "imag",
})
ZERO_NONE: frozenset[str] = frozenset({
    "exp", "exp2", "log", "cos", "cosh", "acos", "logistic", "rsqrt", "erf_inv", "erfc",
    "lgamma", "digamma", "is_finite", "not", "pow", "atan2", "eq", "ne", "lt", "gt", "le",
    "ge", "nextafter", "population_count", "clz", "shift_left", "shift_right_logical",
    "shift_right_arithmetic", "or", "xor", "igamma", "igammac", "random_gamma_grad",
    "bessel_i0e", "bessel_i1e", "regularized_incomplete_beta", "polygamma", "zeta", "clamp",
    "complex",
})
ZERO_ANY: frozenset[str] = frozenset({"mul", "and"})
ZERO_ALL: frozenset[str] = frozenset({"add", "sub", "max", "min", "add_any", "select_n"})
VIEW: frozenset[str] = frozenset({
    "convert_element_type", "reshape", "transpose", "broadcast_in_dim", "squeeze", "copy",
    "copy_p", "reduce_precision", "slice", "sharding_constraint", "mesh_cast", "reshard",
    "pvary"})
"""Primitives whose output is a view of a parameter operand (it stays that parameter)."""
IDENTITY: frozenset[str] = frozenset({"sharding_constraint", "mesh_cast", "reshard", "pvary",
                                      "optimization_barrier"})
RANDOM: frozenset[str] = frozenset({
    "random_bits", "random_seed", "random_wrap", "random_unwrap", "random_split",
    "random_fold_in", "threefry2x32", "rng_bit_generator", "rng_uniform", "random_clone"})
BLOCK_REDUCED: frozenset[str] = frozenset({"reduce_max", "reduce_min", "reduce_prod",
                                           "reduce_and", "reduce_or", "reduce_xor", "argmax",
                                           "argmin"})
CUMULATIVE: frozenset[str] = frozenset({"cumsum", "cumprod", "cummax", "cummin",
                                        "cumlogsumexp"})

ZERO_KINDS: dict[str, ZeroKind] = {
    **dict.fromkeys(ZERO_NONE, "none"), **dict.fromkeys(ZERO_FIRST, "first"),
    **dict.fromkeys(ZERO_ALL, "all"), **dict.fromkeys(ZERO_ANY, "any"),
    "integer_pow": "first",  # x**y with y > 0; y <= 0 keeps no zero (`elementwise_rule`)
}
"""Elementwise primitive name -> its `ZeroKind` (`def_elementwise` adds to it)."""


class AxisTracer(Interpreter):
    """Builds the axis classes, relations, blocks and the zero-analysis event list."""

    def __init__(self) -> None:
        super().__init__()
        self.uf = UnionFind()
        self.size: list[int] = []
        self.n_vals = 0
        self.blocked: dict[int, tuple[str, str | None]] = {}  # dim -> (reason, primitive)
        self.embeds: list[tuple[int, int, int]] = []  # (small dim, big dim, offset)
        self.products: list[tuple[int, list[int]]] = []  # (merged dim, factor dims)
        self.events: list[Event] = []
        self.contracted: set[tuple[int, int]] = set()  # (leaf, axis) used as contraction
        self.produced: set[tuple[int, int]] = set()  # (leaf, axis) used otherwise
        self.first_use: dict[int, int] = {}
        self.n_uses = 0
        self.unknown: dict[str, set[int]] = {}  # primitive -> dims it blocked
        self.consts: list[str] = []  # closed-over arrays, described ('f32[3,4]')
        self.const_users: dict[int, str] = {}  # closed-over array -> first primitive
        self.const_blocks: dict[int, frozenset] = {}  # dim -> closed-over arrays blocking
        # where things happened: the ``source_info`` of the equation being interpreted
        # (None outside equations), of each block, of each primitive's first block, of
        # each closed-over array's first use and of each parameter's first use
        self.site: Any = None
        self.block_sites: dict[int, Any] = {}
        self.primitive_sites: dict[str, Any] = {}
        self.const_sites: dict[int, Any] = {}
        self.use_sites: dict[int, Any] = {}

    # -- values
    def new_dim(self, n: int) -> int:
        """A new axis node of length ``n``."""
        self.size.append(int(n))
        return self.uf.add()

    def new_val(self, shape: Sequence[int], dims: Sequence[int] | None = None,
                **kw: Any) -> Value:
        """A new value with fresh axis nodes (or the given ones)."""
        shape = tuple(int(s) for s in shape)
        if dims is None:
            dims = tuple(self.new_dim(s) for s in shape)
        self.n_vals += 1
        return Value(self.n_vals, shape, tuple(dims), **kw)

    def out_val(self, eqn: Any, i: int = 0) -> Value:
        """A fresh value for output ``i`` of ``eqn``."""
        return self.new_val(eqn.outvars[i].aval.shape)

    def literal(self, value: Any, aval: Any) -> Value:
        """Literals and constants: fixed arrays, so every axis of length > 1 is *varying*.

        Their own axes are never joined to anything: each use gets a fresh copy
        (`prepare`) whose varying axes are blocked there.
        """
        shape = tuple(getattr(aval, "shape", ()))
        arr = np.asarray(value)
        val = self.new_val(shape, allzero=bool(arr.size) and not np.any(arr), const=True,
                           varying=tuple(n > 1 for n in shape))
        if not shape and arr.dtype.kind in "biuf":
            val.literal = float(arr)
        for d in val.dims:
            self.block(d, "a constant array has this axis")
        return val

    def const(self, value: Any) -> Value:
        """A closed-over array: a literal that remembers which closed-over array it is."""
        aval = jax.typeof(value) if hasattr(jax, "typeof") else value
        val = self.literal(value, aval)
        if val.shape:
            dtype = np.dtype(getattr(value, "dtype", np.float32))
            self.consts.append(f"{dtype.name}{list(val.shape)}")
            val.sources = frozenset({len(self.consts) - 1})
        return val

    def prepare(self, eqn: Any, invals: list[Value]) -> list[Value]:
        """Each use of a constant is independent: it reads a fresh copy of the constant.

        A constant shared by several operations (a ``head_mask`` whose row ``i`` scales
        layer ``i``) must not join their axes. The copy's varying axes are blocked (they
        cannot be sliced with the parameters); a uniform axis (``jnp.ones``) stays free.
        """
        self.site = eqn.source_info
        return [self._copy_const(eqn, v) if v.const and v.shape else v for v in invals]

    def enter(self, label: str, closed: Any, args: Sequence[Any]) -> list[Any]:
        """Interprets a nested jaxpr; the current site is restored afterwards."""
        site = self.site
        try:
            return super().enter(label, closed, args)
        finally:
            self.site = site

    def _copy_const(self, eqn: Any, v: Value) -> Value:
        c = self.new_val(v.shape, literal=v.literal, allzero=v.allzero, const=True,
                         varying=v.varying, sources=v.sources)
        name = eqn.primitive.name
        for k in v.sources:
            self.const_users.setdefault(k, name)
            self.const_sites.setdefault(k, self.site)
        for d, n, var in zip(c.dims, c.shape, v.varying, strict=True):
            if var and n > 1:
                if v.sources:
                    what = ", ".join(f"#{k} {self.consts[k]}" for k in sorted(v.sources))
                    self.block(d, f"closed-over array {what} has this axis (fixed shape)")
                    self.const_blocks[d] = v.sources
                else:
                    self.block(d, "a constant computed in the trace varies along this axis")
        if not v.allzero:
            self.event(lambda z: z.put(c, [frozenset()] * len(c.shape),
                                       allzero=z.is_allzero(v)))
        return c

    # -- relations
    def union(self, a: int, b: int) -> None:
        """Joins two axes of equal length into one class."""
        if self.size[a] != self.size[b]:
            raise RuntimeError(f"internal: joining axes of sizes {self.size[a]}, {self.size[b]}")
        self.uf.union(a, b)

    def block(self, dim: int, reason: str, primitive: str | None = None) -> None:
        """Marks an axis as not prunable (the first reason is kept)."""
        if dim not in self.blocked:
            self.blocked[dim] = (reason, primitive)
            self.block_sites[dim] = self.site
        if primitive is not None:
            self.primitive_sites.setdefault(primitive, self.site)

    def event(self, fn: Event) -> None:
        """Appends a zero-analysis event (run at the current site: `ZeroAnalysis.site`)."""
        site = self.site
        if site is None:
            self.events.append(fn)
            return

        def located(z: ZeroAnalysis) -> None:
            outer, z.site = z.site, site
            try:
                fn(z)
            finally:
                z.site = outer

        self.events.append(located)

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[Event]]:
        """Collects the events emitted inside the block (control-flow bodies)."""
        saved, self.events = self.events, []
        try:
            yield self.events
        finally:
            self.events = saved

    # -- parameter uses
    def use(self, v: Value, contracted_axes: Sequence[int] = ()) -> None:
        """Records a non-view use of ``v``; ``contracted_axes`` are summed over."""
        if v.pdims is None:
            return
        self.n_uses += 1
        for axis, pairs in enumerate(v.pdims):
            for leaf, pax in pairs:
                self.first_use.setdefault(leaf, self.n_uses)
                self.use_sites.setdefault(leaf, self.site)
                if axis in contracted_axes:
                    self.contracted.add((leaf, pax))
                else:
                    self.produced.add((leaf, pax))

    def fallback(self, eqn: Any, invals: list[Value]) -> Any:
        """No rule: `default_rule` (every axis of the inputs and outputs is blocked)."""
        return default_rule(self, eqn, invals)

    def on_eqn(self, eqn: Any, invals: list[Value], outvals: list[Value]) -> None:
        """Marks constant outputs (`_mark_const`) and keeps views of parameters views."""
        if all(v.const for v in invals):
            _mark_const(eqn, invals, outvals)
        self._view(eqn, invals, outvals)

    def _view(self, eqn: Any, invals: list[Value], outvals: list[Value]) -> None:
        """A view of a parameter (transpose, reshape, cast, ...) stays a view of it."""
        name = eqn.primitive.name
        src = invals[0] if invals else None
        if name not in VIEW or src is None or src.pdims is None:
            return
        out = outvals[0]
        out.pdims = view_axes(eqn, src.pdims, src.shape, out.shape)


# -- constants: which axes of a constant may vary (see `AxisTracer.prepare`)
_UNIFORM_VIEWS = {"slice", "squeeze", "reshape", "transpose", "rev", "dynamic_slice",
                  "gather", "copy", "copy_p", "reduce_max", "reduce_min", "pad",
                  "concatenate", "stack", *IDENTITY}


def _mark_const(eqn: Any, ins: list[Value], outs: list[Value]) -> None:
    """Outputs of an operation on constants only are constants.

    ``varying`` follows the operation (broadcast axes are uniform, aligned axes of an
    elementwise op vary if an operand does, a reshape group varies if one of its axes
    does, iota varies along its dimension); any other operation makes every axis vary.
    A view of a uniform constant (``literal`` set) stays uniform with the same value.
    """
    sources = frozenset().union(*(v.sources for v in ins))
    for out in outs:
        out.const, out.sources = True, sources
        out.varying = _varying(eqn, ins, out)
    out = outs[0]
    if out.literal is None and eqn.primitive.name in _UNIFORM_VIEWS:
        values = [v.literal for v in ins] if eqn.primitive.name in (
            "concatenate", "stack", "pad") else [ins[0].literal]
        if values[0] is not None and all(u == values[0] for u in values):
            out.literal = values[0]
    if out.literal is not None:
        out.varying = (False,) * len(out.shape)


def _varying(eqn: Any, ins: list[Value], out: Value) -> tuple[bool, ...]:
    name, p = eqn.primitive.name, eqn.params
    nd = len(out.shape)
    src = ins[0] if ins else None
    if name == "iota":
        return tuple(i == p["dimension"] for i in range(nd))
    if name == "broadcast_in_dim":
        var = [False] * nd
        for i, o in enumerate(p["broadcast_dimensions"]):
            var[o] = src.varying[i] and src.shape[i] == out.shape[o]
        return tuple(var)
    if name == "transpose":
        return tuple(src.varying[i] for i in p["permutation"])
    if name == "squeeze":
        dropped = {d % len(src.shape) for d in p["dimensions"]}
        return tuple(v for i, v in enumerate(src.varying) if i not in dropped)
    if name == "reshape" and p.get("dimensions") is None:
        groups = reshape_groups(src.shape, out.shape)
        if groups or not (src.shape and out.shape):
            var = [False] * nd
            for gi, go in groups:
                for o in go:
                    var[o] = any(src.varying[i] for i in gi)
            return tuple(var)
    if name in ("slice", "rev", "dynamic_slice", *CUMULATIVE):
        return tuple(src.varying)
    if name == "pad":
        return tuple(v or tuple(cfg) != (0, 0, 0)
                     for v, cfg in zip(src.varying, p["padding_config"], strict=True))
    if name in ZERO_KINDS:
        arrays = [v for v in ins if len(v.shape) == nd and nd]
        return tuple(any(v.varying[i] and v.shape[i] == out.shape[i] for v in arrays)
                     for i in range(nd))
    return (True,) * nd


AxisRule = Callable[[AxisTracer, Any, list[Value]], Any]
"""``rule(tracer, eqn, invals) -> Value`` (a list when the primitive has several results).

A rule joins the axes that share a channel index (`AxisTracer.union`), blocks the axes it
treats non-uniformly (`AxisTracer.block`), records parameter uses (`AxisTracer.use`), and
appends the zero-analysis event of its outputs (`AxisTracer.event`)."""

RULES: dict[str, AxisRule] = {}
"""Primitive name -> `AxisRule`: the rule table of group discovery (`register_rule`)."""


def _rule(*names: str) -> Callable[[AxisRule], AxisRule]:
    def register(fn: AxisRule) -> AxisRule:
        for n in names:
            RULES[n] = fn
        return fn

    return register


def _name(primitive: Any) -> str:
    name = getattr(primitive, "name", primitive)
    if not isinstance(name, str):
        raise TypeError(f"a primitive or its name, got {type(primitive).__name__}")
    return name


def register_rule(primitive: Any, rule: AxisRule | None = None, *,
                  override: bool = False) -> Any:
    """Registers the discovery rule of a primitive (the extension point of discovery).

    A primitive without a rule goes to `default_rule`, which blocks every axis it touches
    (its parameters are then not pruned along them, with a `DiscoveryWarning`). Register
    a rule built by `elementwise_rule`, or use a definer (`def_elementwise`,
    `def_identity`, ...) for a family of primitives, or write an `AxisRule`.

    Args:
      primitive: a ``jax.extend.core.Primitive`` or its name.
      rule: the rule; omitted, ``register_rule(p)`` is a decorator.
      override: replace an existing rule (a built-in one included).

    Returns:
      ``rule`` (or the decorator).

    Raises:
      ValueError: if the primitive has a rule already and ``override`` is False.
      TypeError: if ``primitive`` is neither a primitive nor a name, or ``rule`` is not
        callable.

    Examples:
      >>> from hesso_jax.jaxpr.axes import RULES, elementwise_rule, register_rule
      >>> _ = register_rule("my_relu", elementwise_rule("first"))
      >>> "my_relu" in RULES
      True
      >>> _ = RULES.pop("my_relu")
    """
    name = _name(primitive)

    def register(fn: AxisRule) -> AxisRule:
        if not callable(fn):
            raise TypeError(f"the rule of {name!r} must be callable, got {fn!r}")
        if name in RULES and not override:
            raise ValueError(f"primitive {name!r} has a discovery rule already; pass "
                             f"override=True to replace it")
        RULES[name] = fn
        return fn

    return register if rule is None else register(rule)


def default_rule(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Any:
    """The explicit default of primitives without a rule: every axis is blocked.

    Every axis of the operands and results is marked non-prunable with the primitive's
    name (named in the `DiscoveryWarning`), and parameter operands count as used.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> eqn = jax.make_jaxpr(jnp.sin)(jnp.ones(3)).jaxpr.eqns[0]
      >>> tr = AxisTracer()
      >>> out = default_rule(tr, eqn, [tr.new_val((3,))])
      >>> len(tr.blocked), set(tr.blocked.values())
      (2, {("primitive 'sin' has no discovery rule", 'sin')})
    """
    name = eqn.primitive.name
    dims = tr.unknown.setdefault(name, set())
    for v in ins:
        tr.use(v)
        for d in v.dims:
            tr.block(d, f"primitive {name!r} has no discovery rule", name)
            dims.add(d)
    outs = [tr.new_val(o.aval.shape) if hasattr(o.aval, "shape") else tr.new_val(())
            for o in eqn.outvars]
    for v in outs:
        for d in v.dims:
            tr.block(d, f"primitive {name!r} has no discovery rule", name)
    return outs if eqn.primitive.multiple_results else outs[0]


AxisTracer.rules = RULES


# -- elementwise
def _elementwise(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Value:
    """Elementwise primitive of `ZERO_KINDS` (``integer_pow`` with ``y <= 0`` keeps none)."""
    kind = ZERO_KINDS.get(eqn.primitive.name, "none")
    if eqn.primitive.name == "integer_pow" and eqn.params["y"] <= 0:
        kind = "none"
    return _elementwise_of(tr, eqn, ins, kind)


def _elementwise_of(tr: AxisTracer, eqn: Any, ins: list[Value], kind: ZeroKind) -> Value:
    """Aligned axes (numpy-style size-1 broadcasting) share a class; zeros follow ``kind``."""
    name = eqn.primitive.name
    out = tr.out_val(eqn)
    arrays = [v for v in ins if len(v.shape) == len(out.shape) and v.shape]
    for v in ins:
        tr.use(v)
    for v in arrays:
        for i, d in enumerate(v.dims):
            if v.shape[i] == out.shape[i]:
                tr.union(d, out.dims[i])
            else:
                tr.block(d, "size-1 axis broadcast against a longer one")
    operands = ins[1:] if name == "select_n" else ins
    tr.event(lambda z: z.elementwise(kind, name, operands, out))
    out.literal = _fold(eqn, ins)
    return out


_FOLD: dict[str, Callable[..., float]] = {
    "neg": lambda a: -a, "sqrt": math.sqrt, "rsqrt": lambda a: 1 / math.sqrt(a),
    "convert_element_type": lambda a: a, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "add": lambda a, b: a + b, "sub": lambda a, b: a - b,
    "max": max, "min": min, "exp": math.exp, "log": math.log,
}


def _fold(eqn: Any, ins: list[Value]) -> float | None:
    """The value of an op on constants that are uniform over their shape (else None).

    Lets the mean/RMS check see divisors computed in the trace, e.g.
    ``jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))``.
    """
    name = eqn.primitive.name
    if any(v.literal is None for v in ins):
        return None
    if name == "integer_pow":
        return float(ins[0].literal) ** eqn.params["y"]
    fn = _FOLD.get(name)
    if fn is None:
        return None
    try:
        return float(fn(*(v.literal for v in ins)))
    except (ArithmeticError, ValueError):
        return None


# -- definers: register a family of primitives at once (as ``jax.experimental.jet``)
def _check_kind(kind: str) -> None:
    if kind not in ("any", "all", "first", "none"):
        raise ValueError(f"zero kind must be 'any', 'all', 'first' or 'none', got {kind!r}")


def elementwise_rule(kind: ZeroKind) -> AxisRule:
    """The `AxisRule` of an elementwise primitive with zero behaviour ``kind``.

    Operands broadcast numpy-style (size-1 axes); aligned axes share one class.

    Args:
      kind: a `ZeroKind` (``'first'`` for ``f`` with ``f(0) = 0``, ``'any'`` for a
        product, ``'all'`` for a sum, ``'none'`` otherwise).

    Returns:
      A rule for `register_rule`.

    Raises:
      ValueError: for an unknown ``kind``.

    Examples:
      >>> rule = elementwise_rule("first")
      >>> callable(rule)
      True
    """
    _check_kind(kind)

    def rule(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Value:
        return _elementwise_of(tr, eqn, ins, kind)

    return rule


def def_elementwise(kind: ZeroKind, *primitives: Any, override: bool = False) -> None:
    """Registers elementwise primitives that keep zeros as ``kind`` (`ZERO_KINDS`).

    Args:
      kind: their `ZeroKind`.
      *primitives: primitives or names.
      override: replace existing rules.

    Raises:
      ValueError: for an unknown ``kind``, or a primitive with a rule (not ``override``).

    Examples:
      >>> def_elementwise("first", "my_gelu")
      >>> ZERO_KINDS["my_gelu"], RULES.pop("my_gelu") is RULES["tanh"]
      ('first', True)
      >>> del ZERO_KINDS["my_gelu"]
    """
    _check_kind(kind)
    for p in primitives:
        register_rule(p, _elementwise, override=override)
        ZERO_KINDS[_name(p)] = kind


def def_identity(*primitives: Any, override: bool = False) -> None:
    """Registers primitives that return their operands unchanged (sharding annotations).

    Examples:
      >>> def_identity("my_barrier")
      >>> RULES.pop("my_barrier") is RULES["optimization_barrier"]
      True
    """
    for p in primitives:
        register_rule(p, _identity, override=override)


def def_source(*primitives: Any, override: bool = False) -> None:
    """Registers primitives whose results depend on no operand axis (random numbers).

    Examples:
      >>> def_source("my_rng")
      >>> RULES.pop("my_rng") is RULES["random_bits"]
      True
    """
    for p in primitives:
        register_rule(p, _source, override=override)


def def_blocked(*primitives: Any, override: bool = False) -> None:
    """Registers primitives explicitly as `default_rule` (every axis blocked, warned).

    Examples:
      >>> def_blocked("my_opaque")
      >>> RULES.pop("my_opaque") is default_rule
      True
    """
    for p in primitives:
        register_rule(p, default_rule, override=override)


@_rule("bitcast_convert_type")
def _bitcast(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Any:
    if tuple(eqn.outvars[0].aval.shape) != ins[0].shape:
        return tr.fallback(eqn, ins)
    return _elementwise(tr, eqn, ins)


def _identity(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Any:
    outs = []
    for v in ins:
        o = tr.new_val(v.shape)
        for a, b in zip(v.dims, o.dims, strict=True):
            tr.union(a, b)
        outs.append(o)
        tr.event(lambda z, v=v, o=o: z.copy(v, o))
    return outs if eqn.primitive.multiple_results else outs[0]


def _source(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Any:
    outs = [tr.out_val(eqn, i) for i in range(len(eqn.outvars))]
    if eqn.primitive.name == "iota":
        d = eqn.params["dimension"]
        tr.block(outs[0].dims[d], "iota (values depend on the index)")
    return outs if eqn.primitive.multiple_results else outs[0]


for _kind in ("none", "first", "all", "any"):
    def_elementwise(_kind, *sorted(k for k, v in ZERO_KINDS.items() if v == _kind))
def_identity(*sorted(IDENTITY))
def_source(*sorted(RANDOM), "iota")


@_rule("broadcast_in_dim")
def _broadcast(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Value:
    v, out = ins[0], tr.out_val(eqn)
    bd = eqn.params["broadcast_dimensions"]
    for i, o in enumerate(bd):
        if v.shape[i] == out.shape[o]:
            tr.union(v.dims[i], out.dims[o])
        else:
            tr.block(v.dims[i], "size-1 axis broadcast against a longer one")
    out.literal = v.literal  # a broadcast constant stays uniform

    def per_axis(src: Sequence[frozenset]) -> list[frozenset]:
        sets = [frozenset()] * len(out.shape)
        for i, o in enumerate(bd):
            if v.shape[i] == out.shape[o]:
                sets[o] = src[i]
        return sets

    tr.event(lambda z: z.remap(v, out, per_axis))
    return out


@_rule("reshape")
def _reshape(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Value:
    v, out = ins[0], tr.out_val(eqn)
    groups = reshape_groups(v.shape, out.shape)
    if eqn.params.get("dimensions") is not None or (not groups and v.shape and out.shape):
        for d in (*v.dims, *out.dims):
            tr.block(d, "reshape that reorders axes")
        groups = []
    # size-1 axes are dropped or inserted: their class cannot be followed through
    grouped_in = {i for gi, _ in groups for i in gi}
    grouped_out = {o for _, go in groups for o in go}
    for i, d in enumerate(v.dims):
        if i not in grouped_in:
            tr.block(d, "size-1 axis dropped by a reshape")
    for o, d in enumerate(out.dims):
        if o not in grouped_out:
            tr.block(d, "size-1 axis inserted by a reshape")
    for gi, go in groups:
        if len(gi) == 1 and len(go) == 1:
            tr.union(v.dims[gi[0]], out.dims[go[0]])
        elif len(gi) == 1:
            tr.products.append((v.dims[gi[0]], [out.dims[o] for o in go]))
        elif len(go) == 1:
            tr.products.append((out.dims[go[0]], [v.dims[i] for i in gi]))
        else:
            for d in [v.dims[i] for i in gi] + [out.dims[o] for o in go]:
                tr.block(d, "reshape mixing several axes into several axes")

    def zero(z: ZeroAnalysis) -> None:
        def per_axis(src: Sequence[frozenset]) -> list[frozenset]:
            sets = [frozenset()] * len(out.shape)
            for gi, go in groups:
                joined = frozenset().union(*(src[i] for i in gi))
                for o in go:
                    sets[o] = joined & z.spaces(out.dims[o])
            return sets

        z.remap(v, out, per_axis)

    tr.event(zero)
    return out


@_rule("transpose")
def _transpose(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Value:
    v, out = ins[0], tr.out_val(eqn)
    perm = eqn.params["permutation"]
    for i, p in enumerate(perm):
        tr.union(v.dims[p], out.dims[i])

    tr.event(lambda z: z.remap(v, out, lambda src: [src[p] for p in perm]))
    return out


def _keep_axes(tr: AxisTracer, v: Value, out: Value, dropped: Sequence[int]) -> list[int]:
    kept = [i for i in range(len(v.shape)) if i not in dropped]
    for i, o in zip(kept, out.dims, strict=True):
        tr.union(v.dims[i], o)
    return kept


@_rule("squeeze")
def _squeeze(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Value:
    v, out = ins[0], tr.out_val(eqn)
    dims = [d % len(v.shape) for d in eqn.params["dimensions"]]
    kept = _keep_axes(tr, v, out, dims)
    for d in dims:
        tr.block(v.dims[d], "squeezed axis")
    tr.event(lambda z: z.map_axes(v, out, kept, transparent=True))
    return out


@_rule("reduce_sum", *BLOCK_REDUCED)
def _reduce(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Value:
    name = eqn.primitive.name
    v, out = ins[0], tr.out_val(eqn)
    axes = tuple(eqn.params["axes"])
    kept = _keep_axes(tr, v, out, axes)
    tr.use(v, axes if name == "reduce_sum" else ())
    if name != "reduce_sum":
        for a in axes:
            tr.block(v.dims[a], f"{name} over this axis")

    def zero(z: ZeroAnalysis) -> None:
        z.map_axes(v, out, kept)
        if name == "reduce_sum":
            z.contract(f"reduce_sum over axes {axes}", [(v, list(axes))], out)
        elif name in ("argmax", "argmin"):
            z.put(out, [frozenset()] * len(out.shape))

    tr.event(zero)
    return out


@_rule(*CUMULATIVE, "rev")
def _along_axis(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Value:
    name = eqn.primitive.name
    v, out = ins[0], tr.out_val(eqn)
    axes = eqn.params.get("dimensions") or (eqn.params.get("axis"),)
    for i in range(len(v.shape)):
        tr.union(v.dims[i], out.dims[i])
    tr.use(v)
    for a in axes:
        tr.block(v.dims[a], f"{name} along this axis")
    tr.event(lambda z: z.map_axes(v, out, list(range(len(v.shape)))))
    return out


@_rule("sort")
def _sort(tr: AxisTracer, eqn: Any, ins: list[Value]) -> list[Value]:
    d = eqn.params["dimension"]
    outs = []
    for v in ins:
        tr.use(v)
        o = tr.new_val(v.shape)
        for i in range(len(v.shape)):
            tr.union(v.dims[i], o.dims[i])
            tr.block(v.dims[d], "sort along this axis")
        outs.append(o)
    kept = [i for i in range(len(ins[0].shape)) if i != d]

    def zero(z: ZeroAnalysis) -> None:
        # the operands are permuted within each fibre along ``d``: a slice at a fixed
        # index of another axis keeps its elements (and its zeros)
        for v, o in zip(ins, outs, strict=True):
            _same_axes(z, v, o, kept)

    tr.event(zero)
    return outs


@_rule("top_k")
def _top_k(tr: AxisTracer, eqn: Any, ins: list[Value]) -> list[Value]:
    v = ins[0]
    tr.use(v)
    outs = [tr.out_val(eqn, i) for i in range(len(eqn.outvars))]
    for o in outs:
        for i in range(len(v.shape) - 1):
            tr.union(v.dims[i], o.dims[i])
    tr.block(v.dims[-1], "top_k along this axis")
    kept = list(range(len(v.shape) - 1))

    def zero(z: ZeroAnalysis) -> None:
        # the values are a selection within each fibre along the last axis
        _same_axes(z, v, outs[0], kept)
        z.put(outs[1], [frozenset()] * len(outs[1].shape))

    tr.event(zero)
    return outs


@_rule("reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window")
def _reduce_window(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Any:
    p = eqn.params
    n_in = len(ins) // 2 if eqn.primitive.name == "reduce_window" else len(ins)
    outs = [tr.out_val(eqn, i) for i in range(len(eqn.outvars))]
    kept = []
    for i in range(len(outs[0].shape)):
        plain = (p["window_dimensions"][i] == 1 and p["window_strides"][i] == 1
                 and tuple(p["padding"][i]) == (0, 0) and p["base_dilation"][i] == 1
                 and p["window_dilation"][i] == 1)
        for v in ins[:n_in]:
            if plain:
                tr.union(v.dims[i], outs[0].dims[i])
            else:
                tr.block(v.dims[i], "pooling window along this axis")
        if plain:
            kept.append(i)
            for o in outs[1:]:
                tr.union(outs[0].dims[i], o.dims[i])
        else:
            for o in outs:
                tr.block(o.dims[i], "pooling window along this axis")
    for v in ins:
        tr.use(v)
    generic = eqn.primitive.name == "reduce_window"

    def zero(z: ZeroAnalysis) -> None:
        for v, o in zip(ins, outs, strict=False):
            if generic:
                z.put(o, [frozenset()] * len(o.shape))
            else:
                src = z.get(v)
                z.put(o, [src[i] if i in kept else frozenset() for i in range(len(o.shape))])

    tr.event(zero)
    return outs if eqn.primitive.multiple_results else outs[0]


@_rule("slice")
def _slice(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Value:
    v, out = ins[0], tr.out_val(eqn)
    p = eqn.params
    strides = p["strides"] or (1,) * len(v.shape)
    for i in range(len(v.shape)):
        lo, hi, st = p["start_indices"][i], p["limit_indices"][i], strides[i]
        if lo == 0 and hi == v.shape[i] and st == 1:
            tr.union(v.dims[i], out.dims[i])
        elif st == 1:
            tr.embeds.append((out.dims[i], v.dims[i], lo))
        else:
            tr.block(v.dims[i], "strided slice along this axis")
            tr.block(out.dims[i], "strided slice along this axis")
    tr.event(lambda z: z.map_axes(v, out, list(range(len(v.shape))), filtered=True,
                                  transparent=True))
    return out


@_rule("split")
def _split(tr: AxisTracer, eqn: Any, ins: list[Value]) -> list[Value]:
    v = ins[0]
    axis = eqn.params["axis"] % len(v.shape)
    outs = [tr.out_val(eqn, i) for i in range(len(eqn.outvars))]
    offset = 0
    for o in outs:
        for i in range(len(v.shape)):
            if i == axis:
                tr.embeds.append((o.dims[i], v.dims[i], offset))
            else:
                tr.union(v.dims[i], o.dims[i])
        offset += o.shape[axis]
    tr.use(v)

    def zero(z: ZeroAnalysis) -> None:
        for o in outs:
            z.map_axes(v, o, list(range(len(v.shape))), filtered=True)

    tr.event(zero)
    return outs


@_rule("concatenate")
def _concatenate(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Value:
    out = tr.out_val(eqn)
    axis = eqn.params["dimension"]
    offset = 0
    for v in ins:
        tr.use(v)
        for i in range(len(out.shape)):
            if i == axis:
                tr.embeds.append((v.dims[i], out.dims[i], offset))
            else:
                tr.union(v.dims[i], out.dims[i])
        offset += v.shape[axis]

    def zero(z: ZeroAnalysis) -> None:
        sets = []
        for i in range(len(out.shape)):
            if i != axis:
                sets.append(frozenset.intersection(*(z.get(v)[i] for v in ins)))
                continue
            ok = set(z.spaces(out.dims[i]))
            for v in ins:
                carried = z.spaces(v.dims[i])
                ok -= carried - z.get(v)[i]
            sets.append(frozenset(ok))
        z.put(out, sets, allzero=all(z.is_allzero(v) for v in ins))

    tr.event(zero)
    return out


@_rule("stack")
def _stack(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Value:
    """``stack`` of equal-shaped operands along a new axis: the other axes are aligned.

    A slice of another axis is zero iff it is zero in every operand; the new axis holds
    no channel (it is zero only where every operand is all zero).
    """
    out = tr.out_val(eqn)
    axis = eqn.params["axis"] % len(out.shape)
    others = [i for i in range(len(out.shape)) if i != axis]
    for v in ins:
        tr.use(v)
        for i, o in enumerate(others):
            tr.union(v.dims[i], out.dims[o])

    def zero(z: ZeroAnalysis) -> None:
        if all(z.is_allzero(v) for v in ins):
            z.set_allzero(out)
            return
        sets = [frozenset()] * len(out.shape)
        for i, o in enumerate(others):
            sets[o] = frozenset.intersection(*(z.get(v)[i] for v in ins))
        z.put(out, sets)

    tr.event(zero)
    return out


def _same_axes(z: ZeroAnalysis, v: Value, out: Value, kept: Sequence[int]) -> None:
    """Zero slices of ``out``, which has ``v``'s axes in place (same rank).

    Only the axes in ``kept`` keep theirs (the others are padded, sliced or permuted).
    """
    if z.is_allzero(v):
        z.set_allzero(out)
        return
    src = z.get(v)
    z.put(out, [src[i] if i in kept else frozenset() for i in range(len(out.shape))])


@_rule("pad")
def _pad(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Value:
    v, padval = ins
    out = tr.out_val(eqn)
    kept = []
    for i, cfg in enumerate(eqn.params["padding_config"]):
        if tuple(cfg) == (0, 0, 0):
            tr.union(v.dims[i], out.dims[i])
            kept.append(i)
        else:
            tr.block(v.dims[i], "padding along this axis")
            tr.block(out.dims[i], "padding along this axis")
    tr.use(v)

    def zero(z: ZeroAnalysis) -> None:
        # padding with 0 keeps a zero slice zero, on the same axis; any other value
        # fills every slice of the padded region
        if z.is_allzero(padval):
            _same_axes(z, v, out, kept)
        else:
            z.put(out, [frozenset()] * len(out.shape))

    tr.event(zero)
    return out


@_rule("dynamic_slice")
def _dynamic_slice(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Value:
    v, out = ins[0], tr.out_val(eqn)
    kept = []
    for i in range(len(v.shape)):
        if out.shape[i] == v.shape[i]:
            tr.union(v.dims[i], out.dims[i])
            kept.append(i)
        else:
            tr.block(v.dims[i], "dynamic slice along this axis")
            tr.block(out.dims[i], "dynamic slice along this axis")
    tr.use(v)
    tr.event(lambda z: _same_axes(z, v, out, kept))
    return out


@_rule("dynamic_update_slice")
def _dynamic_update_slice(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Value:
    v, upd = ins[0], ins[1]
    out = tr.out_val(eqn)
    for i in range(len(v.shape)):
        tr.union(v.dims[i], out.dims[i])
        if upd.shape[i] == v.shape[i]:
            tr.union(upd.dims[i], out.dims[i])
        else:
            for d in (v.dims[i], upd.dims[i]):
                tr.block(d, "dynamic update along this axis")
    tr.use(v)
    tr.use(upd)

    def zero(z: ZeroAnalysis) -> None:
        a, b = z.get(v), z.get(upd)
        z.put(out, [a[i] & b[i] if upd.shape[i] == v.shape[i] else frozenset()
                    for i in range(len(v.shape))])

    tr.event(zero)
    return out


@_rule("gather")
def _gather(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Value:
    operand, indices = ins[0], ins[1]
    out = tr.out_val(eqn)
    dn = eqn.params["dimension_numbers"]
    sizes = eqn.params["slice_sizes"]
    tr.use(operand)
    skipped = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
    window = [d for d in range(len(operand.shape)) if d not in skipped]
    mapped = {}
    for d, o in zip(window, dn.offset_dims, strict=True):
        if sizes[d] == operand.shape[d] and d not in dn.start_index_map:
            tr.union(operand.dims[d], out.dims[o])
            mapped[o] = d
        else:
            tr.block(operand.dims[d], "gather indexes this axis")
            tr.block(out.dims[o], "gather indexes this axis")
    for d in skipped | set(dn.start_index_map):
        tr.block(operand.dims[d], "gather indexes this axis")
    batch_out = [o for o in range(len(out.shape)) if o not in dn.offset_dims]
    idx_axes = list(range(len(indices.shape) - 1))
    for o, i in zip(batch_out, idx_axes, strict=False):
        if indices.shape[i] == out.shape[o] and i not in dn.start_indices_batching_dims:
            tr.union(indices.dims[i], out.dims[o])
        else:
            tr.block(out.dims[o], "gather batch axis")
    for i in dn.start_indices_batching_dims:
        tr.block(indices.dims[i], "gather batch axis")

    def zero(z: ZeroAnalysis) -> None:
        if z.is_allzero(operand):
            z.set_allzero(out)
            return
        src = z.get(operand)
        z.put(out, [src[mapped[o]] if o in mapped else frozenset()
                    for o in range(len(out.shape))])

    tr.event(zero)
    return out


@_rule("dot_general")
def _dot_general(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Value:
    lhs, rhs = ins
    out = tr.out_val(eqn)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lf = [i for i in range(len(lhs.shape)) if i not in lc and i not in lb]
    rf = [i for i in range(len(rhs.shape)) if i not in rc and i not in rb]
    for k, (a, b) in enumerate(zip(lb, rb, strict=True)):
        tr.union(lhs.dims[a], out.dims[k])
        tr.union(rhs.dims[b], out.dims[k])
    for k, a in enumerate(lf):
        tr.union(lhs.dims[a], out.dims[len(lb) + k])
    for k, b in enumerate(rf):
        tr.union(rhs.dims[b], out.dims[len(lb) + len(lf) + k])
    for a, b in zip(lc, rc, strict=True):
        tr.union(lhs.dims[a], rhs.dims[b])
    tr.use(lhs, lc)
    tr.use(rhs, rc)

    def zero(z: ZeroAnalysis) -> None:
        if z.is_allzero(lhs) or z.is_allzero(rhs):
            z.set_allzero(out)
            return
        zl, zr = z.get(lhs), z.get(rhs)
        sets = [zl[a] | zr[b] for a, b in zip(lb, rb, strict=True)]
        sets += [zl[a] for a in lf] + [zr[b] for b in rf]
        z.put(out, sets)
        z.contract_pairs("dot_general", lhs, rhs, list(zip(lc, rc, strict=True)), out)

    tr.event(zero)
    return out


@_rule("conv_general_dilated")
def _conv(tr: AxisTracer, eqn: Any, ins: list[Value]) -> Value:
    """Convolution: batch and feature axes as in ``dot_general``; windows are blocked.

    ``feature_group_count = 1``: out-channels are the kernel's, in-channels are contracted
    with the kernel's in axis (`_conv_dense`). ``G = feature_group_count > 1``: see
    `_conv_grouped`. ``batch_group_count > 1`` blocks every feature axis.
    """
    lhs, rhs = ins
    out = tr.out_val(eqn)
    p = eqn.params
    dn = p["dimension_numbers"]
    lb, lfeat, *lsp = dn.lhs_spec
    rout, rin, *rsp = dn.rhs_spec
    ob, ofeat, *osp = dn.out_spec
    tr.union(lhs.dims[lb], out.dims[ob])
    for d in [lhs.dims[i] for i in lsp] + [rhs.dims[i] for i in rsp] + [out.dims[i] for i in osp]:
        tr.block(d, "convolution window axis")
    axes = (lfeat, rin, rout, ofeat)
    if p["batch_group_count"] != 1:
        for d in (lhs.dims[lfeat], rhs.dims[rin], rhs.dims[rout], out.dims[ofeat]):
            tr.block(d, f"convolution with batch_group_count={p['batch_group_count']}",
                     "conv_general_dilated")
        tr.use(lhs)
        tr.use(rhs)
        tr.event(lambda z: z.put(out, [frozenset()] * len(out.shape)))
    elif p["feature_group_count"] == 1:
        _conv_dense(tr, lhs, rhs, out, axes)
    else:
        _conv_grouped(tr, lhs, rhs, out, axes, p["feature_group_count"])
    return out


def _conv_dense(tr: AxisTracer, lhs: Value, rhs: Value, out: Value,
                axes: tuple[int, int, int, int]) -> None:
    lfeat, rin, rout, ofeat = axes
    tr.union(lhs.dims[lfeat], rhs.dims[rin])
    tr.union(rhs.dims[rout], out.dims[ofeat])
    tr.use(lhs, (lfeat,))
    tr.use(rhs, (rin,))

    def zero(z: ZeroAnalysis) -> None:
        if z.is_allzero(lhs) or z.is_allzero(rhs):
            z.set_allzero(out)
            return
        sets = [frozenset()] * len(out.shape)
        sets[ofeat] = z.get(rhs)[rout]
        z.put(out, sets)
        z.contract_pairs("conv_general_dilated", lhs, rhs, [(lfeat, rin)], out)

    tr.event(zero)


def _conv_grouped(tr: AxisTracer, lhs: Value, rhs: Value, out: Value,
                  axes: tuple[int, int, int, int], groups: int) -> None:
    """A grouped convolution is a product of axes: conv-group ``g`` times channel-in-group.

    With ``G`` groups, ``k = C_in / G`` in-channels and ``m = C_out / G`` out-channels per
    group, out-channel ``g*m + j`` sums over in-channels ``g*k + i``, ``i < k`` (the
    kernel's in axis). So the in-channel axis is the row-major product ``(G, k)`` whose
    inner factor is contracted with the kernel's in axis, and the out-channel axis is
    ``(G, m)``; the group factor ``G`` is the same axis on both sides (a zero input group
    makes a zero output group, as a depthwise channel does). This yields two kinds of
    families, both keeping the conv valid with ``feature_group_count = C_in / k``:

    * whole conv-groups (the ``G`` factor: block ``k`` of the producer's channels, block
      ``m`` of the kernel's out-channels) -- ``G`` shrinks, ``k`` and ``m`` stay;
    * where ``G`` is not prunable (e.g. the input is the model input): channel ``j`` of
      every group (the inner factors: repeat ``G``, stride ``m``; or ``i`` of every
      input group, with the kernel's in axis as dependent) -- ``G`` stays.

    The outer factor (whole groups) wins where both are provable. Depthwise convolutions
    (``k = m = 1``) are the case where all three axes are one.
    """
    lfeat, rin, rout, ofeat = axes
    k_in, c_out = rhs.shape[rin], rhs.shape[rout]
    g = tr.new_dim(groups)
    if k_in == 1:
        tr.union(lhs.dims[lfeat], g)
        tr.block(rhs.dims[rin], "in-channel axis of a depthwise kernel")
    else:
        tr.products.append((lhs.dims[lfeat], [g, rhs.dims[rin]]))
    inner = None
    if c_out == groups:
        tr.union(out.dims[ofeat], g)
    else:
        inner = tr.new_dim(c_out // groups)
        tr.products.append((out.dims[ofeat], [g, inner]))
    tr.union(rhs.dims[rout], out.dims[ofeat])
    tr.use(lhs)
    tr.use(rhs, (rin,) if k_in > 1 else ())

    def zero(z: ZeroAnalysis) -> None:
        if z.is_allzero(lhs) or z.is_allzero(rhs):
            z.set_allzero(out)
            return
        zl, zr = z.get(lhs), z.get(rhs)
        # a whole group of the input passes to the same group of the output; spaces of
        # the channel-in-group factors (or tied to them) do not
        whole = z.spaces(g)
        if k_in > 1:
            whole -= z.spaces(rhs.dims[rin])
        if inner is not None:
            whole -= z.spaces(inner)
        sets = [frozenset()] * len(out.shape)
        sets[ofeat] = zr[rout] | (zl[lfeat] & whole)
        z.put(out, sets)
        if k_in > 1:
            z.contract_within("grouped conv_general_dilated", lhs, lfeat, rhs, rin, out)

    tr.event(zero)


@_rule("cond")
def _cond(tr: AxisTracer, eqn: Any, ins: list[Value]) -> list[Value]:
    ops = ins[1:]
    outs = [tr.out_val(eqn, i) for i in range(len(eqn.outvars))]
    branches = []
    for k, br in enumerate(eqn.params["branches"]):
        with tr.recording() as events:
            res = tr.enter(f"cond branch {k}", br, ops)
        branches.append((events, res))
        for r, o in zip(res, outs, strict=True):
            for a, b in zip(r.dims, o.dims, strict=True):
                tr.union(a, b)

    def zero(z: ZeroAnalysis) -> None:
        per_branch = []
        for events, res in branches:
            z.run(events)
            per_branch.append([(z.get(r), z.is_allzero(r)) for r in res])
        for i, o in enumerate(outs):
            sets = [frozenset.intersection(*(pb[i][0][d] for pb in per_branch))
                    for d in range(len(o.shape))]
            z.put(o, sets, allzero=all(pb[i][1] for pb in per_branch))

    tr.event(zero)
    return outs


def _loop_vals(tr: AxisTracer, init: Sequence[Value]) -> list[Value]:
    """Loop-carried values: new values whose axes are joined with the initial ones."""
    carry = []
    for v in init:
        c = tr.new_val(v.shape, pdims=v.pdims)
        for a, b in zip(v.dims, c.dims, strict=True):
            tr.union(a, b)
        carry.append(c)
    return carry


def _join_carry(tr: AxisTracer, res: Sequence[Value], carry: Sequence[Value],
                outs: Sequence[Value]) -> None:
    """A loop body's carried results share axes with the carry and the loop outputs."""
    for r, c, o in zip(res, carry, outs, strict=True):
        for a, b, d in zip(r.dims, c.dims, o.dims, strict=True):
            tr.union(a, b)
            tr.union(a, d)


@_rule("scan")
def _scan(tr: AxisTracer, eqn: Any, ins: list[Value]) -> list[Value]:
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    consts, init, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
    carry = _loop_vals(tr, init)
    slices = []
    for x in xs:
        s = tr.new_val(x.shape[1:], dims=x.dims[1:],
                       pdims=None if x.pdims is None else x.pdims[1:])
        tr.block(x.dims[0], "scan axis")
        slices.append(s)
    with tr.recording() as events:
        res = tr.enter("scan body", p["jaxpr"], [*consts, *carry, *slices])
    outs = [tr.out_val(eqn, i) for i in range(len(eqn.outvars))]
    _join_carry(tr, res[:nk], carry, outs[:nk])
    for r, o in zip(res[nk:], outs[nk:], strict=True):
        tr.block(o.dims[0], "scan axis")
        for a, b in zip(r.dims, o.dims[1:], strict=True):
            tr.union(a, b)

    def zero(z: ZeroAnalysis) -> None:
        for x, s in zip(xs, slices, strict=True):
            z.put(s, z.get(x)[1:], allzero=z.is_allzero(x))
        z.fixpoint(init, carry, events, res[:nk])
        for r, o in zip(res, outs, strict=True):
            src = z.get(r)
            if len(o.shape) == len(r.shape):
                z.put(o, src, allzero=z.is_allzero(r))
            else:
                z.put(o, [frozenset(), *src], allzero=z.is_allzero(r))

    tr.event(zero)
    return outs


@_rule("while")
def _while(tr: AxisTracer, eqn: Any, ins: list[Value]) -> list[Value]:
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
    carry = _loop_vals(tr, init)
    with tr.recording() as events:
        tr.enter("while cond", p["cond_jaxpr"], [*cconsts, *carry])
        res = tr.enter("while body", p["body_jaxpr"], [*bconsts, *carry])
    outs = [tr.out_val(eqn, i) for i in range(len(eqn.outvars))]
    _join_carry(tr, res, carry, outs)

    def zero(z: ZeroAnalysis) -> None:
        z.fixpoint(init, carry, events, res)
        for r, o in zip(res, outs, strict=True):
            z.put(o, z.get(r), allzero=z.is_allzero(r))

    tr.event(zero)
    return outs
