"""Scale of HESSO's identification and per-step projection on CPU: time and memory vs G, N.

A synthetic model isolates the optimizer: one leaf ``w`` of shape ``(R, G)`` whose ``G``
columns are the groups (``Member(("w",), 1)``) plus a bias ``b[G]`` (``Member(("b",), 0)``),
``N = R·G + G`` parameters, a fixed synthetic gradient and ``optax.sgd`` as the base
optimizer, so the measured cost is HESSO's own. One jitted step
``(params, grads, state) -> (params + update, state)`` is compiled per size and timed on

* *base*: ``optax.sgd`` alone (the floor: one read of grads and params, one write);
* *ordinary*: a HESSO step inside a pruning period (projection of the redundant set:
  one gather of a length-``G`` mask per grouped leaf and one ``where``), expected ``O(N)``;
* *start*: a period start (saliency: three per-group reductions over ``N`` elements, a
  segment sum into ``G`` groups, the score mix, then the bottom-``K̂`` selection by a stable
  sort, under ``lax.cond``), expected ``O(N + G log G)``;
* *bottom_k*: the selection alone on a random length-``G`` score vector, ``O(G log G)``.

The HESSO state is built with a chosen ``count`` so the same compiled step runs the wanted
branch on the same gradient and state (new state discarded; the parameters are donated and
fed back, as in a training loop, so XLA reuses their buffers). Minimum of ``--reps`` calls,
each followed by ``block_until_ready``; compile time excluded. Growth exponents are
least-squares slopes of ``log time`` against ``log size``. On a shared machine (the RESULTS
section states the load) ratios and exponents are the meaningful figures, not absolute times.

Memory: ``jax.devices()[0].memory_stats()`` is ``None`` on XLA:CPU, so the step's memory is
taken from the compiled executable's ``memory_analysis()`` (argument, output and temporary
buffer bytes, which is what XLA allocates for the step), and the optimizer state size from
the leaves of ``tx.init`` (evaluated with ``jax.eval_shape``, nothing allocated), compared
with ``optax.adam``'s as a typical base. The CRIC variant's period-start temporaries are
measured the same way.

A last micro-benchmark compares the per-group reduction as written in ``groups.py``
(``jnp.sum`` over the leading axes of a ``(3, 3, C_in, C_out)`` conv kernel) with the same sum
after a reshape to ``(rows, C_out)``.

Usage::

    python benchmarks/scale.py            # full run (about 5-8 minutes on 2 loaded cores)
    python benchmarks/scale.py --quick    # smoke test (sizes up to 10^6)

Writes ``scale.json``, ``scale.png`` and the section ``## Scale: identification and
projection vs G and N (CPU)`` of ``RESULTS.md`` in ``--out`` (default: this directory).
"""

from __future__ import annotations

import argparse
import functools
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
from common import command_line, environment, min_time, parser, publish
from tqdm import tqdm

import hesso_jax as hj
from hesso_jax.cric import CricConfig
from hesso_jax.projection import bottom_k

SECTION = "## Scale: identification and projection vs G and N (CPU)"
PERIODS, TP = 2, 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = parser(__doc__, no_write=False)
    p.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
    p.add_argument("--reps", type=int, default=7, help="timed calls per measurement")
    p.add_argument("--no-results-md", action="store_true", help="do not touch RESULTS.md")
    p.add_argument("--from-json", type=Path, default=None,
                   help="re-render the plot, table and RESULTS.md section from a saved "
                        "scale.json instead of measuring")
    return p.parse_args(argv)


def make_problem(rows: int, num_groups: int) -> tuple[dict, dict, hj.Groups]:
    """Deterministic params/grads of ``rows × G`` (+ bias), generated on the device."""

    @jax.jit
    def gen() -> tuple[dict, dict]:
        i = jax.lax.broadcasted_iota(jnp.float32, (rows, num_groups), 1)
        r = jax.lax.broadcasted_iota(jnp.float32, (rows, num_groups), 0)
        w = jnp.sin(0.37 * i + 0.011 * r) * (1.0 + jnp.cos(0.05 * i))
        g = jnp.cos(0.13 * i - 0.017 * r)
        b = jnp.sin(jnp.arange(num_groups, dtype=jnp.float32))
        return {"w": w, "b": b}, {"w": g, "b": jnp.cos(b)}

    params, grads = gen()
    groups = hj.Groups.from_families([hj.GroupFamily(
        num_groups, (hj.Member(("w",), 1), hj.Member(("b",), 0)))])
    return params, grads, groups


def memory(compiled: Any) -> dict[str, int]:
    """Bytes XLA allocates for a compiled step (``memory_analysis``)."""
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "temp", "alias")}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]  # alias:
    # donated parameter buffers reused for the output
    return out


def tree_bytes(tree: Any) -> int:
    """Total bytes of the leaves of a tree of arrays or ShapeDtypeStructs."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def measure_steps(rows: int, num_groups: int, reps: int, *, cric: bool = False) -> dict:
    """Times and memory of the base, ordinary and period-start steps at one size."""
    params, grads, groups = make_problem(rows, num_groups)
    k = num_groups // 2
    config = CricConfig(sample_steps=2, learning_rate=1e-3) if cric else None
    tx = optax.chain(optax.sgd(1e-3), hj.hesso(groups, k, PERIODS, TP, cric=config))
    base = optax.sgd(1e-3)

    def value_fn(p: dict) -> jax.Array:
        return 1e-3 * jnp.sum(jnp.square(p["w"])) + jnp.sum(p["b"])

    def step(p: dict, g: dict, s: Any) -> tuple[dict, Any]:
        u, s = tx.update(g, s, p, value_fn=value_fn)
        return optax.apply_updates(p, u), s

    def base_step(p: dict, g: dict, s: Any) -> tuple[dict, Any]:
        u, s = base.update(g, s, p)
        return optax.apply_updates(p, u), s

    state0 = tx.init(params)
    hs = state0[1]
    # Ordinary step: mid-period with half of the period's groups being projected.
    redundant = jnp.arange(num_groups) % 4 == 0
    mid = (state0[0], hs._replace(count=jnp.asarray(1, jnp.int32), redundant=redundant))
    start = state0  # count 0 with warmup 0: the first period start

    # The parameters are donated, as in a real training loop: XLA writes the new
    # parameters into the old buffers instead of allocating (and page-faulting) fresh
    # N-sized outputs on every call, which on CPU otherwise dominates and varies between
    # runs. Each timed call feeds its output parameters back in; the state is not donated,
    # so every call runs the same branch.
    f = jax.jit(step, donate_argnums=0).lower(params, grads, state0).compile()
    bstate = base.init(params)
    fb = jax.jit(base_step, donate_argnums=0).lower(params, grads, bstate).compile()
    res = {"rows": rows, "G": num_groups, "N": rows * num_groups + num_groups,
           "cric": cric}

    def looped(fn: Any, state: Any) -> Callable[[], Any]:
        box = [jax.tree.map(jnp.copy, params)]

        def call() -> Any:
            box[0] = fn(box[0], grads, state)[0]
            return box[0]

        return call

    res["start_s"], res["start_cpu_s"] = min_time(looped(f, start), reps)
    if not cric:
        res["ordinary_s"], res["ordinary_cpu_s"] = min_time(looped(f, mid), reps)
        res["base_s"], res["base_cpu_s"] = min_time(looped(fb, bstate), reps)
    res["memory_hesso_step"] = memory(f)
    res["memory_base_step"] = memory(fb)
    abstract = jax.eval_shape(lambda: params)
    res["state_bytes_hesso"] = tree_bytes(jax.eval_shape(tx.init, abstract)[1])
    res["state_bytes_adam"] = tree_bytes(jax.eval_shape(optax.adam(1e-3).init, abstract))
    res["params_bytes"] = tree_bytes(abstract)
    # Sanity: the start step selects exactly K̂ groups.
    _, s1 = f(jax.tree.map(jnp.copy, params), grads, start)
    assert int(jnp.sum(s1[1].redundant)) == k // PERIODS, "wrong selection size"
    gc.collect()
    return res


def measure_donation(rows: int, num_groups: int, reps: int) -> dict:
    """Ordinary HESSO step vs bare sgd, with and without donated parameters (CPU seconds).

    With donation sgd updates the parameters in place; HESSO's period-start ``lax.cond``
    reads the base update, so XLA materialises that update as one N-sized temporary per
    step, which on XLA:CPU is a fresh allocation (page faults) like an un-donated output.
    """
    params, grads, groups = make_problem(rows, num_groups)
    tx = optax.chain(optax.sgd(1e-3), hj.hesso(groups, num_groups // 2, PERIODS, TP))
    st = tx.init(params)
    mid = (st[0], st[1]._replace(count=jnp.asarray(1, jnp.int32),
                                 redundant=jnp.arange(num_groups) % 4 == 0))

    def hesso_step(p: dict, g: dict, s: Any) -> dict:
        u, _ = tx.update(g, s, p)
        return optax.apply_updates(p, u)

    def sgd_step(p: dict, g: dict, s: Any) -> dict:
        return jax.tree.map(lambda a, b: a - 1e-3 * b, p, g)

    out: dict[str, Any] = {"N": rows * num_groups + num_groups}
    for donate in (False, True):
        for name, fn in (("hesso_ordinary", hesso_step), ("sgd", sgd_step)):
            f = jax.jit(fn, donate_argnums=(0,) if donate else ()).lower(
                params, grads, mid).compile()
            box = [jax.tree.map(jnp.copy, params)]

            def call(f: Any = f, box: list = box) -> Any:
                box[0] = f(box[0], grads, mid)
                return box[0]

            key = f"{name}_{'donated' if donate else 'not_donated'}"
            out[key + "_cpu_s"] = min_time(call, reps)[1]
            out[key + "_temp_bytes"] = memory(f)["temp"]
    return out


def measure_bottom_k(num_groups: int, reps: int) -> tuple[float, float]:
    """Wall and CPU seconds (`timed`) of `bottom_k` alone on ``G`` random scores (K̂ = G/4)."""
    scores = jax.random.uniform(jax.random.key(0), (num_groups,))
    cand = jnp.arange(num_groups) % 7 != 0
    f = jax.jit(bottom_k).lower(scores, cand, num_groups // 4).compile()
    return min_time(lambda: f(scores, cand, num_groups // 4), reps)


def measure_reductions(reps: int, shapes: list[tuple[int, ...]]) -> list[dict]:
    """Per-channel ``Σ x²`` over all axes but the last, as ``groups.py`` computes it
    (``jnp.sum`` over the leading axes), vs the same sum after a reshape to (rows, C), vs a
    ``ones @ x²`` mat-vec; equal element counts, different aspect ratios."""
    out = []
    for shape in shapes:
        x = jax.jit(lambda shape=shape: jnp.sin(0.01 * jax.lax.broadcasted_iota(
            jnp.float32, shape, len(shape) - 1) + 0.003 * jax.lax.broadcasted_iota(
            jnp.float32, shape, 0)))()
        lead = jax.jit(lambda a: jnp.sum(jnp.square(a), axis=tuple(range(a.ndim - 1))))
        flat = jax.jit(lambda a: jnp.sum(jnp.square(a.reshape(-1, a.shape[-1])), axis=0))
        matvec = jax.jit(lambda a: jnp.ones((a.size // a.shape[-1],), a.dtype)
                         @ jnp.square(a.reshape(-1, a.shape[-1])))
        np.testing.assert_allclose(np.asarray(lead(x)), np.asarray(flat(x)), rtol=1e-4)
        np.testing.assert_allclose(np.asarray(lead(x)), np.asarray(matvec(x)), rtol=1e-3)
        out.append({"shape": list(shape), "elements": int(x.size),
                    "sum_leading_axes_s": min_time(functools.partial(lead, x), reps)[1],
                    "reshape_then_sum_s": min_time(functools.partial(flat, x), reps)[1],
                    "ones_matvec_s": min_time(functools.partial(matvec, x), reps)[1]})
    return out


def slope(sizes: list[float], times: list[float]) -> float:
    """Least-squares exponent ``b`` of ``time ≈ a · size^b``."""
    return float(np.polyfit(np.log(sizes), np.log(times), 1)[0])


def run(args: argparse.Namespace) -> dict:
    """All sweeps; returns the JSON-ready results."""
    if args.quick:
        g_sweep_n, g_sweep = 10**6, [10**3, 10**4, 10**5]
        n_sweep_g, n_rows = 10**3, [100, 300, 1000]
        bk_sizes = [10**3, 10**4, 10**5]
        red_shapes = [(10, 10**5), (1000, 1000), (3, 3, 112, 1000)]
    else:
        g_sweep_n, g_sweep = 10**7, [10**3, 10**4, 10**5, 10**6]
        n_sweep_g, n_rows = 10**4, [100, 300, 1000, 3000, 10000]
        bk_sizes = [10**3, 3 * 10**3, 10**4, 3 * 10**4, 10**5, 3 * 10**5, 10**6]
        red_shapes = [(10, 10**6), (1000, 10**4), (3, 3, 1024, 1088)]
    env = environment()
    out: dict[str, Any] = {
        "when": env["when"],
        "command": command_line("scale.py"),
        "machine": {"platform": env["platform"], "cpus": env["cpus"],
                    "jax": env["jax"], "backend": env["backend"],
                    "devices": len(env["devices"]),
                    "loadavg_start": env["load_average"]},
        "memory_stats_available": jax.devices()[0].memory_stats() is not None,
        "gpu": None if env["backend"] == "cpu" else env["devices"],
        "schedule": {"P": PERIODS, "Tp": TP, "K": "G/2", "base": "optax.sgd(1e-3)"},
    }
    t0 = time.perf_counter()
    out["bottom_k"] = [dict(zip(("G", "seconds", "cpu_seconds"),
                                (g, *measure_bottom_k(g, args.reps)), strict=True))
                       for g in tqdm(bk_sizes, desc="bottom_k vs G")]
    out["g_sweep"] = [measure_steps(g_sweep_n // g, g, args.reps)
                      for g in tqdm(g_sweep, desc=f"steps vs G (N={g_sweep_n:.0e})")]
    out["n_sweep"] = [measure_steps(r, n_sweep_g, max(3, args.reps - 2 * (r >= 3000)))
                      for r in tqdm(n_rows, desc=f"steps vs N (G={n_sweep_g:.0e})")]
    cric_rows = n_rows[2]
    out["cric"] = measure_steps(cric_rows, n_sweep_g, 3, cric=True)
    out["reductions"] = measure_reductions(args.reps, red_shapes)
    out["donation"] = measure_donation(n_rows[2], n_sweep_g, args.reps)

    bk = out["bottom_k"]
    gs, ns = out["g_sweep"], out["n_sweep"]
    big = [r for r in ns if r["N"] >= 5e6]  # beyond the caches
    big = big if len(big) >= 2 else ns[-2:]  # (--quick has no such sizes)
    fits: dict[str, float] = {}
    for suffix, key in (("", "seconds"), ("_cpu", "cpu_seconds")):
        fits["bottom_k_vs_G" + suffix] = slope([r["G"] for r in bk], [r[key] for r in bk])
        fits["bottom_k_vs_GlogG" + suffix] = slope(
            [r["G"] * np.log(r["G"]) for r in bk], [r[key] for r in bk])
    for suffix, t in (("", "_s"), ("_cpu", "_cpu_s")):
        fits["identification_extra_vs_G" + suffix] = slope(
            [r["G"] for r in gs],
            [max(r["start" + t] - r["ordinary" + t], 1e-6) for r in gs])
        for kind in ("ordinary", "start", "base"):
            fits[f"{kind}_step_vs_N{suffix}"] = slope([r["N"] for r in ns],
                                                      [r[kind + t] for r in ns])
            fits[f"{kind}_step_vs_N_large{suffix}"] = slope([r["N"] for r in big],
                                                            [r[kind + t] for r in big])
    fits["step_temp_bytes_vs_N"] = slope([r["N"] for r in ns],
                                         [max(r["memory_hesso_step"]["temp"], 1) for r in ns])
    out["fits"] = fits
    out["machine"]["loadavg_end"] = environment()["load_average"]
    out["wall_seconds"] = time.perf_counter() - t0
    return out


def plot(res: dict, path: Path) -> None:
    """Three panels: selection vs G, step CPU time vs N, step memory vs N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fits = res["fits"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    bk = res["bottom_k"]
    ax.loglog([r["G"] for r in bk], [1e3 * r["cpu_seconds"] for r in bk], "o-",
              label=f"bottom_k alone (slope {fits['bottom_k_vs_G_cpu']:.2f})")
    gs = res["g_sweep"]
    ax.loglog([r["G"] for r in gs], [1e3 * (r["start_cpu_s"] - r["ordinary_cpu_s"]) for r in gs],
              "s-", label=f"period start − ordinary step, N≈{gs[0]['N']:.0e} "
                          f"(slope {fits['identification_extra_vs_G_cpu']:.2f})")
    ax.set_xlabel("G (groups)")
    ax.set_ylabel("CPU ms (min over repeats)")
    ax.set_title("identification vs G")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax = axes[1]
    ns = res["n_sweep"]
    n = [r["N"] for r in ns]
    for kind, label in (("base", "sgd alone"), ("ordinary", "HESSO ordinary step"),
                        ("start", "HESSO period start")):
        ax.loglog(n, [1e3 * r[kind + "_cpu_s"] for r in ns], "o-",
                  label=f"{label} (slope {fits[kind + '_step_vs_N_large_cpu']:.2f} for N≥5e6)")
    ax.set_xlabel(f"N (parameters), G = {ns[0]['G']:.0e}")
    ax.set_ylabel("CPU ms (min over repeats)")
    ax.set_title("step time vs N")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax = axes[2]
    ax.loglog(n, [r["memory_hesso_step"]["total"] / 2**20 for r in ns], "o-",
              label="HESSO step (args+out+temp)")
    ax.loglog(n, [r["memory_base_step"]["total"] / 2**20 for r in ns], "s--",
              label="sgd step (args+out+temp)")
    ax.loglog(n, [r["memory_hesso_step"]["temp"] / 2**20 for r in ns], "^-",
              label="HESSO step temporaries")
    ax.set_xlabel("N (parameters)")
    ax.set_ylabel("MiB (XLA memory_analysis)")
    ax.set_title("step memory vs N")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    m = res["machine"]
    fig.suptitle(f"hesso-jax scale on {m['backend'].upper()} ("
                 f"{'loaded ' if loaded(m) else ''}{m['cpus']}-core machine; "
                 "min over repeats of process CPU time)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loaded(machine: dict) -> bool:
    """Whether the 1-minute load average exceeded half the cores at the start or end."""
    loads = [v[0] for v in (machine.get("loadavg_start"), machine.get("loadavg_end")) if v]
    return bool(loads) and max(loads) > 0.5 * (machine.get("cpus") or 1)


def machine_text(res: dict) -> tuple[str, str]:
    """The prose on the load and the backend that is true for this run."""
    m = res["machine"]
    load = (f"load average {m['loadavg_start'][0]:.1f} at the start, "
            f"{m['loadavg_end'][0]:.1f} at the end, on {m['cpus']} cores")
    if loaded(m):
        head = (f"**The machine was loaded** ({load}, from other jobs), so absolute times "
                "are inflated and noisy: read")
    else:
        head = f"The machine was not loaded ({load}); read"
    if m.get("backend", "cpu") == "cpu":
        tail = "No GPU was available to this run, so there are no GPU figures."
    else:
        tail = f"Backend: {m['backend']} ({m['devices']} device(s))."
    return head, tail


def markdown(res: dict) -> str:
    """The RESULTS.md section."""
    f = res["fits"]
    m = res["machine"]
    bk = res["bottom_k"]

    def row(name: str, key: str, expected: str) -> str:
        return f"| {name} | {f[key + '_cpu']:.2f} | {f[key]:.2f} | {expected} |"

    head, tail = machine_text(res)
    lines = [
        f"Command: `{res['command']}` ({res['when']}, {m['cpus']} CPU cores, JAX {m['jax']}, "
        f"{res['wall_seconds']:.0f} s). {head} the "
        "exponents and ratios, fitted on the minimum over repeats of process CPU time (all "
        "threads; other jobs only add time, and CPU time does not count waiting for a core; "
        "wall times are in `scale.json`). Synthetic model "
        "`w[R, G]` + `b[G]`, one group per column, base `optax.sgd`, HESSO "
        "`K = G/2, P = 2, Tp = 10`; jitted steps with donated parameters, compile "
        "excluded. Plot: "
        f"`scale.png`. {tail}",
        "",
        "Fitted growth (least-squares slope of log time vs log size):",
        "",
        "| quantity | exponent (CPU time) | exponent (wall) | expected |",
        "|---|---:|---:|---|",
        row(f"`bottom_k` alone vs G ({bk[0]['G']:.0e}…{bk[-1]['G']:.0e})", "bottom_k_vs_G",
            "G log G: slightly above 1"),
        row("`bottom_k` alone vs G·log G", "bottom_k_vs_GlogG", "1"),
        row(f"period start − ordinary step vs G, N ≈ {res['g_sweep'][0]['N']:.0e} fixed",
            "identification_extra_vs_G", "O(N) part constant + G log G"),
        row("ordinary HESSO step vs N, N ≥ 5·10⁶", "ordinary_step_vs_N_large", "1 (O(N))"),
        row("period-start step vs N, N ≥ 5·10⁶ (G fixed)", "start_step_vs_N_large",
            "1 (O(N))"),
        row("sgd step alone vs N, N ≥ 5·10⁶", "base_step_vs_N_large", "1 (O(N))"),
        row("ordinary HESSO step vs N, all sizes (10⁶ fits in cache)", "ordinary_step_vs_N",
            "≤ 1"),
        f"| HESSO step temporaries (bytes) vs N | {f['step_temp_bytes_vs_N']:.2f} | – | 1 |",
        "",
        f"Steps vs N (G = {res['n_sweep'][0]['G']:.0e}; CPU ms; ratios to the sgd step):",
        "",
        "| N | sgd | HESSO ordinary | ratio | period start | ratio | step temp MiB | "
        "HESSO state bytes | Adam state MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["n_sweep"]:
        lines.append(
            f"| {r['N']:.2e} | {1e3 * r['base_cpu_s']:.1f} | {1e3 * r['ordinary_cpu_s']:.1f} | "
            f"{r['ordinary_cpu_s'] / r['base_cpu_s']:.2f} | {1e3 * r['start_cpu_s']:.1f} | "
            f"{r['start_cpu_s'] / r['base_cpu_s']:.2f} | "
            f"{r['memory_hesso_step']['temp'] / 2**20:.1f} | {r['state_bytes_hesso']:,} | "
            f"{r['state_bytes_adam'] / 2**20:.1f} |")
    lines += ["", "Steps vs G (N ≈ {:.0e}; CPU ms):".format(res["g_sweep"][0]["N"]), "",
              "| G | rows | ordinary | period start | start − ordinary | `bottom_k` alone | "
              "HESSO state bytes |", "|---:|---:|---:|---:|---:|---:|---:|"]
    bk_at = {r["G"]: r["cpu_seconds"] for r in bk}
    for r in res["g_sweep"]:
        alone = bk_at.get(r["G"])
        lines.append(f"| {r['G']:.0e} | {r['rows']} | {1e3 * r['ordinary_cpu_s']:.1f} | "
                     f"{1e3 * r['start_cpu_s']:.1f} | "
                     f"{1e3 * (r['start_cpu_s'] - r['ordinary_cpu_s']):.1f} | "
                     + (f"{1e3 * alone:.1f}" if alone is not None else "–")
                     + f" | {r['state_bytes_hesso']:,} |")
    c = res["cric"]
    same = next(r for r in res["n_sweep"] if r["N"] == c["N"])
    lines += [
        "",
        "Memory. HESSO's own state is `count`, `cric_cycles`, `schedule` (24 bytes) plus "
        "`redundant`, `pruned` (bool[G]) and `scores` (float32[G]): **6·G + 24 bytes**, "
        "independent of N, on top of the base optimizer's state (Adam: 2·N floats), so "
        "optimizer state = base state + O(G). The step's temporaries are O(N) (the "
        "rewritten update of each grouped leaf; per-leaf reductions at period starts). "
        "HESSO-CRIC (`sample_steps=2`) adds, while its period start runs, one working copy "
        "of the parameters and the trial gradient/update (transient, not state): the "
        f"compiled step at N = {c['N']:.1e} reserves "
        f"{c['memory_hesso_step']['temp'] / 2**20:.1f} MiB of temporaries vs "
        f"{same['memory_hesso_step']['temp'] / 2**20:.1f} MiB for greedy HESSO (XLA reuses "
        "buffers between the cond branches, so the difference is smaller than N floats); its "
        f"period start took {1e3 * c['start_cpu_s']:.0f} CPU ms. "
        "`jax.devices()[0].memory_stats()` is "
        + ("available" if res["memory_stats_available"] else "`None` on XLA:CPU")
        + ", so the memory figures are XLA's `memory_analysis()` of the compiled step "
        "(argument + output + temporary buffers), not a measured peak RSS.",
        "",
        "Why the ordinary step costs {big:.1f}× a bare *donated* sgd update at the largest N "
        "on CPU: sgd then "
        "updates the parameters in place, while HESSO's period-start `lax.cond` reads the "
        "base update, so XLA materialises that update as one N-sized temporary per step "
        "(`step temp MiB` above grows as 8·N bytes: the update and its projected rewrite), "
        "a fresh allocation on XLA:CPU that costs "
        "what an un-donated output does. At N = {N:.1e}: sgd {sd:.1f} ms donated / {sn:.1f} ms "
        "not donated; HESSO ordinary {hd:.1f} ms donated / {hn:.1f} ms not donated (CPU). "
        "Without donation HESSO's step costs {ratio_nd:.2f}× sgd's; in a real model the "
        "forward and "
        "backward pass dominate (see the per-step overhead section: 1.03× for the digits "
        "CNN).".format(big=res["n_sweep"][-1]["ordinary_cpu_s"] / res["n_sweep"][-1]["base_cpu_s"],
                       ratio_nd=res["donation"]["hesso_ordinary_not_donated_cpu_s"]
                       / res["donation"]["sgd_not_donated_cpu_s"],
                       N=res["donation"]["N"],
                       sd=1e3 * res["donation"]["sgd_donated_cpu_s"],
                       sn=1e3 * res["donation"]["sgd_not_donated_cpu_s"],
                       hd=1e3 * res["donation"]["hesso_ordinary_donated_cpu_s"],
                       hn=1e3 * res["donation"]["hesso_ordinary_not_donated_cpu_s"]),
        "",
        "Identification vs G: at small G the period start's extra cost is the O(N) saliency "
        "pass; the G-dependent part appears from G = 10⁵ on, where the sort (`bottom_k` "
        "column, exponent ≈ 1 against G·log G) and the three per-group reductions of a short, "
        "wide `(N/G, G)` leaf dominate: such a reduction is several times slower per element "
        "on XLA:CPU than on a tall leaf (table below), which is why `start − ordinary` at "
        "G = 10⁶ exceeds `bottom_k` alone by about three reductions.",
        "",
        "Per-channel reduction (`Groups.reduce` / `group_reduce`: `jnp.sum` over every axis "
        "but the channel axis), CPU ms for the same element count and different shapes:",
        "",
        "| shape | elements | `jnp.sum` leading axes | reshape to (rows, C), sum | "
        "`ones @ x` |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in res["reductions"]:
        lines.append(f"| {tuple(r['shape'])} | {r['elements']:.1e} | "
                     f"{1e3 * r['sum_leading_axes_s']:.1f} | {1e3 * r['reshape_then_sum_s']:.1f} "
                     f"| {1e3 * r['ones_matvec_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark (or re-renders a saved one) and writes its outputs."""
    args = parse_args(argv)
    if args.from_json is not None:
        res = json.loads(args.from_json.read_text())
    else:
        res = run(args)
    section = None if args.no_results_md or args.quick else SECTION
    publish(args.out, section, markdown(res), results=res, json_name="scale.json")
    plot(res, args.out / "scale.png")


if __name__ == "__main__":
    main()
