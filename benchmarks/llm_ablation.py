"""LLM ablations on the pretrained Llama decoder: saliency scores (paper Table 6) and budgets.

Two questions, on the runs of ``benchmarks/llm.py`` (same checkpoint, groups, recovery
budget, data order, schedule and verification; see its docstring):

* **Saliency ablation** (HESSO paper Table 6 in miniature): HESSO and HESSO-CRIC with each
  of the five scores of `hesso_jax.saliency` alone (``saliency=<name>``; CRIC scores its
  trial points with the same score) at one ratio ``r`` of parameters removed,
  ``hj.Budget(params=1 - r)``. The equal mix of the five (HESSO's default) is the
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
import json
import math
import sys
from pathlib import Path
from typing import Any

import llm
from common import command_line, environment, environment_line, publish
from tqdm.auto import tqdm

import hesso_jax as hj
from hesso_jax.saliency import SCORES, weighted

SECTION = "## LLM ablations: saliency scores (Table 6) and FLOP budgets"
JSON = "llm_ablation.json"
PARTS = ("saliency", "budget")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """`llm.parse_args`'s options plus the ablation's own."""
    argv = list(argv or [])
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--parts", default=",".join(PARTS))
    own.add_argument("--scores", default=",".join(SCORES))
    own.add_argument("--ratio", type=float, default=0.25,
                     help="fraction of params removed in the saliency ablation")
    own.add_argument("--count-fraction", type=float, default=0.25,
                     help="fraction of the groups count-K HESSO removes")
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
    model, info = llm.prune(method, dense, groups, ratio, args.seed, ctx["data"], args,
                            budget=budget, saliency=fn)
    row = llm.measure(method, ratio, args.seed, model, info, dense, groups, ctx["windows"],
                      args, target=target)
    row.update(part=part, saliency=saliency)
    tqdm.write(f"{part}: {method} {saliency or 'mix'} {target[0]}: ppl "
               f"{row['heldout_perplexity']:.3f}, kept {100 * row['kept_params']:.1f} % "
               f"params, {100 * row['kept_flops']:.1f} % FLOPs")
    return row


def saliency_fn(name: str) -> Any:
    """HESSO's ``saliency=`` for a row label, the normalisation always explicit (under a
    `Budget` HESSO's own default is the additive mix): ``"norm"`` / ``"additive"`` the
    equal mix of the five scores normalised by norm / to shares, a score name that score
    alone, norm-normalised (the reference's scores, as in the paper's Table 6)."""
    if name in ("norm", "additive"):
        return weighted(normalize=name)
    return weighted({name: 1.0}, normalize="norm")


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
    if "budget" in parts:
        jobs.append(("budget", "hesso", args.count_fraction, ("count", args.count_fraction),
                     "norm"))
    for job in tqdm(jobs, desc="ablation runs"):
        if (job[0], job[1], job[4], job[3][0]) not in done:
            rows.append(one_run(args, ctx, *job))
            save(rows)
    if "budget" not in parts:
        return rows
    count = next(r for r in rows if run_key(r) == ("budget", "hesso", "norm", "count"))
    f = count["kept_flops"]
    for mix in ("norm", "additive"):
        if ("budget", "hesso", mix, "flops") not in done:
            rows.append(one_run(args, ctx, "budget", "hesso", hj.Budget(flops=f),
                                ("flops", f), mix))
            save(rows)
    return rows


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
    names = {"count": "HESSO, K = {:.0%} of the groups",
             "flops": "HESSO, `Budget(flops={:.4f})`"}
    mixes = {"norm": ", norm mix", "additive": ", additive mix"}
    return "\n".join([HEADER.format(what="selection")] + [
        _row_line(r, names[r["target"][0]].format(r["target"][1]) + mixes[r["saliency"]])
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
                     f"mix of the five (HESSO's default: under a `Budget` the additive mix) "
                     f"is the LLM-pruning section's HESSO / HESSO-CRIC row of the same seed, "
                     f"ratio and recipe.\n\n" + saliency_table(rows))
    if any(r["part"] == "budget" for r in rows):
        parts.append("**Budget in FLOPs vs a count of groups**: count-K HESSO first, then "
                     "`hj.Budget(flops=f)` at the FLOP fraction `f` count-K achieved, with "
                     "the equal mix of the five scores normalised by norm (the reference's "
                     "mix, HESSO's default for a count K) and normalised additively "
                     "(`weighted(normalize=\"additive\")`, HESSO's default under a "
                     "`Budget`: each score a loss-increase estimate, so saliency / cost is "
                     "loss per FLOP)."
                     "\n\n" + budget_table(rows))
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
