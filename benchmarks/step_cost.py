"""What one HESSO step costs next to the base optimizer's step (issue 14 item 1, 13 item 4).

For every model and every variant of the chain the same jitted training step (forward,
backward, ``tx.update``, ``optax.apply_updates``) is compiled with and without buffer
donation. Reported per (model, donation):

* *temp*: ``compiled.memory_analysis().temp_size_in_bytes`` (deterministic) minus the
  base step's, next to ``4·N`` (one float32 copy of the parameters) and ``G``;
* *ordinary*: the step at a count inside pruning period 1 with its ``K̂`` groups being
  projected (the representative step); *start p=0*: the first period start (saliency +
  selection); *start p=1*: a later one (also runs the period-end check);
* *amortised (est.)*: the reference schedule (``T_w = 200``, ``P = 5``, ``T_p = 100``,
  1000 steps) priced with the medians: warm-up and ordinary steps at *ordinary*;
* *loop* (``--loop N``, donated rows): ``N`` ordinary steps dispatched back to back as a
  training loop runs them (outputs fed back, donated, one ``block_until_ready`` at the
  end), seconds per step over the base's. JAX dispatches asynchronously, so in a loop
  the Python and PjRt work of dispatching step ``t + 1`` (argument handling grows with
  the number of state arrays: HESSO adds 11) overlaps the execution of step ``t``; the
  one-call columns time dispatch and execution in series.

Variants: ``adam`` alone (the base), ``adam + hesso`` (``optax.chain``, default saliency,
direction = the base update ``u``), ``hesso base=`` (the fused form ``hj.hesso(...,
base=optax.adam(1e-3))``: same selection, ``u`` recomputed inside the period start),
``hesso base= gradient`` (fused, ``d = −∇f``), ``hesso(direction="gradient")`` with
``update(..., grad=grads)`` (``d = −∇f``, the gradient the step has already computed),
the same with only
``value_fn`` (``∇f`` recomputed at period starts), ``hesso(saliency="magnitude")`` (no
direction).

Timing: the HESSO state is rebuilt with the chosen ``count`` before every call (outside
the timed region) so every timed call runs the same branch; with donation the outputs are
fed back. Base and HESSO calls are interleaved in rotating rounds, each followed by
``block_until_ready``; medians of wall time. The machine may be shared: ratios, not
absolute times, are the result.

Usage::

    python benchmarks/step_cost.py                  # all models (~10 min on 2 cores)
    python benchmarks/step_cost.py --models mlp10m --rounds 5
    python benchmarks/step_cost.py --models wide1e2 --loop 100   # + training-loop timing
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import hesso_jax as hj
from hesso_jax.hesso import HessoState, resolve_count, schedule_counts

Pytree = Any
Loss = Callable[[Pytree, Pytree], jax.Array]
TW, P, TP = 20, 2, 20
REFERENCE = (200, 5, 100, 1000)  # T_w, P, T_p, total steps
LOOP_TP = 10_000  # period length of the --loop cases: every looped step is ordinary
KINDS = ("ordinary", "start0", "start1")
VARIANTS: dict[str, tuple[dict[str, Any] | None, bool]] = {  # (hesso kwargs, pass grad=)
    "adam": (None, False),
    "hesso": ({}, False),
    "hesso base=": ({"base": True}, False),
    "hesso base= record": ({"base": True, "on_fault": "record"}, False),
    "hesso base= gradient": ({"base": True, "direction": "gradient"}, False),
    "hesso gradient": ({"direction": "gradient"}, True),
    "hesso gradient (value_fn)": ({"direction": "gradient"}, False),
    "hesso magnitude": ({"saliency": "magnitude"}, False),
}


@dataclasses.dataclass(frozen=True)
class Model:
    """A benchmarked model: parameters, a batch, its loss and its groups."""

    name: str
    params: Pytree
    batch: Pytree
    loss: Loss
    groups: hj.Groups


def _mlp(dims: tuple[int, ...], batch: int = 64) -> Model:
    """Plain-pytree MLP (relu), one family per hidden layer (kernel column + bias)."""
    keys = jax.random.split(jax.random.key(0), len(dims))
    params = {f"l{i}": {"kernel": jax.random.normal(keys[i], (a, b)) / np.sqrt(a),
                        "bias": jnp.zeros((b,))}
              for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True))}
    families = [hj.GroupFamily(dims[i + 1], (hj.Member((f"l{i}", "kernel"), 1),
                                             hj.Member((f"l{i}", "bias"), 0)),
                               (hj.Member((f"l{i + 1}", "kernel"), 0),), name=f"h{i}")
                for i in range(len(dims) - 2)]

    def loss(p: Pytree, b: Pytree) -> jax.Array:
        h = b[0]
        for i in range(len(dims) - 1):
            h = h @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"]
            h = jax.nn.relu(h) if i < len(dims) - 2 else h
        return jnp.mean((h - b[1]) ** 2)

    x = jax.random.normal(keys[-1], (batch, dims[0]))
    y = jax.random.normal(keys[0], (batch, dims[-1]))
    name = "MLP " + "→".join(str(d) for d in dims)
    return Model(name, params, (x, y), loss, hj.Groups.from_families(families))


def _nnx(name: str, model: nnx.Module, x: jax.Array, y: jax.Array) -> Model:
    """An NNX model with discovered groups; the loss is a squared error of its output."""
    groups = hj.discover_groups(model, x)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p: Pytree, b: Pytree) -> jax.Array:
        out = nnx.merge(graphdef, p, jax.tree.map(lambda v: v, rest))(b[0])
        return jnp.mean((out.astype(jnp.float32) - b[1]) ** 2)

    return Model(name, params, (x, y), loss, groups)


def build(name: str) -> Model:
    """The model called ``name`` (see ``MODELS``)."""
    from hesso_jax.models import CNN, TinyTransformer
    from hesso_jax.models.bert import BertEncoder

    key = jax.random.key(1)
    if name == "cnn":
        return _nnx("CNN (digits)", CNN(rngs=nnx.Rngs(0)), jax.random.normal(key, (64, 8, 8, 1)),
                    jnp.zeros((64, 10)))
    if name == "transformer":
        return _nnx("TinyTransformer", TinyTransformer(rngs=nnx.Rngs(0)),
                    jax.random.normal(key, (64, 8, 8)), jnp.zeros((64, 10)))
    if name == "bert":
        enc = BertEncoder(vocab_size=1000, max_len=64, d_model=256, num_heads=4, mlp_dim=1024,
                          depth=4, rngs=nnx.Rngs(0))
        ids = jax.random.randint(key, (8, 64), 0, 1000)
        return _nnx("BERT-like 4×256", enc, ids, jnp.zeros((8, 64, 256)))
    if name == "mlp10m":
        return _mlp((64, 10_000, 1000, 10))
    if name.startswith("wide"):
        return _mlp((64, int(float(name[4:])), 10))
    raise ValueError(f"unknown model {name!r}")


MODELS = ("cnn", "transformer", "bert", "mlp10m", "wide1e2", "wide1e3", "wide1e4", "wide1e5")


def make_step(model: Model, tx: optax.GradientTransformation, donate: bool,
              pass_grad: bool) -> Callable:
    """Jitted ``step(params, opt_state, batch) -> (params, opt_state, loss)``.

    ``update`` gets ``value_fn`` (the loss on the batch) and, if ``pass_grad``, ``grad``.
    """

    def step(params: Pytree, opt_state: Pytree, batch: Pytree) -> tuple:
        loss, grads = jax.value_and_grad(model.loss)(params, batch)
        extra = {"grad": grads} if pass_grad else {}
        updates, opt_state = tx.update(grads, opt_state, params,
                                       value_fn=lambda p: model.loss(p, batch), **extra)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


STATE_CLASSES: tuple[type, ...] = (HessoState,)  # `ab_hesso.py` adds an older version's


def with_count(opt_state: Pytree, count: int, redundant: np.ndarray) -> Pytree:
    """``opt_state`` (fresh arrays) whose `HessoState` has ``count`` and ``redundant``
    (any class of `STATE_CLASSES`)."""

    def fix(s: Any) -> Any:
        if isinstance(s, STATE_CLASSES):
            s = s._replace(count=jnp.int32(count), redundant=jnp.asarray(redundant))
            return type(s)(*(jnp.array(a, copy=True) for a in s))
        return jnp.array(s, copy=True)

    return jax.tree.map(fix, opt_state, is_leaf=lambda s: isinstance(s, STATE_CLASSES))


def kind_count(kind: str, tp: int = TP) -> int:
    return {"ordinary": TW + tp + 3, "start0": TW, "start1": TW + tp}[kind]


class Case:
    """One compiled (variant, donation) step and the state it is called with per kind."""

    def __init__(self, model: Model, variant: str, donate: bool, tp: int = TP):
        kw, pass_grad = VARIANTS[variant]
        base = optax.adam(1e-3)
        if kw is None:
            self.tx = base
        elif kw.get("base"):  # the fused form: hesso(..., base=adam)
            self.tx = hj.hesso(model.groups, 0.5, P, tp, warmup_steps=TW,
                               **{**kw, "base": base})
        else:
            self.tx = optax.chain(base, hj.hesso(model.groups, 0.5, P, tp, warmup_steps=TW, **kw))
        self.model, self.donate, self.hesso, self.tp = model, donate, kw is not None, tp
        self.step = make_step(model, self.tx, donate, pass_grad)
        self.init = self.tx.init(model.params)
        G = model.groups.num_groups
        self.mask = np.arange(G) < schedule_counts(resolve_count(0.5, G), P)[0]
        compiled = self.step.lower(model.params, self.init, model.batch).compile()
        self.temp = int(compiled.memory_analysis().temp_size_in_bytes)
        self.hlo = compiled.as_text()
        self.params = jax.tree.map(lambda a: jnp.array(a, copy=True), model.params)

    def inputs(self, kind: str) -> tuple[Pytree, Pytree]:
        mask = self.mask if kind == "ordinary" else np.zeros_like(self.mask)
        state = with_count(self.init, kind_count(kind, self.tp), mask)
        params = jax.tree.map(lambda a: jnp.array(a, copy=True), self.params)
        return params, state

    def call(self, kind: str) -> tuple[float, float]:
        """``(wall, process CPU)`` seconds of one step of ``kind`` (inputs prepared outside
        the timed region). CPU time leaves out waiting for a core: less sensitive to
        other processes' load than wall time."""
        params, state = self.inputs(kind)
        jax.block_until_ready((params, state))
        c0, t0 = time.process_time(), time.perf_counter()
        out = jax.block_until_ready(self.step(params, state, self.model.batch))
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if self.donate:
            self.params = out[0]
        return dt, dc

    def loop(self, steps: int) -> float:
        """Wall seconds per step of ``steps`` ordinary steps dispatched back to back
        (outputs fed back, one ``block_until_ready`` at the end), as a training loop runs
        them. Needs ``steps`` ordinary counts in a row: a case built with ``tp > steps``."""
        if not (self.donate and self.tp > steps + 3):
            raise ValueError(f"loop of {steps} steps needs a donated case with a long period "
                             f"(T_p > {steps + 3}), got donate={self.donate}, T_p={self.tp}")
        params, state = self.inputs("ordinary")
        jax.block_until_ready((params, state))
        dt, self.params, _ = timed_loop(self.step, params, state, self.model.batch, steps)
        return dt


def timed_loop(step: Callable, params: Pytree, state: Pytree, batch: Pytree, steps: int
               ) -> tuple[float, Pytree, Pytree]:
    """``steps`` calls ``params, state, _ = step(params, state, batch)`` back to back, one
    ``block_until_ready`` at the end: ``(wall seconds per step, params, state)``."""
    t0 = time.perf_counter()
    for _ in range(steps):
        params, state, _ = step(params, state, batch)
    jax.block_until_ready((params, state))
    return (time.perf_counter() - t0) / steps, params, state


def rotating_rounds(names: list[Any], rounds: int, block: Callable[[Any], None]) -> None:
    """``block(name)`` for every name, round after round, the order rotated by one each
    round (so no name always follows the same one), the garbage collector off meanwhile."""
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                block(name)
    finally:
        gc.enable()


def time_cases(cases: dict[str, Case], rounds: int, per_block: int,
               kinds: tuple[str, ...] = KINDS) -> dict[str, float]:
    """Median wall seconds per ``"variant/kind"`` (and CPU seconds per ``"variant/kind/cpu"``),
    interleaved in rotating rounds: ``"adam/ordinary"`` and every other case at ``kinds``."""
    calls = [("adam", "ordinary")] + [(v, k) for v in cases if v != "adam" for k in kinds]
    times: dict[tuple[str, str], list[tuple[float, float]]] = {c: [] for c in calls}
    for c in calls:  # compile and warm
        cases[c[0]].call(c[1])

    def block(c: tuple[str, str]) -> None:
        cases[c[0]].call(c[1])  # warms caches after the switch
        times[c].extend(cases[c[0]].call(c[1]) for _ in range(per_block))

    rotating_rounds(calls, rounds, block)
    med = {f"{v}/{k}": float(np.median(np.asarray(t)[:, 0])) for (v, k), t in times.items()}
    med.update({f"{v}/{k}/cpu": float(np.median(np.asarray(t)[:, 1]))
                for (v, k), t in times.items()})
    return med


def time_loops(model: Model, variants: list[str], rounds: int, steps: int
               ) -> dict[str, float]:
    """Median seconds per looped ordinary step (`Case.loop`) per variant, donated,
    interleaved in rotating rounds (each block preceded by an untimed warm loop)."""
    cases = {v: Case(model, v, True, tp=LOOP_TP) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in cases}
    for case in cases.values():  # compile and warm
        case.loop(steps)

    def block(v: str) -> None:
        cases[v].loop(steps)
        times[v].append(cases[v].loop(steps))

    rotating_rounds(variants, rounds, block)
    return {v: float(np.median(t)) for v, t in times.items()}


def amortised(med: dict[str, float], variant: str) -> float:
    """Reference-schedule ratio from the kind medians (warm-up steps priced as ordinary)."""
    tw, periods, _, total = REFERENCE
    ordinary = med[f"{variant}/ordinary"]
    cost = (med[f"{variant}/start0"] + (periods - 1) * med[f"{variant}/start1"]
            + (total - periods) * ordinary)
    return cost / (total * med["adam/ordinary"])


def u_buffers(case: Case, model: Model) -> int:
    """Parameter-sized non-parameter fusions whose result HESSO's step keeps (a proxy).

    Counts fusion/op results in the entry computation with the shape of the largest
    parameter leaf, minus the base step's count: a kept ``u`` adds one.
    """
    big = max(jax.tree.leaves(model.params), key=np.size)
    shape = "f32[" + ",".join(str(d) for d in big.shape) + "]"
    entry = case.hlo.split("ENTRY")[1]
    return sum(1 for line in entry.splitlines()
               if f"= {shape}" in line and "parameter(" not in line)


def run_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    model = build(name)
    n = sum(int(np.size(p)) for p in jax.tree.leaves(model.params))
    rows = []
    loop = getattr(args, "loop", 0)
    looped = time_loops(model, args.variants, args.rounds, loop) if loop else {}
    gc.collect()
    for donate in (False, True):
        cases = {v: Case(model, v, donate) for v in args.variants}
        med = time_cases(cases, args.rounds, args.per_block)
        base_temp, base_big = cases["adam"].temp, u_buffers(cases["adam"], model)
        for v in args.variants:
            if v == "adam":
                continue
            row = {"model": model.name, "params": n, "G": model.groups.num_groups,
                   "donate": donate, "variant": v, "base_ms": med["adam/ordinary"] * 1e3,
                   "temp_extra_bytes": cases[v].temp - base_temp, "four_n": 4 * n,
                   "big_buffers_extra": u_buffers(cases[v], model) - base_big,
                   "amortised": amortised(med, v)}
            row.update({k: med[f"{v}/{k}"] / med["adam/ordinary"] for k in KINDS})
            row.update({f"{k}_cpu": med[f"{v}/{k}/cpu"] / med["adam/ordinary/cpu"]
                        for k in KINDS})
            if looped and donate:
                row.update(loop=looped[v] / looped["adam"], loop_steps=loop,
                           loop_base_ms=looped["adam"] * 1e3)
            rows.append(row)
            print(format_row(row), flush=True)
        del cases
        gc.collect()
    return rows


def format_row(r: dict[str, Any]) -> str:
    return (f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['G']} | "
            f"{'yes' if r['donate'] else 'no'} | {r['variant']} | {r['base_ms']:.2f} | "
            f"{r['ordinary']:.3f}× | {r['start0']:.2f}× | {r['start1']:.2f}× | "
            f"{r['amortised']:.3f}× | {r['temp_extra_bytes'] / 1e6:+.3f} MB "
            f"(4N = {r['four_n'] / 1e6:.1f} MB) | {r['big_buffers_extra']:+d} | "
            + (f"{r['loop']:.3f}× ({r['loop_base_ms']:.2f} ms) |" if "loop" in r else "– |"))


HEADER = ("| model | N | G | donated | variant | base ms | ordinary | start p=0 | start p=1 | "
          "amortised (est.) | temp − base | big buffers − base | loop (base ms) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-block", type=int, default=3)
    parser.add_argument("--loop", type=int, default=0, metavar="N",
                        help="also time N ordinary steps back to back (donated rows)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("step_cost.json"))
    args = parser.parse_args(argv)
    args.variants = ["adam"] + [v for v in args.variants.split(",") if v != "adam"]
    print(HEADER, flush=True)
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, args)
    args.out.write_text(json.dumps({"jax": jax.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
