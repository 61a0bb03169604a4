"""Where a HESSO period start's time goes, and the library's reductions against the old ones.

Issue 14 item 1: the period start (saliency + selection under ``lax.cond``) must cost at
most 1.5× the base optimizer's step. For the ``64→G→10`` MLPs of
``benchmarks/step_cost.py`` (``wide1e3`` … ``wide1e5``, ``mlp10m``) this script

* times the pieces of a period start on their own (``--parts``): the default saliency
  (five scores), one per-group reduction, a plain sum of squares (one pass, the floor),
  the selection `hesso_jax.projection.bottom_k` and the recomputed Adam update, each
  *before* (`REFERENCE`: the implementations this work replaced, kept here verbatim) and
  *after* (the library), with a count of what the compiled saliency + selection does:
  fusions reading a parameter-sized operand (passes), scatter and sort instructions;
* times whole training steps (``step_cost.Case``: forward, backward, update) for the base
  (Adam) and for HESSO before and after, interleaved in rotating rounds, at an ordinary
  step and at both kinds of period start, as ratios to Adam's step (medians of wall time
  and of process CPU time, the latter less sensitive to other processes' load); checks
  that before and after select the same groups with scores equal to float32 rounding.

Usage::

    python benchmarks/period_start.py --models wide1e3,wide1e4,wide1e5 --rounds 5
    python benchmarks/period_start.py --models wide1e5 --parts-only
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_cost as sc  # noqa: E402

import hesso_jax.projection as projection  # noqa: E402
from hesso_jax.groups import Groups, replicate  # noqa: E402
from hesso_jax.saliency import evaluate, weighted  # noqa: E402


def _reference_reduce_many(self: Groups, fn: Callable, *trees: Any) -> jax.Array:
    """Before: one XLA reduction over the non-channel axes per statistic and member leaf,
    one ``segment_sum`` (a scatter) per statistic."""
    layout = self.layout(trees[0], dependents="present")
    leaves = [jax.tree.leaves(t) for t in trees]
    rows = []
    k = len(jax.eval_shape(fn, *(jax.ShapeDtypeStruct((), jnp.float32) for _ in trees)))
    for j in range(k):
        parts = [replicate(m.channel_sum(fn(*(lv[m.leaf] for lv in leaves))[j]))
                 for m in layout.members]
        index = np.concatenate([m.index for m in layout.members])
        rows.append(jax.ops.segment_sum(jnp.concatenate(parts), index,
                                        num_segments=self.num_groups + 1)[: self.num_groups])
    return jnp.stack(rows)


def _reference_bottom_k(scores: jax.Array, candidates: jax.Array, k: Any) -> jax.Array:
    """Before: a stable ``lexsort`` by (not a candidate, score) and its inverse by scatter."""
    scores, candidates = replicate(scores), replicate(candidates)
    clean = jnp.where(jnp.isnan(scores), jnp.inf, scores)
    order = jnp.lexsort((clean, ~candidates))
    rank = jnp.zeros(order.shape, jnp.int32).at[order].set(
        jnp.arange(order.shape[0], dtype=jnp.int32))
    return candidates & (rank < k)


REFERENCE = {"reduce_many": _reference_reduce_many, "bottom_k": _reference_bottom_k}


@contextlib.contextmanager
def reference() -> Iterator[None]:
    """Traces inside this context use the `REFERENCE` implementations (the *before*)."""
    hesso_mod = sys.modules["hesso_jax.hesso"]  # the name hesso_jax.hesso is the function
    saved = (Groups.reduce_many, projection.bottom_k, hesso_mod.bottom_k)
    Groups.reduce_many = _reference_reduce_many
    projection.bottom_k = hesso_mod.bottom_k = _reference_bottom_k
    try:
        yield
    finally:
        Groups.reduce_many, projection.bottom_k, hesso_mod.bottom_k = saved


def _median_ms(f: Callable, *args: Any, n: int) -> tuple[float, float]:
    jax.block_until_ready(f(*args))
    wall, cpu = [], []
    for _ in range(n):
        c0, t0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(f(*args))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return float(np.median(wall)) * 1e3, float(np.median(cpu)) * 1e3


def hlo_counts(compiled: Any, big: int) -> dict[str, int]:
    """Fusions/ops reading an operand of ``>= big`` elements (passes), scatters, sorts."""
    text = compiled.as_text()
    shapes = {}
    for name, dims in re.findall(r"%(\S+) = \w+\[([\d,]*)\]", text):
        shapes[name] = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    passes = 0
    for line in text.split("ENTRY")[1].splitlines():
        m = re.search(r" (fusion|reduce|while|sort|scatter)\(([^)]*)\)", line)
        if m and any(shapes.get(o.strip().lstrip("%"), 0) >= big
                     for o in m.group(2).split(",")):
            passes += 1
    return {"passes": passes, "scatter": len(re.findall(r" scatter\(", text)),
            "sort": len(re.findall(r" sort\(", text))}


def parts(name: str, reps: int) -> list[dict[str, Any]]:
    """Time the period start's pieces alone, before and after."""
    model = sc.build(name)
    groups, params, G = model.groups, model.params, model.groups.num_groups
    direction = jax.tree.map(lambda a: a * 0.01 + 0.001, params)
    big = max(int(np.size(p)) for p in jax.tree.leaves(params))
    cand = jnp.ones(G, bool)
    fn = weighted()
    adam = optax.adam(1e-3)
    state = adam.init(params)
    pieces = {
        "saliency (5 scores)": (lambda p, d: evaluate(fn, p, d, groups), (params, direction)),
        "one reduction": (lambda p: groups.reduce(jnp.square, p), (params,)),
        "sum of squares (floor)": (lambda p: sum(jnp.sum(jnp.square(x))
                                                 for x in jax.tree.leaves(p)), (params,)),
        "bottom_k": (lambda s, c: projection.bottom_k(s, c, G // 4),
                     (jnp.linspace(1.0, 0.0, G), cand)),
        "saliency + bottom_k": (lambda p, d: projection.bottom_k(
            evaluate(fn, p, d, groups), cand, G // 4), (params, direction)),
        "adam update": (lambda g, s, p: adam.update(g, s, p)[0], (direction, state, params)),
    }
    rows = []
    for label, (f, args) in pieces.items():
        row = {"model": name, "G": G, "piece": label}
        for impl in ("before", "after"):
            ctx = reference() if impl == "before" else contextlib.nullcontext()
            with ctx:
                jf = jax.jit(lambda *a, f=f: f(*a))
                compiled = jf.lower(*args).compile()
                row[f"{impl}_wall_ms"], row[f"{impl}_cpu_ms"] = _median_ms(compiled, *args,
                                                                            n=reps)
                row[f"{impl}_hlo"] = hlo_counts(compiled, big)
        rows.append(row)
        print(f"| {name} | {G} | {label} | {row['before_cpu_ms']:.3f} | "
              f"{row['after_cpu_ms']:.3f} | {row['before_wall_ms']:.3f} | "
              f"{row['after_wall_ms']:.3f} | {_fmt(row['before_hlo'])} | "
              f"{_fmt(row['after_hlo'])} |", flush=True)
    return rows


def _fmt(h: dict[str, int]) -> str:
    return f"{h['passes']} / {h['scatter']} / {h['sort']}"


class _Timed(sc.Case):
    """A `step_cost.Case` traced (and warmed) with the before or the after implementation."""

    def __init__(self, model: sc.Model, variant: str, donate: bool, impl: str):
        ctx = reference() if impl == "before" else contextlib.nullcontext()
        with ctx:
            super().__init__(model, variant, donate)
            for kind in sc.KINDS if self.hesso else ("ordinary",):
                self.call(kind)  # traces under ctx; later calls hit jit's cache

    def outputs(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """(redundant mask, scores) after one step of ``kind`` from fixed inputs."""
        params, state = self.inputs(kind)
        _, new_state, _ = self.step(params, state, self.model.batch)
        status = [s for s in jax.tree.leaves(new_state, is_leaf=lambda s: isinstance(
            s, sc.HessoState)) if isinstance(s, sc.HessoState)][0]
        return np.asarray(status.redundant), np.asarray(status.scores)


def steps(name: str, variants: list[str], rounds: int, per_block: int) -> list[dict[str, Any]]:
    """Whole steps, Adam vs HESSO before/after, interleaved; ratios to Adam's step."""
    model = sc.build(name)
    rows = []
    for donate in (False, True):
        cases = {"adam": _Timed(model, "adam", donate, "after")}
        for v in variants:
            for impl in ("before", "after"):
                cases[f"{v} [{impl}]"] = _Timed(model, v, donate, impl)
        for v in variants:
            for kind in ("start0", "start1"):
                if donate:
                    break  # donated outputs feed back; compare on undonated steps
                (m0, s0), (m1, s1) = (cases[f"{v} [{i}]"].outputs(kind)
                                      for i in ("before", "after"))
                assert np.array_equal(m0, m1), f"{name} {v} {kind}: selections differ"
                np.testing.assert_allclose(s0, s1, rtol=2e-5, atol=1e-7)
        med = sc.time_cases(cases, rounds, per_block)
        for key in cases:
            if key == "adam":
                continue
            row = {"model": model.name, "G": model.groups.num_groups, "donate": donate,
                   "case": key, "adam_ms": med["adam/ordinary"] * 1e3,
                   "temp_extra_bytes": cases[key].temp - cases["adam"].temp}
            for kind in sc.KINDS:
                row[kind] = med[f"{key}/{kind}"] / med["adam/ordinary"]
                row[f"{kind}_cpu"] = med[f"{key}/{kind}/cpu"] / med["adam/ordinary/cpu"]
            rows.append(row)
            print(f"| {row['model']} | {row['G']} | {'yes' if donate else 'no'} | {key} | "
                  f"{row['adam_ms']:.2f} | {row['ordinary']:.2f}× ({row['ordinary_cpu']:.2f}×) "
                  f"| {row['start0']:.2f}× ({row['start0_cpu']:.2f}×) | {row['start1']:.2f}× "
                  f"({row['start1_cpu']:.2f}×) | {row['temp_extra_bytes'] / 1e6:+.3f} MB |",
                  flush=True)
        del cases
        gc.collect()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="wide1e3,wide1e4,wide1e5")
    parser.add_argument("--variants", default="hesso base=,hesso")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-block", type=int, default=3)
    parser.add_argument("--reps", type=int, default=15, help="calls per piece (--parts)")
    parser.add_argument("--parts-only", action="store_true")
    parser.add_argument("--steps-only", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"jax": jax.__version__, "load_start": os.getloadavg()}
    names = args.models.split(",")
    if not args.steps_only:
        print("| model | G | piece | before CPU ms | after CPU ms | before wall ms | "
              "after wall ms | before passes / scatters / sorts | after |\n"
              "|---|---|---|---|---|---|---|---|---|", flush=True)
        out["parts"] = [r for n in names for r in parts(n, args.reps)]
    if not args.parts_only:
        print("| model | G | donated | case | Adam ms | ordinary (CPU) | start p=0 (CPU) | "
              "start p=1 (CPU) | scratch − Adam |\n|---|---|---|---|---|---|---|---|---|",
              flush=True)
        out["steps"] = [r for n in names
                        for r in steps(n, args.variants.split(","), args.rounds,
                                       args.per_block)]
    out["load_end"] = os.getloadavg()
    print(f"load average: start {out['load_start']}, end {out['load_end']}")
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
