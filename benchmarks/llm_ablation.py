"""LLM ablations on the pretrained Llama decoder: saliency scores (paper Table 6) and budgets.

Two questions, on the runs of ``benchmarks/llm.py`` (same checkpoint, groups, recovery
budget, data order, schedule and verification; see its docstring):

* **Saliency ablation** (HESSO paper Table 6 in miniature): HESSO and HESSO-CRIC with each
  of the five scores of `hesso_jax.saliency` alone (``saliency=<name>``; CRIC scores its
  trial points with the same score) at one ratio ``r`` of parameters removed,
  ``hj.Budget(params=1 - r)``. The equal mix of the five (HESSO's default for a count) is the
  ``llm.py`` row of the same seed and ratio.
* **Budget in FLOPs vs a count of groups** (issue 16): HESSO with ``K`` = a fraction
  ``--count-fraction`` of the groups (count-K: the ``K`` least salient groups, whatever
  they cost), then HESSO with ``hj.Budget(flops=f)`` at the FLOP fraction ``f`` that the
  count-K run achieved — held-out perplexity at the same FLOPs — with the default
  saliency mix and with the additive mix (``weighted(normalize="additive")``, whose
  saliency / cost is an estimated loss increase per FLOP).

Rows are written to ``llm_ablation.json`` after every run (a late failure loses nothing;
``--resume`` skips the runs already there), then the section "LLM ablations" of
``RESULTS.md``.

    python benchmarks/llm_ablation.py                    # both parts, 1 seed, r = 0.25
    python benchmarks/llm_ablation.py --parts budget --count-fraction 0.3
    python benchmarks/llm_ablation.py --quick --random-init --no-write   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import llm
import numpy as np
from common import command_line, environment, environment_line, publish
from flax import nnx
from tqdm.auto import tqdm

import hesso_jax as hj
from hesso_jax.budget import budget_min_keep, budget_select, resolve_budget
from hesso_jax.groups import resolve_count
from hesso_jax.models.charlm import lm_loss
from hesso_jax.projection import FamilyFloor, bottom_k
from hesso_jax.saliency import SCORES, weighted

SECTION = "## LLM ablations: saliency scores (Table 6) and FLOP budgets"
JSON = "llm_ablation.json"
PARTS = ("saliency", "budget", "oneshot")
ONESHOT = ("norm", "additive", "fisher")
"""Saliency labels of the one-shot proxy (`oneshot_rows`), as in `saliency_fn`."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """`llm.parse_args`'s options plus the ablation's own."""
    argv = list(argv or [])
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--parts", default="saliency,budget",
                     help=f"comma list of {PARTS} ('oneshot': the selection proxy, "
                          "`oneshot_rows`)")
    own.add_argument("--scores", default=",".join(SCORES))
    own.add_argument("--ratio", type=float, default=0.25,
                     help="fraction of params removed in the saliency ablation")
    own.add_argument("--count-fraction", type=float, default=0.25,
                     help="fraction of the groups count-K HESSO removes")
    own.add_argument("--budget-runs", default="hesso:norm,hesso:additive",
                     help="the FLOP-budget runs, method:saliency (saliency as in "
                          "`saliency_fn`: norm, additive, fisher, or a score name)")
    own.add_argument("--oneshot-windows", type=int, default=128,
                     help="held-out windows the one-shot proxy scores its selections on")
    own.add_argument("--oneshot-batches", type=int, default=8,
                     help="training batches of the one-shot proxy's directions")
    own.add_argument("--seed", type=int, default=0)
    own.add_argument("--resume", action="store_true",
                     help="keep the rows already in llm_ablation.json, run the rest")
    mine, rest = own.parse_known_args(argv)
    args = llm.parse_args(rest)
    for k, v in vars(mine).items():
        setattr(args, k, v)
    bad = set(args.parts.split(",")) - set(PARTS) | set(args.scores.split(",")) - set(SCORES)
    if bad:
        raise SystemExit(f"unknown part or score {sorted(bad)}; parts {PARTS}, scores "
                         f"{SCORES}")
    return args


def run_key(row: dict[str, Any]) -> tuple:
    """What identifies a run (for ``--resume``)."""
    return (row["part"], row["method"], row.get("saliency"), row["target"][0])


def one_run(args: argparse.Namespace, ctx: dict[str, Any], part: str, method: str,
            budget: Any, target: tuple[str, float], saliency: str) -> dict[str, Any]:
    """A verified `llm.prune` + `llm.measure` run, tagged with its part and saliency."""
    dense, groups = ctx["dense"], ctx["groups"]
    ratio = args.ratio if part == "saliency" else args.count_fraction
    fn = saliency_fn(saliency)
    with hesso_direction(direction_for(saliency)):
        model, info = llm.prune(method, dense, groups, ratio, args.seed, ctx["data"], args,
                                budget=budget, saliency=fn)
    row = llm.measure(method, ratio, args.seed, model, info, dense, groups, ctx["windows"],
                      args, target=target)
    row.update(part=part, saliency=saliency, direction=direction_for(saliency))
    tqdm.write(f"{part}: {method} {saliency or 'mix'} {target[0]}: ppl "
               f"{row['heldout_perplexity']:.3f}, kept {100 * row['kept_params']:.1f} % "
               f"params, {100 * row['kept_flops']:.1f} % FLOPs")
    return row


FISHER = "fisher"
"""Saliency label: additive Taylor-2 alone on the raw gradient (``direction="gradient"``),
``½ Σ_{e∈g} x_e² (∂f/∂x_e)²``: Optimal Brain Damage with the empirical-Fisher diagonal."""


def saliency_fn(name: str) -> Any:
    """HESSO's ``saliency=`` for a row label, the normalisation always explicit (under a
    `Budget` HESSO's own default is ``"fisher"``, `hj.saliency.budget_saliency`):
    ``"norm"`` / ``"additive"`` the equal mix of the five scores normalised by norm / to
    shares, ``"fisher"`` additive Taylor-2 alone (`FISHER`; its direction is set by
    `direction_for`), a score name that score alone, norm-normalised (the reference's
    scores, as in the paper's Table 6)."""
    if name in ("norm", "additive"):
        return weighted(normalize=name)
    if name == FISHER:
        return weighted({"taylor_second_order": 1.0}, normalize="additive")
    return weighted({name: 1.0}, normalize="norm")


def direction_for(name: str) -> str:
    """HESSO's ``direction=`` for a saliency label: ``"gradient"`` for `FISHER` (the raw
    gradient ``−∇f``, recomputed at period starts from the batch loss ``value_fn``),
    else ``"update"`` (HESSO's default, the base optimizer's update)."""
    return "gradient" if name == FISHER else "update"


@contextlib.contextmanager
def hesso_direction(direction: str) -> Iterator[None]:
    """Within the block, `hesso_jax.hesso` defaults to ``direction=direction``
    (`llm.prune` builds HESSO without a ``direction=`` argument)."""
    original = hj.hesso
    hj.hesso = functools.partial(original, direction=direction)
    try:
        yield
    finally:
        hj.hesso = original


def saliency_jobs(args: argparse.Namespace) -> list[tuple]:
    """``(part, method, budget, target, saliency)`` of the saliency ablation."""
    keep = 1.0 - args.ratio
    return [("saliency", m, hj.Budget(params=keep), ("params", keep), s)
            for s in args.scores.split(",") for m in ("hesso", "hesso_cric")]


def run_all(args: argparse.Namespace, ctx: dict[str, Any],
            rows: list[dict[str, Any]], save: Any) -> list[dict[str, Any]]:
    """Runs every job not yet in ``rows`` (saving after each); the count-K run comes
    before the FLOP-budget run, whose target is the FLOPs count-K achieved."""
    done = {run_key(r) for r in rows}
    parts = args.parts.split(",")
    jobs = saliency_jobs(args) if "saliency" in parts else []
    if "budget" in parts or "oneshot" in parts:
        jobs.append(("budget", "hesso", args.count_fraction, ("count", args.count_fraction),
                     "norm"))
    for job in tqdm(jobs, desc="ablation runs"):
        if (job[0], job[1], job[4], job[3][0]) not in done:
            rows.append(one_run(args, ctx, *job))
            save(rows)
    if "budget" not in parts and "oneshot" not in parts:
        return rows
    count = next(r for r in rows if run_key(r) == ("budget", "hesso", "norm", "count"))
    f = count["kept_flops"]
    if "oneshot" in parts and not any(r["part"] == "oneshot" for r in rows):
        rows.extend(oneshot_rows(args, ctx, f))
        save(rows)
    for run in args.budget_runs.split(",") if "budget" in parts else ():
        method, mix = run.split(":")
        if ("budget", method, mix, "flops") not in done:
            rows.append(one_run(args, ctx, "budget", method, hj.Budget(flops=f),
                                ("flops", f), mix))
            save(rows)
    return rows


def oneshot_directions(dense: nnx.Module, data: jax.Array, args: argparse.Namespace,
                       ) -> tuple[Any, dict[str, Any]]:
    """``(params, {"update": ū, "gradient": −g₀})`` at the checkpoint from the gradients
    ``g_b`` of ``--oneshot-batches`` training batches: ``ū = −mean_b g_b / rms_b g_b``
    (Adam's ``−m/√v`` with the moments over the batches: what HESSO's direction is under
    Adam) and ``−g₀`` (one batch's raw gradient: ``direction="gradient"``)."""
    graphdef, params = nnx.split(dense, nnx.Param)

    def loss(p: Any, w: jax.Array) -> jax.Array:
        return lm_loss(nnx.merge(graphdef, p)(w[:, :-1]), w[:, 1:])

    grad = jax.jit(jax.grad(loss))
    key = jax.random.key(args.seed + 20_000)
    gs = [grad(params, llm.windows_at(data, jax.random.fold_in(key, i), args.batch,
                                      args.seq_len)) for i in range(args.oneshot_batches)]
    mean = jax.tree.map(lambda *a: sum(a) / len(a), *gs)
    rms = jax.tree.map(lambda *a: jnp.sqrt(sum(x * x for x in a) / len(a)), *gs)
    update = jax.tree.map(lambda m, r: -m / (r + 1e-8), mean, rms)
    return params, {"update": update, "gradient": jax.tree.map(lambda g: -g, gs[0])}


def oneshot_select(groups: hj.Groups, scores: jax.Array, K: Any,
                   min_keep: int) -> np.ndarray:
    """``bool[G]``: what one selection removes from the dense model: `budget_select` with
    the whole requirement of a `Budget`, else the ``K`` lowest; the family floors kept."""
    alive = jnp.ones(groups.num_groups, bool)
    if not isinstance(K, hj.Budget):
        k = resolve_count(K, groups.num_groups)
        floor = FamilyFloor.build(groups, min_keep, k)
        cand = floor.candidates(scores, alive) if floor is not None else alive
        return np.asarray(bottom_k(scores, cand, k))
    rb = resolve_budget(K, groups, groups.costs, min_keep=min_keep)
    floor = FamilyFloor.build(groups, budget_min_keep(min_keep))
    protected = floor.protected(scores, alive) if floor is not None else ~alive
    return np.asarray(budget_select(scores, rb.tables, alive, protected,
                                    rb.period_target(0, 1)))


def oneshot_rows(args: argparse.Namespace, ctx: dict[str, Any],
                 f: float) -> list[dict[str, Any]]:
    """The selection proxy: from the dense checkpoint, *one* selection (no training) per
    saliency label × direction, count-K at ``--count-fraction`` and ``Budget(flops=f)``;
    each row's ``delta_loss`` is the held-out loss increase (nats/token, first
    ``--oneshot-windows`` windows) of zeroing the selected groups."""
    dense, groups = ctx["dense"], ctx["groups"]
    params, directions = oneshot_directions(dense, ctx["data"], args)
    windows = ctx["windows"][:args.oneshot_windows]
    base = llm.lm_eval_loss(dense, windows)
    model, rows = nnx.clone(dense), []
    for direction, d in directions.items():
        for label in ONESHOT:
            scores = saliency_fn(label)(params, d, groups)
            for K, target in ((args.count_fraction, ("count", args.count_fraction)),
                              (hj.Budget(flops=f), ("flops", f))):
                drop = oneshot_select(groups, scores, K, args.min_keep)
                nnx.update(model, groups.mask(params, jnp.asarray(~drop)))
                kept = groups.costs.kept_fraction(drop)
                rows.append({"part": "oneshot", "method": f"oneshot:{direction}",
                             "saliency": label, "direction": direction, "target": target,
                             "kept_params": float(kept[0]), "kept_flops": float(kept[1]),
                             "per_layer": llm.per_layer(groups, drop),
                             "delta_loss": llm.lm_eval_loss(model, windows) - base})
    return rows


def oneshot_table(rows: list[dict[str, Any]]) -> str:
    """The proxy's rows: selection, direction, what it removes and the loss increase."""
    lines = ["| selection | saliency | direction | FLOPs kept | kv-head groups removed per "
             "layer | SwiGLU neurons removed per layer | Δ held-out loss (nats/token) |",
             "|---|---|---|---:|---|---|---:|"]
    for r in (r for r in rows if r["part"] == "oneshot"):
        what = (f"K = {r['target'][1]:.0%} of the groups" if r["target"][0] == "count"
                else f"`Budget(flops={r['target'][1]:.4f})`")
        lay = r["per_layer"]
        lines.append(f"| {what} | {r['saliency']} | {r['direction']} | "
                     f"{100 * r['kept_flops']:.1f} % | {' / '.join(map(str, lay['heads']))} | "
                     f"{' / '.join(map(str, lay['neurons']))} | {r['delta_loss']:.4f} |")
    return "\n".join(lines)


def _row_line(r: dict[str, Any], name: str) -> str:
    lay = r["per_layer"]
    return (f"| {name} | {r['heldout_perplexity']:.3f} | {100 * r['kept_params']:.1f} % | "
            f"{100 * r['kept_flops']:.1f} % | {' / '.join(map(str, lay['heads']))} | "
            f"{' / '.join(map(str, lay['neurons']))} | "
            f"{'–' if r.get('cric_cycles') is None else r['cric_cycles']} |")


HEADER = ("| {what} | held-out ppl | params kept | FLOPs kept | kv-head groups removed "
          "per layer | SwiGLU neurons removed per layer | CRIC cycles |\n"
          "|---|---:|---:|---:|---|---|---|")


def saliency_table(rows: list[dict[str, Any]]) -> str:
    """Perplexity per score, HESSO and HESSO-CRIC side by side (Table 6's layout)."""
    sel = [r for r in rows if r["part"] == "saliency"]
    lines = ["| score | HESSO ppl | HESSO-CRIC ppl |", "|---|---:|---:|"]
    for score in dict.fromkeys(r["saliency"] for r in sel):
        ppl = {r["method"]: r["heldout_perplexity"] for r in sel if r["saliency"] == score}
        lines.append(f"| {score} | " + " | ".join(
            f"{ppl[m]:.3f}" if m in ppl else "–" for m in ("hesso", "hesso_cric")) + " |")
    detail = [HEADER.format(what="run")] + [
        _row_line(r, f"{llm.LABELS[r['method']]}, {r['saliency']}") for r in sel]
    return "\n".join(lines) + "\n\n" + "\n".join(detail)


def budget_table(rows: list[dict[str, Any]]) -> str:
    """Count-K HESSO and FLOP-budgeted HESSO at the FLOPs count-K reached."""
    sel = sorted((r for r in rows if r["part"] == "budget"), key=lambda r: r["target"][0])
    names = {"count": "{}, K = {:.0%} of the groups", "flops": "{}, `Budget(flops={:.4f})`"}
    mixes = {"norm": ", norm mix", "additive": ", additive mix",
             FISHER: ", additive Taylor-2 on the gradient (`fisher`)"}
    return "\n".join([HEADER.format(what="selection")] + [
        _row_line(r, names[r["target"][0]].format(llm.LABELS[r["method"]], r["target"][1])
                  + mixes.get(r["saliency"], f", {r['saliency']}"))
        for r in sel])


def body_text(result: dict[str, Any]) -> str:
    """The RESULTS.md section."""
    a, rows = result["args"], result["rows"]
    parts = []
    if any(r["part"] == "saliency" for r in rows):
        parts.append(f"**Saliency scores (paper Table 6)**, {100 * a['ratio']:.0f} % of the "
                     f"params removed (`hj.Budget(params={1 - a['ratio']:g})`), seed "
                     f"{a['seed']}; each score alone, normalised by its norm as in the "
                     f"reference (`weighted({{name: 1.0}}, normalize=\"norm\")`). The equal "
                     f"mix of the five (normalised additively, `hj.hesso`'s default under a "
                     f"`Budget` when these rows were run) "
                     f"is the LLM-pruning section's HESSO / HESSO-CRIC row of the same seed, "
                     f"ratio and recipe.\n\n" + saliency_table(rows))
    if any(r["part"] == "budget" for r in rows):
        parts.append("**Budget in FLOPs vs a count of groups**: count-K HESSO first, then "
                     "`hj.Budget(flops=f)` at the FLOP fraction `f` count-K achieved, with "
                     "the equal mix of the five scores normalised by norm (the reference's "
                     "mix, HESSO's default for a count K) and normalised additively "
                     "(`weighted(normalize=\"additive\")`, HESSO's default under a "
                     "`Budget` when these rows were run: each score a loss-increase "
                     "estimate, so saliency / cost is loss per FLOP); `fisher`: "
                     "`hj.saliency.budget_saliency()` (additive Taylor-2 alone, `½ Σ x² g²`; "
                     "`hj.hesso`'s default under a `Budget` since) with `hj.hesso(..., "
                     "direction=\"gradient\")` (the raw batch gradient, recomputed from "
                     "`value_fn` at period starts); HESSO-CRIC rows with the CRIC settings "
                     "below."
                     "\n\n" + budget_table(rows))
    if any(r["part"] == "oneshot" for r in rows):
        parts.append("**One selection from the checkpoint (a proxy, no training)**: "
                     "count-K and the FLOP budget of the rows above, each selected once "
                     "from the dense checkpoint with the saliency and direction named "
                     "(`oneshot_rows`: *update* = Adam's `−m/√v` with moments over "
                     f"{a.get('oneshot_batches', 8)} training batches, *gradient* = one "
                     "batch's raw `−∇f`); Δ loss = held-out loss of the dense model with the "
                     f"selection zeroed minus the dense loss, first "
                     f"{a.get('oneshot_windows', 128)} held-out windows.\n\n"
                     + oneshot_table(rows))
    commands = " then ".join(f"`{c}`" for c in result.get("commands", [result["command"]]))
    return (f"Commands: {commands}. Starting point: {result['start']}; recipe, "
            f"verification and measurement as in the LLM-pruning section ({a['steps']} "
            f"recovery steps × {a['batch']} windows, P = {a['periods']}, CRIC "
            f"`CricConfig(sample_steps={a['cric_steps']}, learning_rate={a['cric_lr']:g}, "
            f"max_cycles={a['cric_cycles']})`, `min_keep={a['min_keep']}`). Machine: "
            f"{environment_line(result['machine'])}.\n\n" + "\n\n".join(parts))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the ablation; writes ``llm_ablation.json`` and the RESULTS section."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    path = args.out / JSON
    result: dict[str, Any] = {"command": command_line("llm_ablation.py", argv),
                              "machine": environment(), "start": llm.start_text(args),
                              "args": {k: (str(v) if isinstance(v, Path) else v)
                                       for k, v in vars(args).items()}}
    old = json.loads(path.read_text()) if args.resume and path.exists() else {}
    rows = old.get("rows", [])
    result["commands"] = [*old.get("commands", [old["command"]] if old else []),
                          result["command"]]

    def save(rows: list[dict[str, Any]]) -> None:
        if not args.no_write:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**result, "rows": rows}, indent=1) + "\n")

    dense, _, data, windows, groups = llm.setup(args)
    ctx = {"dense": dense, "data": data, "windows": windows, "groups": groups}
    result["rows"] = run_all(args, ctx, rows, save)
    result["dense_perplexity"] = math.exp(llm.lm_eval_loss(dense, windows))
    publish(args.out, SECTION, body_text(result), results=result, json_name=JSON,
            write=not args.no_write)
    return result


if __name__ == "__main__":
    main()
