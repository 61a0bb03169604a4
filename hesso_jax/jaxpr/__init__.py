"""One small jaxpr interpreter shared by group discovery and activation capture.

`interpreter.Interpreter` is the abstract-interpretation core (a registry of per-primitive
rules, an explicit conservative fallback, inlining of call-like primitives). Its clients:
`axes.AxisTracer` (axis classes and zero-analysis events, used by
`hesso_jax.discovery`) and the activation capture of `capture` (used by SNOWS).
"""

from hesso_jax.jaxpr.interpreter import CALL_JAXPR_PARAMS, Interpreter, Rule, inner_jaxpr

__all__ = ["CALL_JAXPR_PARAMS", "Interpreter", "Rule", "inner_jaxpr"]
