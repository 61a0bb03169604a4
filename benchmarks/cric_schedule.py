"""HESSO-CRIC over the whole reference schedule, next to greedy HESSO and Adam (issue 14 item 2).

`cric_cost.py` prices one period start — the first, at a chosen point — and extrapolates
the schedule from it. Here the schedule is *run*: from initialisation, the reference
schedule (``T_w = 200``, ``P = 5``, ``T_p = 100``, 1000 steps; ``K = 50 %`` of the groups)
is trained three times side by side on the same batches,

* ``adam``: ``optax.adam(3e-3)`` alone;
* ``hesso``: ``optax.chain(adam, hj.hesso(groups, 0.5, P, T_p, warmup_steps=T_w))``;
* ``cric``: the same with ``cric=`` the model's `hesso_jax.CricConfig` (`cric_cost.py`'s:
  ``S = 5``, tolerance 0, no cycle cap),

one step of each in turn (the order rotating every step), every step timed up to
``jax.block_until_ready`` (compilation excluded: each step function is compiled before
the run). Reported per model:

* for every period start ``p`` of the CRIC run: the corrective cycles CRIC ran there
  (`hesso_jax.hesso_status`), the loss gradients they took
  (`hesso_jax.CricConfig.gradient_count`), and the start's wall time over the median
  ordinary step of the same run;
* amortised cost, *measured*: the whole CRIC run's wall time over the greedy HESSO run's
  and over the Adam run's (same steps, interleaved, so the machine's load falls on all
  three alike);
* the loss of the final parameters on a held-out batch (the digits test split; for BERT a
  batch of fresh token ids), and the groups both pruned runs removed.

Usage::

    python benchmarks/cric_schedule.py                 # both models (~20 min on 2 cores)
    python benchmarks/cric_schedule.py --models cnn --no-write
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import cric_cost
import jax
import numpy as np
import optax
from tqdm.auto import tqdm

import hesso_jax as hj

SECTION = "## HESSO-CRIC over the reference schedule"
TW, P, TP, TOTAL = cric_cost.REFERENCE
RUNS = ("adam", "hesso", "cric")
Pytree = Any


def transformation(model: cric_cost.Model, run: str, schedule: tuple[int, int, int],
                   lr: float = 3e-3) -> optax.GradientTransformationExtraArgs:
    """``run``'s optimizer: Adam, Adam + greedy HESSO, or Adam + HESSO-CRIC."""
    base = optax.adam(lr)
    if run == "adam":
        return optax.with_extra_args_support(base)
    tw, periods, tp = schedule
    cric = model.cric if run == "cric" else None
    return optax.chain(base, hj.hesso(model.groups, 0.5, periods, tp, warmup_steps=tw,
                                      cric=cric))


def compiled_step(model: cric_cost.Model, tx: optax.GradientTransformationExtraArgs,
                  state: Pytree) -> Callable[..., tuple[Pytree, Pytree, jax.Array]]:
    """`cric_cost.train_step`, compiled for the model's parameters and batch shapes."""
    step = cric_cost.train_step(model, tx)
    return jax.jit(step).lower(model.params, state, model.batches(0)).compile()


def run_schedule(model: cric_cost.Model, schedule: tuple[int, int, int], total: int
                 ) -> dict[str, Any]:
    """The three runs, interleaved step by step (the order rotating every step).

    Returns ``{"walls": {run: [seconds per step]}, "starts": [step of period start p],
    "cycles": [CRIC's corrective cycles at start p], "params": {run: final params},
    "pruned": {run: bool[G] groups at exact zero}, "replay": {"start p" / "ordinary":
    the CRIC run's step at that point as a zero-argument call, for `replayed`}}``.
    """
    tw, periods, tp = schedule
    starts = [tw + p * tp for p in range(periods)]
    steps, params, states = {}, {}, {}
    for name in RUNS:
        tx = transformation(model, name, schedule)
        states[name], params[name] = tx.init(model.params), model.params
        steps[name] = compiled_step(model, tx, states[name])
    walls: dict[str, list[float]] = {name: [] for name in RUNS}
    cycles: list[int] = []
    replay: dict[str, Callable[[], Any]] = {}  # the CRIC run's starts (and one ordinary)
    for i in tqdm(range(total), desc=model.name, leave=False):
        batch = model.batches(i)
        if i in starts or i == starts[0] + 1:  # T_p > 1: step T_w + 1 is ordinary
            kind = f"start {starts.index(i)}" if i in starts else "ordinary"
            replay[kind] = functools.partial(steps["cric"], params["cric"],
                                             states["cric"], batch)
        for name in RUNS[i % len(RUNS):] + RUNS[:i % len(RUNS)]:
            (params[name], states[name], _), wall = common.timed(
                lambda n=name, b=batch: steps[n](params[n], states[n], b))
            walls[name].append(wall)
        if i in starts:
            cycles.append(hj.hesso_status(states["cric"]).cric_cycles)
    pruned = {n: hj.hesso_status(states[n]).pruned for n in ("hesso", "cric")}
    return {"walls": walls, "starts": starts, "cycles": cycles, "params": params,
            "pruned": pruned, "replay": replay}


def replayed(replay: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Each period start of the CRIC run over an ordinary step of the same run: the steps
    called again from their saved inputs, interleaved round after round (median ratio)."""
    med = common.medians(common.interleaved(replay, rounds))
    return {k: med[k] / med["ordinary"] for k in replay if k != "ordinary"}


def summarise(model: cric_cost.Model, out: dict[str, Any], rounds: int) -> dict[str, Any]:
    """The JSON row of one model: per-start cycles, gradients and cost (in the run and
    replayed, `replayed`); amortised cost measured over the whole runs; held-out loss of
    every run; groups both pruned."""
    walls = {n: np.asarray(w) for n, w in out["walls"].items()}
    starts = out["starts"]
    ordinary = np.delete(walls["cric"], starts)
    held_out = jax.jit(model.loss)
    again = replayed(out["replay"], rounds) if rounds else {}
    both = out["pruned"]["hesso"] & out["pruned"]["cric"]
    return {
        "model": model.name, "G": model.groups.num_groups,
        "k": int(out["pruned"]["cric"].sum()),
        "cric": {"sample_steps": model.cric.sample_steps,
                 "learning_rate": model.cric.learning_rate,
                 "tolerance": model.cric.tolerance, "max_cycles": model.cric.max_cycles},
        "starts": [{"step": s, "cycles": int(c),
                    "gradients": model.cric.gradient_count(int(c) + 1),
                    "over_ordinary": float(walls["cric"][s] / np.median(ordinary)),
                    "replayed_over_ordinary": again.get(f"start {p}")}
                   for p, (s, c) in enumerate(zip(starts, out["cycles"], strict=True))],
        "replay_rounds": rounds,
        "ordinary_median_s": {n: float(np.median(np.delete(w, starts)))
                              for n, w in walls.items()},
        "total_s": {n: float(w.sum()) for n, w in walls.items()},
        "amortised": {"over_hesso": float(walls["cric"].sum() / walls["hesso"].sum()),
                      "over_adam": float(walls["cric"].sum() / walls["adam"].sum())},
        "held_out_loss": {n: float(held_out(p, model.held_out))
                          for n, p in out["params"].items()},
        "pruned_by_both": int(both.sum()),
    }


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the RESULTS section: one line per model."""
    lines = ["| model (G, K, CRIC) | corrective cycles at the P starts | gradients | "
             "start / ordinary step, in the run | replayed | amortised over greedy HESSO "
             "(measured) | amortised over Adam (measured) | held-out loss: Adam / HESSO / "
             "HESSO-CRIC | groups pruned by both |", "|" + "---|" * 9]
    for r in rows:
        c, om = r["cric"], r["ordinary_median_s"]
        model = (f"{r['model']} (G={r['G']}, K={r['k']}, S={c['sample_steps']}, "
                 f"η={c['learning_rate']:g}, tol={c['tolerance']}); ordinary CRIC step "
                 f"{om['cric'] * 1e3:.1f} ms, Adam {om['adam'] * 1e3:.1f} ms")
        loss = " / ".join(f"{r['held_out_loss'][n]:.4g}" for n in RUNS)
        lines.append(
            f"| {model} | {_cell(r, 'cycles', 'd')} | {_cell(r, 'gradients', 'd')} | "
            f"{_cell(r, 'over_ordinary', '.1f')} (×) | "
            f"{_cell(r, 'replayed_over_ordinary', '.1f')} (×) | "
            f"**{r['amortised']['over_hesso']:.3f}×** | "
            f"{r['amortised']['over_adam']:.3f}× | {loss} | {r['pruned_by_both']} / {r['k']} |")
    return "\n".join(lines)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    """``row``'s per-start values of ``key``, comma-separated."""
    return ", ".join("–" if s.get(key) is None else format(s[key], fmt)
                     for s in row["starts"])


def section_body(results: dict[str, Any]) -> str:
    """The RESULTS section: command, machine, definitions, table."""
    tw, periods, tp, total = results["schedule"]
    return "\n\n".join([
        f"Command: `{results['command']}`. Machine: "
        f"{common.environment_line(results['environment'])} — a shared 2-core CPU, so "
        "absolute times are only indicative; the three runs were interleaved step by step "
        "(order rotating), so load falls on all three alike.",
        f"From initialisation, the schedule T_w={tw}, P={periods}, T_p={tp}, {total} steps, "
        "K = 50 % of the groups, base optax.adam(3e-3), trained as Adam alone, Adam + "
        "greedy HESSO and Adam + HESSO-CRIC on the same batches. Cycles: CRIC's corrective "
        "cycles at each period start of the run (`hj.hesso_status`); gradients: the loss "
        "gradients that took (`CricConfig.gradient_count`); start / ordinary: that start's "
        "wall time over the CRIC run's median ordinary step; replayed: the same steps "
        f"called again from their saved inputs, {results['rows'][0]['replay_rounds']} "
        "rounds interleaved with an ordinary step of the run (ratio of medians; a single "
        "step in the run is noisy). Amortised: the whole CRIC "
        "run's wall time (every step, starts included) over the greedy HESSO run's and "
        "the Adam run's. Held-out loss: the final parameters on the digits test split "
        "(cross-entropy) or on a batch of fresh token ids (distillation MSE).",
        format_rows(results["rows"]),
    ])


def main(argv: list[str] | None = None) -> None:
    """Runs the schedules (or re-renders a saved JSON) and publishes the RESULTS section."""
    p = common.parser(__doc__)
    p.add_argument("--models", default="cnn,bert")
    p.add_argument("--schedule", default=",".join(map(str, cric_cost.REFERENCE)),
                   help="T_w,P,T_p,total steps")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds of the replayed period starts (0: none)")
    p.add_argument("--render", type=Path, default=None,
                   help="re-render the section from this cric_schedule.json")
    args = p.parse_args(argv)
    if args.render is not None:
        results = json.loads(args.render.read_text())
    else:
        tw, periods, tp, total = (int(v) for v in args.schedule.split(","))
        rows = []
        for name in args.models.split(","):
            model = cric_cost.BUILDERS[name](0)  # initialisation: the run warms up itself
            rows.append(summarise(model, run_schedule(model, (tw, periods, tp), total),
                                  args.rounds))
            print(format_rows(rows[-1:]), flush=True)
        results = {"environment": common.environment(), "rows": rows,
                   "schedule": [tw, periods, tp, total],
                   "command": common.command_line("cric_schedule.py", argv)}
    common.publish(args.out, SECTION, section_body(results), results=results,
                   json_name="cric_schedule.json", write=not args.no_write)


if __name__ == "__main__":
    main()
