"""One small jaxpr interpreter shared by group discovery, activation capture and costs.

`interpreter.Interpreter` is the abstract-interpretation core (a registry of per-primitive
rules, an explicit conservative fallback, inlining of call-like primitives). Its clients:

* group discovery (`hesso_jax.discovery` is their client): `axes.AxisTracer` (stage 1:
  axis classes and zero-analysis events, with the public rule table `axes.RULES`, its
  definers and the extension point `axes.register_rule`), `spaces.Spaces` (stage 2:
  channel spaces) and `zeros.ZeroAnalysis` (stage 3: exact zeros);
* the activation capture of `capture` (used by SNOWS);
* the cost model of `hesso_jax.costs`.

Discovery and capture follow parameters through views with one tracker (`views`).
Nothing in this package imports `hesso_jax.discovery`.
"""

from hesso_jax.jaxpr.axes import (
    RULES,
    ZERO_KINDS,
    AxisRule,
    AxisTracer,
    ZeroKind,
    def_blocked,
    def_elementwise,
    def_identity,
    def_source,
    default_rule,
    elementwise_rule,
    register_rule,
)
from hesso_jax.jaxpr.interpreter import (
    CALL_JAXPR_PARAMS,
    Interpreter,
    Rule,
    inner_jaxpr,
    source_line,
)
from hesso_jax.jaxpr.zeros import ZeroAnalysis

__all__ = [
    "CALL_JAXPR_PARAMS",
    "RULES",
    "ZERO_KINDS",
    "AxisRule",
    "AxisTracer",
    "Interpreter",
    "Rule",
    "ZeroAnalysis",
    "ZeroKind",
    "def_blocked",
    "def_elementwise",
    "def_identity",
    "def_source",
    "default_rule",
    "elementwise_rule",
    "inner_jaxpr",
    "register_rule",
    "source_line",
]
