"""A small functional training loop for NNX classifiers (used by the demo and benchmarks).

The model is split once into ``(graphdef, params, rest)``: ``params`` (``nnx.Param``) is
what the optax transformation sees, ``rest`` holds BatchNorm statistics and anything else.
One jitted step computes the cross-entropy gradient, the optimizer update (HESSO or not)
and applies it; nothing in the loop depends on Python-side model state.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from hesso_jax.data import Split
from hesso_jax.groups import Groups
from hesso_jax.hesso import _find_states, check_faults

__all__ = ["History", "count_params", "demo_schedule", "evaluate", "forward_flops",
           "latency_ratio", "make_eval", "make_step", "make_train_step", "train_classifier"]


def demo_schedule(steps: int, periods: int) -> tuple[int, int]:
    """The demo's HESSO schedule ``(warmup_steps, Tp)``.

    Warm-up for 20% of ``steps``, ``periods`` pruning periods over the next 50%, fine-tuning
    for the remaining 30%.
    """
    return steps // 5, max(1, (steps // 2) // periods)


def make_train_step(loss_fn: Callable[..., Any], tx: optax.GradientTransformation, *,
                    has_aux: bool = False, jit: bool = True) -> Callable[..., tuple]:
    """The training recipe: one step of ``tx`` on the gradient of ``loss_fn``.

    Returns ``step(params, opt_state, *batch) -> (params, opt_state, loss)`` (with
    ``has_aux``: ``(params, opt_state, loss, aux)``), jitted unless ``jit=False``. The
    gradient is taken with respect to ``params`` only; ``batch`` is everything else
    ``loss_fn(params, *batch)`` needs (data, non-trainable state, targets).

    The loss on the current batch is passed to ``tx`` as the optax extra argument
    ``value_fn(params) -> loss``, which HESSO-CRIC's trial steps differentiate
    (``hj.hesso(..., cric=hj.CricConfig(...))``); transformations without extra arguments
    ignore it (``tx`` is wrapped with ``optax.with_extra_args_support``). The raw gradient
    goes along as ``grad``, the direction ``hj.hesso(..., direction="gradient")`` and the
    default score under a `hesso_jax.Budget` read (free: it is in memory). With ``has_aux``,
    ``loss_fn`` returns ``(loss, aux)`` and ``value_fn`` keeps the loss.

    Example::

        tx = optax.chain(optax.adam(1e-3), hj.hesso(groups, 0.5, P, Tp, cric=hj.CricConfig()))
        step = make_train_step(lambda p, x, y: jnp.mean((f(p, x) - y) ** 2), tx)
        params, opt_state, loss = step(params, tx.init(params), x, y)
    """
    tx = optax.with_extra_args_support(tx)

    def step(params: Any, opt_state: Any, *batch: Any) -> tuple:
        def value_fn(p: Any) -> jax.Array:   # the loss on this batch, for CRIC
            out = loss_fn(p, *batch)
            return out[0] if has_aux else out

        out, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params, value_fn=value_fn,
                                       grad=grads)
        params = optax.apply_updates(params, updates)
        return (params, opt_state, *out) if has_aux else (params, opt_state, out)

    return jax.jit(step) if jit else step


def make_step(graphdef: Any, tx: optax.GradientTransformation) -> Callable:
    """Jitted ``step(params, rest, opt_state, x, y) -> (params, rest, opt_state, loss)``.

    The cross-entropy recipe of `make_train_step` for an NNX classifier split into
    ``(graphdef, params, rest)``: ``rest`` (BatchNorm statistics) comes back updated.
    """

    def loss_fn(params: Any, rest: Any, x: jax.Array, y: jax.Array) -> tuple:
        # Fresh Variable objects for `rest` at this trace level, so BatchNorm may update it.
        model = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))
        logits = model(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, nnx.state(model, nnx.Not(nnx.Param))

    train_step = make_train_step(loss_fn, tx, has_aux=True, jit=False)

    @jax.jit
    def step(params: Any, rest: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple:
        params, opt_state, loss, rest = train_step(params, opt_state, rest, x, y)
        return params, rest, opt_state, loss

    return step


def make_eval(model: nnx.Module) -> Callable:
    """Jitted ``logits(state, x)`` of ``model`` in evaluation mode (BN running stats).

    ``model`` itself keeps its mode: the evaluation graph comes from a merged view that
    shares its arrays.
    """
    view = nnx.merge(*nnx.split(model))
    view.eval()
    graphdef = nnx.graphdef(view)

    @jax.jit
    def logits(state: Any, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(x)

    return logits


def evaluate(model: nnx.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of ``model`` (evaluation mode) on ``(x, y)``."""
    logits = make_eval(model)(nnx.state(model), jnp.asarray(x))
    return float(np.mean(np.asarray(logits).argmax(-1) == y))


def latency_ratio(small_fn: Callable, small_state: Any, dense_fn: Callable, dense_state: Any,
                  x: Any, rounds: int = 30) -> tuple[float, float, float]:
    """Median forward time of two compiled models, measured interleaved in one run.

    Returns ``(small / dense, small ms, dense ms)``; interleaving makes the ratio robust
    to load that changes during the measurement (absolute times only mean something on
    an idle machine).
    """
    for fn, st in ((small_fn, small_state), (dense_fn, dense_state)):
        jax.block_until_ready(fn(st, x))
    t_small: list[float] = []
    t_dense: list[float] = []
    for _ in range(rounds):
        for fn, st, acc in ((small_fn, small_state, t_small), (dense_fn, dense_state, t_dense)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(st, x))
            acc.append(time.perf_counter() - t0)
    ms, md = float(np.median(t_small)), float(np.median(t_dense))
    return ms / md, ms * 1e3, md * 1e3


def count_params(model_or_state: Any) -> int:
    """Number of ``nnx.Param`` elements."""
    state = (nnx.state(model_or_state, nnx.Param)
             if isinstance(model_or_state, nnx.Module) else model_or_state)
    return int(sum(np.size(x) for x in jax.tree.leaves(state)))


def forward_flops(model: nnx.Module, x: np.ndarray) -> float:
    """FLOPs of one evaluation-mode forward pass on ``x``, from XLA's cost analysis."""
    fn = make_eval(model)
    cost = fn.lower(nnx.state(model), jnp.asarray(x)).compile().cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


@dataclasses.dataclass
class History:
    """What `train_classifier` recorded every ``eval_every`` steps."""

    steps: list[int] = dataclasses.field(default_factory=list)
    test_accuracy: list[float] = dataclasses.field(default_factory=list)
    zero_groups: list[int] = dataclasses.field(default_factory=list)
    loss: list[float] = dataclasses.field(default_factory=list)


def _check_faults(opt_state: Any, params: Any) -> None:
    """`check_faults` when ``opt_state`` holds one HESSO state (a no-op otherwise)."""
    if len(_find_states(opt_state)) == 1:
        check_faults(opt_state, params)


def train_classifier(model: nnx.Module, tx: optax.GradientTransformation, data: Split, *,
                     steps: int, batch_size: int = 64, seed: int = 0, eval_every: int = 50,
                     groups: Groups | None = None, desc: str = "train",
                     progress: bool = True) -> tuple[nnx.Module, Any, History]:
    """Trains ``model`` with ``tx`` on ``data`` for ``steps`` minibatch steps.

    Batches are drawn from a seeded permutation, epoch by epoch, so two runs with the same
    seed see the same batches whatever ``tx`` is.

    Returns:
      ``(model, opt_state, history)``: the trained model (updated in place), the final
      optimizer state and the `History`.

    Raises:
      ValueError: at an evaluation, a placement fault a ``hesso(..., on_fault="record")``
        in ``tx`` recorded (`hesso_jax.check_faults`).
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)
    step = make_step(graphdef, tx)
    eval_logits = make_eval(model)
    rng = np.random.default_rng(seed)
    n = len(data.x_train)
    order = rng.permutation(n)
    pos = 0
    hist = History()
    x_test = jnp.asarray(data.x_test)
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False)
    for t in bar:
        if pos + batch_size > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        params, rest, opt_state, loss = step(params, rest, opt_state, data.x_train[idx],
                                             data.y_train[idx])
        if t % eval_every == 0 or t == steps:
            _check_faults(opt_state, params)
            state = nnx.merge_state(params, rest)
            acc = float(np.mean(np.asarray(eval_logits(state, x_test)).argmax(-1)
                                == data.y_test))
            hist.steps.append(t)
            hist.test_accuracy.append(acc)
            hist.loss.append(float(loss))
            hist.zero_groups.append(int(groups.zero_groups(params).sum()) if groups else 0)
            bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{acc:.3f}")
    nnx.update(model, params, rest)
    return model, opt_state, hist
