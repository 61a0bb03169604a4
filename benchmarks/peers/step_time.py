"""Train-step times side by side: hesso_jax (jitted) vs PyTorch eager, 1 and 2 torch threads.

The honest companion of ``torch_pruning_digits.py``'s whole-recipe wall times. On a shared
2-core machine PyTorch with 2 intra-op threads stalls (some steps take many times the
median), which inflates a recipe's wall time; a median per step does not stall. Here each
framework's dense train step on the digits CNN (batch 64, Adam; the PyTorch twin of
`hesso_jax.models.CNN` from ``torch_pruning_digits.py``) is timed in interleaved rounds:

* ``jax adam`` and ``jax hesso`` (``chain(adam, hesso)``, an ordinary pruning-period
  step): one jitted step each (XLA uses its own thread pool over the machine's cores);
* ``torch 1 thread`` and ``torch 2 threads``: forward + backward + ``Adam.step`` eager,
  ``torch.set_num_threads`` switched between rounds.

Reported per kind: the median step, the share of *stalled* steps (over 3× the median) and
the step-median estimate of the recipe's training time (median × steps). The whole-recipe
wall times of ``torch_pruning_digits.py`` include pruning, bisection and evaluation too;
this table isolates the training steps that dominate them.

    python benchmarks/peers/step_time.py                     # 300 rounds
    python benchmarks/peers/step_time.py --rounds 50 --no-write
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch_pruning_digits as tpd  # noqa: I001 (puts benchmarks/ on sys.path)
from common import command_line, environment_line, parser, publish

SECTION = "## Peer side by side: train-step times, 1 vs 2 PyTorch threads"


def jax_steps(batch_size: int, steps: int) -> dict[str, Any]:
    """``{name: zero-arg call}`` of the jitted JAX steps (adam, adam + hesso mid-period)."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import hesso_jax as hj
    from hesso_jax.data import load_digits_split
    from hesso_jax.models import CNN
    from hesso_jax.train import demo_schedule, make_step

    data = load_digits_split(0)
    x, y = jnp.asarray(data.x_train[:batch_size]), jnp.asarray(data.y_train[:batch_size])
    model = CNN(rngs=nnx.Rngs(0))
    groups = hj.discover_groups(model, data.x_train[:1])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    warmup, period = demo_schedule(steps, 5)
    calls = {}
    for name, tx in (("jax adam", optax.adam(3e-3)),
                     ("jax hesso", optax.chain(optax.adam(3e-3), hj.hesso(
                         groups, 0.5, 5, period, warmup_steps=warmup)))):
        step, state = make_step(graphdef, tx), tx.init(params)
        if name == "jax hesso":  # an ordinary step inside period 0 (not its start)
            state = (state[0], state[1]._replace(count=jnp.asarray(warmup + 1, jnp.int32)))
        calls[name] = (lambda s=step, st=state: s(params, rest, st, x, y)[3])
    return calls


def torch_step(torch: Any, batch_size: int) -> Any:
    """A zero-arg eager PyTorch train step of the digits CNN twin (Adam, cross-entropy)."""
    from hesso_jax.data import load_digits_split

    data = load_digits_split(0)
    x = torch.from_numpy(np.ascontiguousarray(data.x_train[:batch_size].transpose(0, 3, 1, 2)))
    y = torch.from_numpy(data.y_train[:batch_size].astype(np.int64))
    torch.manual_seed(0)
    model = tpd.torch_cnn(torch)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()

    def step() -> float:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    return step


def measure(rounds: int, batch_size: int, steps: int) -> dict[str, list[float]]:
    """Interleaved rounds: one step of each kind per round (torch threads set per call)."""
    import jax

    torch, _ = tpd._import_peers()
    calls = jax_steps(batch_size, steps)
    tstep = torch_step(torch, batch_size)

    def torch_with(n: int) -> Any:
        def call() -> float:
            torch.set_num_threads(n)
            return tstep()
        return call

    calls["torch 1 thread"], calls["torch 2 threads"] = torch_with(1), torch_with(2)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():  # compile / warm up
        for _ in range(3):
            jax.block_until_ready(fn())
    from tqdm.auto import tqdm

    for _ in tqdm(range(rounds), desc="rounds"):
        for name, fn in calls.items():
            if name.startswith("torch"):
                fn()  # untimed: the thread-count switch settles on this call
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return times


def report(times: dict[str, list[float]], steps: int) -> tuple[str, dict[str, Any]]:
    """Markdown table and JSON rows of `measure`'s times."""
    rows = {}
    ref = float(np.median(times["jax hesso"]))
    lines = ["| step | median | stalled (> 3× median) | worst | est. training time for "
             f"{steps} steps (median × steps) | vs jax hesso |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, t in times.items():
        t = np.asarray(t)
        med = float(np.median(t))
        stalled = int(np.sum(t > 3 * med))
        rows[name] = {"median_s": med, "stalled": stalled, "n": len(t),
                      "worst_s": float(t.max()), "estimate_s": med * steps}
        lines.append(f"| {name} | {1e3 * med:.2f} ms | {stalled} / {len(t)} | "
                     f"{1e3 * t.max():.1f} ms | {med * steps:.1f} s | {med / ref:.2f}× |")
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], out=tpd.HERE.parent)
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=1500, help="the recipe's steps (estimate)")
    args = p.parse_args(argv)
    try:
        tpd._import_peers()
    except ImportError as err:
        print(tpd.MISSING.format(error=err), file=sys.stderr)
        return 2
    env = environment_line()
    times = measure(args.rounds, args.batch_size, args.steps)
    table, rows = report(times, args.steps)
    body = (f"- Command: `{command_line('peers/step_time.py', argv)}`.\n"
            f"- {env}\n\n"
            "One dense train step of the digits CNN (batch 64, Adam), interleaved rounds; "
            "JAX steps jitted, PyTorch eager with `torch.set_num_threads` 1 or 2 (one "
            "untimed step after each switch).\n\n" + table)
    publish(args.out, SECTION, body, results={"rounds": args.rounds, "rows": rows,
                                               "environment": env},
            json_name="peers/step_time.json", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
