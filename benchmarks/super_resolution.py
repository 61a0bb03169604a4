"""CRIC on ×2 super-resolution (HESSO paper §4.1): does greedy HESSO prune the tail?

A small CARN-style network (`hesso_jax.models.carn.CARN`) learns luminance ×2
super-resolution on scikit-learn's two bundled photographs (china.jpg, flower.jpg; nothing
is downloaded). A central vertical strip (25% of the width) of each image is held out for
testing (the flower's outer columns are featureless blurred background, so a side strip
would make a nearly trivial test set); training patches are cut from the regions left and
right of it (HR ``patch × patch``, LR = bicubic ×2 downsampling of each whole region,
random flips/rotations). Dense Adam, HESSO and HESSO-CRIC run from the same initialisation
on the same batches and step budget (warm-up 20%, ``P`` pruning periods over 50%,
fine-tune 30%) at several group sparsities; the table reports test PSNR on the held-out
strips, which layers each method pruned, and the wall-time cost of CRIC.

    python benchmarks/super_resolution.py            # default run (≤ ~10 min on 2 cores)
    python benchmarks/super_resolution.py --quick    # smoke run (~1-2 min)

Writes ``super_resolution.json``, ``super_resolution.png`` and the section
``## CRIC on super-resolution (paper §4.1)`` of ``RESULTS.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import command_line, environment_line, parser, publish, time_call
from flax import nnx
from tqdm.auto import tqdm

import hesso_jax as hj
from hesso_jax.groups import resolve_count
from hesso_jax.models.carn import CARN, bicubic_upsample
from hesso_jax.train import count_params, make_train_step

SECTION = "## CRIC on super-resolution (paper §4.1)"
SHAVE = 2  # border pixels (= scale) left out of the PSNR, as is customary in SR


# ----------------------------------------------------------------------------- data
def luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma in [0, 1] of an 8-bit RGB image."""
    return (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0


def downsample(hr: np.ndarray) -> np.ndarray:
    """Bicubic ×2 downsampling (antialiased, as MATLAB's imresize) of an ``(H, W)`` image."""
    h, w = hr.shape
    lr = jax.image.resize(jnp.asarray(hr), (h // 2, w // 2), method="bicubic", antialias=True)
    return np.asarray(lr, np.float32)


def load_images(test_fraction: float) -> dict[str, Any]:
    """Per image: the HR/LR test strip (a central vertical band of ``test_fraction`` of the
    width) and the HR/LR training regions left and right of it, each downsampled on its
    own so no test pixel reaches the training data."""
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    out: dict[str, Any] = {"train": [], "test": []}
    for name, rgb in zip(data.filenames, data.images, strict=True):
        y = luminance(rgb)
        h, w = y.shape[0] // 2 * 2, y.shape[1] // 2 * 2
        width = int(round(w * test_fraction)) // 2 * 2
        lo = (w - width) // 4 * 2
        regions = [y[:h, :lo], y[:h, lo + width:w]]
        test = y[:h, lo:lo + width]
        out["train"] += [(r, downsample(r)) for r in regions]
        out["test"].append((Path(name).stem, test, downsample(test)))
        out.setdefault("columns", []).append((lo, lo + width))
    return out


class PatchSampler:
    """Seeded random aligned (LR, HR) patch pairs with the 8 flips/rotations; a region is
    drawn with probability proportional to its number of patch positions."""

    def __init__(self, train: list[tuple[np.ndarray, np.ndarray]], patch: int, batch: int,
                 seed: int):
        self.train, self.patch, self.batch = train, patch, batch
        q = patch // 2
        n = np.array([(lr.shape[0] - q + 1) * (lr.shape[1] - q + 1) for _, lr in train], float)
        self.weights = n / n.sum()
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        p, q = self.patch, self.patch // 2
        lrs, hrs = [], []
        for _ in range(self.batch):
            hr_img, lr_img = self.train[self.rng.choice(len(self.train), p=self.weights)]
            i = self.rng.integers(lr_img.shape[0] - q + 1)
            j = self.rng.integers(lr_img.shape[1] - q + 1)
            lr, hr = lr_img[i:i + q, j:j + q], hr_img[2 * i:2 * i + p, 2 * j:2 * j + p]
            k, flip = self.rng.integers(4), self.rng.integers(2)
            lr, hr = np.rot90(lr, k), np.rot90(hr, k)
            if flip:
                lr, hr = lr[:, ::-1], hr[:, ::-1]
            lrs.append(lr)
            hrs.append(hr)
        return (np.stack(lrs)[..., None].astype(np.float32),
                np.stack(hrs)[..., None].astype(np.float32))


def sq_errors(pred: np.ndarray, hr: np.ndarray) -> np.ndarray:
    """Squared errors of ``clip(pred, 0, 1)`` against ``hr``, borders shaved."""
    s = SHAVE
    return (np.clip(pred, 0, 1)[s:-s, s:-s].astype(np.float64) - hr[s:-s, s:-s]) ** 2


def psnr_table(preds: list[np.ndarray], test: list) -> dict[str, float]:
    """PSNR (dB, peak 1) per test strip and ``'pooled'`` over all their pixels."""
    errs = [sq_errors(p, hr) for p, (_, hr, _) in zip(preds, test, strict=True)]
    res = {name: float(-10 * np.log10(e.mean())) for e, (name, _, _) in
           zip(errs, test, strict=True)}
    res["pooled"] = float(-10 * np.log10(np.concatenate([e.ravel() for e in errs]).mean()))
    return res


# ----------------------------------------------------------------------------- training
def make_step(graphdef: Any, tx: optax.GradientTransformation) -> Callable:
    """Jitted ``step(params, opt_state, lr, hr) -> (params, opt_state, loss)`` (L1 loss;
    the library's recipe, ``value_fn`` = the loss on the current batch for CRIC)."""

    def loss_of(params: Any, lr: jax.Array, hr: jax.Array) -> jax.Array:
        return jnp.mean(jnp.abs(nnx.merge(graphdef, params)(lr) - hr))

    return make_train_step(loss_of, tx)


def make_predict(graphdef: Any) -> Callable:
    @jax.jit
    def predict(params: Any, lr: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params)(lr)

    return predict


def test_psnr(predict: Callable, params: Any, test: list) -> dict[str, float]:
    return psnr_table([np.asarray(predict(params, jnp.asarray(lr)[None, ..., None]))[0, ..., 0]
                       for _, _, lr in test], test)


def bicubic_psnr(test: list) -> dict[str, float]:
    return psnr_table([np.asarray(bicubic_upsample(jnp.asarray(lr)[None, ..., None]))[0, ..., 0]
                       for _, _, lr in test], test)


def schedule(steps: int, periods: int) -> tuple[int, int]:
    """``(warmup, Tp)``: warm-up 20%, ``periods`` periods over the next 50%."""
    return steps // 5, max(1, (steps // 2) // periods)


def make_tx(args: argparse.Namespace, groups: hj.Groups, kind: str, sparsity: float,
            cric_lr: float | None = None) -> optax.GradientTransformation:
    base = optax.adam(args.lr)
    if kind == "dense":
        return base
    warmup, tp = schedule(args.steps, args.periods)
    cric = None
    if kind == "cric":
        cric = hj.CricConfig(args.cric_steps, cric_lr or args.cric_lr,
                             tolerance=args.cric_tolerance, max_cycles=args.cric_max_cycles)
    return optax.chain(base, hj.hesso(groups, sparsity, args.periods, tp,
                                      warmup_steps=warmup, cric=cric))


def train(args: argparse.Namespace, data: dict, kind: str, sparsity: float,
          snapshot_at: int | None = None, cric_lr: float | None = None,
          seed: int | None = None) -> dict[str, Any]:
    """One run; returns final params, per-step times, PSNR, zero groups per family."""
    seed = args.seed if seed is None else seed
    model = CARN(args.channels, args.blocks, cascade=not args.no_cascade,
                 rngs=nnx.Rngs(seed))
    groups = hj.discover_groups(model, jnp.zeros((1, 8, 8, 1)))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_tx(args, groups, kind, sparsity, cric_lr)
    cric_lr = (cric_lr or args.cric_lr) if kind == "cric" else None
    opt_state = tx.init(params)
    step = make_step(graphdef, tx)
    sampler = PatchSampler(data["train"], args.patch, args.batch, seed)
    warmup, tp = schedule(args.steps, args.periods)
    starts = {warmup + p * tp + 1 for p in range(args.periods)}  # 1-based step numbers
    times, start_times, cycles, losses, nan_scores = [], [], [], [], []
    snapshot = None
    label = "dense" if kind == "dense" else f"{kind} {sparsity:.0%}" + (
        f" η={cric_lr:g}" if cric_lr not in (None, args.cric_lr) else "") + (
        f" seed {seed}" if seed != args.seed else "")
    bar = tqdm(range(1, args.steps + 1), desc=label, leave=False, disable=args.no_progress)
    t_run = time.perf_counter()
    for t in bar:
        if snapshot_at is not None and t == snapshot_at + 1:
            snapshot = (params, opt_state)
        lr, hr = sampler()
        t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, lr, hr)
        loss = float(loss)
        dt = time.perf_counter() - t0
        losses.append(loss)
        if kind != "dense" and t in starts:
            start_times.append(dt)
            status = hj.hesso_status(opt_state)
            cycles.append(status.cric_cycles)
            nan_scores.append(int(np.isnan(status.scores).sum()))
        elif t > 1:
            times.append(dt)
        if t % 50 == 0:
            bar.set_postfix(loss=f"{loss:.4f}")
    wall = time.perf_counter() - t_run
    out: dict[str, Any] = {
        "kind": kind, "sparsity": sparsity, "cric_lr": cric_lr, "seed": seed, "wall_s": wall,
        "params": params,
        "median_step_s": float(np.median(times)), "start_step_s": start_times,
        "cric_cycles": cycles if kind == "cric" else [], "nan_scores": nan_scores,
        "final_loss": float(np.mean(losses[-50:])), "snapshot": snapshot,
        "graphdef": graphdef, "groups": groups, "tx": tx,
    }
    out["psnr"] = test_psnr(make_predict(graphdef), params, data["test"])
    zero = groups.zero_groups(params)
    out["zero_groups"] = int(zero.sum())
    out["K"] = resolve_count(sparsity, groups.num_groups) if kind != "dense" else 0
    out["per_family"] = {f.name: int(zero[s:s + f.size].sum())
                         for f, s in zip(groups.families, groups.starts, strict=True)}
    if kind != "dense":
        small, _ = hj.shrink(params, groups)
        out["params_shrunk"] = count_params(small)
    out["params_total"] = count_params(params)
    return out


# ----------------------------------------------------------------------------- CRIC cost
def time_cric(args: argparse.Namespace, data: dict, dense: dict, sparsity: float,
              rounds: int) -> dict[str, Any]:
    """Side-by-side wall time of: a CRIC period-start step, a greedy HESSO period-start
    step, an ordinary HESSO step and a whole HESSO period (``Tp`` steps carried forward),
    all from the dense run's state at the end of warm-up (identical to HESSO's, since
    warm-up passes Adam's update unchanged); plus the CRIC period start with the stock
    ``lax.conv_general_dilated`` gradients (``CARN(canonical_grad=False)``, same params)."""
    params, adam_state = dense["snapshot"]
    graphdef, groups = dense["graphdef"], dense["groups"]
    warmup, tp = schedule(args.steps, args.periods)
    sampler = PatchSampler(data["train"], args.patch, args.batch, args.seed + 1)
    batches = [sampler() for _ in range(tp)]

    def state_at(tx: optax.GradientTransformation, count: int) -> Any:
        _, hst = tx.init(params)
        return (adam_state, hst._replace(count=jnp.asarray(count, jnp.int32)))

    tx_h, tx_c = make_tx(args, groups, "hesso", sparsity), make_tx(args, groups, "cric", sparsity)
    step_h, step_c = make_step(graphdef, tx_h), make_step(graphdef, tx_c)
    stock = nnx.eval_shape(lambda: CARN(args.channels, args.blocks, cascade=not args.no_cascade,
                                        canonical_grad=False, rngs=nnx.Rngs(0)))
    step_stock = make_step(nnx.split(stock, nnx.Param)[0], tx_c)
    s_start_h, s_ord = state_at(tx_h, warmup), state_at(tx_h, warmup + 1)
    s_start_c = state_at(tx_c, warmup)
    lr, hr = batches[0]

    def period() -> Any:
        p, s = params, s_start_h
        for b_lr, b_hr in batches:
            p, s, _ = step_h(p, s, b_lr, b_hr)
        return p

    calls = {
        "cric_start": lambda: step_c(params, s_start_c, lr, hr),
        "hesso_start": lambda: step_h(params, s_start_h, lr, hr),
        "hesso_ordinary": lambda: step_h(params, s_ord, lr, hr),
        "hesso_period": period,
        "cric_start_stock": lambda: step_stock(params, s_start_c, lr, hr),
    }
    if args.no_stock_timing:
        del calls["cric_start_stock"]
    repeats = {"hesso_period": 1, "cric_start_stock": 1}
    for fn in calls.values():  # compile and warm
        time_call(fn)
    _, s_after = jax.block_until_ready(step_c(params, s_start_c, lr, hr))[:2]
    cycles = hj.hesso_status(s_after).cric_cycles
    res: dict[str, list[float]] = {k: [] for k in calls}
    for r in tqdm(range(rounds), desc="timing", leave=False, disable=args.no_progress):
        order = list(calls)
        order = order[r % len(order):] + order[:r % len(order)]  # rotate the order
        for k in order:
            if k == "cric_start_stock" and r >= 2:  # ~10 s a call: two are enough
                continue
            n = repeats.get(k, 3)
            res[k].append(float(np.median([time_call(calls[k]) for _ in range(n)])))
    med = {k: float(np.median(v)) for k, v in res.items()}
    return {"sparsity": sparsity, "Tp": tp, "rounds": rounds, "cycles": int(cycles),
            "median_s": med, "all_s": res}



# ----------------------------------------------------------------------------- report
def fam_string(per_family: dict[str, int], size: int) -> str:
    return ", ".join(f"{k} {v}/{size}" for k, v in per_family.items())


def markdown(args: argparse.Namespace, res: dict, command: str) -> str:
    c = args.channels
    warmup, tp = schedule(args.steps, args.periods)
    names = res["test_names"]
    g = res["G"]
    lines = [
        f"- Command: `{command}` (wall time {res['wall_s']:.0f} s).",
        f"- Machine: {environment_line()}.",
        f"- Model: CARN(C={c}, B={args.blocks}, cascade={not args.no_cascade}), "
        f"{res['params_dense']:,} params, G = {g} groups in {len(res['families'])} families "
        f"of {c}; ×2 luminance SR with a bicubic global skip.",
        f"- Data: scikit-learn's china.jpg and flower.jpg (427×640) as luma in [0, 1]; "
        f"a central vertical strip of {100 * args.test_fraction:.0f}% of the width of each "
        f"image (columns {', '.join(f'{a}–{b}' for a, b in res['test_columns'])}) held out "
        f"for testing, the regions left and right of it for training ({args.patch}×"
        f"{args.patch} HR patches, LR = antialiased bicubic ×2 of each whole region, "
        f"flips/rotations). PSNR of the luma, {SHAVE}-px border shaved, output clipped to "
        f"[0, 1]; **pooled** = PSNR of the mean squared error over both test strips "
        f"(the flower strip is smooth and scores far higher on its own).",
        f"- Recipe: Adam lr={args.lr}, L1 loss, {args.steps} steps of batch {args.batch}; "
        f"HESSO: warm-up {warmup}, P={args.periods} periods of Tp={tp}, fine-tune "
        f"{args.steps - warmup - args.periods * tp}; CRIC: `CricConfig(sample_steps="
        f"{args.cric_steps}, learning_rate={args.cric_lr}, tolerance={args.cric_tolerance}, "
        f"max_cycles={args.cric_max_cycles})`, value_fn = the L1 loss on the current batch. "
        "Same initialisation (seed "
        f"{args.seed}) and batches for every run"
        + (f"; at {max(args.sparsities):.0%} also seeds "
           f"{', '.join(str(x) for x in args.extra_seeds)} (initialisation and batch order; "
           f"their dense baseline is not run, Δ is against seed {args.seed}'s dense)"
           if args.extra_seeds else "") + ".", "",
        "| method | sparsity | zero groups / K | pooled test PSNR (dB) " + "".join(
            f"| {n} " for n in names) + "| Δ vs dense | params | CRIC cycles per period "
        "| pruned groups per family |",
        "|---|---:|---:|---:" + "|---:" * len(names) + "|---:|---:|---|---|",
    ]
    dense_mean = res["dense"]["psnr"]["pooled"]

    def row(label: str, sp: str, zk: str, ps: dict, params: str, cyc: str, fam: str) -> str:
        delta = ps["pooled"] - dense_mean
        return (f"| {label} | {sp} | {zk} | **{ps['pooled']:.2f}** " + "".join(
            f"| {ps[n]:.2f} " for n in names) + f"| {delta:+.2f} | {params} | {cyc} | {fam} |")

    lines.append(row("bicubic", "–", "–", res["bicubic"], "0", "–", "–"))
    lines.append(row("dense (Adam)", "0%", "–", res["dense"]["psnr"],
                     f"{res['params_dense']:,}", "–", "–"))
    for r in res["runs"]:
        label = method_label(r, args)
        cyc = ", ".join(str(x) for x in r["cric_cycles"]) if r["cric_cycles"] else "–"
        lines.append(row(label, f"{r['sparsity']:.0%}", f"{r['zero_groups']} / {r['K']}",
                         r["psnr"], f"{r['params_shrunk']:,}", cyc,
                         fam_string(r["per_family"], c)))
    lines += ["", *observations(res, c, args)]
    t = res["timing"]
    m = t["median_s"]
    lines += [
        "", f"**CRIC wall-time cost.** One period start at sparsity {t['sparsity']:.0%} "
        f"(first period, from the state at the end of warm-up; CRIC ran {t['cycles']} "
        f"corrective cycle(s) there, i.e. {(t['cycles'] + 1) * args.cric_steps} trial "
        "gradient steps plus the greedy gradient); median over "
        f"{t['rounds']} interleaved rounds, compile excluded.", "",
        "| step | wall time | × ordinary HESSO step | × whole HESSO period |",
        "|---|---:|---:|---:|",
    ]
    labels = (("hesso_ordinary", "ordinary HESSO step"),
              ("hesso_start", "HESSO period start (greedy)"),
              ("cric_start", "HESSO-CRIC period start"),
              ("hesso_period", f"whole HESSO period (Tp = {t['Tp']} steps)"),
              ("cric_start_stock", "HESSO-CRIC period start, stock `lax.conv_general_dilated` "
               "gradients (`CARN(canonical_grad=False)`)"))
    for k, label in labels:
        if k in m:
            lines.append(f"| {label} | {1e3 * m[k]:.1f} ms | {m[k] / m['hesso_ordinary']:.2f}× "
                         f"| {m[k] / m['hesso_period']:.3f}× |")
    runs_c = [r for r in res["runs"] if r["kind"] == "cric"]
    runs_h = [r for r in res["runs"] if r["kind"] == "hesso"]
    lines += ["", "In the training runs (every step timed with a host sync): the P period-start "
              "steps of HESSO-CRIC took " + "; ".join(
                  f"{r['sparsity']:.0%}: " + ", ".join(f"{x:.2f}" for x in r["start_step_s"])
                  + " s" for r in runs_c) + "; the median ordinary step "
              f"{1e3 * np.median([r['median_step_s'] for r in runs_h]):.1f} ms (HESSO runs). "
              "Whole runs (compile included): dense "
              f"{res['dense']['wall_s']:.0f} s, HESSO " + ", ".join(
                  f"{r['wall_s']:.0f}" for r in runs_h) + " s, HESSO-CRIC " + ", ".join(
                  f"{r['wall_s']:.0f}" for r in runs_c) + " s.",
              "", "The stock row: `CARN(canonical_grad=False)` convolves with JAX's stock "
              "`lax.conv_general_dilated`, whose transposed (gradient) convolutions XLA:CPU "
              "runs tens of times slower inside `lax.cond` / `while_loop` bodies (where CRIC "
              "computes its trial gradients) than at the top level; CRIC rewrites every "
              "convolution of the loss into canonical channels-last layout itself "
              "(`hesso_jax/jaxpr/conv_layout.py`), so this row measures that rewrite against "
              "`CARN`'s own `conv_nhwc`."]
    return "\n".join(lines)


def observations(res: dict, c: int, args: argparse.Namespace) -> list[str]:
    """Facts read off the runs: collapses, families removed whole, head/tail counts."""
    bic, dense = res["bicubic"]["pooled"], res["dense"]["psnr"]["pooled"]
    fams = res["families"]
    head, tail = fams[0], fams[-2:]
    out = [f"**Head / tail.** Pruned groups of the head family `{head}` (the entry conv: "
           "all of it cuts the input off the residual branch) and of the tail "
           f"`{' + '.join(tail)}` (last fusion + upsampler, {2 * c} groups), HESSO vs "
           "HESSO-CRIC: " + "; ".join(
               f"{sp:.0%}: head {find_run(res, 'hesso', sp)['per_family'][head]} vs "
               f"{find_run(res, 'cric', sp)['per_family'][head]}, tail "
               f"{sum(find_run(res, 'hesso', sp)['per_family'][f] for f in tail)} vs "
               f"{sum(find_run(res, 'cric', sp)['per_family'][f] for f in tail)}"
               for sp in args.sparsities) + "."]
    whole = [f"{method_label(r, args)} {r['sparsity']:.0%}: "
             + ", ".join(f for f, n in r["per_family"].items() if n == c)
             for r in res["runs"] if any(n == c for n in r["per_family"].values())]
    out += ["", "**Families removed entirely** (a whole `block{i}.conv1` family only turns "
            "its block into a residual pass-through; the head family takes the input away): "
            + ("; ".join(whole) if whole else "none") + "."]
    collapsed = [f"{method_label(r, args)} {r['sparsity']:.0%} "
                 f"({r['psnr']['pooled']:.2f} dB)" for r in res["runs"]
                 if r["psnr"]["pooled"] - bic < 0.1 * (dense - bic)]
    out += ["", f"**Collapse** (less than 10% of dense's {dense - bic:+.2f} dB gain over "
            "bicubic left): " + (", ".join(collapsed) if collapsed else "none") + "."]
    short = [f"{method_label(r, args)} {r['sparsity']:.0%}: {r['zero_groups']} of K = "
             f"{r['K']} (NaN scores at the period starts: "
             f"{', '.join(str(n) for n in r['nan_scores'])})"
             for r in res["runs"] if r["zero_groups"] != r["K"]]
    out += ["", "**Exactly K groups at 0.0:** " + (
        "every run." if not short else "not in " + "; ".join(short) + ". Every selection of "
        "`projection.bottom_k` has exactly K̂ groups (a NaN score, from diverged CRIC trial "
        "steps, ranks last among the candidates), so a shortfall here is a bug to report.")]
    return out


def find_run(res: dict, kind: str, sparsity: float) -> dict:
    """The run of ``kind`` at ``sparsity`` (CRIC: the one with the default trial rate)."""
    return next(r for r in res["runs"] if r["kind"] == kind and r["sparsity"] == sparsity
                and r["cric_lr"] in (None, res["config"]["cric_lr"])
                and r["seed"] == res["config"]["seed"])


def method_label(r: dict, args: argparse.Namespace) -> str:
    seed = f" (seed {r['seed']})" if r["seed"] != args.seed else ""
    if r["kind"] == "hesso":
        return "HESSO" + seed
    return "HESSO-CRIC" + (f" (η={r['cric_lr']:g})" if r["cric_lr"] != args.cric_lr
                           else "") + seed


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5),
                                   gridspec_kw={"width_ratios": [1, 1.8]})
    sps = sorted({r["sparsity"] for r in res["runs"]})
    for kind, label, mk in (("hesso", "HESSO", "o-"), ("cric", "HESSO-CRIC", "s-")):
        ys = [find_run(res, kind, s)["psnr"]["pooled"] for s in sps]
        ax1.plot([100 * s for s in sps], ys, mk, label=label)
    labelled: set[str] = set()
    for r in res["runs"]:
        if r is find_run(res, r["kind"], r["sparsity"]):
            continue
        kind = r["kind"]
        other = "other seeds" if r["cric_lr"] in (None, res["config"]["cric_lr"]) else "other η"
        label = f"{'HESSO' if kind == 'hesso' else 'HESSO-CRIC'}, {other}"
        ax1.plot(100 * r["sparsity"] + (-0.7 if kind == "hesso" else 0.7),
                 r["psnr"]["pooled"], "x" if other == "other seeds" else "+", ms=8,
                 color="C0" if kind == "hesso" else "C1",
                 label=None if label in labelled else label)
        labelled.add(label)
    ax1.axhline(res["dense"]["psnr"]["pooled"], color="k", ls="--", label="dense")
    ax1.axhline(res["bicubic"]["pooled"], color="gray", ls=":", label="bicubic")
    ax1.set_xlabel("group sparsity (%)")
    ax1.set_ylabel("test PSNR (dB, Y)")
    ax1.set_title("held-out PSNR")
    ax1.legend(fontsize=8, loc="lower left")
    fams = res["families"]
    x = np.arange(len(fams))
    n = 2 * len(sps)
    w = 0.8 / n
    cmap = {"hesso": plt.get_cmap("Blues"), "cric": plt.get_cmap("Oranges")}
    i = 0
    for s_i, s in enumerate(sps):
        for kind, label in (("hesso", "HESSO"), ("cric", "CRIC")):
            r = find_run(res, kind, s)
            ax2.bar(x - 0.4 + (i + 0.5) * w, [r["per_family"][f] for f in fams], w,
                    color=cmap[kind](0.4 + 0.5 * s_i / max(len(sps) - 1, 1)),
                    label=f"{label} {s:.0%}")
            i += 1
    ax2.set_xticks(x, fams, rotation=30, ha="right")
    ax2.set_ylabel(f"pruned groups (of {res['channels']})")
    ax2.set_title("pruned groups per family (head = first, tail = last two)")
    ax2.set_ylim(0, 1.4 * res["channels"])
    ax2.legend(ncol=len(sps), fontsize=8, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run (~1-2 minutes)")
    p.add_argument("--steps", type=int, default=None, help="default 1000 (quick: 250)")
    p.add_argument("--sparsities", type=float, nargs="+", default=None,
                   help="default 0.3 0.5 0.7 0.9 (quick: 0.5 0.9)")
    p.add_argument("--periods", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patch", type=int, default=32, help="HR patch size (even)")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--no-cascade", action="store_true")
    p.add_argument("--cric-steps", type=int, default=5)
    p.add_argument("--cric-lr", type=float, default=1.0)
    p.add_argument("--cric-lr-sweep", type=float, nargs="*", default=None,
                   help="extra CRIC runs at the highest sparsity with these trial rates "
                   "(default: none)")
    p.add_argument("--extra-seeds", type=int, nargs="*", default=None,
                   help="HESSO and CRIC at the highest sparsity with these seeds too "
                   "(default 1 2; quick: none)")
    p.add_argument("--cric-tolerance", type=int, default=0)
    p.add_argument("--cric-max-cycles", type=int, default=4)
    p.add_argument("--timing-rounds", type=int, default=None, help="default 3 (quick: 1)")
    p.add_argument("--no-stock-timing", action="store_true",
                   help="skip timing CRIC with the stock lax convolution gradients")
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 250 if args.quick else 1000
    if args.sparsities is None:
        args.sparsities = [0.5, 0.9] if args.quick else [0.3, 0.5, 0.7, 0.9]
    if args.cric_lr_sweep is None:
        args.cric_lr_sweep = []
    if args.extra_seeds is None:
        args.extra_seeds = [] if args.quick else [1, 2]
    if args.timing_rounds is None:
        args.timing_rounds = 1 if args.quick else 3
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    data = load_images(args.test_fraction)
    warmup, _ = schedule(args.steps, args.periods)
    dense = train(args, data, "dense", 0.0, snapshot_at=warmup)
    runs = []
    for sp in args.sparsities:
        for kind in ("hesso", "cric"):
            runs.append(train(args, data, kind, sp))
    for eta in args.cric_lr_sweep:  # CRIC's trial rate, at the highest sparsity
        runs.append(train(args, data, "cric", max(args.sparsities), cric_lr=eta))
    for seed in args.extra_seeds:  # other initialisations / batch orders, highest sparsity
        for kind in ("hesso", "cric"):
            runs.append(train(args, data, kind, max(args.sparsities), seed=seed))
    timing = time_cric(args, data, dense, max(args.sparsities), args.timing_rounds)
    fams = [f.name for f in dense["groups"].families]
    tail = fams[-2:]
    keep = ("kind", "sparsity", "cric_lr", "seed", "wall_s", "median_step_s", "start_step_s",
            "cric_cycles", "nan_scores", "final_loss", "psnr", "zero_groups", "K", "per_family",
            "params_shrunk")
    return {
        "wall_s": time.perf_counter() - t0,
        "channels": args.channels,
        "G": dense["groups"].num_groups,
        "families": fams,
        "tail_families": tail,
        "test_names": [n for n, _, _ in data["test"]],
        "test_columns": data["columns"],
        "bicubic": bicubic_psnr(data["test"]),
        "dense": {k: dense[k] for k in ("psnr", "wall_s", "median_step_s", "final_loss")},
        "params_dense": dense["params_total"],
        "runs": [{k: r[k] for k in keep} for r in runs],
        "timing": timing,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    res = run(args)
    body = markdown(args, res, command_line("super_resolution.py", argv))
    publish(args.out, SECTION, body, results=res, json_name="super_resolution.json",
            write=not args.no_write)
    if not args.no_write:
        plot(res, args.out / "super_resolution.png")


if __name__ == "__main__":
    main()
