"""Digits Pareto front: HESSO, HESSO-CRIC and one-shot baselines at equal step budgets.

For each architecture (the demo CNN and a wider ResNet-style net), seed and group sparsity
(30/50/70/90%):

* **dense**: Adam for ``--steps`` steps;
* **HESSO** / **HESSO-CRIC**: the demo recipe (warm-up 20%, P periods over 50%,
  fine-tune 30%) with ``optax.chain(adam, hj.hesso(...))``;
* **magnitude + FT** / **Taylor + FT** (`hesso_jax.baselines`): Adam for 70% of the steps,
  one-shot removal of the K lowest-scoring groups (L2 norm, or Σ|x·∂L/∂x| over 4 batches),
  then fine-tuning with a fresh Adam for the remaining 30% — what a Torch-Pruning user does.

Every pruned model is shrunk with `hj.shrink_model`; the table reports test accuracy (mean
± std over seeds), parameters, FLOPs per example and the shrunk/dense latency ratio on the
test set (interleaved medians, same run). Groups come from `hj.discover_groups`.

    python benchmarks/pareto_digits.py                       # full grid, 3 seeds
    python benchmarks/pareto_digits.py --seeds 1 --steps 600 --archs cnn   # quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import (
    HERE,
    command_line,
    environment_line,
    parser,
    seed_list,
    seeds_arg,
    upsert_section,
)
from flax import nnx
from tqdm.auto import tqdm

import hesso_jax as hj
from hesso_jax.baselines import keep_pruned, one_shot_prune
from hesso_jax.data import load_digits_split
from hesso_jax.models import CNN, ResNet
from hesso_jax.train import (
    count_params,
    demo_schedule,
    evaluate,
    forward_flops,
    latency_ratio,
    make_eval,
    train_classifier,
)

SECTION = "## Digits Pareto front: HESSO vs one-shot baselines"
ARCHS = {
    "cnn": ("CNN(48, 96)", lambda seed: CNN(rngs=nnx.Rngs(seed))),
    "resnet": ("ResNet(32-64-128, 1-1-1)",
               lambda seed: ResNet((32, 64, 128), (1, 1, 1), in_channels=1,
                                   rngs=nnx.Rngs(seed))),
}
METHODS = ("hesso", "hesso_cric", "magnitude", "taylor")
DEFAULT_STEPS = 1500  # --steps; rows written before they recorded "steps" all used it
FLOP_METHODS = ("hesso", "hesso_additive", "hesso_cric_additive", "magnitude", "taylor")
"""Methods of the FLOP-budget rows; ``_additive``: HESSO's saliency mix with
``hj.saliency.weighted(normalize="additive")`` (loss shares, `hesso_jax.saliency`);
``hesso_fisher`` (not in the default ``--flop-methods``; `hj.hesso`'s own default saliency
under a Budget): additive Taylor-2 alone on the raw gradient (`hesso_saliency`); the others
with ``normalize="norm"`` (the reference's mix), set explicitly."""
PEER_METHODS = ("tp_uniform", "tp_global")
"""Torch-Pruning's FLOP-target rows (PyTorch twin, group-L2 magnitude + fine-tuning, per
layer / global), read from `PEER_JSON` when it exists (no PyTorch needed here)."""
ALL_METHODS = (*METHODS, "hesso_additive", "hesso_cric_additive", "hesso_fisher",
               *PEER_METHODS)
PEER_JSON = HERE / "peers" / "torch_pruning_digits_flops.json"
METHOD_LABELS = {"tp_uniform": "Torch-Pruning per layer (PyTorch twin)",
                 "tp_global": "Torch-Pruning global (PyTorch twin)"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser(__doc__, out=None,
               no_write_help="print only: do not write the JSON, the plot or RESULTS.md")
    p.add_argument("--archs", default="cnn,resnet")
    p.add_argument("--sparsities", default="0.3,0.5,0.7,0.9")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="3", type=seeds_arg,
                   help="a count N (seeds 0..N-1) or a comma list of seeds, e.g. '1,2' or '2,'")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--periods", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--min-keep", type=float, default=0,
                   help="per-family floor of every pruning method (hj.hesso(min_keep=...), "
                        "one_shot_prune(min_keep=...)): an int count or a fraction in (0, 1)")
    p.add_argument("--flops", default="",
                   help="FLOP-budget rows: kept FLOP fractions, e.g. '0.7,0.5,0.3' (each "
                        "method with K = hj.Budget(flops=f))")
    p.add_argument("--flop-methods", default=",".join(FLOP_METHODS))
    p.add_argument("--merge", action="store_true",
                   help="add these runs to the rows already in pareto_digits.json "
                        "(same arch/method/sparsity/seed replaced)")
    p.add_argument("--render", action="store_true",
                   help="run nothing: redraw the plot and the RESULTS section from "
                        "pareto_digits.json (and the Torch-Pruning FLOP rows of PEER_JSON)")
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md",
                   help="the RESULTS.md whose section this run rewrites")
    return p.parse_args(argv)


def _taylor_grads(model: nnx.Module, data: Any, seed: int, batches: int = 4,
                  batch: int = 64) -> list[Any]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, p, jax.tree.map(lambda v: v, rest))(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    rng = np.random.default_rng(seed + 10_000)
    grad = jax.jit(jax.grad(loss))
    out = []
    for _ in range(batches):
        idx = rng.choice(len(data.x_train), batch, replace=False)
        out.append(grad(params, data.x_train[idx], data.y_train[idx]))
    return out


def hesso_saliency(method: str) -> tuple[Any, str]:
    """``(saliency=, direction=)`` of a HESSO method name, always explicit (hj.hesso's
    default is the "norm" mix for a count K, `budget_saliency` (``_fisher``) for a Budget):
    ``_fisher``: additive Taylor-2 alone, ``½ Σ_e x_e² (∂f/∂x_e)²`` on the raw gradient (OBD with
    the empirical-Fisher diagonal; ``direction="gradient"``, recomputed from the batch loss at
    period starts); ``_additive``: the equal mix, additive; else the equal mix, "norm"; the
    last two on the base update (HESSO's default direction)."""
    if method.endswith("_fisher"):
        return hj.saliency.weighted({"taylor_second_order": 1.0},
                                    normalize="additive"), "gradient"
    return hj.saliency.weighted(
        normalize="additive" if method.endswith("_additive") else "norm"), "update"


def _train_pruned(args: argparse.Namespace, model: nnx.Module, groups: hj.Groups,
                  method: str, K: float | hj.Budget, seed: int, data: Any) -> None:
    """Trains ``model`` in place with ``method`` at ``K`` (a group fraction or a Budget)."""
    min_keep = _min_keep(args)
    warmup, period_len = demo_schedule(args.steps, args.periods)
    common = dict(batch_size=args.batch_size, seed=seed, eval_every=args.steps,
                  progress=False)
    base = method.removesuffix("_additive").removesuffix("_fisher")
    if base in ("hesso", "hesso_cric"):
        cric = (hj.CricConfig(sample_steps=5, learning_rate=args.lr * 10)
                if base == "hesso_cric" else None)
        saliency, direction = hesso_saliency(method)
        tx = optax.chain(optax.adam(args.lr),
                         hj.hesso(groups, K, args.periods, period_len, warmup_steps=warmup,
                                  cric=cric, min_keep=min_keep, saliency=saliency,
                                  direction=direction))
        train_classifier(model, tx, data, steps=args.steps, **common)
        return
    pre = warmup + args.periods * period_len  # when HESSO finishes pruning
    train_classifier(model, optax.adam(args.lr), data, steps=pre, **common)
    grads = _taylor_grads(model, data, seed) if method == "taylor" else ()
    params = nnx.state(model, nnx.Param)
    pruned, keep = one_shot_prune(params, groups, K, method, grads, min_keep=min_keep)
    nnx.update(model, pruned)
    tx = optax.chain(optax.adam(args.lr), keep_pruned(groups, keep))
    train_classifier(model, tx, data, steps=args.steps - pre, **common)


def run_one(args: argparse.Namespace, arch: str, method: str, sparsity: float | None,
            seed: int, data: Any, dense: nnx.Module, *, flops: float | None = None,
            return_model: bool = False) -> Any:
    """One pruned run at group ``sparsity`` (count K) or, with ``flops``, at
    ``hj.Budget(flops=flops)``: its row, or ``(row, shrunk model)`` with ``return_model``."""
    model = ARCHS[arch][1](seed)
    groups = hj.discover_groups(model, data.x_train[:1])
    t0 = time.perf_counter()
    K = hj.Budget(flops=flops) if flops is not None else sparsity
    _train_pruned(args, model, groups, method, K, seed, data)
    seconds = time.perf_counter() - t0
    zero = np.asarray(groups.zero_groups(nnx.state(model, nnx.Param)))
    if flops is None:
        k = hj.groups.resolve_count(sparsity, groups.num_groups)
        if int(zero.sum()) < k:
            raise RuntimeError(f"{method}: {int(zero.sum())} zero groups, expected {k}")
    small = hj.shrink_model(model, groups)
    x_test = jnp.asarray(data.x_test)
    acc = evaluate(small, data.x_test, data.y_test)
    masked = evaluate(model, data.x_test, data.y_test)
    small_flops = forward_flops(small, data.x_test[:1])
    row = {"arch": arch, "method": method, "sparsity": sparsity, "budget_flops": flops,
           "steps": args.steps, "seed": seed, "min_keep": _min_keep(args), "acc": acc,
           "acc_masked": masked,
           "params": count_params(small), "flops": small_flops,
           "flops_fraction": small_flops / forward_flops(dense, data.x_test[:1]),
           "flops_fraction_model": float(groups.costs.kept_fraction(zero)[1]),
           "zero_groups": int(zero.sum()), "group_fraction": float(zero.mean()),
           "latency_ratio": latency_ratio(make_eval(small), nnx.state(small),
                                          make_eval(dense), nnx.state(dense), x_test,
                                          rounds=20)[0],
           "seconds": seconds}
    return (row, small) if return_model else row


def _min_keep(args: argparse.Namespace) -> int | float:
    """``--min-keep`` as hesso takes it: an int count, or a float fraction below 1."""
    m = args.min_keep
    return int(m) if float(m).is_integer() else float(m)


def _key(r: dict[str, Any]) -> tuple:
    """What distinguishes a configuration (rows before ``--min-keep`` existed had none;
    count-K rows have ``budget_flops`` None, FLOP-budget rows ``sparsity`` None)."""
    return (r["arch"], r["method"], r["sparsity"], r.get("min_keep", 0),
            r.get("budget_flops"), r.get("steps", DEFAULT_STEPS))


def _label(method: str, min_keep: int | float, budget: float | None = None,
           steps: int = 1500) -> str:
    method = METHOD_LABELS.get(method, method)
    name = f"{method} (FLOP budget)" if budget is not None else method
    name = name if steps == DEFAULT_STEPS else f"{name} [{steps} steps]"
    return f"{name} (min_keep={min_keep})" if min_keep else name


def flops_text(flops: float) -> str:
    """``'0.84 M'``, or ``'–'`` when a layer was removed entirely (XLA reports NaN)."""
    return "–" if flops != flops else f"{flops / 1e6:.2f} M"


def aggregate(sel: list[dict[str, Any]]) -> dict[str, Any]:
    """Seed statistics of one configuration's rows: accuracy in % (mean, sample std),
    mean params/FLOPs/seconds, median latency ratio."""
    accs = [100 * r["acc"] for r in sel]
    frac = [r["flops_fraction"] for r in sel if "flops_fraction" in r]
    return {"n": len(sel), "acc_mean": statistics.mean(accs),
            "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "params": statistics.mean(r["params"] for r in sel),
            "flops": statistics.mean(r["flops"] for r in sel),
            "flops_fraction": statistics.mean(frac) if frac else None,
            "latency_ratio": statistics.median(r["latency_ratio"] for r in sel),
            "seconds": statistics.mean(r["seconds"] for r in sel)}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = sorted({_key(r) for r in rows},
                  key=lambda k: (k[0], -k[5], k[4] is not None, -(k[4] or 0), k[2] or 0,
                                 k[3], k[1]))
    return [{"arch": key[0], "method": key[1], "sparsity": key[2], "min_keep": key[3],
             "budget_flops": key[4], "steps": key[5],
             **aggregate([r for r in rows if _key(r) == key])} for key in keys]


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Accuracy vs FLOPs per architecture: one colour per method, dotted for floors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    names = ("dense", *ALL_METHODS)
    colours = dict(zip(names, plt.get_cmap("tab10").colors, strict=False))
    archs = sorted({s["arch"] for s in summary})
    budgeted = sorted({(s["arch"], s["steps"]) for s in summary
                       if s.get("budget_flops") is not None})
    n = len(archs) + len(budgeted)
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.6), squeeze=False)
    for ax, (arch, steps) in zip(axes[0][len(archs):], budgeted, strict=True):
        _plot_budget_panel(ax, summary, arch, steps, colours)
    for ax, arch in zip(axes[0][:len(archs)], archs, strict=True):
        series = sorted({(s["method"], s.get("min_keep", 0), s.get("budget_flops") is not None,
                          s["steps"]) for s in summary if s["arch"] == arch},
                        key=lambda m: (-m[3], m[2], names.index(m[0]), m[1]))
        for method, min_keep, budget, steps in series:
            pts = sorted((s["flops"], s["acc_mean"], s["acc_std"]) for s in summary
                         if s["arch"] == arch and s["method"] == method
                         and s.get("min_keep", 0) == min_keep and s["steps"] == steps
                         and (s.get("budget_flops") is not None) == budget
                         and s["flops"] == s["flops"])  # a removed layer has no FLOPs
            if not pts:
                continue
            f, a, e = zip(*pts, strict=True)
            # no floor: circles, solid; a count floor: squares, dotted; a fraction: triangles;
            # a FLOP budget: diamonds, dash-dotted
            kind = 0 if not min_keep else (1 if float(min_keep).is_integer() else 2)
            style = "none" if method == "dense" else ("-.", ("-", ":", "--")[kind])[not budget]
            ax.errorbar(np.asarray(f) / 1e6, a, yerr=e, capsize=3, color=colours[method],
                        marker="D" if budget else "os^"[kind], linestyle=style,
                        alpha=1.0 if steps == DEFAULT_STEPS else 0.6,
                        label=_label(method, min_keep, 0.0 if budget else None, steps))
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("FLOPs per example (M, shrunk model)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(ARCHS[arch][0])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def results_table(summary: list[dict[str, Any]]) -> str:
    """One line per configuration; the target is a group sparsity or a FLOP budget."""
    lines = ["| arch | method | target | seeds | test acc % (mean ± std) | params | "
             "FLOPs/example | latency shrunk/dense | train s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        target = (f"{100 * s['sparsity']:.0f}% groups" if s.get("budget_flops") is None
                  else f"FLOPs ≤ {100 * s['budget_flops']:.0f}%")
        lines.append(f"| {ARCHS[s['arch']][0]} | "
                     f"{_label(s['method'], s['min_keep'], s.get('budget_flops'), s['steps'])} | "
                     f"{target} | {s['n']} | "
                     f"{s['acc_mean']:.2f} ± {s['acc_std']:.2f} | {s['params']:,.0f} | "
                     f"{flops_text(s['flops'])} | {s['latency_ratio']:.2f} | "
                     f"{s['seconds']:.0f} |")
    return "\n".join(lines)


def flop_section(rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> str:
    """The FLOP-budget part of the RESULTS.md section (empty without FLOP rows)."""
    budget = [r for r in rows if r.get("budget_flops") is not None]
    if not budget:
        return ""
    ok = all(r["budget_flops"] - 0.03 <= r["flops_fraction_model"] <= r["budget_flops"] + 1e-9
             for r in budget)
    xla = [r["flops_fraction"] - r["budget_flops"] for r in budget]
    return ("\n\n### FLOP budgets: count K vs hj.Budget(flops=f) at the same achieved FLOPs"
            "\n\nEvery FLOP-budget run keeps a fraction of the cost model's FLOPs "
            f"(`groups.costs`) in [f − 0.03, f]: {'yes' if ok else 'NO'}; XLA's count of the "
            f"shrunk model minus f: {min(xla):+.3f} to {max(xla):+.3f}. `_additive`: HESSO's "
            "mix with `hj.saliency.weighted(normalize=\"additive\")` (hj.hesso's default "
            "under a Budget when those rows were run), the others the reference's "
            "`normalize=\"norm\"` mix; `hesso_fisher`: `hj.saliency.budget_saliency()` "
            "(additive Taylor-2 alone, hj.hesso's default under a Budget since) with "
            "`hj.hesso(..., direction=\"gradient\")`; magnitude / taylor are "
            "`one_shot_prune(..., hj.Budget(flops=f))`; Torch-Pruning: the PyTorch twin "
            "pruned to the FLOP target (section \"Torch-Pruning on digits (flops)\"). The "
            "count-K column interpolates the count-K HESSO curve (and the dense point) of the "
            "table above with the same step count linearly in FLOPs at the row's achieved "
            "FLOPs (seed means: compare rows with the same seeds).\n\n"
            + matched_table(summary) + _paired_text(rows))


def _paired_text(rows: list[dict[str, Any]]) -> str:
    """The per-seed paired comparisons (`paired_table`) of the HESSO FLOP-budget methods
    that have at least two paired seeds, with the rule they follow."""
    tables = [t for m in ("hesso_fisher", "hesso_additive")
              if sum(len(r["seeds"]) > 1 for r in paired_matched(rows, m))
              and (t := paired_table(rows, m))]
    if not tables:
        return ""
    return ("\n\nPaired per seed (`paired_matched`): each budget run against count-K "
            "HESSO of the same seed and step count (that seed's dense run as the 100 % "
            "point), interpolated linearly in XLA FLOPs between the two count-K runs that "
            "bracket its achieved FLOPs; Δ = budget − count K; the interval is the 95 % "
            "Student-t interval of the mean Δ over seeds (n − 1 degrees of freedom); one "
            "test image is 0.28 pp.\n\n" + "\n\n".join(tables))


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear ``y(x)`` through ``points`` (sorted by x); None outside them."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def matched_table(summary: list[dict[str, Any]]) -> str:
    """FLOP-budget rows against count-K HESSO *at the same achieved FLOPs*: the count-K
    accuracy is interpolated linearly in FLOPs between its two nearest measured points."""
    lines = ["| arch | FLOP target | method | seeds | FLOPs kept (XLA) | test acc % | "
             "count-K HESSO at same FLOPs | Δ |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for s in summary:
        if s.get("budget_flops") is None:
            continue
        count = [(c["flops"], c["acc_mean"]) for c in summary
                 if c["arch"] == s["arch"] and c["method"] in ("hesso", "dense")
                 and c["steps"] == s["steps"]
                 and c.get("budget_flops") is None and not c.get("min_keep")
                 and c["flops"] == c["flops"]]
        ref = interpolate(count, s["flops"])
        ref_text = "–" if ref is None else f"{ref:.2f}"
        delta = "–" if ref is None else f"{s['acc_mean'] - ref:+.2f}"
        lines.append(f"| {ARCHS[s['arch']][0]} | {100 * s['budget_flops']:.0f}% | "
                     f"{_label(s['method'], s['min_keep'], None, s['steps'])} | {s['n']} | "
                     f"{100 * (s['flops_fraction'] or float('nan')):.1f}% | "
                     f"{s['acc_mean']:.2f} ± {s['acc_std']:.2f} | {ref_text} | {delta} |")
    return "\n".join(lines)


T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262}
"""Two-sided 95 % Student-t critical values by degrees of freedom (`paired_matched`)."""


def _seed_curve(rows: list[dict[str, Any]], arch: str, steps: int,
                seed: int) -> list[tuple[float, float, float]]:
    """``(XLA FLOPs, accuracy %, group sparsity)`` of one seed's count-K HESSO rows (no
    floor) and its dense row at ``steps`` steps, sorted by FLOPs (NaN FLOPs left out)."""
    return sorted((r["flops"], 100 * r["acc"], r["sparsity"]) for r in rows
                  if r["arch"] == arch and r["seed"] == seed
                  and r.get("steps", DEFAULT_STEPS) == steps
                  and r["method"] in ("hesso", "dense") and r.get("budget_flops") is None
                  and not r.get("min_keep") and r["flops"] == r["flops"])


def paired_matched(rows: list[dict[str, Any]], method: str = "hesso_fisher"
                   ) -> list[dict[str, Any]]:
    """``method``'s FLOP-budget rows against count-K HESSO at the same achieved FLOPs,
    paired per seed.

    For every seed of a FLOP-budget configuration, the count-K HESSO accuracy of the same
    arch, step count and seed (its dense row as the 100 % point) is interpolated linearly
    in XLA FLOPs between the two count-K points that bracket the budget run's FLOPs; the
    differences are then averaged over the seeds that have a bracket.

    Args:
      rows: rows of ``pareto_digits.json`` (every seed, not the summary).
      method: the FLOP-budget method compared, e.g. ``"hesso_fisher"``.

    Returns:
      One dict per (arch, steps, FLOP target) with per-seed lists ``seeds``, ``acc``,
      ``flops_fraction``, ``ref`` (interpolated count-K accuracy, %), ``bracket`` (the two
      count-K group sparsities, 0 = dense) and ``diff`` (acc − ref, pp), plus
      ``diff_mean``, ``diff_std`` (sample std) and ``ci95`` (half-width of the 95 %
      Student-t interval of the mean difference; None below 2 seeds).
    """
    out = []
    budget = [r for r in rows if r["method"] == method and r.get("budget_flops") is not None
              and not r.get("min_keep")]
    keys = sorted({(r["arch"], r.get("steps", DEFAULT_STEPS), r["budget_flops"])
                   for r in budget}, key=lambda k: (k[0], -k[1], -k[2]))
    for arch, steps, f in keys:
        res: dict[str, Any] = {"arch": arch, "steps": steps, "budget_flops": f, "seeds": [],
                               "acc": [], "flops_fraction": [], "ref": [], "bracket": [],
                               "diff": []}
        for r in sorted((r for r in budget if (r["arch"], r.get("steps", DEFAULT_STEPS),
                                               r["budget_flops"]) == (arch, steps, f)),
                        key=lambda r: r["seed"]):
            curve = _seed_curve(rows, arch, steps, r["seed"])
            pair = [(a, b) for a, b in zip(curve, curve[1:], strict=False)
                    if a[0] <= r["flops"] <= b[0]]
            if not pair:
                continue
            ref = interpolate([(c[0], c[1]) for c in pair[0]], r["flops"])
            res["seeds"].append(r["seed"])
            res["acc"].append(100 * r["acc"])
            res["flops_fraction"].append(r["flops_fraction"])
            res["ref"].append(ref)
            res["bracket"].append((pair[0][0][2], pair[0][1][2]))
            res["diff"].append(100 * r["acc"] - ref)
        n = len(res["diff"])
        res["diff_mean"] = statistics.mean(res["diff"]) if n else None
        res["diff_std"] = statistics.stdev(res["diff"]) if n > 1 else None
        res["ci95"] = (T95.get(n - 1, 1.96) * res["diff_std"] / n ** 0.5) if n > 1 else None
        out.append(res)
    return out


def paired_table(rows: list[dict[str, Any]], method: str = "hesso_fisher") -> str:
    """Markdown of `paired_matched`: one line per FLOP target (empty without rows)."""
    res = [r for r in paired_matched(rows, method) if r["seeds"]]
    if not res:
        return ""
    lines = [f"| arch | steps | FLOP target | seeds | {method} acc % | FLOPs kept (XLA) | "
             "count-K brackets | count-K at same FLOPs % | Δ per seed (pp) | "
             "Δ mean ± 95% CI (pp) |", "|---|---:|---:|---|---:|---:|---|---:|---:|---:|"]
    for r in res:
        n = len(r["seeds"])
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        brackets = sorted({f"{100 * min(a, b):.0f}–{100 * max(a, b):.0f}%"
                           for a, b in r["bracket"]})
        ci = "–" if r["ci95"] is None else f"{r['ci95']:.2f}"
        lines.append(
            f"| {ARCHS[r['arch']][0]} | {r['steps']} | {100 * r['budget_flops']:.0f}% | "
            f"{','.join(map(str, r['seeds']))} | "
            f"{statistics.mean(r['acc']):.2f} ± {sd(r['acc']):.2f} | "
            f"{100 * statistics.mean(r['flops_fraction']):.1f}% | {', '.join(brackets)} | "
            f"{statistics.mean(r['ref']):.2f} ± {sd(r['ref']):.2f} | "
            f"{' / '.join(f'{d:+.2f}' for d in r['diff'])} | "
            f"{r['diff_mean']:+.2f} ± {ci} (n={n}) |")
    return "\n".join(lines)


def peer_rows(path: Path = PEER_JSON) -> tuple[list[dict[str, Any]], list[str]]:
    """Torch-Pruning's FLOP-target rows of ``path`` as rows of this benchmark (arch
    ``cnn``, methods `PEER_METHODS`, ``flops`` XLA's count of the same channel counts) and
    the commands that wrote them; ``([], [])`` when the file does not exist."""
    if not path.exists():
        return [], []
    data = json.loads(path.read_text())
    rows = [{"arch": "cnn", "method": r["method"], "sparsity": None,
             "budget_flops": r["budget_flops"], "steps": r["steps"], "seed": r["seed"],
             "min_keep": 0, "acc": r["acc"], "params": r["params"], "flops": r["flops_xla"],
             "flops_fraction": r["flops_fraction"], "latency_ratio": r["latency_ratio"],
             "seconds": r["seconds"]}
            for r in data["rows"] if r.get("budget_flops") is not None]
    return rows, data.get("commands", [data["command"]])


def write_outputs(args: argparse.Namespace, rows: list[dict[str, Any]],
                  summary: list[dict[str, Any]], commands: list[str]) -> None:
    """The plot and the RESULTS.md section of ``rows`` (``summary = summarize(rows)``),
    with Torch-Pruning's FLOP-target rows (`peer_rows`) in the FLOP table and the plot."""
    peers, peer_commands = peer_rows()
    with_peers = summarize(rows + peers)
    plot(with_peers, HERE / "pareto_digits.png")
    cmd = "`, then `".join(c.strip() for c in commands)
    peer_text = ("" if not peers else " Torch-Pruning rows (FLOP table and plot): `"
                 + "`, then `".join(peer_commands) + "` (PyTorch twin, 1 intra-op thread; "
                 "`benchmarks/peers/torch_pruning_digits_flops.json`).")
    body = (f"Commands: `{cmd}` ({DEFAULT_STEPS} steps unless a row says [N steps], Adam "
            f"lr {args.lr}, batch {args.batch_size}, P={args.periods}; last command on "
            f"{environment_line()}; `train s` and latency are only comparable within the "
            "table). Accuracy is the shrunk model's; every count-K run has exactly K groups "
            f"at 0.0. Plot: `benchmarks/pareto_digits.png`.{peer_text}\n\n"
            + results_table(summary) + flop_section(rows, with_peers))
    upsert_section(args.results, SECTION, body)


def _plot_budget_panel(ax: Any, summary: list[dict[str, Any]], arch: str, steps: int,
                       colours: dict[str, Any]) -> None:
    """Accuracy vs kept FLOP fraction of one arch's FLOP-budget runs at ``steps`` steps,
    with the count-K HESSO curve of the same step count."""
    sel = [s for s in summary if s["arch"] == arch and s["steps"] == steps
           and not s.get("min_keep") and s["flops_fraction"] is not None]
    series = {("hesso", "hesso (count K)"): [s for s in sel if s["method"] == "hesso"
                                             and s.get("budget_flops") is None]}
    for method in dict.fromkeys(s["method"] for s in sel if s.get("budget_flops")):
        kind = "FLOPs target" if method in PEER_METHODS else "FLOP budget"
        series[method, f"{METHOD_LABELS.get(method, method)} ({kind})"] = [
            s for s in sel if s["method"] == method and s.get("budget_flops") is not None]
    for (method, label), pts in series.items():
        pts = sorted((100 * s["flops_fraction"], s["acc_mean"], s["acc_std"]) for s in pts)
        if pts:
            x, y, e = zip(*pts, strict=True)
            ax.errorbar(x, y, yerr=e, capsize=2, fmt="o-" if "count" in label else "D-.",
                        color=colours[method], label=label)
    ax.set(xlabel="FLOPs kept (% of dense, XLA)", ylabel="test accuracy (%)",
           title=f"{ARCHS[arch][0]}: FLOP budgets, {steps} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def render(args: argparse.Namespace) -> None:
    """``--render``: the plot and the RESULTS section from ``pareto_digits.json``."""
    old = json.loads((HERE / "pareto_digits.json").read_text())
    summary = summarize(old["rows"])
    print(results_table(summary))
    print(paired_table(old["rows"]))
    write_outputs(args, old["rows"], summary, old.get("commands", []))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        render(args)
        return
    archs = args.archs.split(",")
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    flop_targets = [float(f) for f in args.flops.split(",") if f]
    flop_methods = [m for m in args.flop_methods.split(",") if m]
    methods = args.methods.split(",")
    rows: list[dict[str, Any]] = []
    out_json = HERE / "pareto_digits.json"
    commands = [command_line("pareto_digits.py", argv)]
    old_rows: list[dict[str, Any]] = []
    if args.merge and out_json.exists():
        old = json.loads(out_json.read_text())
        old_rows, commands = old["rows"], old.get("commands", []) + commands

    def merged() -> list[dict[str, Any]]:
        key = lambda r: (*_key(r), r["seed"])  # noqa: E731
        new_keys = {key(r) for r in rows}
        return [r for r in old_rows if key(r) not in new_keys] + rows

    def save() -> None:  # after every run, so an interrupted grid keeps what it measured
        if args.no_write:
            return
        out_json.write_text(json.dumps({"commands": commands, "rows": merged(),
                                        "summary": summarize(merged())}, indent=1))

    seeds = seed_list(args.seeds)
    jobs = [(a, s) for a in archs for s in seeds]
    bar = tqdm(total=len(jobs) * (1 + len(methods) * len(sparsities)
                                  + len(flop_methods) * len(flop_targets)), desc="runs")
    for arch, seed in jobs:
        data = load_digits_split(seed)
        dense = ARCHS[arch][1](seed)
        t0 = time.perf_counter()
        train_classifier(dense, optax.adam(args.lr), data, steps=args.steps,
                         batch_size=args.batch_size, seed=seed, eval_every=args.steps,
                         progress=False)
        rows.append({"arch": arch, "method": "dense", "sparsity": 0.0, "seed": seed,
                     "steps": args.steps,
                     "min_keep": 0, "acc": evaluate(dense, data.x_test, data.y_test),
                     "acc_masked": None,
                     "params": count_params(dense),
                     "flops": forward_flops(dense, data.x_test[:1]), "latency_ratio": 1.0,
                     "seconds": time.perf_counter() - t0})
        bar.update()
        save()
        for sparsity in sparsities:
            for method in methods:
                rows.append(run_one(args, arch, method, sparsity, seed, data, dense))
                bar.set_postfix(arch=arch, m=method, s=sparsity,
                                acc=f"{100 * rows[-1]['acc']:.1f}")
                bar.update()
                save()
        for f in flop_targets:
            for method in flop_methods:
                rows.append(run_one(args, arch, method, None, seed, data, dense, flops=f))
                bar.set_postfix(arch=arch, m=method, flops=f,
                                acc=f"{100 * rows[-1]['acc']:.1f}")
                bar.update()
                save()
    bar.close()
    rows = merged()
    summary = summarize(rows)
    table = results_table(summary)
    print(table, paired_table(rows), sep="\n")
    save()
    if not args.no_write:
        write_outputs(args, rows, summary, commands)


if __name__ == "__main__":
    main()
