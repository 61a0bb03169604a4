"""SNOWS one-shot pruning of the pretrained Llama decoder: 2:4 and 50 %, magnitude vs Wanda.

Issue 15 item 5. From the checkpoint of ``benchmarks/llm_pretrain.py`` (`load_pretrained`;
``--random-init`` uses the fresh tiny `Llama` of ``benchmarks/llm.py`` instead, for tests),
every attention and SwiGLU kernel (``query``, ``key``, ``value``, ``out``, ``gate``,
``up``, ``down`` of every layer) is pruned in one shot with `hj.snows` (SNOWS,
arXiv 2411.18376) — the tied embedding / output head stays dense, as in SparseGPT and
Wanda — for every

* **pattern**: ``2:4`` (2 kept in every 4 consecutive weights along the reduction axis)
  and ``0.5`` (50 % unstructured, exactly ``round(0.5 · size)`` per kernel);
* **criterion**: ``magnitude`` (score ``|W_ij|``) or ``wanda`` (Sun et al. 2023,
  arXiv 2306.11695: score ``|W_ij| · ‖X_j‖₂``, ``X_j`` the kernel's input feature ``j``
  over every calibration token, from the dense network);
* **method**: the mask alone (``newton_steps=0``; with ``wanda`` that *is* Wanda) or the
  SNOWS refit of the kept weights with reconstruction horizon ``K = 0`` (layer-wise) or
  ``K = 2`` (own output and the next 2 linear ops downstream).

Calibration: ``--calib`` windows of ``--seq-len`` bytes at random offsets of the
*training* text only (key ``--seed``), in batches of ``--calib-batch``. The solver uses
Gauss-Newton HVPs (softmax and SiLU downstream make the exact Hessian indefinite for
``K > 0``; for ``K = 0`` the objective is quadratic and the two coincide).

Reported: held-out perplexity (``exp lm_eval_loss`` over `heldout_windows` of the
held-out documents) of the dense checkpoint and of every pruned model, the zero fraction
of the pruned kernels and of all parameters, the mean per-layer objective ratio
``after / before``, the seconds of the `hj.snows` call, and for every mask the overlap of
the magnitude and Wanda masks. Every run is checked: the mask holds (2:4: at most 2
nonzeros in each run of 4 along the reduction axis; 50 %: at least ``round(0.5 · size)``
zeros per kernel) and the refit never increases a layer's objective.

    python benchmarks/llm_snows.py                    # the RESULTS.md run
    python benchmarks/llm_snows.py --quick --random-init --no-write    # smoke test
    python benchmarks/llm_snows.py --from-json benchmarks/llm_snows.json  # re-render
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from common import command_line, environment, environment_line, parser, publish
from flax import nnx
from llm import CHECKPOINT, ROOT, load_model, windows_at
from tqdm.auto import tqdm

import hesso_jax as hj
from hesso_jax import text
from hesso_jax.models.llama import heldout_windows, lm_eval_loss
from hesso_jax.snows import parse_nm
from hesso_jax.train import count_params

SECTION = "## SNOWS one-shot pruning of the Llama decoder (2:4, 50 %; magnitude vs Wanda)"
KERNELS = ("query", "key", "value", "out", "gate", "up", "down")
METHOD_LABELS = {None: "mask only", 0: "SNOWS K=0", 2: "SNOWS K=2"}
QUICK = dict(calib=4, calib_batch=4, seq_len=32, newton_steps=1, cg_max_iters=4,
             eval_windows=8, ks="0,2", kernels="query,down")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; ``--quick`` changes the defaults (explicit flags still win)."""
    p = parser(__doc__, no_write_help="print only: write no JSON, plot or RESULTS.md")
    p.add_argument("--ckpt", type=Path, default=CHECKPOINT)
    p.add_argument("--random-init", action="store_true",
                   help="prune a fresh tiny Llama (no checkpoint needed; for tests)")
    p.add_argument("--quick", action="store_true", help="tiny budget (a smoke run)")
    p.add_argument("--modules", default=None,
                   help="comma list of standard-library modules for the corpus "
                        "(default: all, as for the checkpoint)")
    p.add_argument("--from-json", type=Path, default=None,
                   help="re-render RESULTS.md and the plot from this json (no runs)")
    p.add_argument("--patterns", default="2:4,0.5")
    p.add_argument("--criteria", default="magnitude,wanda")
    p.add_argument("--ks", default="0,2", help="SNOWS horizons K (comma list)")
    p.add_argument("--kernels", default=",".join(KERNELS),
                   help="which kernels of every layer to prune (comma list of "
                        f"{', '.join(KERNELS)})")
    p.add_argument("--calib", type=int, default=16, help="calibration windows")
    p.add_argument("--calib-batch", type=int, default=16, help="calibration batch size")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--newton-steps", type=int, default=2)
    p.add_argument("--cg-max-iters", type=int, default=20)
    p.add_argument("--eval-windows", type=int, default=None,
                   help="held-out windows scored (default: all)")
    p.add_argument("--seed", type=int, default=0, help="calibration offsets")
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    return args


def sparsity_arg(pattern: str) -> str | float:
    """``'2:4'`` stays a string (N:M); ``'0.5'`` becomes the float fraction."""
    return pattern if ":" in pattern else float(pattern)


def layer_paths(model: nnx.Module, names: str = ",".join(KERNELS)) -> list[tuple]:
    """The attention and SwiGLU kernels ``names`` of every layer (never the tied
    embedding), in forward order."""
    wanted = names.split(",")
    unknown = set(wanted) - set(KERNELS)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; choose from {KERNELS}")
    paths = []
    for i, _ in enumerate(model.layers):
        paths += [("layers", i, "attn", k) for k in KERNELS[:4] if k in wanted]
        paths += [("layers", i, "mlp", k, "kernel") for k in KERNELS[4:] if k in wanted]
    return paths


def kernels(model: nnx.Module, paths: list[tuple]) -> dict[tuple, np.ndarray]:
    """``{path: kernel}`` of ``model`` for ``paths``."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    return {p: np.asarray(flat[p][...]) for p in paths}


def mask_holds(pattern: str, weights: dict[tuple, np.ndarray]) -> bool:
    """2:4: ≤ 2 nonzeros per run of 4 along the reduction axes (the leading ones: ``d``
    of ``(d, H, D)`` kernels, ``H·D`` of ``out``); a fraction ``s``: ≥ ``round(s·size)``
    zeros per kernel."""
    for path, w in weights.items():
        if ":" in pattern:
            n, m = parse_nm(pattern)
            red = w.reshape(-1, w.shape[-1]) if path[-1] == "out" else w.reshape(
                w.shape[0], -1)
            if (red.reshape(-1, m, red.shape[-1]) != 0).sum(axis=1).max() > n:
                return False
        elif (w == 0).sum() < round(float(pattern) * w.size):
            return False
    return True


def zero_masks(weights: dict[tuple, np.ndarray]) -> dict[tuple, np.ndarray]:
    """``{path: W == 0}``."""
    return {p: w == 0 for p, w in weights.items()}


# ------------------------------------------------------------------------- the runs
def calibration(args: argparse.Namespace, train_ids: np.ndarray) -> jax.Array:
    """``--calib`` training windows of ``--seq-len`` bytes (inputs only), key ``--seed``."""
    data = jnp.asarray(train_ids, jnp.int32)
    return windows_at(data, jax.random.key(args.seed), args.calib, args.seq_len)[:, :-1]


def prune_one(dense: nnx.Module, calib: jax.Array, pattern: str, criterion: str,
              k: int | None, args: argparse.Namespace, paths: list[tuple]
              ) -> tuple[nnx.Module, hj.SnowsReport, float]:
    """One `hj.snows` call (``k=None``: the mask alone); ``(pruned, report, seconds)``."""
    t0 = time.perf_counter()
    pruned, report = hj.snows(
        dense, calib, sparsity=sparsity_arg(pattern), criterion=criterion,
        K=0 if k is None else k, newton_steps=0 if k is None else args.newton_steps,
        cg_max_iters=args.cg_max_iters, gauss_newton=True, batch_size=args.calib_batch,
        layers=paths)
    return pruned, report, time.perf_counter() - t0


def measure(pruned: nnx.Module, report: hj.SnowsReport, seconds: float, pattern: str,
            criterion: str, k: int | None, windows: np.ndarray, paths: list[tuple],
            total_params: int) -> dict[str, Any]:
    """The row of one run: perplexity, sparsity, objectives, checks."""
    weights = kernels(pruned, paths)
    loss = lm_eval_loss(pruned, windows)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    ratios = [lr.objective_after / max(lr.objective_before, 1e-30) for lr in report.layers]
    return {"pattern": pattern, "criterion": criterion, "K": k,
            "method": METHOD_LABELS[k], "heldout_loss": loss,
            "heldout_perplexity": math.exp(loss), "kernel_sparsity": report.sparsity,
            "param_sparsity": zeros / total_params, "seconds": seconds,
            "objective_ratio_mean": float(np.mean(ratios)),
            "objective_ratio_max": float(np.max(ratios)),
            "objective_never_worse": all(lr.objective_after <= lr.objective_before
                                         * (1 + 1e-6) for lr in report.layers),
            "cg_iterations": int(sum(lr.cg_iterations for lr in report.layers)),
            "mask_holds": mask_holds(pattern, weights), "layers": len(report.layers)}


def overlap(a: dict[tuple, np.ndarray], b: dict[tuple, np.ndarray]) -> float:
    """Fraction of kernel entries on which two zero masks agree."""
    same = sum(int((a[p] == b[p]).sum()) for p in a)
    return same / sum(a[p].size for p in a)


def run_cell(dense: nnx.Module, calib: jax.Array, pattern: str, criterion: str,
             args: argparse.Namespace, windows: np.ndarray, paths: list[tuple]
             ) -> tuple[list[dict[str, Any]], dict[tuple, np.ndarray]]:
    """Mask only, then SNOWS at every K, for one (pattern, criterion); the rows and the
    mask's zeros. Each SNOWS row records whether it keeps the mask's zeros."""
    total, rows, base = count_params(dense), [], None
    for k in [None, *(int(v) for v in args.ks.split(","))]:
        pruned, report, seconds = prune_one(dense, calib, pattern, criterion, k, args, paths)
        rows.append(measure(pruned, report, seconds, pattern, criterion, k, windows,
                            paths, total))
        zeros = zero_masks(kernels(pruned, paths))
        base = zeros if base is None else base
        rows[-1]["keeps_mask_zeros"] = all(bool(zeros[p][base[p]].all()) for p in paths)
        tqdm.write(f"{pattern} {criterion} {METHOD_LABELS[k]}: ppl "
                   f"{rows[-1]['heldout_perplexity']:.3f} ({seconds:.0f} s)")
    return rows, base


def run_grid(args: argparse.Namespace) -> dict[str, Any]:
    """Every (pattern, criterion, method) run; rows, mask overlaps, what they ran on."""
    dense, cfg = load_model(args)
    modules = args.modules.split(",") if args.modules else None
    train, test = text.train_test_corpus(0.1, modules=modules)
    train_ids = text.encode_bytes(train)
    windows = heldout_windows(text.encode_bytes(test), args.seq_len, args.eval_windows)
    calib, paths = calibration(args, train_ids), layer_paths(dense, args.kernels)
    dense_loss = lm_eval_loss(dense, windows)
    print(f"dense: {count_params(dense):,} params, held-out ppl {math.exp(dense_loss):.3f}; "
          f"{len(paths)} kernels, {calib.shape[0]} calibration windows")
    rows: list[dict[str, Any]] = []
    overlaps: dict[str, float] = {}
    for pattern in args.patterns.split(","):
        masks = {}
        for criterion in args.criteria.split(","):
            cell, masks[criterion] = run_cell(dense, calib, pattern, criterion, args,
                                              windows, paths)
            rows += cell
        if {"magnitude", "wanda"} <= set(masks):
            overlaps[pattern] = overlap(masks["magnitude"], masks["wanda"])
    start = ("a fresh randomly initialised tiny Llama (--random-init)" if args.random_init
             else f"the pretrained checkpoint `{args.ckpt.relative_to(ROOT)}`"
             if args.ckpt.is_relative_to(ROOT) else str(args.ckpt))
    kernel_params = sum(int(np.size(w)) for w in kernels(dense, paths).values())
    return {"rows": rows, "mask_overlap": overlaps, "config": cfg.to_dict(),
            "start": start, "dense": {"heldout_loss": dense_loss,
                                      "heldout_perplexity": math.exp(dense_loss),
                                      "params": count_params(dense),
                                      "kernel_params": kernel_params},
            "heldout_windows": len(windows), "calib_shape": list(calib.shape)}


# ------------------------------------------------------------------------- reporting
def table(result: dict[str, Any]) -> str:
    """Markdown: one row per (pattern, criterion), held-out perplexity per method."""
    rows = result["rows"]
    methods = [m for m in METHOD_LABELS.values() if any(r["method"] == m for r in rows)]
    lines = ["| mask | criterion | " + " | ".join(f"ppl, {m}" for m in methods)
             + " | zeros (kernels / all params) | seconds (" + " / ".join(methods) + ") |",
             "|---|---|" + "---:|" * len(methods) + "---:|---:|"]
    cells = dict.fromkeys((r["pattern"], r["criterion"]) for r in rows)
    for pattern, criterion in cells:
        sel = {r["method"]: r for r in rows
               if (r["pattern"], r["criterion"]) == (pattern, criterion)}
        first = next(iter(sel.values()))
        name = pattern if ":" in pattern else f"{100 * float(pattern):g} % unstructured"
        lines.append(
            f"| {name} | {criterion} | "
            + " | ".join(f"{sel[m]['heldout_perplexity']:.3f}" if m in sel else "–"
                         for m in methods)
            + f" | {100 * first['kernel_sparsity']:.1f} % / "
              f"{100 * first['param_sparsity']:.1f} % | "
            + " / ".join(f"{sel[m]['seconds']:.0f}" if m in sel else "–" for m in methods)
            + " |")
    return "\n".join(lines)


def checks_text(result: dict[str, Any]) -> str:
    """One sentence on the per-run checks and the mask overlaps."""
    rows = result["rows"]
    snows = [r for r in rows if r["K"] is not None]
    ok = all(r["mask_holds"] for r in rows)
    kept = all(r["keeps_mask_zeros"] for r in snows)
    never = all(r["objective_never_worse"] for r in snows)
    ovl = ", ".join(f"{p}: {100 * v:.1f} %" for p, v in result["mask_overlap"].items())
    ratio = ("; mean per-layer objective after/before (K=2 sums the errors of 3 ops, so "
             "its ratio is not comparable with K=0's): " + ", ".join(
        f"{r['pattern']} {r['criterion']} K={r['K']} {r['objective_ratio_mean']:.3f}"
        for r in snows)) if snows else ""
    return (f"Checks: mask holds in every run: {'yes' if ok else 'NO'}; SNOWS keeps "
            f"every zero of its mask: {'yes' if kept else 'NO'}; no layer objective "
            f"increased: {'yes' if never else 'NO'}{ratio}. Magnitude and Wanda masks "
            f"agree on {ovl or '–'} of the kernel entries.")


def findings(result: dict[str, Any]) -> str:
    """What the table says, computed from it: Wanda vs magnitude per method and pattern,
    and K=2 vs K=0 per (pattern, criterion)."""
    ppl = {(r["pattern"], r["criterion"], r["K"]): r["heldout_perplexity"]
           for r in result["rows"]}
    out = []
    for pattern in dict.fromkeys(p for p, _, _ in ppl):
        for k in dict.fromkeys(k for _, _, k in ppl):
            mag, wan = ppl.get((pattern, "magnitude", k)), ppl.get((pattern, "wanda", k))
            if mag is not None and wan is not None:
                out.append(f"{pattern} {METHOD_LABELS[k]}: Wanda {wan:.3f} vs magnitude "
                           f"{mag:.3f} ({wan - mag:+.3f})")
    for pattern, criterion, k in ppl:
        if k == 2 and (pattern, criterion, 0) in ppl:
            out.append(f"{pattern} {criterion}: K=2 {ppl[(pattern, criterion, 2)]:.3f} vs "
                       f"K=0 {ppl[(pattern, criterion, 0)]:.3f} "
                       f"({ppl[(pattern, criterion, 2)] - ppl[(pattern, criterion, 0)]:+.3f})")
    return "Held-out perplexity differences: " + "; ".join(out) + "." if out else ""


def body_text(result: dict[str, Any]) -> str:
    """The RESULTS.md section."""
    a, d = result["args"], result["dense"]
    best = min(result["rows"], key=lambda r: r["heldout_perplexity"])
    return (
        f"Command: `{result['command']}`. Starting point: {result['start']} "
        f"({d['params']:,} params; held-out perplexity **{d['heldout_perplexity']:.3f}**). "
        f"Pruned: the {result['rows'][0]['layers']} attention/SwiGLU kernels "
        f"(`{a['kernels']}` of every layer; "
        f"{d['kernel_params']:,} params; the tied embedding/output head and the norms "
        f"stay dense) with `hj.snows(model, calib, sparsity=..., criterion=..., K=..., "
        f"gauss_newton=True, batch_size={a['calib_batch']})`. Calibration: "
        f"{result['calib_shape'][0]} windows of {result['calib_shape'][1]} bytes at random "
        f"offsets of the training text (seed {a['seed']}; one draw, no repeats); "
        f"held-out text never seen. "
        f"Masks on the dense network: magnitude `|W|` or Wanda `|W_ij|·‖X_j‖` (per-kernel "
        f"ranking for 50 %, per run of 4 along the reduction axis for 2:4); *mask only* "
        f"applies it (`newton_steps=0`: magnitude pruning, or Wanda itself); SNOWS refits "
        f"the kept weights ({a['newton_steps']} Gauss-Newton steps per kernel, CG cap "
        f"{a['cg_max_iters']}) to the dense outputs of its own op (K=0) and the next 2 "
        f"linear ops (K=2). Perplexity: all {result['heldout_windows']} held-out windows of "
        f"{a['seq_len'] + 1} bytes. Seconds: the `hj.snows` call (compilation included; "
        f"machine shared; whole run {result.get('wall_s', float('nan')):.0f} s). Machine: "
        f"{environment_line(result['machine'])}.\n\n"
        + table(result) + "\n\n" + checks_text(result)
        + f" Lowest pruned perplexity: {best['pattern']} {best['criterion']} "
          f"{best['method']} ({best['heldout_perplexity']:.3f} vs dense "
          f"{d['heldout_perplexity']:.3f}). " + findings(result)
        + " Plot: `benchmarks/llm_snows.png`.")


def plot(result: dict[str, Any], path: Path) -> None:
    """Held-out perplexity per (mask, criterion), one bar per method, dense as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    cells = list(dict.fromkeys((r["pattern"], r["criterion"]) for r in rows))
    methods = [m for m in METHOD_LABELS.values() if any(r["method"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(1.6 * len(cells) + 2, 3.6))
    w = 0.8 / len(methods)
    for j, m in enumerate(methods):
        vals = [next((r["heldout_perplexity"] for r in rows if r["method"] == m
                      and (r["pattern"], r["criterion"]) == c), np.nan) for c in cells]
        ax.bar(np.arange(len(cells)) - 0.4 + (j + 0.5) * w, vals, w, label=m)
    ax.axhline(result["dense"]["heldout_perplexity"], color="k", ls="--", label="dense")
    ax.set_xticks(range(len(cells)), [f"{p}\n{c}" for p, c in cells])
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("SNOWS on the byte-level Llama")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the grid; writes ``llm_snows.json``, ``llm_snows.png`` and the RESULTS section."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
    else:
        t0 = time.perf_counter()
        result = run_grid(args)
        result.update(command=command_line("llm_snows.py", argv), machine=environment(),
                      wall_s=time.perf_counter() - t0,
                      args={k: (str(v) if isinstance(v, Path) else v)
                            for k, v in vars(args).items()})
    publish(args.out, SECTION, body_text(result), results=result,
            json_name="llm_snows.json", write=not args.no_write)
    if not args.no_write:
        plot(result, args.out / "llm_snows.png")
        print(f"wrote {args.out / 'llm_snows.json'}, {args.out / 'llm_snows.png'}, "
              "RESULTS.md")
    return result


if __name__ == "__main__":
    main()
