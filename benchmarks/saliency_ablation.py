"""Saliency ablation (HESSO paper, Table 6) on a character-level causal transformer LM.

A `CharLM` (2 causal pre-LayerNorm blocks; attention heads and MLP neurons are the groups) is
trained on the source of a fixed set of Python standard-library modules read from disk
(no download), and evaluated by held-out perplexity (exp of the mean cross-entropy per
character on the last 10% of the text). From the same initialisation and the same batches:

* dense: ``optax.adam``;
* for each saliency ``S`` in the five single scores and the equal mix (``saliency=None``):
  ``optax.chain(adam, hj.hesso(groups, K, P, Tp, warmup_steps=Tw, saliency=S))``, and the
  same with CRIC (``cric=hj.CricConfig(...)``, ``value_fn`` = loss on the current batch).

Writes ``benchmarks/saliency_ablation.{json,png}`` and the section
"Saliency ablation on a character-level LM (paper Table 6)" of ``benchmarks/RESULTS.md``.

    python benchmarks/saliency_ablation.py            # full grid, 8-12 min on 2 shared CPU cores
    python benchmarks/saliency_ablation.py --quick    # smoke run, 1-2 min
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import command_line, parser, publish, upsert_section
from flax import nnx
from tqdm.auto import tqdm

import hesso_jax as hj
from hesso_jax.models.charlm import VOCAB_SIZE, CharLM, encode, lm_loss
from hesso_jax.train import count_params, demo_schedule, make_train_step

SECTION = "## Saliency ablation on a character-level LM (paper Table 6)"

# A fixed, ordered set of pure-Python standard-library modules (~600 KB of source).
CORPUS_FILES = (
    "argparse.py", "dataclasses.py", "functools.py", "textwrap.py", "difflib.py",
    "pprint.py", "string.py", "heapq.py", "random.py", "statistics.py", "fractions.py",
    "collections/__init__.py", "json/decoder.py", "json/encoder.py", "csv.py", "copy.py",
    "contextlib.py",
)

SALIENCIES: tuple[str | None, ...] = (*hj.SCORES, None)


def saliency_name(s: str | None) -> str:
    return "mix (equal, default)" if s is None else s


# ------------------------------------------------------------------------------- data
def load_corpus(held_out: float) -> dict[str, Any]:
    """The concatenated stdlib source, tokenised, split into train / held-out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for name in CORPUS_FILES:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} is missing from this Python")
        texts.append(f"# ===== {name} =====\n" + path.read_text(encoding="utf-8"))
    text = "\n\n".join(texts)
    tokens = encode(text)
    n_train = int(round(len(tokens) * (1.0 - held_out)))
    return {
        "root": str(root),
        "files": list(CORPUS_FILES),
        "chars": len(tokens),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "other_token_share": float(np.mean(tokens == VOCAB_SIZE - 1)),
        "train": tokens[:n_train],
        "held_out": tokens[n_train:],
    }


def batch_starts(n: int, seq_len: int, steps: int, batch: int, seed: int) -> np.ndarray:
    """Random window starts, one row per step: every run sees exactly these batches."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n - seq_len - 1, size=(steps, batch))


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, ...]:
    idx = starts[..., None] + np.arange(seq_len + 1)
    w = tokens[idx]
    return w[..., :-1], w[..., 1:]


def held_out_windows(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows: every held-out character but the first is predicted once."""
    n = (len(tokens) - 1) // seq_len
    starts = np.arange(n) * seq_len
    return windows(tokens, starts, seq_len)


# ------------------------------------------------------------------------------ model
def make_model(args: argparse.Namespace) -> CharLM:
    return CharLM(VOCAB_SIZE, args.seq_len, args.d_model, args.heads, args.mlp_dim, args.depth,
                  rngs=nnx.Rngs(args.seed))


def make_loss(graphdef: Any) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    def loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return lm_loss(nnx.merge(graphdef, params)(x), y)

    return loss


def make_step(graphdef: Any, tx: optax.GradientTransformationExtraArgs) -> Callable:
    """Jitted ``step(params, opt_state, x, y) -> (params, opt_state, loss)`` (the library's
    recipe: ``value_fn`` = the loss on the step's batch, for CRIC)."""
    return make_train_step(make_loss(graphdef), tx)


def make_eval(graphdef: Any, batch: int) -> Callable[[Any, np.ndarray, np.ndarray], float]:
    @jax.jit
    def nll_rows(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, params)(x).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, y[..., None], axis=-1), axis=(1, 2))

    def perplexity(params: Any, x: np.ndarray, y: np.ndarray) -> float:
        total = 0.0
        for i in range(0, len(x), batch):
            xb, yb = x[i:i + batch], y[i:i + batch]
            n = len(xb)
            if n < batch:  # pad to one fixed shape (one compilation); padding not counted
                xb = np.pad(xb, ((0, batch - n), (0, 0)))
                yb = np.pad(yb, ((0, batch - n), (0, 0)))
            total += float(np.sum(np.asarray(nll_rows(params, xb, yb), np.float64)[:n]))
        return float(np.exp(total / y.size))

    return perplexity


# ------------------------------------------------------------------------------- runs
def pruned_per_block(groups: hj.Groups, params: Any) -> dict[str, int]:
    zero = groups.zero_groups(params)
    out, start = {}, 0
    for fam in groups.families:
        out[fam.name] = int(zero[start:start + fam.size].sum())
        start += fam.size
    return out


def train_run(args: argparse.Namespace, kind: str, saliency: str | None, use_cric: bool,
              data: dict[str, Any], starts: np.ndarray,
              ho: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    t_run = time.perf_counter()
    model = make_model(args)
    groups = hj.discover_groups(model, jnp.zeros((1, args.seq_len), jnp.int32))
    graphdef, params = nnx.split(model, nnx.Param)
    lr = optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.1)
    tx = optax.adam(lr)
    warmup, period_len = demo_schedule(args.steps, args.periods)
    period_starts: set[int] = set()
    if kind == "hesso":
        cric = (hj.CricConfig(args.cric_steps, args.cric_lr, tolerance=args.cric_tolerance,
                              max_cycles=args.cric_max_cycles) if use_cric else None)
        tx = optax.chain(tx, hj.hesso(groups, args.sparsity, args.periods, period_len,
                                      warmup_steps=warmup, saliency=saliency, cric=cric))
        period_starts = {warmup + p * period_len for p in range(args.periods)}
    opt_state = tx.init(params)
    step = make_step(graphdef, tx)
    desc = "dense" if kind == "dense" else saliency_name(saliency) + (" +CRIC" * use_cric)
    losses: list[float] = []
    cycles: list[int] = []
    start_ms: list[float] = []
    compile_s = 0.0
    loss = None
    for t in tqdm(range(args.steps), desc=desc, leave=False, mininterval=2.0):
        x, y = windows(data["train"], starts[t], args.seq_len)
        timed = t == 0 or t in period_starts
        if timed:
            if loss is not None:
                loss.block_until_ready()
            t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, x, y)
        if timed:
            loss.block_until_ready()
            dt = time.perf_counter() - t0
            if t == 0:
                compile_s = dt
            else:
                start_ms.append(1e3 * dt)
            if t in period_starts:
                cycles.append(hj.hesso_status(opt_state).cric_cycles)
        if (t + 1) % args.log_every == 0 or t + 1 == args.steps:
            losses.append(float(loss))
    train_s = time.perf_counter() - t_run
    t_eval = time.perf_counter()
    ppl = make_eval(graphdef, args.eval_batch)(params, *ho)
    eval_s = time.perf_counter() - t_eval
    res: dict[str, Any] = {
        "kind": kind, "saliency": saliency,
        "saliency_label": "dense" if kind == "dense" else saliency_name(saliency),
        "cric": use_cric, "perplexity": ppl, "final_train_loss": losses[-1],
        "train_loss_curve": losses, "wall_s": train_s + eval_s, "train_s": train_s,
        "first_step_s": compile_s, "eval_s": eval_s,
        "period_start_step_ms": start_ms, "params": count_params(params),
    }
    if kind == "hesso":
        status = hj.hesso_status(opt_state)
        per_family = pruned_per_block(groups, params)
        small, _ = hj.shrink(params, groups)
        res.update(
            pruned_per_family=per_family, zero_groups=int(sum(per_family.values())),
            K=status.target, G=groups.num_groups, cric_cycles=cycles,
            pruned_mask=groups.zero_groups(params).astype(int).tolist(),
            params_shrunk=count_params(small))
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = load_corpus(args.held_out)
    starts = batch_starts(len(data["train"]), args.seq_len, args.steps, args.batch, args.seed)
    ho = held_out_windows(data["held_out"], args.seq_len)
    if args.eval_windows:
        ho = (ho[0][:args.eval_windows], ho[1][:args.eval_windows])
    configs: list[tuple[str, str | None, bool]] = [("dense", None, False)]
    configs += [("hesso", s, c) for c in (False, True) for s in SALIENCIES]
    runs = []
    t0 = time.perf_counter()
    for kind, s, c in tqdm(configs, desc="runs"):
        r = train_run(args, kind, s, c, data, starts, ho)
        tqdm.write(f"{'dense' if kind == 'dense' else saliency_name(s)}"
                   f"{' +CRIC' if c else ''}: ppl {r['perplexity']:.3f}, {r['wall_s']:.1f} s")
        runs.append(r)
    total_s = time.perf_counter() - t0
    corpus = {k: v for k, v in data.items() if k not in ("train", "held_out")}
    corpus.update(train_chars=len(data["train"]), held_out_chars=len(data["held_out"]),
                  held_out_predicted=int(ho[1].size))
    # overlap of the final pruned sets, greedy vs CRIC, per saliency
    for r in runs:
        if r["kind"] == "hesso" and r["cric"]:
            greedy = next(g for g in runs if g["kind"] == "hesso" and not g["cric"]
                          and g["saliency"] == r["saliency"])
            a, b = np.asarray(r["pruned_mask"], bool), np.asarray(greedy["pruned_mask"], bool)
            r["overlap_with_greedy"] = int((a & b).sum())
    return {"corpus": corpus, "runs": runs, "total_s": total_s}


# -------------------------------------------------------------------------- reporting
def load_average() -> str:
    with contextlib.suppress(OSError, AttributeError):
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    return "n/a"


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# Family names of block i's heads / MLP neurons: the hand-written groups of earlier runs
# (saved JSONs), then hj.discover_groups' names (the modules of the families' kernels).
FAMILY_NAMES = {"heads": ("blocks.{i}.heads", "blocks/{i}/attn"),
                "mlp": ("blocks.{i}.mlp", "blocks/{i}/fc1")}


def fmt_pruned(r: dict[str, Any], depth: int, what: str) -> str:
    """Pruned groups of kind ``what`` ('heads' or 'mlp') per block, ``'a / b / ...'``."""
    per_family = r["pruned_per_family"]

    def count(i: int) -> int:
        names = [n.format(i=i) for n in FAMILY_NAMES[what]]
        return next(per_family[n] for n in names if n in per_family)

    return " / ".join(str(count(i)) for i in range(depth))


def markdown(args: argparse.Namespace, res: dict[str, Any], command: str,
             machine: dict[str, str]) -> str:
    runs = res["runs"]
    dense = runs[0]
    c = res["corpus"]
    warmup, period_len = demo_schedule(args.steps, args.periods)
    g0 = next(r for r in runs if r["kind"] == "hesso")
    lines = [
        f"- Command: `{command}` (total wall time {res['total_s']:.0f} s).",
        f"- Date: {machine['date']}; machine: {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['platform']}, devices: {machine['devices']}; load average (1/5/15 min) "
        f"{machine['load_start']} at the start and {machine['load_end']} at the end "
        "(other processes share the CPU, so wall times are indicative).",
        f"- Python {machine['python']}, jax {machine['jax']}, flax {machine['flax']}, "
        f"optax {machine['optax']}.",
        f"- Data: the source of {len(c['files'])} standard-library modules of this Python "
        f"({', '.join(c['files'])}), concatenated: {c['chars']:,} characters "
        f"(sha256 {c['sha256'][:12]}…), {VOCAB_SIZE} tokens (printable ASCII, newline, one "
        f"'other' token: {100 * c['other_token_share']:.2f}% of characters). Train: first "
        f"{100 * (1 - args.held_out):.0f}% ({c['train_chars']:,} chars); held-out: last "
        f"{100 * args.held_out:.0f}% ({c['held_out_chars']:,} chars, {c['held_out_predicted']:,} "
        f"predicted in non-overlapping windows of {args.seq_len}).",
        f"- Model: `CharLM(d_model={args.d_model}, heads={args.heads}, mlp_dim={args.mlp_dim}, "
        f"depth={args.depth}, seq_len={args.seq_len})`, {dense['params']:,} parameters; groups: "
        f"{args.heads} heads + {args.mlp_dim} MLP neurons per block, G = {g0['G']}.",
        f"- Training: Adam, lr {args.lr:g} cosine-decayed to {0.1 * args.lr:g}, {args.steps} "
        f"steps of {args.batch} random windows of {args.seq_len} characters (same windows and "
        f"init for every run, seed {args.seed}). HESSO: K = {args.sparsity:g} of the groups "
        f"({g0['K']} of {g0['G']}), P = {args.periods}, Tp = {period_len}, warm-up "
        f"{warmup} steps, fine-tune the remaining "
        f"{args.steps - warmup - args.periods * period_len}."
        f" CRIC: `CricConfig(sample_steps={args.cric_steps}, learning_rate={args.cric_lr:g}, "
        f"tolerance={args.cric_tolerance}, max_cycles={args.cric_max_cycles})`, same saliency "
        "as HESSO, `value_fn` = loss on the step's batch.",
        "- Perplexity: exp of the mean cross-entropy per character on the held-out text. "
        "Pruned counts are per block (block 0 / block 1). Wall: the whole run (compilation, "
        "training, evaluation); 'start step' is the mean time of the P period-start steps "
        "(saliency and selection; with CRIC, its trials).", "",
        f"Dense: held-out perplexity **{dense['perplexity']:.3f}**, wall {dense['wall_s']:.1f} s.",
        "",
        "| saliency | CRIC | held-out ppl | Δ vs dense | heads pruned | neurons pruned "
        "| zero / K | CRIC cycles per period | same as greedy | start step (ms) | wall (s) |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in runs[1:]:
        start_ms = float(np.mean(r["period_start_step_ms"])) if r["period_start_step_ms"] else 0
        overlap = f"{r['overlap_with_greedy']} / {r['K']}" if r["cric"] else ""
        lines.append(
            f"| {r['saliency_label']} | {'yes' if r['cric'] else 'no'} "
            f"| {r['perplexity']:.3f} | {r['perplexity'] - dense['perplexity']:+.3f} "
            f"| {fmt_pruned(r, args.depth, 'heads')} of {args.heads} "
            f"| {fmt_pruned(r, args.depth, 'mlp')} of {args.mlp_dim} "
            f"| {r['zero_groups']} / {r['K']} "
            f"| {', '.join(map(str, r['cric_cycles'])) if r['cric'] else ''} | {overlap} "
            f"| {start_ms:.0f} | {r['wall_s']:.1f} |")
    greedy = [r for r in runs if r["kind"] == "hesso" and not r["cric"]]
    cric = [r for r in runs if r["kind"] == "hesso" and r["cric"]]
    best = min(runs[1:], key=lambda r: r["perplexity"])
    exact = all(r["zero_groups"] == r["K"] for r in runs[1:])
    head_size = 3 * args.d_model * (args.d_model // args.heads) + 3 * (args.d_model // args.heads)
    lines += [
        "",
        f"Best pruned run: {best['saliency_label']}{' + CRIC' if best['cric'] else ''} "
        f"({best['perplexity']:.3f}). Exactly K groups at 0.0 in every run: "
        f"{'yes' if exact else 'NO'}. Mean wall time: greedy "
        f"{np.mean([r['wall_s'] for r in greedy]):.1f} s, CRIC "
        f"{np.mean([r['wall_s'] for r in cric]):.1f} s, dense {dense['wall_s']:.1f} s. "
        "'same as greedy': groups pruned by both the CRIC run and the greedy run of the same "
        "score (the runs diverge after the first period, so this is not a pure "
        "selection comparison).",
        "",
        "One seed, one sparsity, no error bars: differences of about 0.1 perplexity or less "
        "between scores are not established; only large gaps, such as a score that removes "
        "every head, are robust.",
        "",
        "Notes (properties of the scores, independent of this run):",
        "",
        f"- `avg_magnitude` = ‖x_g‖/|g| ranks groups by size: a head has {head_size:,} member "
        f"elements (W_q, W_k, W_v columns and biases), an MLP neuron {args.d_model + 1}, so "
        "heads score lowest and are removed first.",
        "- With a single score, ½⟨x_g, u_g⟩² is a monotone function of |⟨x_g, u_g⟩|: greedy "
        "HESSO with `taylor_first_order` and `taylor_second_order` selects the same groups "
        "and the two rows are identical by construction (up to float32 ties). With CRIC the "
        "scores are summed over trial points, which is not order-preserving, so those rows "
        "can differ.",
        "- The magnitude scores do not depend on the direction, and a CRIC trial only shrinks "
        "the groups it tests, so they stay in the bottom K unless untested groups shrink "
        "faster during the S trial steps: CRIC can hardly correct a magnitude selection "
        "(here: 0 cycles, the same groups as greedy).",
        "- Inside CRIC the direction is the raw gradient step −η∇f (cric.py), while greedy "
        "HESSO scores the Adam update: direction-dependent scores (cosine, Taylor, the mix) "
        "select differently with CRIC even when it runs 0 corrective cycles.",
        "",
        "![saliency ablation](saliency_ablation.png)",
    ]
    return "\n".join(lines)


def plot(args: argparse.Namespace, res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["runs"]
    dense = runs[0]["perplexity"]
    labels = [saliency_name(s).replace(" (equal, default)", "") for s in SALIENCIES]
    greedy = [next(r["perplexity"] for r in runs if r["kind"] == "hesso" and not r["cric"]
                   and r["saliency"] == s) for s in SALIENCIES]
    cric = [next(r["perplexity"] for r in runs if r["kind"] == "hesso" and r["cric"]
                 and r["saliency"] == s) for s in SALIENCIES]
    x = np.arange(len(labels))
    values = np.asarray([dense, *greedy, *cric])
    lo = float(values.min())
    # an outlier (> 1.5x dense) would flatten every other bar: clip it and print its value
    inlier = values[values <= 1.5 * dense]
    hi = float(inlier.max())
    top = hi + 0.15 * (hi - lo) + 0.05
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for offset, vals, label in ((-0.2, greedy, "HESSO (greedy)"), (0.2, cric, "HESSO-CRIC")):
        bars = ax.bar(x + offset, np.minimum(vals, top), 0.4, label=label)
        ax.bar_label(bars, labels=[f"{v:.2f}" if v <= top else "" for v in vals], fontsize=7)
        for xi, v in zip(x + offset, vals, strict=True):
            if v > top:
                ax.text(xi, top, f"{v:.2f}\n(clipped)", ha="center", va="top", fontsize=7,
                        color="white", fontweight="bold")
    ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense ({dense:.2f})")
    ax.set_xticks(x, labels, rotation=15)
    ax.set_ylabel("held-out perplexity (per character)")
    ax.set_ylim(max(0.0, lo - 0.25 * (hi - lo) - 0.05), top)
    ax.set_title(f"Saliency ablation: CharLM, {args.sparsity:g} of the groups pruned, "
                 f"{args.steps} steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: few steps, small eval")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default 800; 60 with --quick)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of groups pruned")
    p.add_argument("--periods", type=int, default=5)
    p.add_argument("--cric-steps", type=int, default=5, help="CRIC sample steps per trial")
    p.add_argument("--cric-lr", type=float, default=0.1, help="CRIC trial SGD step size")
    p.add_argument("--cric-tolerance", type=int, default=2)
    p.add_argument("--cric-max-cycles", type=int, default=4)
    p.add_argument("--held-out", type=float, default=0.1)
    p.add_argument("--eval-windows", type=int, default=0, help="0: the whole held-out text")
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replot", action="store_true",
                   help="no training: redo the PNG and the RESULTS.md section from the JSON")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 60 if args.quick else 800
    if args.quick and not args.eval_windows:
        args.eval_windows = 128
    return args


def replot(args: argparse.Namespace) -> None:
    saved = json.loads((args.out / "saliency_ablation.json").read_text())
    run_args = argparse.Namespace(**{**saved["settings"], "out": args.out})
    res = {k: saved[k] for k in ("corpus", "runs", "total_s")}
    body = markdown(run_args, res, saved["command"], saved["machine"])
    print(body)
    plot(run_args, res, args.out / "saliency_ablation.png")
    upsert_section(args.out / "RESULTS.md", SECTION, body)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot:
        replot(args)
        return
    command = command_line("saliency_ablation.py", argv)
    machine = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(), "cores": str(os.cpu_count()), "platform": platform.platform(),
        "python": platform.python_version(), "jax": jax.__version__,
        "flax": flax.__version__, "optax": optax.__version__,
        "devices": ", ".join(str(d) for d in jax.devices()), "load_start": load_average(),
    }
    res = run(args)
    machine["load_end"] = load_average()
    body = markdown(args, res, command, machine)
    out = {"command": command, "machine": machine, "settings": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, **res}
    publish(args.out, SECTION, body, results=out, json_name="saliency_ablation.json",
            write=not args.no_write)
    if not args.no_write:
        plot(args, res, args.out / "saliency_ablation.png")


if __name__ == "__main__":
    main()
