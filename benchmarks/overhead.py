"""Per-step time overhead of HESSO on CPU: ``optax.adam`` alone vs ``adam`` + ``hesso``.

For each configuration one jitted training step (forward + backward + optimizer update +
``optax.apply_updates``) is compiled for the base optimizer and for the HESSO chain, then
timed on four kinds of HESSO step and over a whole pruning schedule:

* *warm-up*: ``count`` inside the warm-up phase;
* *ordinary* (a): inside pruning period ``p = 1`` but not at its start (projection active);
  the representative per-step cost. Every HESSO step includes the placement probe (8 sampled
  parameter elements compared bit for bit with the previous update, `hesso_jax.placement`);
* *start p=0*: the first period start (saliency + group selection under ``lax.cond``);
* *start p>=1* (b): a later period start (selection + the placement check that follows every
  period end, a ``jax.pure_callback`` on that step only);
* *amortised* (c): a full schedule (warm-up, ``P`` periods, fine-tune) with the state carried
  forward, ``mean_t median_r time(step t of repeat r)`` vs the same for the base optimizer;
  also *estimated* for the reference schedule from the kind-of-step medians.

The kind-of-step timings are deterministic: the HESSO state is built with a chosen
``count`` and the same jitted step is called again and again on the *same* inputs (the new
state is discarded), so every timed call runs the same branch. Base and HESSO calls are
interleaved in rotating rounds, each call is followed by ``block_until_ready``, compile
time is excluded, and medians are reported because the machine may be shared. Every call
records wall-clock time (the headline numbers) and process CPU time (a second table, less
sensitive to other processes competing for the cores).

Usage::

    python benchmarks/overhead.py            # full run (~4-6 minutes on 2 CPU cores)
    python benchmarks/overhead.py --quick    # smoke test (~1 minute on an idle machine)
    python benchmarks/overhead.py --targets  # issue 14's targets, every model, donated or not

*Targets* (``--targets``, written to ``overhead_targets.md`` / ``.json``): for every model
of ``benchmarks/step_cost.py`` (digits CNN, TinyTransformer, BERT-like 4×256, MLP
64→10000→1000→10 with 10.7 M params and G = 11 000, and ``64→G→10`` MLPs with G = 10² …
10⁵), compiled with and without buffer donation, ``optax.adam(1e-3)`` against
``optax.chain(adam, hesso(...))`` (the chain form, default direction ``u``) and
``hesso(..., base=adam)`` (the fused form), with the default ``on_fault="raise"`` and with
``on_fault="record"`` (no host callback in the step), interleaved, ratios of medians
(`step_cost.run_model`): ordinary step ≤ 1.03×, period start ≤ 1.5×, amortised over the
reference schedule ≤ 1.05×, scratch ≤ the base's + O(G) (here: 256 bytes per group, the
allowance of ``tests/test_step_structure.py``). With ``--target-loop N`` the donated rows
also get the ordinary step timed as a training loop runs it (`step_cost.Case.loop`:
``N`` steps dispatched back to back, outputs fed back; Adam and every form interleaved)
and the verdict ``loop`` (that ratio ≤ 1.03×).

Writes ``overhead.md``, ``overhead.json`` and (unless ``--no-results-md``) the section
``## HESSO per-step overhead`` of ``RESULTS.md`` in ``--out`` (default: the directory of
this script).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import upsert_section
from flax import nnx
from tqdm import tqdm

import hesso_jax as hj
from hesso_jax.data import load_digits_split
from hesso_jax.hesso import resolve_count
from hesso_jax.models import CNN, MLP, TinyTransformer
from hesso_jax.train import make_step

BATCH = 64
LEARNING_RATE = 1e-3
PRUNE_FRACTION = 0.5
SECTION = "## HESSO per-step overhead"
KINDS = ("warmup", "ordinary", "start0", "start1")
KIND_LABELS = {
    "warmup": "warm-up",
    "ordinary": "ordinary (a)",
    "start0": "start p=0",
    "start1": "start p≥1 (b)",
}

BOLD = ("ordinary", "start1")

Pytree = Any
StepFn = Callable[[Pytree, Pytree, Pytree, jax.Array, jax.Array],
                  tuple[Pytree, Pytree, Pytree, jax.Array]]


# ---------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class Schedule:
    """HESSO schedule: ``warmup`` plain steps, ``periods`` x ``period_len``, then fine-tune."""

    warmup: int
    periods: int
    period_len: int
    total: int

    def __post_init__(self) -> None:
        if self.warmup < 4 or self.periods < 2 or self.period_len < 4:
            raise ValueError(f"schedule needs warmup >= 4, periods >= 2, period_len >= 4: {self}")
        if self.total < self.warmup + self.periods * self.period_len + 1:
            raise ValueError(f"schedule total {self.total} leaves no fine-tune step: {self}")

    def count(self, kind: str) -> int:
        """HESSO ``count`` at which the next update is a step of the given kind."""
        tw, tp = self.warmup, self.period_len
        return {"warmup": 3, "ordinary": tw + tp + 3, "start0": tw, "start1": tw + tp}[kind]

    def describe(self) -> str:
        return f"Tw={self.warmup}, P={self.periods}, Tp={self.period_len}, {self.total} steps"


REFERENCE = Schedule(warmup=200, periods=5, period_len=100, total=1000)


def estimate_amortised(kind_ms: dict[str, float], base_ms: float, sch: Schedule) -> float:
    """Amortised ratio over ``sch`` predicted from the kind-of-step medians.

    Warm-up steps cost ``warmup``, the first period start ``start0``, later ones ``start1``
    and every other step (pruning and fine-tune) ``ordinary``.
    """
    n_ordinary = sch.total - sch.warmup - sch.periods
    total = (sch.warmup * kind_ms["warmup"] + kind_ms["start0"]
             + (sch.periods - 1) * kind_ms["start1"] + n_ordinary * kind_ms["ordinary"])
    return total / (sch.total * base_ms)


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmarked model."""

    name: str
    build: Callable[[], nnx.Module]
    groups: Callable[[nnx.Module], hj.Groups]
    inputs: Callable[[np.ndarray], np.ndarray]
    schedule: Schedule
    section: str  # "reference" or "scaling"
    min_repeats: int = 1
    detail: Callable[[nnx.Module], str] | None = None  # appended to the name in reports


class WideMLP(nnx.Module):
    """``64 → G → 10`` MLP (relu); its ``G`` hidden neurons are the groups."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(64, width, rngs=rngs)])
        self.head = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(nnx.relu(self.layers[0](x.reshape(x.shape[0], -1))))


def wide_mlp_groups(model: nnx.Module) -> hj.Groups:
    """One family: neuron ``j`` = kernel column ``j`` + bias ``j``; dependent head row ``j``."""
    assert isinstance(model, WideMLP)
    width = model.layers[0].out_features
    return hj.Groups.from_families([hj.GroupFamily(
        width,
        (hj.Member(("layers", 0, "kernel"), 1), hj.Member(("layers", 0, "bias"), 0)),
        (hj.Member(("head", "kernel"), 0),),
        name="hidden")])


def cnn_channels(model: nnx.Module) -> str:
    assert isinstance(model, CNN)
    return f"c1={model.stem.conv.out_features}, c2={model.down.conv.out_features}"


def reference_groups(model: nnx.Module) -> hj.Groups:
    """Discovered groups (equal, as sets, to the models' hand-written ``groups()``)."""
    shape = (1, 8, 8) if isinstance(model, TinyTransformer) else (1, 8, 8, 1)
    return hj.discover_groups(model, jnp.zeros(shape))


def build_configs(quick: bool) -> list[Config]:
    if quick:
        ref = Schedule(warmup=8, periods=2, period_len=8, total=40)
        sweep = ref
        widths = [100, 10_000]
    else:
        ref = REFERENCE
        # A short schedule for the sweep (a G = 1e5 step takes ~0.1-0.3 s here): 2 period
        # starts in 100 steps, 4x the reference's share; see also the estimate column.
        sweep = Schedule(warmup=20, periods=2, period_len=20, total=100)
        widths = [100, 1_000, 10_000, 100_000]
    min_repeats = 1 if quick else 2  # the reference models' schedules run at least twice
    images = lambda x: x  # noqa: E731  (B, 8, 8, 1)
    rows = lambda x: x[..., 0]  # noqa: E731  (B, 8, 8): rows are tokens
    configs = [
        Config("MLP(64,(256,256),10)", lambda: MLP(64, (256, 256), 10, rngs=nnx.Rngs(0)),
               reference_groups, images, ref, "reference", min_repeats),
        Config("CNN()", lambda: CNN(rngs=nnx.Rngs(0)), reference_groups, images, ref,
               "reference", min_repeats, cnn_channels),
        Config("TinyTransformer()", lambda: TinyTransformer(rngs=nnx.Rngs(0)),
               reference_groups, rows, ref, "reference", min_repeats),
    ]
    for g in widths:
        configs.append(Config(f"MLP 64→{g}→10", lambda g=g: WideMLP(g, rngs=nnx.Rngs(0)),
                              wide_mlp_groups, images, sweep, "scaling"))
    return configs


# ---------------------------------------------------------------------------- training step
def with_hesso_state(opt_state: Pytree, count: int, redundant: np.ndarray) -> Pytree:
    """``opt_state`` with its `HessoState`'s ``count`` and ``redundant`` mask replaced."""

    def replace(s: Any) -> Any:
        if isinstance(s, hj.HessoState):
            return s._replace(count=jnp.int32(count), redundant=jnp.asarray(redundant))
        return s

    return jax.tree.map(replace, opt_state, is_leaf=lambda s: isinstance(s, hj.HessoState))


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Collects once, then keeps the cyclic garbage collector out of the timed region."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def timed_call(fn: Callable[[], Any]) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of ``fn()`` until its result is ready.

    Process CPU time (all threads) does not count time spent waiting for a core, so it is
    less sensitive than wall time to other processes competing for the CPU.
    """
    c0, t0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0, time.process_time() - c0


def time_interleaved(calls: dict[str, Callable[[], Any]], rounds: int, per_block: int,
                     warm: bool) -> dict[str, np.ndarray]:
    """``[calls, 2]`` (wall, CPU) seconds per call, in rotating rounds (ABC, BCA, CAB, ...).

    In each round every callable runs ``per_block`` timed calls, preceded (if ``warm``) by
    one untimed call that warms its caches after the switch from the previous callable.
    """
    names = list(calls)
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    with no_gc():
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                fn = calls[name]
                if warm:
                    jax.block_until_ready(fn())
                times[name].extend(timed_call(fn) for _ in range(per_block))
    return {n: np.asarray(t) for n, t in times.items()}


class ScheduleRun:
    """A training run advanced a chunk at a time; records each step's (wall, CPU) seconds."""

    def __init__(self, step: StepFn, params: Pytree, rest: Pytree, opt_state: Pytree,
                 batches: list[tuple[jax.Array, jax.Array]]):
        self.step = step
        self.state = (params, rest, opt_state)
        self.batches = batches
        self.times = np.zeros((len(batches), 2))
        self.position = 0

    @property
    def done(self) -> bool:
        return self.position >= len(self.batches)

    def advance(self, n: int) -> None:
        stop = min(self.position + n, len(self.batches))
        for i in range(self.position, stop):
            x, y = self.batches[i]
            params, rest, opt_state = self.state
            c0, t0 = time.process_time(), time.perf_counter()
            out = jax.block_until_ready(self.step(params, rest, opt_state, x, y))
            self.times[i] = time.perf_counter() - t0, time.process_time() - c0
            self.state = out[:3]
        self.position = stop


# ---------------------------------------------------------------------------- measurement
@dataclasses.dataclass
class Result:
    """Measured times of one configuration (milliseconds) and ratios to the base step."""

    name: str
    section: str
    num_groups: int
    num_params: int
    schedule: str
    compile_s: dict[str, float]
    base_ms: float
    kind_ms: dict[str, float]
    kind_ratio: dict[str, float]
    kind_calls: int
    amortised_base_ms: float
    amortised_hesso_ms: float
    amortised_ratio: float
    amortised_repeats: int
    estimated_ratio: float
    base_cpu_ms: float
    kind_cpu_ratio: dict[str, float]
    amortised_cpu_ratio: float
    pruned: int
    target_pruned: int


def measure(cfg: Config, data: Any, args: argparse.Namespace,
            rng: np.random.Generator) -> Result:
    model = cfg.build()
    groups = cfg.groups(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    sch = cfg.schedule
    hesso_tx = hj.hesso(groups, PRUNE_FRACTION, sch.periods, sch.period_len,
                        warmup_steps=sch.warmup)
    txs = {"base": optax.adam(LEARNING_RATE),
           "hesso": optax.chain(optax.adam(LEARNING_RATE), hesso_tx)}
    steps = {k: make_step(graphdef, tx) for k, tx in txs.items()}
    init = {k: tx.init(params) for k, tx in txs.items()}

    G = groups.num_groups
    k_total = resolve_count(PRUNE_FRACTION, G)
    per_period = k_total // sch.periods
    redundant = np.arange(G) < per_period  # cost is data-independent; any mask will do
    no_mask = np.zeros(G, bool)
    opt_states = {"base": init["base"]}
    for kind in KINDS:
        mask = redundant if kind == "ordinary" else no_mask
        opt_states[kind] = with_hesso_state(init["hesso"], sch.count(kind), mask)

    x = jnp.asarray(cfg.inputs(data.x_train[:BATCH]))
    y = jnp.asarray(data.y_train[:BATCH])
    compile_s = {}
    for k, step in steps.items():
        opt = opt_states["base" if k == "base" else "ordinary"]
        compile_s[k] = timed_call(lambda s=step, o=opt: s(params, rest, o, x, y))[0]

    # (a), (b): the same jitted step on the same inputs, state not carried forward.
    calls: dict[str, Callable[[], Any]] = {}
    for name, opt in opt_states.items():
        step = steps["base" if name == "base" else "hesso"]
        calls[name] = lambda s=step, o=opt: s(params, rest, o, x, y)
    per_call = {n: timed_call(fn)[0] for n, fn in calls.items()}  # one each, to size rounds
    # Timed calls per kind: what fits in the budget, within [min_calls, calls]; at least
    # `min_rounds` rounds; a warming call per block only where steps are short.
    sweep_s = sum(per_call.values())
    n_calls = int(np.clip(args.budget / sweep_s, args.min_calls, max(args.min_calls, args.calls)))
    per_block = max(1, min(args.per_block, n_calls // args.min_rounds))
    rounds = -(-n_calls // per_block)
    kind_times = time_interleaved(calls, rounds, per_block, warm=sweep_s < 0.1)
    med = {n: float(np.median(t[:, 0])) * 1e3 for n, t in kind_times.items()}
    med_cpu = {n: float(np.median(t[:, 1])) * 1e3 for n, t in kind_times.items()}

    # (c): whole schedules with the state carried forward, base and HESSO interleaved in
    # chunks; per step, the median over repeats, then the mean over the schedule.
    batches = []
    for _ in range(sch.total):
        idx = rng.integers(0, len(data.x_train), BATCH)
        batches.append((jnp.asarray(cfg.inputs(data.x_train[idx])),
                        jnp.asarray(data.y_train[idx])))
    pair_s = (med["base"] + med["ordinary"]) / 1e3
    repeats = int(np.clip(args.schedule_budget // (sch.total * pair_s), cfg.min_repeats,
                          max(cfg.min_repeats, args.repeats)))
    chunk = int(np.clip(round(args.chunk_s / pair_s), 1, args.chunk))
    runs: dict[str, list[ScheduleRun]] = {"base": [], "hesso": []}
    total_chunks = repeats * 2 * -(-sch.total // chunk)
    with tqdm(total=total_chunks, desc=f"  {cfg.name} schedule", leave=False) as bar:
        for r in range(repeats):
            current = {k: ScheduleRun(steps[k], params, rest, init[k], batches) for k in steps}
            order = ["base", "hesso"] if r % 2 == 0 else ["hesso", "base"]
            with no_gc():
                while not all(run.done for run in current.values()):
                    for k in order:
                        current[k].advance(chunk)
                    order.reverse()
                    bar.update(2)
            for k, run in current.items():
                runs[k].append(run)
    for k, step in steps.items():  # every timed call must have reused one executable
        n = step._cache_size()  # type: ignore[attr-defined]
        if n != 1:
            tqdm.write(f"warning: {cfg.name} {k} step was compiled {n} times")
    # [2] (wall, CPU): mean over steps of the median over repeats.
    amortised = {k: np.mean(np.median(np.stack([r.times for r in rs]), axis=0), axis=0) * 1e3
                 for k, rs in runs.items()}
    status = hj.hesso_status(runs["hesso"][-1].state[2])

    return Result(
        name=cfg.name + (f" [{cfg.detail(model)}]" if cfg.detail else ""),
        section=cfg.section,
        num_groups=G,
        num_params=sum(int(np.size(p)) for p in jax.tree.leaves(params)),
        schedule=sch.describe(),
        compile_s=compile_s,
        base_ms=med["base"],
        kind_ms={k: med[k] for k in KINDS},
        kind_ratio={k: med[k] / med["base"] for k in KINDS},
        kind_calls=len(kind_times["base"]),
        amortised_base_ms=float(amortised["base"][0]),
        amortised_hesso_ms=float(amortised["hesso"][0]),
        amortised_ratio=float(amortised["hesso"][0] / amortised["base"][0]),
        amortised_repeats=repeats,
        estimated_ratio=estimate_amortised(med, med["base"], REFERENCE),
        base_cpu_ms=med_cpu["base"],
        kind_cpu_ratio={k: med_cpu[k] / med_cpu["base"] for k in KINDS},
        amortised_cpu_ratio=float(amortised["hesso"][1] / amortised["base"][1]),
        pruned=status.num_pruned,
        target_pruned=status.target,
    )


# ---------------------------------------------------------------------------- reporting
def load_average() -> str:
    with contextlib.suppress(OSError, AttributeError):
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    return "n/a"


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "devices": ", ".join(str(d) for d in jax.devices()),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_start": load_average(),
    }


def _ms(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _cell(ms: float, ratio: float, bold: bool = False) -> str:
    r = f"**{ratio:.2f}×**" if bold else f"{ratio:.2f}×"
    return f"{_ms(ms)} ms ({r})"


def results_table(results: list[Result]) -> str:
    head = ["model", "G", "params", "base step", *(KIND_LABELS[k] for k in KINDS),
            "amortised (c), measured", "schedule (c)", "amortised, est. for ref. schedule"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r.name, f"{r.num_groups:,}", f"{r.num_params:,}", f"{_ms(r.base_ms)} ms",
               *(_cell(r.kind_ms[k], r.kind_ratio[k], bold=k in BOLD) for k in KINDS),
               f"{_ms(r.amortised_hesso_ms)} vs {_ms(r.amortised_base_ms)} ms "
               f"(**{r.amortised_ratio:.2f}×**)",
               f"{r.schedule}, {r.amortised_repeats} rep.",
               f"{r.estimated_ratio:.2f}×"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def cpu_table(results: list[Result]) -> str:
    head = ["model", "G", "base step (CPU)", *(KIND_LABELS[k] for k in KINDS),
            "amortised (c), measured"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r.name, f"{r.num_groups:,}", f"{_ms(r.base_cpu_ms)} ms",
               *(f"{r.kind_cpu_ratio[k]:.2f}×" for k in KINDS), f"{r.amortised_cpu_ratio:.2f}×"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def targets_text(results: list[Result], quick: bool) -> str:
    cnn = next((r for r in results if r.name.startswith("CNN()")), None)
    if cnn is None:
        return ""

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    a, c = cnn.kind_ratio["ordinary"], cnn.amortised_ratio
    e = cnn.estimated_ratio
    text = (f"Targets on the CNN: ordinary steps ≤ 1.05×: measured {a:.2f}× "
            f"({verdict(a <= 1.05)}); amortised ≤ 1.10×: measured {c:.2f}× "
            f"({verdict(c <= 1.10)}), estimated from the medians {e:.2f}× ({verdict(e <= 1.10)}).")
    if quick:
        text += " (`--quick`: a smoke test with a 40-step schedule, not a measurement.)"
    return text


def report(results: list[Result], info: dict[str, str], command: str, date: str,
           wall_s: float, quick: bool) -> str:
    notes = [
        f"- Command: `{command}` (wall time {wall_s:.0f} s).",
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['platform']}; "
        f"devices: {info['devices']}; load average (1/5/15 min) {info['load_start']} at the "
        f"start and {info['load_end']} at the end of the run (other processes share the CPU).",
        f"- Python {info['python']}, jax {info['jax']}, flax {info['flax']}, "
        f"optax {info['optax']}"
        + (f", XLA_FLAGS=`{info['xla_flags']}`" if info["xla_flags"] else "") + f"; {date}.",
        "",
        f"One jitted step (forward + backward + update + `apply_updates`), batch {BATCH} of "
        "scikit-learn digits, `optax.adam(1e-3)` (base) vs `optax.chain(optax.adam(1e-3), "
        f"hj.hesso(groups, {PRUNE_FRACTION}, P, Tp, warmup_steps=Tw))`. Cells: median time "
        "of the HESSO step and, in parentheses, the ratio of medians HESSO / base. Kinds of "
        "step are timed with a fixed `count` and the state not carried forward, base and "
        "HESSO interleaved in rotating rounds; every HESSO step includes the placement "
        "probe (8 sampled elements compared with the previous update); *start p≥1* "
        "includes the period-end placement check (a `jax.pure_callback` on that step "
        "only). "
        "*Amortised*: full schedule with the state carried forward, mean over steps of "
        "the per-step median over repeats, HESSO vs base (base and HESSO interleaved in "
        "chunks); under CPU contention this mean is noisier than the medians. "
        "*Est. for ref. schedule*: the "
        f"amortised ratio predicted from the medians for {REFERENCE.describe()} (warm-up "
        "steps at the warm-up cost, one start p=0, P-1 starts p≥1, every other step at the "
        "ordinary cost).",
        "",
        results_table(results),
        "",
        targets_text(results, quick),
        "",
        "Process CPU time (all threads of this process) of the same calls, as ratios HESSO "
        "/ base. It leaves out the time spent waiting for a core, so it is less sensitive "
        "to other processes' load than the wall-clock table above (but counts work on both "
        "cores as the sum).",
        "",
        cpu_table(results),
    ]
    missing = [r for r in results if r.pruned != r.target_pruned]
    if missing:
        notes.append("Warning: the amortised HESSO run did not prune its target for "
                     + ", ".join(f"{r.name} ({r.pruned}/{r.target_pruned})" for r in missing))
    return "\n".join(notes).rstrip() + "\n"


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny schedules, G in {1e2, 1e4}, few calls")
    p.add_argument("--repeats", type=int, default=None,
                   help="max repeats of each full schedule (default 3, quick 1)")
    p.add_argument("--calls", type=int, default=None,
                   help="max timed calls per kind of step (default 150, quick 20)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per config for the kind-of-step timings (default 8, quick 1)")
    p.add_argument("--schedule-budget", type=float, default=None,
                   help="seconds per config for the schedule repeats (default 45, quick 2)")
    p.add_argument("--min-rounds", type=int, default=4, help="min interleaved rounds (default 4)")
    p.add_argument("--min-calls", type=int, default=10,
                   help="min timed calls per kind (default 10)")
    p.add_argument("--per-block", type=int, default=5,
                   help="timed calls per block of a round (default 5)")
    p.add_argument("--chunk", type=int, default=50,
                   help="max steps per interleaved chunk of the schedule runs (default 50)")
    p.add_argument("--chunk-s", type=float, default=0.25,
                   help="target seconds per base+HESSO pair of schedule chunks (default 0.25)")
    p.add_argument("--only", default=None, help="regex: only the configs whose name matches")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order (default 0)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                   help="output directory (default: this script's directory)")
    p.add_argument("--targets", action="store_true",
                   help="issue 14's targets on every model, donated and not (see docstring)")
    p.add_argument("--target-models", default="cnn,transformer,bert,mlp10m,wide1e2,wide1e3,"
                   "wide1e4,wide1e5", help="step_cost.py model names for --targets")
    p.add_argument("--target-rounds", type=int, default=5,
                   help="interleaved rounds per (model, donation) for --targets (default 5)")
    p.add_argument("--target-loop", type=int, default=0, metavar="N",
                   help="--targets: also time N ordinary steps back to back (donated rows)")
    p.add_argument("--no-results-md", action="store_true",
                   help="write overhead.md/json only, not the section of RESULTS.md")
    args = p.parse_args(argv)
    defaults = {"repeats": (3, 1), "calls": (150, 20), "budget": (8.0, 1.0),
                "schedule_budget": (45.0, 2.0)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


TARGETS = {"ordinary": 1.03, "start": 1.5, "amortised": 1.05}
TARGET_VARIANTS = ("hesso", "hesso base=", "hesso base= record")
FORMS = {"hesso": "chain(adam, hesso)", "hesso base=": "hesso(base=adam)",
         "hesso base= record": "hesso(base=adam, on_fault=\"record\")"}
O_G_BYTES = 256  # scratch allowance per group


def target_verdicts(row: dict[str, Any]) -> dict[str, bool]:
    """Which of issue 14's targets a `step_cost.run_model` row meets."""
    met = {"ordinary": row["ordinary"] <= TARGETS["ordinary"],
           "start": max(row["start0"], row["start1"]) <= TARGETS["start"],
           "amortised": row["amortised"] <= TARGETS["amortised"],
           "temp": row["temp_extra_bytes"] <= O_G_BYTES * row["G"]}
    if "loop" in row:
        met["loop"] = row["loop"] <= TARGETS["ordinary"]
    return met


def targets_report(rows: list[dict[str, Any]], command: str, info: dict[str, str]) -> str:
    head = ("| model | N | G | donated | form | base ms | ordinary | ordinary (CPU time) | "
            "ordinary, looped (base ms) | start p=0 | start p≥1 | amortised (est.) | "
            "scratch − base | targets met |\n" + "|---" * 14 + "|")
    lines = [f"Command: `{command}`", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, jax {info['jax']}; load average "
             f"{info['load_start']} at the start, {info['load_end']} at the end.", "",
             "Ratios over the base (Adam) ordinary step: medians of wall time, base and HESSO "
             "interleaved in rotating rounds (3 calls per kind per round); the CPU-time "
             "column is the same ratio of process CPU time (less sensitive to other "
             "processes' load). Scratch: `memory_analysis().temp_size_in_bytes` minus the "
             "base step's (deterministic). Looped: ordinary steps dispatched back to back "
             "as a training loop runs them, donated rows only (`--target-loop`). Verdicts "
             "use the wall-time medians.", "", head]
    for r in rows:
        ok = target_verdicts(r)
        form = FORMS[r["variant"]]
        met = ", ".join(k if v else f"**not {k}**" for k, v in ok.items())
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['G']} | "
            f"{'yes' if r['donate'] else 'no'} | {form} | {r['base_ms']:.2f} | "
            f"{r['ordinary']:.3f}× | {r.get('ordinary_cpu', float('nan')):.3f}× | "
            f"{_looped(r)} | {r['start0']:.2f}× | {r['start1']:.2f}× | "
            f"{r['amortised']:.3f}× | {r['temp_extra_bytes'] / 1e6:+.3f} MB "
            f"(4N = {r['four_n'] / 1e6:.1f} MB) | {met} |")
    return "\n".join(lines) + "\n"


def _looped(row: dict[str, Any]) -> str:
    """The looped ordinary step's cell of a targets row (``–`` where it was not timed)."""
    if "loop" not in row:
        return "–"
    return f"{row['loop']:.3f}× ({row['loop_base_ms']:.2f} ms)"


def run_targets(args: argparse.Namespace, command: str) -> None:
    """``--targets``: `step_cost.run_model` on every model, every form of `FORMS`."""
    import step_cost  # same directory

    info = machine_info()
    ns = argparse.Namespace(variants=["adam", *TARGET_VARIANTS], rounds=args.target_rounds,
                            per_block=3, loop=args.target_loop)
    rows: list[dict[str, Any]] = []
    for name in args.target_models.split(","):
        rows += step_cost.run_model(name, ns)
    info["load_end"] = load_average()
    body = targets_report(rows, command, info)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead_targets.md").write_text(f"# HESSO step-cost targets (CPU)\n\n{body}")
    (args.out / "overhead_targets.json").write_text(json.dumps(
        {"command": command, "machine": info, "targets": TARGETS, "o_g_bytes": O_G_BYTES,
         "rows": [{**r, "met": target_verdicts(r)} for r in rows]}, indent=1) + "\n")
    print(body)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.targets:
        run_targets(args, shlex.join(["python", *(sys.argv if argv is None
                                                  else ["overhead.py", *argv])]))
        return
    t_start = time.perf_counter()
    command = shlex.join(["python", *(sys.argv if argv is None else ["overhead.py", *argv])])
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    info = machine_info()
    data = load_digits_split(0)
    rng = np.random.default_rng(args.seed)
    configs = build_configs(args.quick)
    if args.only:
        configs = [c for c in configs if re.search(args.only, c.name)]
    results = []
    for cfg in tqdm(configs, desc="configs"):
        res = measure(cfg, data, args, rng)
        results.append(res)
        tqdm.write(f"{res.name}: base {res.base_ms:.3g} ms, "
                   + ", ".join(f"{k} {res.kind_ratio[k]:.2f}×" for k in KINDS)
                   + f", amortised {res.amortised_ratio:.2f}×")
    wall = time.perf_counter() - t_start
    info["load_end"] = load_average()

    body = report(results, info, command, date, wall, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.md").write_text(f"# HESSO per-step overhead (CPU)\n\n{body}")
    if not args.no_results_md:
        upsert_section(args.out / "RESULTS.md", SECTION, body)
    payload = {"command": command, "date": date, "wall_s": wall, "machine": info,
               "batch": BATCH, "prune_fraction": PRUNE_FRACTION,
               "results": [dataclasses.asdict(r) for r in results]}
    (args.out / "overhead.json").write_text(json.dumps(payload, indent=2) + "\n")
    print()
    print(body)
    written = ["overhead.md", "overhead.json"] + ([] if args.no_results_md else ["RESULTS.md"])
    print("wrote " + ", ".join(str(args.out / name) for name in written))


if __name__ == "__main__":
    main()
