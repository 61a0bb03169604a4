"""Newton–CG–Armijo on a masked objective, written once and run by two loop drivers.

This is the solver of SNOWS (arXiv 2411.18376, the paper's Hessian-free Newton method; its
equation and algorithm numbers are not cited because they were not checked against the
paper text). It minimises a smooth ``L`` over the active coordinates of a mask ``m``
(``w = w ⊙ m``), seeing ``L`` only through an `Oracle`:

* ``loss(w) = L(w)``, ``grad(w) = m ⊙ ∇L(w)``, ``hvp(w, v) = m ⊙ ∇²L(w)(m ⊙ v)``.

**Newton step** (`newton_step`). With ``g = grad(w)``, solve ``(H + λI) d = −g`` by
conjugate gradient (`cg`), ``λ = damping · |gᵀHg| / gᵀg`` (damping relative to the
curvature along ``g``). CG starts from 0 and stops when ``‖r‖ ≤ cg_tol · ‖g‖``, after
``cg_max_iters`` iterations, or on a direction ``p`` with ``pᵀ(H + λI)p`` not > 0
(non-positive *or non-finite* curvature): then it keeps its last iterate, or ``−g`` (the
steepest-descent direction) on the first iteration. A step with ``gᵀg`` not > 0 (zero or
non-finite gradient) is not attempted and ends the Newton loop.

**Line search** (`armijo`). Trial lengths ``t = 1, ½, ¼, …`` (at most `MAX_TRIALS`);
a trial is accepted when ``L(w + t d)`` is finite and
``L(w + t d) ≤ L(w) + c · t · gᵀd`` (``c = ARMIJO_C``). It runs only for a descent
direction, ``gᵀd < 0`` (False for NaN).

**Non-finite trial points** (one semantics for both drivers). A trial whose loss is NaN
or ±inf is *rejected like any failed Armijo test*: the search keeps halving ``t`` up to
the cap. If no finite Armijo point exists among the `MAX_TRIALS` trials, the Newton loop
stops and keeps its last (finite) iterate. Rejected non-finite trials are counted
(`NewtonResult.nonfinite_trials`).

**Outer loop** (`newton_cg`). From ``w_0 = w_start ⊙ m``, at most ``newton_steps`` Newton
steps, stopping early at the first step the line search rejects. The result is never
worse than the start: if ``not L(w) ≤ L(w_0)`` (e.g. ``L(w_0)`` itself is NaN) the start
is returned.

**Drivers.** The iteration is written once against a `Driver`, which only says how a
``while`` loop and a two-way branch run: `HOST` runs them in Python on concrete values
(each oracle call can then be a separately jitted top-level computation, and a caller can
show progress); `JIT` maps them to ``lax.while_loop`` / ``lax.cond`` so the whole solve is
traceable inside one ``jax.jit``. Both execute the same arithmetic in the same order, so
given the same oracle they agree up to floating-point rounding (XLA fuses differently
inside ``jit``; SNOWS's two oracles also average calibration batches differently, a host
sum vs a ``lax.map`` mean). Rounding can still move a CG exit by an iteration or flip an
Armijo test that holds with equality; the tests bound both.
We use our own CG rather than ``jax.scipy.sparse.linalg.cg`` because the latter is a
``lax.while_loop`` (it cannot run under `HOST`), and reports neither its iteration count
nor a negative-curvature exit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["ARMIJO_C", "HOST", "JIT", "MAX_TRIALS", "Driver", "LineSearch", "NewtonResult",
           "Oracle", "armijo", "cg", "newton_cg", "newton_step"]

ARMIJO_C = 1e-4
MAX_TRIALS = 30

State = Any


# ---------------------------------------------------------------------------- drivers
class Driver(NamedTuple):
    """How the solver's loops and branches execute.

    Attributes:
      name: ``'host'`` or ``'jit'``.
      while_loop: ``while_loop(cond, body, init) -> state`` with the semantics of
        ``lax.while_loop``.
      cond: ``cond(pred, true_fn, false_fn) -> value`` with the semantics of ``lax.cond``
        (both branches must return the same structure, shapes and dtypes).

    Examples:
      >>> HOST.while_loop(lambda s: s < 5, lambda s: s + 2, 0)
      6
      >>> int(JIT.while_loop(lambda s: s < 5, lambda s: s + 2, 0))
      6
    """

    name: str
    while_loop: Callable[[Callable[[State], Any], Callable[[State], State], State], State]
    cond: Callable[[Any, Callable[[], Any], Callable[[], Any]], Any]


def _host_while(cond: Callable[[State], Any], body: Callable[[State], State],
                state: State) -> State:
    while bool(cond(state)):
        state = body(state)
    return state


def _host_cond(pred: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
    return true_fn() if bool(pred) else false_fn()


def _jit_cond(pred: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
    return jax.lax.cond(pred, true_fn, false_fn)


HOST = Driver("host", _host_while, _host_cond)
JIT = Driver("jit", jax.lax.while_loop, _jit_cond)


class Oracle(NamedTuple):
    """The objective ``L`` and its derivatives, as the solver sees them.

    `newton_cg` restricts them to the mask itself (``m ⊙ grad(w)``,
    ``m ⊙ hvp(w, m ⊙ v)``), so they may be given masked or not (masking is idempotent).

    Attributes:
      loss: ``w -> L(w)`` (a scalar; the solver compares it in float32).
      grad: ``w -> ∇L(w)``.
      hvp: ``(w, v) -> ∇²L(w) v`` (or a PSD approximation such as Gauss-Newton).
    """

    loss: Callable[[jax.Array], jax.Array]
    grad: Callable[[jax.Array], jax.Array]
    hvp: Callable[[jax.Array, jax.Array], jax.Array]


# ---------------------------------------------------------------------------- CG
def cg(driver: Driver, matvec: Callable[[jax.Array], jax.Array], b: jax.Array,
       tol: Any, maxiter: Any) -> tuple[jax.Array, jax.Array]:
    """Conjugate gradient for ``A x = b`` from ``x_0 = 0``.

    Standard CG (``α = rᵀr / pᵀAp``, ``x += α p``, ``r −= α Ap``, ``p = r + (r'ᵀr'/rᵀr) p``)
    while ``‖r‖ > tol · ‖b‖`` and fewer than ``maxiter`` iterations. On a direction with
    ``pᵀAp`` not > 0 (non-positive or non-finite curvature) it stops with its last
    iterate, or ``b`` itself on the first iteration (for ``b = −g``: steepest descent).

    Returns:
      ``(x, iterations)``; iterations counts matrix-vector products.

    Examples:
      >>> a = jnp.array([[4.0, 1.0], [1.0, 3.0]])
      >>> x, k = cg(HOST, lambda v: a @ v, jnp.array([1.0, 2.0]), 1e-6, 10)
      >>> [round(float(v), 4) for v in x], int(k)
      ([0.0909, 0.6364], 2)
    """
    bnorm = jnp.sqrt(jnp.vdot(b, b))

    def cond(c: tuple) -> jax.Array:
        k, _x, _r, _p, rs, stop = c
        return (k < maxiter) & (jnp.sqrt(rs) > tol * bnorm) & ~stop

    def body(c: tuple) -> tuple:
        k, x, r, p, rs, _ = c
        ap = matvec(p)
        pap = jnp.vdot(p, ap)
        bad = ~(pap > 0)
        alpha = jnp.where(bad, 0.0, rs / jnp.where(bad, 1.0, pap)).astype(rs.dtype)
        x_new = jnp.where(bad, jnp.where(k == 0, b, x), x + alpha * p)
        r_new = r - alpha * ap
        rs_new = jnp.vdot(r_new, r_new)
        p_new = r_new + (rs_new / jnp.where(rs > 0, rs, 1.0)).astype(rs.dtype) * p
        return k + 1, x_new, r_new, p_new, rs_new, bad

    init = (jnp.int32(0), jnp.zeros_like(b), b, b, jnp.vdot(b, b), jnp.bool_(False))
    k, x, *_ = driver.while_loop(cond, body, init)
    return x, k


# ---------------------------------------------------------------------------- Armijo
class LineSearch(NamedTuple):
    """Outcome of `armijo`: step length, loss there, accepted?, trials, non-finite ones."""

    t: jax.Array
    loss: jax.Array
    accepted: jax.Array
    trials: jax.Array
    nonfinite: jax.Array


def armijo(driver: Driver, loss: Callable[[jax.Array], jax.Array], w: jax.Array,
           f: jax.Array, d: jax.Array, slope: jax.Array,
           max_trials: int = MAX_TRIALS) -> LineSearch:
    """Armijo backtracking: the first ``t ∈ {1, ½, ¼, …}`` with a finite sufficient decrease.

    Accepts ``t`` when ``L(w + t d)`` is finite and ``L(w + t d) ≤ f + ARMIJO_C · t · slope``
    (``f = L(w)``, ``slope = gᵀd``). Non-finite trials are rejected and halving goes on,
    at most ``max_trials`` trials; nothing is tried unless ``slope < 0``.

    Examples:
      >>> loss = lambda w: jnp.where(w[0] > 1.5, jnp.nan, (w[0] - 2.0) ** 2)
      >>> ls = armijo(HOST, loss, jnp.array([0.0]), jnp.float32(4.0), jnp.array([2.0]),
      ...             jnp.float32(-8.0))
      >>> float(ls.t), float(ls.loss), bool(ls.accepted), int(ls.nonfinite)
      (0.5, 1.0, True, 1)
    """
    f = jnp.asarray(f, jnp.float32)
    slope = jnp.asarray(slope, jnp.float32)

    def cond(s: LineSearch) -> jax.Array:
        return ~s.accepted & (s.trials < max_trials) & (slope < 0)

    def body(s: LineSearch) -> LineSearch:
        f_new = jnp.asarray(loss((w + s.t * d).astype(w.dtype)), jnp.float32)
        finite = jnp.isfinite(f_new)
        ok = finite & (f_new <= f + ARMIJO_C * s.t * slope)
        return LineSearch(jnp.where(ok, s.t, 0.5 * s.t), f_new, ok, s.trials + 1,
                          s.nonfinite + (~finite).astype(jnp.int32))

    init = LineSearch(jnp.float32(1.0), f, jnp.bool_(False), jnp.int32(0), jnp.int32(0))
    return driver.while_loop(cond, body, init)


# ---------------------------------------------------------------------------- Newton
class _Step(NamedTuple):
    w: jax.Array
    f: jax.Array
    cg_iterations: jax.Array
    accepted: jax.Array
    nonfinite: jax.Array


def newton_step(driver: Driver, oracle: Oracle, w: jax.Array, f: jax.Array,
                cg_max_iters: Any, cg_tol: Any, damping: Any) -> _Step:
    """One damped Newton–CG step with Armijo backtracking (see the module docstring).

    ``d ≈ −(H + λI)⁻¹ g`` by `cg` with ``λ = damping · |gᵀHg| / gᵀg``, then
    ``w ← w + t d`` with ``t`` from `armijo`. Not attempted when ``gᵀg`` is not > 0.

    Returns:
      ``(w, f, cg_iterations, accepted, nonfinite)``; ``w`` and ``f = L(w)`` are the
      inputs when the step is not accepted.

    Examples:
      >>> a = jnp.array([3.0, 1.0])
      >>> o = Oracle(lambda w: jnp.sum(a * w ** 2), lambda w: 2 * a * w,
      ...            lambda w, v: 2 * a * v)
      >>> s = newton_step(HOST, o, jnp.array([1.0, 1.0]), jnp.float32(4.0), 10, 1e-6, 0.0)
      >>> [round(float(v), 4) for v in s.w], round(float(s.f), 6), int(s.cg_iterations)
      ([0.0, 0.0], 0.0, 2)
      >>> bool(s.accepted)
      True
    """
    g = oracle.grad(w)
    gg = jnp.vdot(g, g)

    def step() -> _Step:
        lam = (damping * jnp.abs(jnp.vdot(g, oracle.hvp(w, g))) / gg).astype(g.dtype)
        d, iters = cg(driver, lambda v: oracle.hvp(w, v) + lam * v, -g, cg_tol,
                      cg_max_iters)
        ls = armijo(driver, oracle.loss, w, f, d, jnp.vdot(g, d))
        w_new = jnp.where(ls.accepted, (w + ls.t * d).astype(w.dtype), w)
        return _Step(w_new, jnp.where(ls.accepted, ls.loss, f), iters, ls.accepted,
                     ls.nonfinite)

    def skip() -> _Step:
        return _Step(w, f, jnp.int32(0), jnp.bool_(False), jnp.int32(0))

    return driver.cond(gg > 0, step, skip)


class NewtonResult(NamedTuple):
    """Outcome of `newton_cg`.

    Attributes:
      w: the returned weights (supported on the mask).
      loss_start: ``L(w_start ⊙ m)``.
      loss_end: ``L(w)`` (``<= loss_start`` unless ``loss_start`` is NaN).
      cg_iterations: CG iterations over all Newton steps.
      newton_steps: Newton steps accepted by the line search.
      nonfinite_trials: line-search trials rejected because the loss was not finite.
    """

    w: jax.Array
    loss_start: jax.Array
    loss_end: jax.Array
    cg_iterations: jax.Array
    newton_steps: jax.Array
    nonfinite_trials: jax.Array


def newton_cg(driver: Driver, oracle: Oracle, w_start: jax.Array, mask: jax.Array,
              newton_steps: Any, cg_max_iters: Any, cg_tol: Any,
              damping: Any) -> NewtonResult:
    """Masked Newton–CG–Armijo from ``w_start ⊙ mask`` (see the module docstring).

    At most ``newton_steps`` `newton_step` calls, stopping at the first rejected step;
    returns the start instead of a worse (or NaN) end point. Under `JIT` the arguments
    may be tracers (call it inside ``jax.jit``); under `HOST` they are concrete.

    Examples:
      >>> a = jnp.array([3.0, 1.0, 2.0])
      >>> o = Oracle(lambda w: jnp.sum(a * (w - 1.0) ** 2), lambda w: 2 * a * (w - 1.0),
      ...            lambda w, v: 2 * a * v)
      >>> keep = jnp.array([True, True, False])
      >>> for drv in (HOST, JIT):
      ...     r = newton_cg(drv, o, jnp.zeros(3), keep, 1, 10, 1e-6, 0.0)
      ...     w = [round(float(v), 4) for v in r.w]
      ...     print(drv.name, w, round(float(r.loss_end), 4), int(r.newton_steps))
      host [1.0, 1.0, 0.0] 2.0 1
      jit [1.0, 1.0, 0.0] 2.0 1
    """
    m = mask.astype(w_start.dtype)
    start = w_start * m
    f0 = jnp.asarray(oracle.loss(start), jnp.float32)
    masked = Oracle(oracle.loss, lambda w: m * oracle.grad(w),
                    lambda w, v: m * oracle.hvp(w, m * v))

    def cond(c: tuple) -> jax.Array:
        k, _w, _f, _cg, _taken, _bad, done = c
        return (k < newton_steps) & ~done

    def body(c: tuple) -> tuple:
        k, w, f, cg_total, taken, bad, _ = c
        s = newton_step(driver, masked, w, f, cg_max_iters, cg_tol, damping)
        return (k + 1, s.w, s.f, cg_total + s.cg_iterations,
                taken + s.accepted.astype(jnp.int32), bad + s.nonfinite, ~s.accepted)

    zero = jnp.int32(0)
    init = (zero, start, f0, zero, zero, zero, jnp.bool_(False))
    _, w, f, cg_total, taken, bad, _ = driver.while_loop(cond, body, init)
    worse = ~(f <= f0)
    return NewtonResult(jnp.where(worse, start, w), f0, jnp.where(worse, f0, f), cg_total,
                        taken, bad)
