"""What a HESSO-CRIC period start costs next to an ordinary step (issue 14 item 2).

For the digits CNN (`hesso_jax.models.CNN`, cross-entropy on digits, trained with Adam
through a warm-up first so the selection is not made at initialisation) and a BERT-like
encoder (`hesso_jax.models.bert.BertEncoder` 4×256, distilling a second random encoder's
token states, also warmed up) one jitted training step (forward, backward, ``tx.update``
with ``value_fn`` = the loss on the step's batch, ``optax.apply_updates``) is compiled for

* ``adam``: the base optimizer alone;
* ``hesso``: ``adam`` + greedy `hesso_jax.hesso` (no CRIC);
* ``cric``: ``adam`` + ``hesso(cric=CricConfig(...))`` as the library runs it now
  (convolutions of the trial gradients in canonical layout, `hesso_jax.jaxpr.conv_layout`);
* ``cric stock`` (``--stock``): the same, compiled with the layout rewrite switched off
  (`hesso_jax.cric.canonical_convs` replaced by the identity while it is traced): the
  ``before`` figure of the convolution fix;
* ``gradients alone``: the loss gradients that CRIC's period start evaluates
  (`hesso_jax.CricConfig.gradient_count` of the trials it ran), computed back to back in a
  ``lax.fori_loop`` with nothing else: the floor of the period start for that many trials.

Kinds: *ordinary* (a count inside pruning period 1, its ``K̂`` groups being projected) and
*start* (the first period start, after the warm-up, nothing pruned). The HESSO state is
rebuilt with the chosen ``count`` before every call, outside the timed region, so every
timed call runs the same branch. Calls are interleaved round after round
(`common.interleaved`) and the ratios are ratios of medians. Amortised: the reference
schedule (``T_w = 200``, ``P = 5``, ``T_p = 100``, 1000 steps) priced with the medians
(``P`` starts at *start*, the other steps at *ordinary*) over 1000 base steps.

Also reported: CRIC's corrective cycles and trial gradients at that period start (from
`hesso_jax.hesso_status` after the step).

Trial trace (``--no-trace`` skips it): the same cycle run trial by trial (`trace_trials`:
the standalone `hesso_jax.cric` with the period's ``K̂``, checked to select exactly what
HESSO-CRIC's start selected), recording every trial's violating set ``V_c`` and score
vector ``T_c = Σ_j s(x_j, u_j)``. From it, without further gradients (`what_if`):

* the trials, gradients and groups shared with the full cycle of every ``tolerance`` /
  ``max_cycles`` setting (the cycle is the same up to where it stops, and the selection is
  ``bottom_K`` of the scores accumulated so far), and the loss with the selected groups
  set to zero at ``x⁰``;
* *speculative batching*: the trials are sequentially dependent (``V_{c+1}`` is read from
  ``A + T_c``), so batching ``B`` of them needs guesses; guessing ``T_{c+i} ≈ T_{c−1}`` (the
  last trial computed) for the ``B − 1`` trials after the certain one, and keeping the
  longest prefix whose guessed ``V`` equals the true one, gives the same selection with
  fewer sequential passes of ``S − 1`` gradients and more gradients in all.

Usage::

    python benchmarks/cric_cost.py                # both models (~5 min on 2 cores)
    python benchmarks/cric_cost.py --models cnn --rounds 5 --no-write
    python benchmarks/cric_cost.py --out /tmp/cric   # JSON and section elsewhere
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import hesso_jax as hj
from hesso_jax.hesso import HessoState, resolve_count, schedule_counts
from hesso_jax.projection import bottom_k
from hesso_jax.saliency import evaluate, resolve_saliency

cric_module = importlib.import_module("hesso_jax.cric")  # hj.cric is the function
Pytree = Any
SECTION = "## CRIC period-start cost"
TW, P, TP = 20, 5, 20
REFERENCE = (200, 5, 100, 1000)  # T_w, P, T_p, total steps
KINDS = ("ordinary", "start")


class Model(NamedTuple):
    """A benchmarked model: parameters (after warm-up), a batch, its loss, groups, CRIC."""

    name: str
    params: Pytree
    batch: Pytree
    loss: Callable[[Pytree, Pytree], jax.Array]
    groups: hj.Groups
    cric: hj.CricConfig
    batches: Callable[[int], Pytree] | None = None  # step i's batch (``batch`` = i=T_w)
    held_out: Pytree | None = None  # a batch never trained on (quality after a run)


def _split(model: nnx.Module) -> tuple[Any, Pytree, Pytree]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def _warm_up(loss: Callable, params: Pytree, batches: Callable[[int], Pytree],
             steps: int) -> Pytree:
    """``steps`` Adam (lr 3e-3) steps on ``batches(i)``: the state a period start sees."""
    tx = optax.adam(3e-3)

    @jax.jit
    def step(p: Pytree, s: Pytree, b: Pytree) -> tuple[Pytree, Pytree]:
        g = jax.grad(loss)(p, b)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    for i in range(steps):
        params, state = step(params, state, batches(i))
    return params


def cnn_model(warmup: int) -> Model:
    """Digits CNN(48, 96), batch 64, cross-entropy; CRIC as in `pareto_digits.py`."""
    from hesso_jax.data import load_digits_split
    from hesso_jax.models import CNN

    data = load_digits_split(0)
    model = CNN(rngs=nnx.Rngs(0))
    groups = hj.discover_groups(model, jnp.asarray(data.x_train[:64]))
    graphdef, params, rest = _split(model)

    def loss(p: Pytree, b: Pytree) -> jax.Array:
        logits = nnx.merge(graphdef, p, jax.tree.map(lambda v: v, rest))(b[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

    n = len(data.x_train) // 64

    def batches(i: int) -> Pytree:
        s = slice((i % n) * 64, (i % n + 1) * 64)
        return jnp.asarray(data.x_train[s]), jnp.asarray(data.y_train[s])

    params = _warm_up(loss, params, batches, warmup)
    return Model("digits CNN(48, 96)", params, batches(warmup), loss, groups,
                 hj.CricConfig(sample_steps=5, learning_rate=0.03), batches,
                 (jnp.asarray(data.x_test), jnp.asarray(data.y_test)))


def bert_model(warmup: int) -> Model:
    """BERT-like 4×256 (4 heads, MLP 1024), 8×64 tokens, distilling a random teacher.

    Run at initialisation by default (``--bert-warmup 0``): there CRIC with ``η = 0.1``
    runs 20–30 corrective cycles of a few groups each, the case of the issue.
    """
    from hesso_jax.models.bert import BertEncoder

    def encoder(seed: int) -> BertEncoder:
        return BertEncoder(vocab_size=1000, max_len=64, d_model=256, num_heads=4,
                           mlp_dim=1024, depth=4, rngs=nnx.Rngs(seed))

    student, teacher = encoder(0), encoder(1)
    ids0 = jax.random.randint(jax.random.key(0), (8, 64), 0, 1000)
    groups = hj.discover_groups(student, ids0)
    graphdef, params, rest = _split(student)

    def loss(p: Pytree, b: Pytree) -> jax.Array:
        out = nnx.merge(graphdef, p, jax.tree.map(lambda v: v, rest))(b[0])
        return jnp.mean((out - b[1]) ** 2)

    def batches(i: int) -> Pytree:
        ids = jax.random.randint(jax.random.key(100 + i), (8, 64), 0, 1000)
        return ids, teacher(ids)

    params = _warm_up(loss, params, batches, warmup)
    return Model("BERT-like 4×256", params, batches(warmup), loss, groups,
                 hj.CricConfig(sample_steps=5, learning_rate=0.1), batches,
                 batches(10_000))


BUILDERS = {"cnn": cnn_model, "bert": bert_model}


@contextlib.contextmanager
def stock_layout() -> Iterator[None]:
    """CRIC traced without the convolution layout rewrite (the ``before`` figure)."""
    saved = cric_module.canonical_convs
    cric_module.canonical_convs = lambda fn: fn
    try:
        yield
    finally:
        cric_module.canonical_convs = saved


VARIANTS = ("adam", "hesso", "cric", "cric cap3", "cric stock")
CAP = 3


def train_step(model: Model, tx: optax.GradientTransformationExtraArgs
               ) -> Callable[[Pytree, Pytree, Pytree], tuple[Pytree, Pytree, jax.Array]]:
    """``step(params, opt_state, batch) -> (params, opt_state, loss)``: forward, backward,
    ``tx.update`` with ``value_fn`` (the loss on the batch, for CRIC), ``apply_updates``."""

    def step(params: Pytree, opt_state: Pytree, batch: Pytree) -> tuple:
        loss, grads = jax.value_and_grad(model.loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params,
                                       value_fn=lambda p: model.loss(p, batch))
        return optax.apply_updates(params, updates), opt_state, loss

    return step


class Case:
    """One compiled step of a variant and the HESSO state it is called with per kind."""

    def __init__(self, model: Model, variant: str):
        base = optax.adam(1e-3)
        cric = None if variant in ("adam", "hesso") else model.cric
        if variant == "cric cap3":
            cric = dataclasses.replace(cric, max_cycles=CAP)
        self.tx = base if variant == "adam" else optax.chain(
            base, hj.hesso(model.groups, 0.5, P, TP, warmup_steps=TW, cric=cric))
        self.model, self.variant = model, variant
        self.init = self.tx.init(model.params)
        G = model.groups.num_groups
        self.mask = np.arange(G) < schedule_counts(resolve_count(0.5, G), P)[0]
        ctx = stock_layout() if variant == "cric stock" else contextlib.nullcontext()
        with ctx:
            self.step = jax.jit(train_step(model, self.tx)).lower(
                model.params, self.init, model.batch).compile()

    def state(self, kind: str) -> Pytree:
        """A fresh copy of the optimizer state at ``kind``'s count."""
        count = TW + TP + 3 if kind == "ordinary" else TW
        mask = self.mask if kind == "ordinary" else np.zeros_like(self.mask)

        def fix(s: Any) -> Any:
            if isinstance(s, HessoState):
                s = s._replace(count=jnp.int32(count), redundant=jnp.asarray(mask))
                return HessoState(*(jnp.array(a, copy=True) for a in s))
            return jnp.array(s, copy=True)

        return jax.tree.map(fix, self.init, is_leaf=lambda s: isinstance(s, HessoState))

    def call(self, kind: str) -> Callable[[], Any]:
        """A zero-argument call of the step at ``kind`` (its state prepared once)."""
        state = self.init if self.variant == "adam" else self.state(kind)
        jax.block_until_ready(state)
        return lambda: self.step(self.model.params, state, self.model.batch)


class GradientFloor:
    """``n`` loss gradients back to back in a ``lax.fori_loop``: CRIC's floor at ``n``.

    Each iteration is what a trial step must do at least: ``∇f(x)`` (through
    `hesso_jax.cric.canonical_convs`, as CRIC runs it) and a move of ``x`` along it, so the
    next gradient is taken at a new point (nothing is loop-invariant).
    """

    def __init__(self, model: Model, n: int):
        value_and_grad = cric_module.canonical_convs(
            jax.value_and_grad(lambda p: model.loss(p, model.batch)))

        def run(params: Pytree) -> jax.Array:
            def body(_: jax.Array, carry: tuple[Pytree, jax.Array]
                     ) -> tuple[Pytree, jax.Array]:
                x, total = carry
                loss, grads = value_and_grad(x)
                return jax.tree.map(lambda a, g: a - 1e-4 * g, x, grads), total + loss

            return jax.lax.fori_loop(0, n, body, (params, jnp.zeros([], jnp.float32)))[1]

        self.model = model
        self.step = jax.jit(run).lower(model.params).compile()

    def call(self, kind: str) -> Callable[[], Any]:
        """The zero-argument call (``kind`` is ignored: always the period start's count)."""
        return lambda: self.step(self.model.params)


def selection(case: Case) -> tuple[int, np.ndarray]:
    """Corrective cycles and groups selected at the period start (CRIC variants)."""
    _, state, _ = case.call("start")()
    status = hj.hesso_status(state)
    return status.cric_cycles, status.redundant


def amortised(med: dict[str, float], variant: str, over: str) -> float:
    """Reference-schedule cost of ``variant`` over ``over`` (``"adam"`` or ``"hesso"``).

    ``P`` period starts at ``variant``'s start median, the other steps at the ordinary
    HESSO-CRIC step; over ``T`` Adam steps, or over greedy HESSO's schedule priced the same
    way (one ordinary median for both, so load on the machine cancels).
    """
    _, periods, _, total = REFERENCE
    ordinary = med["cric/ordinary"]
    cost = periods * med[f"{variant}/start"] + (total - periods) * ordinary
    if over == "adam":
        return cost / (total * med["adam/ordinary"])
    return cost / (periods * med["hesso/start"] + (total - periods) * ordinary)


class Trace(NamedTuple):
    """CRIC's trials at a period start, one by one (`trace_trials`).

    Attributes:
      violating: ``bool[N, G]`` trial ``c``'s violating set ``V_c`` (``V_0`` greedy).
      acc: ``float32[N, G]`` the accumulated scores ``A`` after trial ``c``.
      sizes: ``|V|`` found after each trial (the last one ``≤ tolerance``, or the cap hit).
      selected: ``bool[G]`` ``bottom_K(A)`` after the last trial.
    """

    violating: np.ndarray
    acc: np.ndarray
    sizes: list[int]
    selected: np.ndarray


def trace_trials(model: Model, k: int) -> Trace:
    """The cycle of `hesso_jax.cric.cric_select` (all groups candidates, count ``k``) run
    trial by trial from Python, each trial compiled once and called with ``(V, A)``.

    The same trial function (`hesso_jax.cric._trial_fn`), the same saliency (the equal
    norm mix, HESSO's default) and the same stopping rule (``|V| ≤ tolerance`` or more than
    ``cap`` corrective cycles); finite trials only (asserted).
    """
    cfg, groups, G = model.cric, model.groups, model.groups.num_groups
    saliency = resolve_saliency(cfg.saliency, normalize="norm")
    layout = groups.layout(model.params, dependents="present")
    value_and_grad = cric_module.canonical_convs(
        jax.value_and_grad(lambda p: model.loss(p, model.batch)))

    def direction(x: Pytree) -> tuple[jax.Array, Pytree]:
        loss, grads = value_and_grad(x)
        return loss, jax.tree.map(lambda g: (-cfg.learning_rate * g).astype(g.dtype), grads)

    @jax.jit
    def start(params: Pytree) -> tuple[jax.Array, Pytree, jax.Array]:
        loss0, u0 = direction(params)
        return loss0, u0, evaluate(saliency, params, u0, groups)

    @jax.jit
    def trial(params: Pytree, first: tuple, violating: jax.Array, acc: jax.Array) -> tuple:
        return cric_module._trial_fn(direction, saliency, groups, layout, params,
                                     cfg.sample_steps, first)(violating, acc)

    first = start(model.params)
    everyone = jnp.ones([G], bool)
    violating, tested, acc = bottom_k(first[2], everyone, k), jnp.zeros([G], bool), None
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    sizes: list[int] = []
    while True:
        acc, finite = trial(model.params, first, violating,
                            jnp.zeros([G], jnp.float32) if acc is None else acc)
        assert bool(finite), "a trial was rejected: the trace covers finite trials only"
        rows.append((np.asarray(violating), np.asarray(acc)))
        tested = tested | violating
        violating = bottom_k(acc, everyone, k) & ~tested
        sizes.append(int(jnp.sum(violating)))
        if sizes[-1] <= cfg.tolerance or len(rows) > cfg.cycle_cap(G, k):
            break
    return Trace(np.stack([v for v, _ in rows]), np.stack([a for _, a in rows]), sizes,
                 np.asarray(bottom_k(acc, everyone, k)))


def speculate(trace: Trace, k: int, batch: int) -> int:
    """Sequential passes of the same cycle with ``batch`` trials per pass, speculatively.

    Each pass runs the next trial (its ``V`` known) and ``batch − 1`` guessed ones: the
    cycle continued with every unknown trial's scores taken as ``T_{c−1}``, the last one
    computed (none before the first trial: that pass runs it alone). The guesses are kept
    while each guessed ``V`` equals the true one read from the accumulated scores of the
    trials before it; the first wrong guess and all after it are discarded. Accepted trials
    are the cycle's own, so the selection is the same.
    """
    n = len(trace.acc)
    everyone = jnp.ones([trace.acc.shape[1]], bool)
    T = np.diff(trace.acc, axis=0, prepend=0.0)
    c, passes = 0, 0
    while c < n:
        passes += 1
        guesses, acc = [], trace.acc[c - 1] if c else np.zeros_like(T[0])
        tested = trace.violating[:c + 1].any(0)
        for _ in range(batch - 1 if c else 0):
            acc = acc + T[max(c - 1, 0)]
            guess = np.asarray(bottom_k(jnp.asarray(acc), everyone, k)) & ~tested
            if not guess.any():
                break
            guesses.append(guess)
            tested = tested | guess
        c += 1
        for guess in guesses:
            if c >= n or not np.array_equal(guess, trace.violating[c]):
                break
            c += 1
    return passes


def what_if(trace: Trace, model: Model, k: int) -> list[dict[str, Any]]:
    """Trials, sequential passes, gradients, groups shared with the full cycle and the loss
    with the selection zeroed at ``x⁰``, for other stopping rules and for speculation."""
    G, S, tol = model.groups.num_groups, model.cric.sample_steps, model.cric.tolerance
    everyone = jnp.ones([G], bool)
    zeroed = jax.jit(lambda keep: model.loss(model.groups.mask(model.params, keep),
                                             model.batch))

    def row(setting: str, trials: int, passes: int, gradients: int) -> dict[str, Any]:
        sel = np.asarray(bottom_k(jnp.asarray(trace.acc[trials - 1]), everyone, k))
        return {"setting": setting, "trials": trials, "passes": passes,
                "gradients": gradients, "shared": int(np.sum(sel & trace.selected)),
                "zeroed_loss": float(zeroed(jnp.asarray(~sel)))}

    n = len(trace.acc)
    rows = [row(f"tolerance={tol} (the run)", n, n, model.cric.gradient_count(n))]
    for t in (tol + 1, tol + 2, tol + 4):
        m = next(i for i, size in enumerate(trace.sizes) if size <= t) + 1
        rows.append(row(f"tolerance={t}", m, m, model.cric.gradient_count(m)))
    for cap in (3, 10):
        m = min(cap + 1, n)
        rows.append(row(f"max_cycles={cap}", m, m, model.cric.gradient_count(m)))
    for batch in (2, 4, 8):
        passes = speculate(trace, k, batch)  # a jitted batch has B trials every pass
        rows.append(row(f"speculative batch of {batch}", n, passes,
                        1 + (S - 1) * batch * passes))
    return rows


def run_model(name: str, args: Any) -> dict[str, Any]:
    """Compiles, times (interleaved) and summarises one model."""
    model = BUILDERS[name](args.warmup if name == "cnn" else args.bert_warmup)
    has_conv = name == "cnn"
    variants = [v for v in VARIANTS if v != "cric stock" or (args.stock and has_conv)]
    cases: dict[str, Any] = {v: Case(model, v) for v in variants}
    selected = {v: selection(c) for v, c in cases.items() if v.startswith("cric")}
    gradients = model.cric.gradient_count(selected["cric"][0] + 1)
    cases["floor"] = GradientFloor(model, gradients)
    timed = [*variants[1:], "floor"]
    calls = {"adam/ordinary": cases["adam"].call("ordinary")}
    for v in timed:
        kinds = ("start",) if v in ("cric stock", "floor") else KINDS
        calls.update({f"{v}/{k}": cases[v].call(k) for k in kinds})
    med = common.medians(common.interleaved(calls, args.rounds))
    ordinary = med["cric/ordinary"]
    G = model.groups.num_groups
    row: dict[str, Any] = {
        "model": model.name, "G": G,
        "k_hat": int(schedule_counts(resolve_count(0.5, G), P)[0]),
        "cric": {"sample_steps": model.cric.sample_steps,
                 "learning_rate": model.cric.learning_rate,
                 "tolerance": model.cric.tolerance, "max_cycles": model.cric.max_cycles},
        "medians_s": med, "rounds": args.rounds,
        "cycles": {v: selected[v][0] for v in selected},
        "same_selection_as_cric": {v: int(np.sum(selected[v][1] & selected["cric"][1]))
                                   for v in selected},
        "start_over_ordinary": {v: med[f"{v}/start"] / ordinary for v in timed},
        "gradients": gradients,
        "gradients_cap3": model.cric.gradient_count(selected["cric cap3"][0] + 1),
    }
    if args.trace:
        row.update(trace_summary(model, row["k_hat"], selected["cric"]))
    return row


def trace_summary(model: Model, k: int, cric: tuple[int, np.ndarray]) -> dict[str, Any]:
    """`trace_trials` and `what_if` at the period start, checked against HESSO-CRIC's
    ``(cycles, selection)`` there."""
    trace = trace_trials(model, k)
    same = len(trace.acc) - 1 == cric[0] and np.array_equal(trace.selected, cric[1])
    return {"violating_sizes": trace.sizes, "trace_equals_hesso_cric": bool(same),
            "what_if": what_if(trace, model, k)}


LABELS = {"hesso": "HESSO (greedy)", "cric": "HESSO-CRIC", "cric cap3":
          f"HESSO-CRIC, max_cycles={CAP}", "cric stock": "HESSO-CRIC, stock conv layout",
          "floor": "HESSO-CRIC's gradients alone (floor)"}


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the RESULTS section: one line per (model, variant)."""
    lines = ["| model (G, K̂, CRIC) | variant | cycles | gradients | period start | "
             "start / ordinary | amortised over greedy HESSO | amortised over Adam | "
             "groups shared with HESSO-CRIC |", "|" + "---|" * 9]
    for r in rows:
        med, c, kh = r["medians_s"], r["cric"], r["k_hat"]
        model = (f"{r['model']} (G={r['G']}, K̂={r['k_hat']}, S={c['sample_steps']}, "
                 f"η={c['learning_rate']:g}, tol={c['tolerance']}); ordinary "
                 f"{med['cric/ordinary'] * 1e3:.1f} ms, Adam {med['adam/ordinary'] * 1e3:.1f} ms")
        for v, ratio in r["start_over_ordinary"].items():
            cyc = r["cycles"].get(v)
            grads = {"cric": r["gradients"], "cric cap3": r["gradients_cap3"]}.get(v)
            if v in ("cric stock", "floor"):
                grads = r["gradients"]
            am = {o: f"{amortised(med, v, o):.3f}×" if f"{v}/start" in med else "–"
                  for o in ("hesso", "adam")}
            shared = r["same_selection_as_cric"].get(v)
            lines.append(
                f"| {model} | {LABELS[v]} | {'–' if cyc is None else cyc} | "
                f"{'–' if grads is None else grads} | {med[f'{v}/start'] * 1e3:.0f} ms | "
                f"**{ratio:.1f}×** | {am['hesso']} | {am['adam']} | "
                f"{'–' if shared is None else f'{shared} / {kh}'} |")
            model = ""
    return "\n".join(lines)


def format_what_if(rows: list[dict[str, Any]]) -> str:
    """The trial-trace table: one line per (model, stopping rule or speculation)."""
    lines = ["| model | setting | trials | sequential passes | gradients | est. start / "
             "ordinary at the floor's cost per gradient | groups shared with the run | "
             "loss, selection zeroed at x⁰ |", "|" + "---|" * 8]
    for r in rows:
        if "what_if" not in r:
            continue
        model = (f"{r['model']} (violating-set sizes after each trial: "
                 f"{', '.join(map(str, r['violating_sizes']))}; trace = HESSO-CRIC's start: "
                 f"{'yes' if r['trace_equals_hesso_cric'] else '**no**'})")
        per_gradient = r["start_over_ordinary"]["floor"] / r["gradients"]
        for w in r["what_if"]:
            lines.append(
                f"| {model} | {w['setting']} | {w['trials']} | {w['passes']} | "
                f"{w['gradients']} | {w['gradients'] * per_gradient:.0f}× | "
                f"{w['shared']} / {r['k_hat']} | {w['zeroed_loss']:.4g} |")
            model = ""
    return "\n".join(lines)


def section_body(env: dict[str, Any], rows: list[dict[str, Any]], args: dict[str, Any],
                 command: str) -> str:
    """The RESULTS section: command, machine, definitions, table."""
    return "\n\n".join([
        f"Command: `{command}`. Machine: {common.environment_line(env)} — a **shared 2-core "
        "CPU** (other jobs ran at the same time; the load average is in that line), so "
        "absolute times are only indicative; the ratios are ratios of medians over "
        f"{args['rounds']} interleaved rounds (compile excluded).",
        "Ratios are to the ordinary HESSO-CRIC step (inside period 1, K̂ groups "
        "projected). *Period start*: the first one after the warm-up (nothing pruned "
        f"yet; T_w={TW}, P={P}, T_p={TP}, K = 50 % of G): the CNN after "
        f"{args['warmup']} Adam steps on digits, BERT after {args['bert_warmup']}. "
        f"*max_cycles={CAP}*: the same CRIC capped at {CAP} corrective cycles (it changes "
        "the selection where more would run: last column, groups selected by both). "
        "*stock conv layout* (CNN only): the same step compiled with CRIC's convolution "
        "layout rewrite switched off — the figure before that fix. Gradients: loss "
        "gradients CRIC evaluates at that start, `CricConfig.gradient_count`. Amortised: "
        "the reference schedule (T_w=200, P=5, T_p=100, 1000 steps) priced with the "
        "medians (P starts, the other steps at the ordinary step), over greedy HESSO's "
        "schedule priced the same way, or over 1000 Adam steps (noisier: two medians). "
        "*gradients alone (floor)*: that many loss gradients back to back in a "
        "`lax.fori_loop` and nothing else — what the period start costs at least for the "
        "trials it ran.",
        format_rows(rows),
        "Trial trace: the same cycle run trial by trial (the standalone `hj.cric` with K̂, "
        "checked to select what HESSO-CRIC's start selected). Other stopping rules are "
        "read off it (the cycle is the same up to where they stop; shared: groups also in "
        "the run's selection); *speculative batch of B*: each sequential pass runs the "
        "next trial and B − 1 guessed ones (the cycle continued with every unknown trial's "
        "scores taken as the last computed trial's), keeping the guesses while each "
        "guessed violating set equals the true one — the run's own trials, so the same "
        "selection, in fewer sequential passes but with more gradients. Est. start / "
        "ordinary: gradients × the floor's cost per gradient (on this CPU a batch of B "
        "gradients costs B gradients; a batch runs B trials every pass, guessed or not; "
        "where a batch costs about one gradient, passes × (S − 1) would count instead). "
        "Loss: the period's loss with the selected groups zeroed at x⁰.",
        format_what_if(rows),
    ])


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark (or re-renders a saved JSON) and publishes its RESULTS section."""
    p = common.parser(__doc__)
    p.add_argument("--models", default="cnn,bert")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=200,
                   help="Adam steps on digits before the CNN's period start")
    p.add_argument("--bert-warmup", type=int, default=0,
                   help="Adam steps before BERT's period start (0: at initialisation)")
    p.add_argument("--no-stock", dest="stock", action="store_false",
                   help="skip the stock-layout (before) variant")
    p.add_argument("--no-trace", dest="trace", action="store_false",
                   help="skip the trial trace and its what-if table")
    p.add_argument("--render", type=Path, default=None,
                   help="re-render the section from this cric_cost.json (no timing)")
    args = p.parse_args(argv)
    if args.render is not None:
        results = json.loads(args.render.read_text())
    else:
        rows = [run_model(name, args) for name in args.models.split(",")]
        results = {"environment": common.environment(), "rows": rows,
                   "command": common.command_line("cric_cost.py", argv),
                   "args": {k: getattr(args, k) for k in ("rounds", "warmup", "bert_warmup")}}
    body = section_body(results["environment"], results["rows"], results["args"],
                        results["command"])
    common.publish(args.out, SECTION, body, results=results, json_name="cric_cost.json",
                   write=not args.no_write)


if __name__ == "__main__":
    main()
