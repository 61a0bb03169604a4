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
  ``before`` figure of the convolution fix.

Kinds: *ordinary* (a count inside pruning period 1, its ``K̂`` groups being projected) and
*start* (the first period start, after the warm-up, nothing pruned). The HESSO state is
rebuilt with the chosen ``count`` before every call, outside the timed region, so every
timed call runs the same branch. Calls are interleaved round after round
(`common.interleaved`) and the ratios are ratios of medians. Amortised: the reference
schedule (``T_w = 200``, ``P = 5``, ``T_p = 100``, 1000 steps) priced with the medians
(``P`` starts at *start*, the other steps at *ordinary*) over 1000 base steps.

Also reported: CRIC's corrective cycles and trial gradients at that period start (from
`hesso_jax.hesso_status` after the step).

Usage::

    python benchmarks/cric_cost.py                # both models (~5 min on 2 cores)
    python benchmarks/cric_cost.py --models cnn --rounds 5 --no-write
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
                 hj.CricConfig(sample_steps=5, learning_rate=0.03))


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
                 hj.CricConfig(sample_steps=5, learning_rate=0.1))


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
            self.step = jax.jit(self._step).lower(model.params, self.init,
                                                  model.batch).compile()

    def _step(self, params: Pytree, opt_state: Pytree, batch: Pytree) -> tuple:
        loss, grads = jax.value_and_grad(self.model.loss)(params, batch)
        updates, opt_state = self.tx.update(
            grads, opt_state, params, value_fn=lambda p: self.model.loss(p, batch))
        return optax.apply_updates(params, updates), opt_state, loss

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


def run_model(name: str, args: Any) -> dict[str, Any]:
    """Compiles, times (interleaved) and summarises one model."""
    model = BUILDERS[name](args.warmup if name == "cnn" else args.bert_warmup)
    has_conv = name == "cnn"
    variants = [v for v in VARIANTS if v != "cric stock" or (args.stock and has_conv)]
    cases = {v: Case(model, v) for v in variants}
    calls = {"adam/ordinary": cases["adam"].call("ordinary")}
    for v in variants[1:]:
        kinds = ("start",) if v == "cric stock" else KINDS
        calls.update({f"{v}/{k}": cases[v].call(k) for k in kinds})
    times = common.interleaved(calls, args.rounds)
    med = common.medians(times)
    ordinary = med["cric/ordinary"]
    S = model.cric.sample_steps
    selected = {v: selection(c) for v, c in cases.items() if v.startswith("cric")}
    row: dict[str, Any] = {
        "model": model.name, "G": model.groups.num_groups,
        "k_hat": int(schedule_counts(resolve_count(0.5, model.groups.num_groups), P)[0]),
        "cric": {"sample_steps": S, "learning_rate": model.cric.learning_rate,
                 "tolerance": model.cric.tolerance, "max_cycles": model.cric.max_cycles},
        "medians_s": med, "rounds": args.rounds,
        "cycles": {v: selected[v][0] for v in selected},
        "same_selection_as_cric": {v: int(np.sum(selected[v][1] & selected["cric"][1]))
                                   for v in selected},
        "start_over_ordinary": {v: med[f"{v}/start"] / ordinary for v in variants[1:]},
    }
    trials = row["cycles"]["cric"] + 1
    row["gradients"] = model.cric.gradient_count(trials)
    row["gradients_cap3"] = model.cric.gradient_count(row["cycles"]["cric cap3"] + 1)
    return row


LABELS = {"hesso": "HESSO (greedy)", "cric": "HESSO-CRIC", "cric cap3":
          f"HESSO-CRIC, max_cycles={CAP}", "cric stock": "HESSO-CRIC, stock conv layout"}


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
            if v == "cric stock":
                grads = r["gradients"]
            am = {o: f"{amortised(med, v, o):.3f}×" for o in ("hesso", "adam")}
            shared = r["same_selection_as_cric"].get(v)
            lines.append(
                f"| {model} | {LABELS[v]} | {'–' if cyc is None else cyc} | "
                f"{'–' if grads is None else grads} | {med[f'{v}/start'] * 1e3:.0f} ms | "
                f"**{ratio:.1f}×** | {am['hesso']} | {am['adam']} | "
                f"{'–' if shared is None else f'{shared} / {kh}'} |")
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
        "schedule priced the same way, or over 1000 Adam steps (noisier: two medians).",
        format_rows(rows),
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
