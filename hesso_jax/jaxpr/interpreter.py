"""A small abstract interpreter over closed jaxprs.

`Interpreter` walks the equations of a jaxpr in order, keeping an environment from
variables to *abstract values* of the client's choosing (dimension records for group
discovery, concrete arrays for activation capture, …). Each primitive is handled by a
rule looked up by name in a registry (`Interpreter.rules`); a primitive without a rule
goes to the client's explicit `Interpreter.fallback`, which must be conservative.

Call-like primitives whose semantics are "run this inner jaxpr" (``jit``/``pjit``,
``closed_call``, ``core_call``, ``remat``/``checkpoint``, ``custom_jvp_call``,
``custom_vjp_call``) are inlined by default: their inner jaxpr is interpreted with the
outer abstract values bound to its inputs, so rules only ever see ordinary primitives.
A client can still register a rule for one of them to treat it as opaque. Control flow
(``cond``, ``scan``, ``while``) has no generic meaning across domains; clients register
rules for it and use `Interpreter.run_closed` to interpret the bodies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from jax.extend import core as jcore

__all__ = ["CALL_JAXPR_PARAMS", "Interpreter", "Rule", "inner_jaxpr", "make_closed_jaxpr",
           "source_line"]

Rule = Callable[["Interpreter", Any, list[Any]], Any]
"""``rule(interp, eqn, invals) -> outval`` (or a list when the primitive has several)."""

CALL_JAXPR_PARAMS: dict[str, str] = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}
"""Call-like primitives and the parameter holding the jaxpr they run."""


def source_line(source_info: Any) -> str | None:
    """The user's ``file:line (function)`` that created an equation (its ``source_info``).

    The innermost frame outside JAX (`jax._src.source_info_util.user_frame`); None when
    unknown or when this JAX version's source info cannot be read (never raises).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> def f(x):
      ...     return jnp.sin(x)
      >>> eqn = jax.make_jaxpr(f)(1.0).jaxpr.eqns[0]
      >>> source_line(eqn.source_info).endswith("(f)")
      True
    """
    try:
        from jax._src import source_info_util

        frame = source_info_util.user_frame(getattr(source_info, "traceback", source_info))
        if frame is None:
            return None
        return f"{frame.file_name}:{frame.start_line} ({frame.function_name})"
    except Exception:  # noqa: BLE001 - private JAX API: degrade to no location
        return None


def make_closed_jaxpr(jaxpr: Any) -> jcore.ClosedJaxpr:
    """``jaxpr`` as a `ClosedJaxpr` (an open one gets no consts)."""
    if isinstance(jaxpr, jcore.ClosedJaxpr):
        return jaxpr
    return jcore.ClosedJaxpr(jaxpr, ())


def inner_jaxpr(eqn: Any) -> jcore.ClosedJaxpr | None:
    """The jaxpr a call-like equation runs, or None for other primitives."""
    param = CALL_JAXPR_PARAMS.get(eqn.primitive.name)
    if param is None or param not in eqn.params:
        return None
    return make_closed_jaxpr(eqn.params[param])


class Interpreter:
    """Base class of the abstract interpreters (one per client domain).

    Subclasses set `rules` (a dict from primitive name to `Rule`) and implement
    `literal`, `const` and `fallback`. `run_closed(closed_jaxpr, args)` then returns the
    abstract values of the outputs. The optional `on_eqn` hook sees every equation after
    its rule ran (used for recording events or capturing intermediate values).

    Attributes:
      rules: primitive name → rule.
      depth: current nesting depth of inlined/called jaxprs (0 at the top level).
      path: names of the call-like primitives and control-flow bodies currently entered
        (for messages), e.g. ``('jit:relu',)``.
    """

    rules: dict[str, Rule] = {}

    def __init__(self) -> None:
        self.depth = 0
        self.path: list[str] = []

    # ------------------------------------------------------------------ client hooks
    def literal(self, value: Any, aval: Any) -> Any:
        """Abstract value of a jaxpr `Literal` with Python/NumPy value ``value``."""
        raise NotImplementedError

    def const(self, value: Any) -> Any:
        """Abstract value of a closed-over constant array."""
        raise NotImplementedError

    def fallback(self, eqn: Any, invals: list[Any]) -> Any:
        """Rule for a primitive without one in `rules`: must be conservative."""
        raise NotImplementedError(f"no rule for primitive {eqn.primitive.name!r}")

    def prepare(self, eqn: Any, invals: list[Any]) -> list[Any]:
        """The operands a (non-inlined) equation's rule sees; ``invals`` by default.

        Lets a client hand each use of a value its own copy (group discovery gives every
        use of a constant fresh axes, so one constant never ties two consumers).
        """
        return invals

    def on_eqn(self, eqn: Any, invals: list[Any], outvals: list[Any]) -> None:  # noqa: B027
        """Called after each (non-inlined) equation; does nothing by default."""

    # ------------------------------------------------------------------ core
    def run_closed(self, closed: Any, args: Sequence[Any]) -> list[Any]:
        """Interprets a `ClosedJaxpr` (or open jaxpr) on abstract ``args``."""
        closed = make_closed_jaxpr(closed)
        consts = [self.const(c) for c in closed.consts]
        return self.run(closed.jaxpr, consts, args)

    def run(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
        """Interprets an open jaxpr given abstract values of its constvars and invars."""
        if len(consts) != len(jaxpr.constvars) or len(args) != len(jaxpr.invars):
            raise ValueError(
                f"jaxpr takes {len(jaxpr.constvars)} consts and {len(jaxpr.invars)} inputs, "
                f"got {len(consts)} and {len(args)}")
        env: dict[Any, Any] = {}

        def read(v: Any) -> Any:
            if isinstance(v, jcore.Literal):
                return self.literal(v.val, v.aval)
            return env[v]

        for v, x in zip(jaxpr.constvars, consts, strict=True):
            env[v] = x
        for v, x in zip(jaxpr.invars, args, strict=True):
            env[v] = x
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            name = eqn.primitive.name
            rule = self.rules.get(name)
            inner = inner_jaxpr(eqn) if rule is None else None
            if inner is not None:
                outvals = self.enter(f"{name}:{eqn.params.get('name', '')}", inner, invals)
            else:
                invals = self.prepare(eqn, invals)
                out = rule(self, eqn, invals) if rule is not None else self.fallback(eqn, invals)
                outvals = list(out) if eqn.primitive.multiple_results else [out]
                self.on_eqn(eqn, invals, outvals)
            if len(outvals) != len(eqn.outvars):
                raise RuntimeError(
                    f"rule for {name!r} returned {len(outvals)} values for "
                    f"{len(eqn.outvars)} outputs")
            for v, x in zip(eqn.outvars, outvals, strict=True):
                if not isinstance(v, jcore.DropVar):
                    env[v] = x
        return [read(v) for v in jaxpr.outvars]

    def enter(self, label: str, closed: Any, args: Sequence[Any]) -> list[Any]:
        """Interprets a nested jaxpr (inlined call or control-flow body)."""
        self.depth += 1
        self.path.append(label)
        try:
            return self.run_closed(closed, args)
        finally:
            self.path.pop()
            self.depth -= 1
