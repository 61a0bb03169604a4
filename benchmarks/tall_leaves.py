"""Saliency sums of tall leaves: the earlier reduction rule against the library's (issue 14).

A HESSO period start sums per-group statistics of every member leaf
(`hesso_jax.groups.Groups.reduce_many`). The fused form ``hj.hesso(..., base=adam)``
recomputes the Adam update ``u`` inside those sums. The earlier rule sent a leaf of more
than 64 rows and fewer than 8192 channels to one library sum per statistic
(``m.channel_sum``), which needs its operand in a buffer: the period start held ``u`` of
such a leaf. The library now sums every leaf with row-blocked multi-output reductions
(`hesso_jax.groups._sum_rows`), with blocks of `hesso_jax.groups.ROW_BLOCK` (32) rows
above 64; the variants "blocks of 16" (the library's rule before 2026-12-03) and "blocks
of 64" are the same with 16- and 64-row blocks.

For each model, donated and not, the step (forward, backward, update, apply) is compiled
with each rule (traced under it) and reported as the scratch bytes over Adam's
(``memory_analysis()``, deterministic) and the two kinds of period start over Adam's
ordinary step: medians of wall time, all rules and Adam interleaved in rotating rounds in
one process (``step_cost.Case``).

Usage::

    python benchmarks/tall_leaves.py --models mlp10m,bert,wide1e4 --rounds 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_cost as sc  # noqa: E402

import hesso_jax.groups as hg  # noqa: E402

VARIANT = "hesso base= record"
KINDS = ("start0", "start1")


def _earlier_sum_rows(terms: list[jax.Array], rows: int = 64) -> list[jax.Array]:
    """The earlier `_sum_rows`: blocks of 64 rows and a separate remainder reduction."""
    A, C, B = terms[0].shape
    single = len(terms) == 1
    terms = [terms[0], terms[0]] if single else terms
    zero = jnp.zeros((), jnp.float32)

    def reduce(ts: list[jax.Array], dims: tuple[int, ...]) -> list[jax.Array]:
        out = jax.lax.reduce(tuple(ts), (zero,) * len(ts),
                             lambda a, b: tuple(x + y for x, y in zip(a, b, strict=True)), dims)
        return list(jax.lax.optimization_barrier(out))

    if A <= rows:
        sums = reduce(terms, (0, 2))
    else:
        main = A // rows * rows
        blocks = reduce([t[:main].reshape(main // rows, rows, C, B) for t in terms], (1, 3))
        sums = _earlier_sum_rows([b.reshape(main // rows, C, 1) for b in blocks])
        if main < A:
            rest = reduce([t[main:] for t in terms], (0, 2))
            sums = [s + r for s, r in zip(sums, rest, strict=True)]
    return sums[:1] if single else sums


def _earlier_channel_sums(m: Any, terms: list[jax.Array]) -> jax.Array:
    """The earlier `_channel_sums`: tall narrow leaves take one library sum per term."""
    shape, axis = m.shape, m.axis
    A, C = int(np.prod(shape[:axis])), shape[axis]
    B = int(np.prod(shape[axis + 1:]))
    if A * B == 1:
        return jnp.stack([t.astype(jnp.float32).reshape(C) for t in terms])
    if A > 64 and C < 8192:
        return jnp.stack([m.channel_sum(t) for t in terms])
    return jnp.stack(_earlier_sum_rows([t.astype(jnp.float32).reshape(A, C, B) for t in terms]))


@contextlib.contextmanager
def rule(name: str) -> Iterator[None]:
    """Traces inside use the reduction rule ``name`` (one of `RULES`)."""
    saved = hg._channel_sums, hg.ROW_BLOCK
    if name == "earlier":
        hg._channel_sums = _earlier_channel_sums
    elif name.startswith("blocks of "):
        hg.ROW_BLOCK = int(name.removeprefix("blocks of "))
    try:
        yield
    finally:
        hg._channel_sums, hg.ROW_BLOCK = saved


RULES = ("earlier", "blocks of 16", "blocks of 64", "library")


def compare(name: str, donate: bool, rounds: int, per_block: int) -> dict[str, Any]:
    """Scratch and period-start ratios of every rule for one model and donation."""
    model = sc.build(name)
    cases = {"adam": sc.Case(model, "adam", donate)}
    for r in RULES:
        with rule(r):
            cases[r] = sc.Case(model, VARIANT, donate)
            for kind in KINDS:
                cases[r].call(kind)  # traces under the rule; later calls hit jit's cache
    calls = [("adam", "ordinary")] + [(r, k) for r in RULES for k in KINDS]
    times: dict[tuple[str, str], list[float]] = {c: [] for c in calls}
    for i in range(rounds):
        j = i % len(calls)
        for c in calls[j:] + calls[:j]:
            cases[c[0]].call(c[1])
            times[c].extend(cases[c[0]].call(c[1])[0] for _ in range(per_block))
    base = float(np.median(times[("adam", "ordinary")]))
    row = {"model": model.name, "G": model.groups.num_groups, "donated": donate,
           "adam_ms": base * 1e3}
    for r in RULES:
        row[r] = {"scratch_mb": (cases[r].temp - cases["adam"].temp) / 1e6,
                  **{k: float(np.median(times[(r, k)])) / base for k in KINDS}}
    return row


def format_row(row: dict[str, Any]) -> str:
    cells = [f"{row[r]['scratch_mb']:+.2f} MB, {row[r]['start0']:.2f}× / "
             f"{row[r]['start1']:.2f}×" for r in RULES]
    return (f"| {row['model']} | {row['G']} | {'yes' if row['donated'] else 'no'} | "
            f"{row['adam_ms']:.1f} ms | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp10m,bert,wide1e4")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-block", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    print("| model | G | donated | Adam step | " + " | ".join(
        f"{r}: scratch − Adam's, start p=0 / p≥1" for r in RULES) + " |")
    print("|---|---|---|---|" + "---|" * len(RULES))
    rows = []
    for name in args.models.split(","):
        for donate in (False, True):
            rows.append(compare(name, donate, args.rounds, args.per_block))
            print(format_row(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tall_leaves.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
