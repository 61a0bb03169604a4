"""HESSO vs dense on the digits CNN: test accuracy at equal steps, mean over seeds.

Runs exactly the demo's recipe (`hesso-jax demo`: Adam, warm-up 20%, P periods over 50%,
fine-tune 30%) for several seeds, checks that exactly K groups are 0.0 at the end, and
writes the table into ``benchmarks/RESULTS.md`` (section "Digits CNN accuracy").

    python benchmarks/digits_accuracy.py                 # demo settings, 3 seeds
    python benchmarks/digits_accuracy.py --c1 32 --c2 64 # a narrower CNN
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import optax
from common import command_line, environment_line, parser, publish
from flax import nnx
from tqdm.auto import tqdm

import hesso_jax as hj
from hesso_jax.data import load_digits_split
from hesso_jax.models import CNN
from hesso_jax.train import count_params, demo_schedule, evaluate, train_classifier

SECTION = "## Digits CNN accuracy: HESSO vs dense at equal steps"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--periods", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--cosine", action="store_true", help="cosine-decay the learning rate")
    p.add_argument("--c1", type=int, default=48)
    p.add_argument("--c2", type=int, default=96)
    p.add_argument("--saliency", default=None, help="a single score name (default: mix)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    rows = []
    for seed in tqdm(range(args.seeds), desc="seeds"):
        data = load_digits_split(seed)
        lr = optax.cosine_decay_schedule(args.lr, args.steps) if args.cosine else args.lr
        warmup, period_len = demo_schedule(args.steps, args.periods)
        result = {"seed": seed}
        for kind in ("dense", "hesso"):
            model = CNN(args.c1, args.c2, rngs=nnx.Rngs(seed))
            groups = hj.discover_groups(model, data.x_train[:1])
            tx = optax.adam(lr)
            if kind == "hesso":
                tx = optax.chain(tx, hj.hesso(groups, args.sparsity, args.periods, period_len,
                                              warmup_steps=warmup, saliency=args.saliency))
            t0 = time.perf_counter()
            _, opt_state, _ = train_classifier(model, tx, data, steps=args.steps, seed=seed,
                                               eval_every=10**9, progress=False)
            result[f"{kind}_seconds"] = time.perf_counter() - t0
            result[f"{kind}_acc"] = evaluate(model, data.x_test, data.y_test)
            if kind == "hesso":
                zero = int(groups.zero_groups(nnx.state(model, nnx.Param)).sum())
                status = hj.hesso_status(opt_state)
                result.update(zero_groups=zero, K=status.target, G=groups.num_groups)
                small, _ = hj.shrink(nnx.state(model), groups)
                result["params_shrunk"] = count_params(small.filter(nnx.Param))
            else:
                result["params_dense"] = count_params(model)
        rows.append(result)
    dense = np.array([r["dense_acc"] for r in rows])
    hesso = np.array([r["hesso_acc"] for r in rows])
    return {"rows": rows, "dense_mean": float(dense.mean()), "hesso_mean": float(hesso.mean()),
            "gap_pp": float(100 * (dense.mean() - hesso.mean())),
            "exact_k": all(r["zero_groups"] == r["K"] for r in rows)}


def markdown(args: argparse.Namespace, res: dict, command: str) -> str:
    lines = [
        f"Command: `{command}`  ",
        f"Environment: {environment_line()}  ",
        f"Recipe: CNN(c1={args.c1}, c2={args.c2}), Adam lr={args.lr}"
        f"{' cosine-decayed' if args.cosine else ''}, {args.steps} steps of batch 64, "
        f"HESSO K={args.sparsity:g} of the groups, P={args.periods}, warm-up 20%, "
        "pruning 50%, fine-tune 30%; same initialisation and batches for both runs.", "",
        "| seed | dense acc (%) | HESSO acc (%) | zero groups / K / G | params dense → shrunk |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['seed']} | {100 * r['dense_acc']:.2f} | {100 * r['hesso_acc']:.2f} "
                     f"| {r['zero_groups']} / {r['K']} / {r['G']} | "
                     f"{r['params_dense']:,} → {r['params_shrunk']:,} |")
    lines += [
        f"| **mean** | **{100 * res['dense_mean']:.2f}** | **{100 * res['hesso_mean']:.2f}** "
        f"| exactly K: {'yes' if res['exact_k'] else 'NO'} | |", "",
        f"Gap dense − HESSO: **{res['gap_pp']:.2f} pp** (target ≤ 0.5 pp: "
        f"{'met' if res['gap_pp'] <= 0.5 else 'NOT met'}).", "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    res = run(args)
    body = markdown(args, res, command_line("digits_accuracy.py", argv))
    publish(args.out, SECTION, body, results=res, json_name="digits_accuracy.json",
            write=not args.no_write)


if __name__ == "__main__":
    main()
