"""LLM pruning: HESSO, HESSO-CRIC and one-shot baselines on the pretrained Llama decoder.

Paper Table 5 in miniature. From the checkpoint of ``benchmarks/llm_pretrain.py``
(`load_pretrained`; ``--random-init`` uses a fresh tiny `Llama` instead, for tests), for
each seed and ratio ``r`` of parameters removed (the budget ``hj.Budget(params=1 - r)``,
whole model: embedding and norms included), over the groups of
``hj.discover_groups(model, tokens)`` (per layer: kv-head groups with their query heads,
SwiGLU neurons; their params/FLOPs recorded by discovery):

* **HESSO** / **HESSO-CRIC**: ``optax.chain(base, hj.hesso(groups, budget, P, Tp,
  warmup_steps=Tw, cric=...))`` for the whole recovery budget (warm-up 20 %, P periods
  over 50 %, fine-tune 30 %; CRIC's trial loss is the batch loss, ``value_fn``);
* **magnitude + FT** / **Taylor + FT** (LLM-Pruner style, `hesso_jax.baselines`): one-shot
  `one_shot_prune` of the pretrained model to the same budget (group L2 norm, or
  ``Σ|x·∂L/∂x|`` over ``--taylor-batches`` training batches), then the recovery budget of
  fine-tuning with the pruned groups held at zero (`keep_pruned`).

Every method gets the same recovery budget: ``--steps`` steps of ``base =
pretrain_optimizer(steps, lr, warmup)`` (clip 1 → adamw, warm-up then cosine to lr/10),
``--batch`` random windows of ``--seq-len + 1`` bytes per step, and the same data order
(`make_lm_train_chunk`, call ``c`` keyed ``fold_in(key(seed + 1), c)``).

Each run is verified: the groups it removed are exactly 0.0, ``hj.shrink_model`` (which
checks masked == shrunk by running) succeeds, the shrunk model's logits equal the masked
model's on held-out windows, and the kept parameter fraction lies in
``[1 - r - 0.03, 1 - r]``. Reported: held-out perplexity (``exp lm_eval_loss`` on
`heldout_windows`) of the shrunk model and of the dense checkpoint, params and FLOPs per
``--seq-len`` window (``hj.group_costs(small, None, x)``), tokens/s of the shrunk vs the
dense model (jitted forward, interleaved rounds), and per layer the kv-head groups and
SwiGLU neurons removed (plot ``llm.png``: one panel per method, bars per layer).

    python benchmarks/llm.py                       # full grid: 3 seeds x 20/25/30 %
    python benchmarks/llm.py --seeds 1 --ratios 0.25 --steps 200    # one configuration
    python benchmarks/llm.py --quick --random-init --no-write       # smoke test (< 1 min)
    python benchmarks/llm.py --from-json benchmarks/llm.json        # re-render only
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import (
    command_line,
    environment,
    environment_line,
    interleaved,
    parser,
    publish,
    seed_list,
    seeds_arg,
)
from flax import nnx
from tqdm.auto import tqdm

import hesso_jax as hj
from hesso_jax import text
from hesso_jax.baselines import keep_pruned, one_shot_prune
from hesso_jax.budget import saliency_normalize
from hesso_jax.models.charlm import lm_loss
from hesso_jax.models.llama import (
    LlamaConfig,
    heldout_windows,
    lm_eval_loss,
    load_pretrained,
    make_lm_train_chunk,
    pretrain_optimizer,
)
from hesso_jax.train import count_params, demo_schedule

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "out" / "llm_pretrain"
SECTION = "## LLM pruning"
METHODS = ("hesso", "hesso_cric", "magnitude", "taylor")
ORDER = ("dense", "dense_ft", *METHODS)
LABELS = {"dense": "dense checkpoint", "dense_ft": "dense + the same FT (control)",
          "hesso": "HESSO", "hesso_cric": "HESSO-CRIC", "magnitude": "magnitude + FT",
          "taylor": "Taylor + FT"}
TOLERANCE = 0.03
"""Achieved kept-parameter fraction must lie in ``[target - TOLERANCE, target]``."""
RANDOM_INIT = LlamaConfig(d_model=32, num_layers=1, num_heads=8, num_kv_heads=4, mlp_dim=192,
                          max_len=128)
"""The ``--random-init`` model: every group costs < 3 % of its parameters."""
QUICK = dict(ratios="0.25", seeds="1", steps=4, batch=4, seq_len=32, periods=2, chunk=4,
             eval_windows=8, timing_batch=2, timing_rounds=3, taylor_batches=2,
             cric_steps=1, cric_cycles=2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; ``--quick`` changes the defaults (explicit flags still win)."""
    p = parser(__doc__, no_write_help="print only: write no JSON, plot or RESULTS.md")
    p.add_argument("--ckpt", type=Path, default=CHECKPOINT)
    p.add_argument("--random-init", action="store_true",
                   help="prune a fresh tiny Llama (no checkpoint needed; for tests)")
    p.add_argument("--quick", action="store_true",
                   help="tiny budget, 1 seed, ratio 0.25 (a smoke run)")
    p.add_argument("--modules", default=None,
                   help="comma list of standard-library modules whose docstrings are the "
                        "corpus (default: all, as for the checkpoint)")
    p.add_argument("--from-json", type=Path, default=None,
                   help="re-render RESULTS.md and the plot from this llm.json (no runs)")
    p.add_argument("--ratios", default="0.2,0.25,0.3", help="fractions of params removed")
    p.add_argument("--seeds", default="3", type=seeds_arg,
                   help="a count N (seeds 0..N-1) or a comma list")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=200, help="recovery budget (every method)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak lr of the recovery schedule")
    p.add_argument("--lr-warmup", type=int, default=10)
    p.add_argument("--periods", type=int, default=5, help="HESSO pruning periods P")
    p.add_argument("--chunk", type=int, default=20, help="steps per jitted lax.scan call")
    p.add_argument("--cric-steps", type=int, default=3, help="CRIC trial steps S")
    p.add_argument("--cric-lr", type=float, default=1e-2, help="CRIC trial step size")
    p.add_argument("--cric-cycles", type=int, default=3, help="cap on CRIC cycles per start")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of llm.json that this command does not rerun "
                        "(other methods, seeds or ratios)")
    p.add_argument("--no-dense-ft", action="store_true",
                   help="skip the control: the dense model trained with the recovery budget")
    p.add_argument("--min-keep", type=int, default=1,
                   help="per-family floor of every method (groups each family keeps); "
                        "a Budget keeps at least 1 anyway (surgery's placeholder group)")
    p.add_argument("--taylor-batches", type=int, default=4)
    p.add_argument("--eval-windows", type=int, default=None,
                   help="held-out windows scored (default: all)")
    p.add_argument("--timing-batch", type=int, default=8, help="windows per timed forward")
    p.add_argument("--timing-rounds", type=int, default=20)
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    if args.steps % args.chunk:
        p.error(f"--steps {args.steps} is not a multiple of --chunk {args.chunk}")
    return args


# ------------------------------------------------------------------------- the runs
def load_model(args: argparse.Namespace) -> tuple[nnx.Module, LlamaConfig]:
    """The dense starting point: the checkpoint, or a fresh `RANDOM_INIT` model."""
    if args.random_init:
        return RANDOM_INIT.build(nnx.Rngs(0)), RANDOM_INIT
    return load_pretrained(args.ckpt)


def windows_at(data: jax.Array, key: jax.Array, batch: int, seq_len: int) -> jax.Array:
    """``batch`` random training windows of ``seq_len + 1`` tokens."""
    starts = jax.random.randint(key, (batch,), 0, data.shape[0] - seq_len)
    return data[starts[:, None] + jnp.arange(seq_len + 1)[None, :]]


def taylor_grads(model: nnx.Module, data: jax.Array, args: argparse.Namespace,
                 seed: int) -> list[Any]:
    """Loss gradients on ``--taylor-batches`` training batches (key ``seed + 10000``)."""
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p: Any, w: jax.Array) -> jax.Array:
        return lm_loss(nnx.merge(graphdef, p)(w[:, :-1]), w[:, 1:])

    grad = jax.jit(jax.grad(loss))
    key = jax.random.key(seed + 10_000)
    return [grad(params, windows_at(data, jax.random.fold_in(key, i), args.batch,
                                    args.seq_len))
            for i in range(args.taylor_batches)]


def recover(model: nnx.Module, tx: optax.GradientTransformation, data: jax.Array,
            args: argparse.Namespace, seed: int, desc: str) -> tuple[Any, list[float], float]:
    """``--steps`` steps of ``tx`` on ``model`` (in place), the same batches for every
    method. Returns ``(opt_state, chunk-mean losses, seconds)``."""
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)
    run = make_lm_train_chunk(graphdef, tx, batch_size=args.batch, seq_len=args.seq_len,
                              steps=args.chunk)
    key = jax.random.key(seed + 1)
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps // args.chunk), desc=desc, leave=False)
    for c in bar:
        params, opt_state, chunk = run(params, opt_state, data, jax.random.fold_in(key, c))
        losses.append(float(jnp.mean(chunk)))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - t0
    nnx.update(model, params)
    return opt_state, losses, seconds


def prune(method: str, dense: nnx.Module, groups: hj.Groups, ratio: float, seed: int,
          data: jax.Array, args: argparse.Namespace, *,
          budget: hj.Budget | int | float | None = None,
          saliency: str | None = None) -> tuple[nnx.Module, dict[str, Any]]:
    """One method at one ratio and seed: the pruned (masked) model and its run record.

    ``budget`` defaults to ``hj.Budget(params=1 - ratio)`` (a count or fraction of groups
    is accepted too, as by `hj.hesso`); ``saliency`` is HESSO's ``saliency=`` (a score
    name; ``None``: the equal mix of the five, normalised additively under a `Budget`,
    ``weighted(normalize="additive")``: the rows of ``llm.json`` were run with it, when it
    was `hj.hesso`'s default there; today's default, ``budget_saliency``, is a row of
    ``llm_ablation.py``) and must be ``None`` for the one-shot baselines."""
    model = nnx.clone(dense)
    budget = hj.Budget(params=1.0 - ratio) if budget is None else budget
    if saliency is not None and method not in ("hesso", "hesso_cric"):
        raise ValueError(f"saliency= is a HESSO option, not one of {method!r}")
    base = pretrain_optimizer(args.steps, args.lr, args.lr_warmup)
    info: dict[str, Any] = {"cric_cycles": None}
    if method in ("hesso", "hesso_cric"):
        warmup, period_len = demo_schedule(args.steps, args.periods)
        cric = (hj.CricConfig(sample_steps=args.cric_steps, learning_rate=args.cric_lr,
                              max_cycles=args.cric_cycles) if method == "hesso_cric" else None)
        if saliency is None:
            saliency = hj.saliency.weighted(normalize=saliency_normalize(budget))
        tx = optax.chain(base, hj.hesso(groups, budget, args.periods, period_len,
                                        warmup_steps=warmup, cric=cric,
                                        min_keep=args.min_keep, saliency=saliency))
        info["schedule"] = {"warmup": warmup, "periods": args.periods,
                            "period_len": period_len}
    else:
        t0 = time.perf_counter()
        grads = taylor_grads(model, data, args, seed) if method == "taylor" else ()
        pruned, keep = one_shot_prune(nnx.state(model, nnx.Param), groups, budget, method,
                                      grads, min_keep=args.min_keep, costs=groups.costs)
        nnx.update(model, pruned)
        info["score_s"] = time.perf_counter() - t0
        tx = optax.chain(base, keep_pruned(groups, keep))
    opt_state, losses, seconds = recover(model, tx, data, args, seed,
                                         f"{method} r={ratio} s={seed}")
    if method in ("hesso", "hesso_cric"):
        status = hj.hesso_status(opt_state)
        expected = np.asarray(status.pruned)
        info["cric_cycles"] = status.cric_cycles if method == "hesso_cric" else None
    else:
        expected = ~np.asarray(keep)
    info.update(expected=expected, train_loss=losses, train_s=seconds)
    return model, info


# ------------------------------------------------------------------------ measuring
@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef: Any, state: Any, x: jax.Array) -> jax.Array:
    """Logits of ``merge(graphdef, state)`` (compiled once per graphdef and shape)."""
    return nnx.merge(graphdef, state)(x)


def forward_fn(model: nnx.Module) -> Any:
    """``x -> logits`` of ``model``, jitted (its state passed as an argument)."""
    graphdef, state = nnx.split(model)
    return lambda x: _logits(graphdef, state, x)


def timing_input(windows: np.ndarray, args: argparse.Namespace) -> jax.Array:
    """``--timing-batch`` held-out windows (inputs only), for timing and equality checks."""
    return jnp.asarray(np.resize(windows[:, :-1], (args.timing_batch, args.seq_len)))


def per_layer(groups: hj.Groups, drop: np.ndarray) -> dict[str, list[int]]:
    """Per layer: kv-head groups and SwiGLU neurons removed, and how many there were."""
    out: dict[str, dict[int, int]] = {k: {} for k in ("heads", "heads_of", "neurons",
                                                      "neurons_of")}
    for fam, start in zip(groups.families, groups.starts, strict=True):
        path = fam.members[0].path
        layer, kind = int(path[1]), "heads" if "attn" in path else "neurons"
        out[kind][layer] = out[kind].get(layer, 0) + int(drop[start:start + fam.size].sum())
        out[f"{kind}_of"][layer] = out[f"{kind}_of"].get(layer, 0) + fam.size
    return {k: [v[i] for i in sorted(v)] for k, v in out.items()}


def verify(method: str, model: nnx.Module, groups: hj.Groups, expected: np.ndarray,
           x: jax.Array) -> tuple[nnx.Module, np.ndarray, float]:
    """Checks the run (see the module docstring); returns ``(small, zero groups, max
    |masked - shrunk| logits)``. Raises `RuntimeError` otherwise."""
    zero = np.asarray(groups.zero_groups(nnx.state(model, nnx.Param)))
    if not zero[expected].all():
        raise RuntimeError(f"{method}: {int((expected & ~zero).sum())} removed groups "
                           "are not exactly zero")
    small = hj.shrink_model(model, groups)   # verifies masked == shrunk by running
    diff = float(jnp.max(jnp.abs(forward_fn(small)(x) - forward_fn(model)(x))))
    if not diff < 1e-3:
        raise RuntimeError(f"{method}: shrunk logits differ from masked ones by {diff}")
    return small, zero, diff


def check_target(method: str, target: tuple[str, float], kept: dict[str, float]) -> None:
    """Raises `RuntimeError` unless the kept fraction of ``target = (metric, fraction)``
    (``"params"`` or ``"flops"``) lies in ``[fraction - TOLERANCE, fraction]``."""
    metric, want = target
    got = kept[metric]
    if not want - TOLERANCE - 1e-9 <= got <= want + 1e-9:
        raise RuntimeError(f"{method}: kept {got:.4f} of the {metric}, target {want:.4f} "
                           f"(allowed [{want - TOLERANCE:.4f}, {want:.4f}])")


def throughput(small: nnx.Module, dense: nnx.Module, args: argparse.Namespace,
               x: jax.Array) -> tuple[float, float]:
    """Tokens/s of the shrunk and the dense forward on ``x`` (interleaved, median of
    rounds)."""
    f_small, f_dense = forward_fn(small), forward_fn(dense)
    times = interleaved({"small": lambda: f_small(x), "dense": lambda: f_dense(x)},
                        args.timing_rounds)
    tokens = args.timing_batch * args.seq_len
    return tokens / float(np.median(times["small"])), tokens / float(np.median(times["dense"]))


def measure(method: str, ratio: float, seed: int, model: nnx.Module, info: dict[str, Any],
            dense: nnx.Module, groups: hj.Groups, windows: np.ndarray,
            args: argparse.Namespace, *,
            target: tuple[str, float] | None = None) -> dict[str, Any]:
    """The row of one pruned run (after `verify` and `check_target`; ``target`` defaults
    to ``("params", 1 - ratio)``, ``("count", ·)`` checks nothing beyond `verify`)."""
    target = ("params", 1.0 - ratio) if target is None else target
    x_time = timing_input(windows, args)
    small, zero, diff = verify(method, model, groups, info["expected"], x_time)
    x = jnp.asarray(windows[:1, :-1])
    costs = hj.group_costs(small, None, x)
    kept = {"params": count_params(small) / count_params(model),
            "flops": costs.dense_flops / groups.costs.dense_flops}
    if target[0] != "count":
        check_target(method, target, kept)
    loss = lm_eval_loss(small, windows)
    tps, dense_tps = throughput(small, dense, args, x_time)
    return {"method": method, "ratio": ratio, "seed": seed, "target": list(target),
            "target_kept": 1.0 - ratio,
            "kept_params": kept["params"], "kept_flops": kept["flops"],
            "params": count_params(small), "flops": int(costs.dense_flops),
            "removed_groups": int(zero.sum()), "heldout_loss": loss,
            "heldout_perplexity": math.exp(loss), "tokens_per_s": tps,
            "dense_tokens_per_s": dense_tps, "speedup": tps / dense_tps,
            "max_abs_diff_masked_vs_shrunk": diff, "per_layer": per_layer(groups, zero),
            "cric_cycles": info["cric_cycles"], "schedule": info.get("schedule"),
            "score_s": info.get("score_s"), "train_s": info["train_s"],
            "final_train_loss": info["train_loss"][-1]}


# ------------------------------------------------------------------------- reporting
def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seed statistics per (method, ratio): perplexity mean ± sample std, mean of the rest."""
    keys = sorted({(r["ratio"], r["method"]) for r in rows},
                  key=lambda k: (k[0], ORDER.index(k[1])))
    out = []
    for ratio, method in keys:
        sel = [r for r in rows if (r["ratio"], r["method"]) == (ratio, method)]
        ppl = [r["heldout_perplexity"] for r in sel]
        mean = {k: statistics.mean(r[k] for r in sel)
                for k in ("kept_params", "kept_flops", "params", "flops", "speedup",
                          "tokens_per_s", "dense_tokens_per_s", "train_s")}
        layers = {k: np.mean([r["per_layer"][k] for r in sel], axis=0).tolist()
                  for k in sel[0]["per_layer"]}
        out.append({"method": method, "ratio": ratio, "n": len(sel),
                    "ppl_mean": statistics.mean(ppl),
                    "ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                    **mean, "per_layer": layers})
    return out


def table(summary: list[dict[str, Any]]) -> str:
    """The markdown table of `summarize`'s rows."""
    lines = ["| method | params removed (target) | seeds | held-out ppl | params (kept) | "
             "FLOPs / window (kept) | tokens/s: this model vs dense, same rounds (×) | "
             "kv-head groups removed per "
             "layer | SwiGLU neurons removed per layer | recovery s |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for s in summary:
        lay = s["per_layer"]
        heads = " / ".join(f"{h:g}" for h in lay["heads"]) + f" (of {lay['heads_of'][0]:g})"
        neurons = " / ".join(f"{n:g}" for n in lay["neurons"]) + \
            f" (of {lay['neurons_of'][0]:g})"
        removed = "–" if s["method"] == "dense" else \
            f"{100 * (1 - s['kept_params']):.1f} % ({100 * s['ratio']:.0f} %)"
        lines.append(
            f"| {LABELS[s['method']]} | {removed} | {s['n']} | "
            f"{s['ppl_mean']:.3f} ± {s['ppl_std']:.3f} | {s['params']:,.0f} "
            f"({100 * s['kept_params']:.1f} %) | {s['flops'] / 1e6:.1f} M "
            f"({100 * s['kept_flops']:.1f} %) | {s['tokens_per_s']:,.0f} vs "
            f"{s['dense_tokens_per_s']:,.0f} (× {s['speedup']:.2f}) | {heads} | {neurons} | "
            f"{s['train_s']:.0f} |")
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Per method (columns) and ratio (rows): % of kv-head groups and of SwiGLU neurons
    removed in every layer, bars per layer, counts on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pruned = [s for s in summary if s["method"] in METHODS]
    methods = [m for m in METHODS if any(s["method"] == m for s in pruned)]
    ratios = sorted({s["ratio"] for s in pruned})
    fig, axes = plt.subplots(len(ratios), len(methods), squeeze=False, sharey=True,
                             figsize=(3.4 * len(methods), 3.0 * len(ratios) + 0.4))
    for i, ratio in enumerate(ratios):
        for j, method in enumerate(methods):
            ax = axes[i][j]
            s = next(s for s in pruned if s["method"] == method and s["ratio"] == ratio)
            lay = s["per_layer"]
            idx = np.arange(len(lay["heads"]))
            for off, kind, name in ((-0.2, "heads", "kv-head groups"),
                                    (0.2, "neurons", "SwiGLU neurons")):
                pct = 100 * np.asarray(lay[kind]) / np.asarray(lay[f"{kind}_of"])
                bars = ax.bar(idx + off, pct, 0.4, label=name)
                ax.bar_label(bars, [f"{v:g}" for v in lay[kind]], fontsize=7)
            ax.set_xticks(idx, [str(k) for k in idx])
            ax.set_ylim(0, 110)
            ax.set_title(f"{LABELS[method]}, {100 * ratio:.0f} % params removed\n"
                         f"ppl {s['ppl_mean']:.3f} ({s['n']} seed{'s' * (s['n'] > 1)})",
                         fontsize=9)
            ax.set_xlabel("layer")
            if j == 0:
                ax.set_ylabel("% removed (count on bar)")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dense_row(dense: nnx.Module, groups: hj.Groups, windows: np.ndarray,
              args: argparse.Namespace) -> dict[str, Any]:
    """The dense checkpoint's row (ratio 0 for every ratio of the grid)."""
    loss = lm_eval_loss(dense, windows)
    _, tps = throughput(dense, dense, args, timing_input(windows, args))
    zero = np.zeros(groups.num_groups, bool)
    return {"method": "dense", "ratio": 0.0, "seed": 0, "target_kept": 1.0,
            "kept_params": 1.0, "kept_flops": 1.0, "params": count_params(dense),
            "flops": int(groups.costs.dense_flops), "removed_groups": 0,
            "heldout_loss": loss, "heldout_perplexity": math.exp(loss),
            "tokens_per_s": tps, "dense_tokens_per_s": tps, "speedup": 1.0,
            "per_layer": per_layer(groups, zero), "train_s": 0.0}


def dense_ft_row(dense: nnx.Module, groups: hj.Groups, seed: int, data: jax.Array,
                 windows: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """The control: the dense model trained with the same recovery budget, unpruned."""
    model = nnx.clone(dense)
    base = pretrain_optimizer(args.steps, args.lr, args.lr_warmup)
    _, losses, seconds = recover(model, base, data, args, seed, f"dense_ft s={seed}")
    row = dense_row(model, groups, windows, args)
    row.update(method="dense_ft", seed=seed, train_s=seconds, final_train_loss=losses[-1])
    tqdm.write(f"dense + FT seed={seed}: ppl {row['heldout_perplexity']:.3f}")
    return row


def body_text(result: dict[str, Any]) -> str:
    """The RESULTS.md section."""
    a, s = result["args"], result["summary"]
    dense = next(r for r in s if r["method"] == "dense")
    pruned = [r for r in s if r["method"] in METHODS]
    control = next((r for r in s if r["method"] == "dense_ft"), None)
    seeds = {r["n"] for r in pruned}
    ratios = sorted({r["ratio"] for r in pruned})
    scope = (f"**{max(seeds)} seed{'s' * (max(seeds) > 1)}, {len(ratios)} "
             f"ratio{'s' * (len(ratios) > 1)} ("
             + ", ".join(f"{100 * r:.0f} %" for r in ratios) + " of the params removed)**")
    sched = next((r["schedule"] for r in result["rows"] if r.get("schedule")), None)
    hesso_text = (f"HESSO with the equal mix of the five scores normalised additively "
                  f"(`weighted(normalize=\"additive\")`, hj.hesso's default under a "
                  f"`Budget` when these rows were run; the default is now "
                  f"`budget_saliency()`, compared in the ablation section), "
                  f"warm-up {sched['warmup']}, "
                  f"P = {sched['periods']} periods of "
                  f"{sched['period_len']}, fine-tune "
                  f"{a['steps'] - sched['warmup'] - sched['periods'] * sched['period_len']}"
                  if sched else "")
    if sched:
        ft = a["steps"] - sched["warmup"] - sched["periods"] * sched["period_len"]
        hesso_text += (f" (HESSO's final architecture trains for its last {ft} steps only, "
                       f"the baselines' for all {a['steps']})")
    best = min(pruned, key=lambda r: r["ppl_mean"]) if pruned else None
    best_text = (f" Lowest perplexity: {LABELS[best['method']]} ({best['ppl_mean']:.3f}, "
                 f"dense checkpoint {dense['ppl_mean']:.3f}"
                 + (f", dense + the same {a['steps']} steps {control['ppl_mean']:.3f}"
                    if control else "") + ")." if best else "")
    commands = " then ".join(f"`{c}`" for c in result.get("commands", [result["command"]]))
    return (f"Command{'s' * ('commands' in result)}: {commands} — {scope}; not the full grid "
            f"(`python benchmarks/llm.py`: 3 seeds × 20/25/30 %). Starting point: "
            f"{result['start']}. Groups: `hj.discover_groups` (G = {result['num_groups']}); "
            f"budget `hj.Budget(params=1 - r)` of the whole model (embedding, norms "
            f"included). Recovery budget, identical for every method and in the same data "
            f"order: {a['steps']} steps × {a['batch']} windows of {a['seq_len'] + 1} bytes, "
            f"clip 1 → adamw (peak lr {a['lr']:g}, warm-up {a['lr_warmup']}, cosine to "
            f"lr/10); {hesso_text}; CRIC `CricConfig(sample_steps={a['cric_steps']}, "
            f"learning_rate={a['cric_lr']:g}, max_cycles={a['cric_cycles']})`; baselines "
            f"prune the checkpoint in one shot (`one_shot_prune`, Taylor over "
            f"{a['taylor_batches']} batches) and fine-tune all {a['steps']} steps with "
            f"`keep_pruned`. Every method has the per-family floor `min_keep={a['min_keep']}` "
            f"(each layer keeps a kv-head group and a neuron; a `Budget` now keeps one "
            f"group per family itself, since `hj.shrink_model` keeps a zero placeholder "
            f"of an emptied family). Every run verified: removed groups exactly 0.0, "
            f"`hj.shrink_model` (masked == shrunk), kept params within "
            f"[target − {TOLERANCE}, target]. Perplexity: shrunk model, all "
            f"{result['heldout_windows']} held-out windows; FLOPs per {a['seq_len']}-byte "
            f"window (`hj.group_costs`); tokens/s: jitted forward of {a['timing_batch']} "
            f"windows, shrunk and dense interleaved ({a['timing_rounds']} rounds; machine "
            f"shared, ratios only). Per-layer heads/neurons: `benchmarks/llm.png`. "
            f"Machine: {environment_line(result['machine'])}.{best_text}\n\n"
            + table(s))


def setup(args: argparse.Namespace) -> tuple[nnx.Module, LlamaConfig, jax.Array,
                                              np.ndarray, hj.Groups]:
    """``(dense model, its config, training bytes, held-out windows, discovered groups)``."""
    dense, cfg = load_model(args)
    modules = args.modules.split(",") if args.modules else None
    train, test = text.train_test_corpus(0.1, modules=modules)
    data = jnp.asarray(text.encode_bytes(train), jnp.int32)
    windows = heldout_windows(text.encode_bytes(test), args.seq_len, args.eval_windows)
    groups = hj.discover_groups(dense, jnp.asarray(windows[:1, :-1]))
    return dense, cfg, data, windows, groups


def start_text(args: argparse.Namespace) -> str:
    """Where the runs start from, for the report."""
    return ("a fresh randomly initialised tiny Llama (--random-init)" if args.random_init
            else f"the pretrained checkpoint `{args.ckpt.relative_to(ROOT)}`"
            if args.ckpt.is_relative_to(ROOT) else str(args.ckpt))


def run_grid(args: argparse.Namespace) -> dict[str, Any]:
    """Every (seed, ratio, method) run; the rows, the summary and what they ran on."""
    dense, cfg, data, windows, groups = setup(args)
    rows = [dense_row(dense, groups, windows, args)]
    print(f"dense: {rows[0]['params']:,} params, held-out ppl "
          f"{rows[0]['heldout_perplexity']:.3f}; G = {groups.num_groups}")
    ratios = [float(r) for r in args.ratios.split(",")]
    jobs = [(s, r, m) for s in seed_list(args.seeds) for r in ratios
            for m in args.methods.split(",")]
    if not args.no_dense_ft:
        rows += [dense_ft_row(dense, groups, seed, data, windows, args)
                 for seed in seed_list(args.seeds)]
    for seed, ratio, method in tqdm(jobs, desc="runs"):
        model, info = prune(method, dense, groups, ratio, seed, data, args)
        rows.append(measure(method, ratio, seed, model, info, dense, groups, windows, args))
        r = rows[-1]
        tqdm.write(f"{method} r={ratio} seed={seed}: ppl {r['heldout_perplexity']:.3f}, "
                   f"kept {100 * r['kept_params']:.1f} % params, ×{r['speedup']:.2f} "
                   f"tokens/s, {r['train_s']:.0f} s")
    summary = summarize(rows)
    return {"rows": rows, "summary": summary, "config": cfg.to_dict(),
            "start": start_text(args),
            "num_groups": groups.num_groups, "heldout_windows": len(windows)}


def merged(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` plus the rows of ``old`` it did not rerun (same method, ratio and seed);
    the commands of both are kept (``commands``), the summary is recomputed."""
    ran = {(r["method"], r["ratio"], r["seed"]) for r in new["rows"]}
    rows = new["rows"] + [r for r in old["rows"]
                          if (r["method"], r["ratio"], r["seed"]) not in ran]
    commands = [*old.get("commands", [old["command"]]), new["command"]]
    return {**new, "rows": rows, "summary": summarize(rows), "commands": commands}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the grid; writes ``llm.json``, ``llm.png`` and the RESULTS section."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
    else:
        result = run_grid(args)
        result.update(command=command_line("llm.py", argv), machine=environment(),
                      args={k: (str(v) if isinstance(v, Path) else v)
                            for k, v in vars(args).items()})
        if args.merge and (args.out / "llm.json").exists():
            result = merged(json.loads((args.out / "llm.json").read_text()), result)
    body = body_text(result)
    publish(args.out, SECTION, body, results=result, json_name="llm.json",
            write=not args.no_write)
    if not args.no_write:
        plot(result["summary"], args.out / "llm.png")
        print(f"wrote {args.out / 'llm.json'}, {args.out / 'llm.png'}, RESULTS.md")
    return result


if __name__ == "__main__":
    main()
