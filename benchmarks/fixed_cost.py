"""The fixed cost of a step: extra state arrays and extra kernels (issue 14 item 1).

On a sub-millisecond step (the MLP 64→100→10 of `step_cost.py`, Adam's donated step
≈ 0.1 ms in a loop) HESSO's ordinary step costs 1.6–2.9× the base step although its own
arithmetic is tiny; this script measures the two per-step costs that do not scale with
the model.

* *State arrays* (timed): Adam's donated training step with ``k`` extra ``int32[8]``
  arrays in its optimizer state, either passed through unchanged or each incremented by
  one (one tiny kernel per array), dispatched ``--steps`` at a time back to back as a
  training loop runs (`step_cost.Case.loop`'s method); microseconds per step, variants
  interleaved in rotating rounds, medians.
* *Structure* (deterministic): for Adam alone, the chain form and the fused form with
  ``on_fault="record"`` on the same model, the number of optimizer-state arrays and of
  instructions in the compiled program's entry computation that the CPU runtime runs as
  thunks (every instruction except ``parameter``, ``constant``, ``tuple``,
  ``get-tuple-element`` and ``bitcast``; a ``conditional`` or ``while`` counts once).

Usage::

    python benchmarks/fixed_cost.py                   # ~1 min on 2 cores
    python benchmarks/fixed_cost.py --extra 0,11 --rounds 9 --out /tmp/fixed.json
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import step_cost as sc

Pytree = Any
NOT_THUNKS = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")


def padded_step(model: sc.Model, extra: int, touch: bool) -> tuple[Callable, Pytree]:
    """Adam's donated step with ``extra`` more ``int32[8]`` state arrays (and its state)."""
    tx = optax.adam(1e-3)

    def step(params: Pytree, state: Pytree, batch: Pytree) -> tuple:
        opt, pads = state
        loss, grads = jax.value_and_grad(model.loss)(params, batch)
        updates, opt = tx.update(grads, opt, params)
        pads = [p + 1 for p in pads] if touch else pads
        return optax.apply_updates(params, updates), (opt, pads), loss

    state = (tx.init(model.params), [jnp.zeros([8], jnp.int32) for _ in range(extra)])
    return jax.jit(step, donate_argnums=(0, 1)), state


def time_padded(model: sc.Model, extras: list[int], rounds: int, steps: int
                ) -> dict[str, float]:
    """Median µs per looped step of every (extra, touched) variant, interleaved."""
    runs: dict[str, list[Any]] = {}
    for k in extras:
        for touch in (False, True):
            if k == 0 and touch:
                continue
            step, state = padded_step(model, k, touch)
            params = jax.tree.map(lambda a: jnp.array(a, copy=True), model.params)
            runs[f"{k}/{'updated' if touch else 'passed'}"] = [step, params, state]

    def loop(run: list[Any]) -> float:
        dt, run[1], run[2] = sc.timed_loop(*run, model.batch, steps)
        return dt

    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        loop(run)  # compile and warm

    def block(name: str) -> None:
        loop(runs[name])
        times[name].append(loop(runs[name]))

    sc.rotating_rounds(list(runs), rounds, block)
    return {name: float(np.median(t)) * 1e6 for name, t in times.items()}


def entry_thunks(hlo: str) -> int:
    """Instructions of the ENTRY computation that the CPU runtime runs (see docstring)."""
    entry = hlo.split("\nENTRY", 1)[1].split("\n}", 1)[0]
    count = 0
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = \S+(?: \S+)*? ([a-z\-]+)\(", line)
        if m and m.group(1) not in NOT_THUNKS:
            count += 1
    return count


def structure(model: sc.Model) -> list[dict[str, Any]]:
    """State arrays and entry thunks of Adam, the chain form and the fused record form."""
    rows = []
    for variant in ("adam", "hesso", "hesso base= record"):
        case = sc.Case(model, variant, True)
        rows.append({"variant": variant, "state_arrays": len(jax.tree.leaves(case.init)),
                     "entry_thunks": entry_thunks(case.hlo)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wide1e2", help="a step_cost.py model name")
    parser.add_argument("--extra", default="0,1,11,30", help="extra state arrays")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    model = sc.build(args.model)
    extras = [int(k) for k in args.extra.split(",")]
    timed = time_padded(model, extras, args.rounds, args.steps)
    base = timed["0/passed"]
    print(f"{model.name}: Adam's donated step with k extra int32[8] state arrays, "
          f"{args.steps} steps back to back, medians of {args.rounds} rounds\n")
    print("| extra arrays | passed through | each updated (+1) |\n|---|---|---|")
    for k in extras:
        cells = [timed.get(f"{k}/{kind}") for kind in ("passed", "updated")]
        print(f"| {k} | " + " | ".join("–" if c is None else f"{c:.1f} µs ({c / base:.2f}×)"
                                       for c in cells) + " |")
    rows = structure(model)
    print("\n| variant | optimizer-state arrays | entry thunks |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['state_arrays']} | {r['entry_thunks']} |")
    if args.out is not None:
        args.out.write_text(json.dumps({"model": model.name, "steps": args.steps,
                                        "rounds": args.rounds, "timed_us": timed,
                                        "structure": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
