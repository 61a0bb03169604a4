"""Peer side by side: Torch-Pruning's group magnitude pruner vs hesso_jax on digits.

The digits CNN of `hesso_jax.models.CNN` (stem → residual block → strided conv → global
mean → Linear, every conv followed by BatchNorm) is written again in PyTorch and trained on
the same scikit-learn digits split, with the same optimizer (Adam, same learning rate),
batch size and batch order. For each seed and group sparsity:

* **ours**: `hj.hesso` (the demo schedule: warm-up 20%, P periods over 50%, fine-tune 30%)
  and one-shot magnitude + fine-tune (`hesso_jax.baselines`), both shrunk with
  `hj.shrink_model` (the rows of ``benchmarks/pareto_digits.py``, run again here so that
  wall times are measured side by side);
* **Torch-Pruning** (`torch_pruning.pruner.BasePruner` with
  ``GroupMagnitudeImportance(p=2)``, the L2 norm of each dependency group): the same dense
  training for the steps HESSO spends before its last period ends, one-shot pruning, then
  fine-tuning with a fresh Adam for the remaining steps — per-layer (``uniform``) and
  ``global`` ranking. Its channel ratio is bisected so that the pruned model has the
  same number of parameters as HESSO's shrunk model of that seed (the parameter reduction
  is matched, not the group count: the two libraries count groups differently).

Reported: test accuracy (mean ± std over seeds), parameters, FLOPs per example (one
analytic count from the channel counts, `cnn_flops`, for both frameworks), wall time
of the whole recipe (train + prune + fine-tune) and the pruned/dense CPU latency ratio
of each framework's own model (interleaved medians on the test set).

Needs the optional extra ``peers`` (PyTorch and Torch-Pruning)::

    pip install torch --index-url https://download.pytorch.org/whl/cpu   # CPU-only machine
    pip install -e ".[peers]"
    python benchmarks/peers/torch_pruning_digits.py                  # 3 seeds, 30/50/70%
    python benchmarks/peers/torch_pruning_digits.py --seeds 1 --steps 300 --no-write
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).parent
# This script lives one folder below the benchmarks it reuses (pareto_digits, common);
# Python puts only its own folder on sys.path, so the parent folder is added here.
sys.path.insert(0, str(HERE.parent))

SECTION = "## Peer side by side: Torch-Pruning on digits"
MISSING = ("benchmarks/peers needs the optional extra 'peers' (PyTorch and Torch-Pruning), "
           "which is not installed here ({error}). Install it with "
           "`pip install -e \".[peers]\"` (on a CPU-only machine install PyTorch's CPU "
           "build first: `pip install torch --index-url "
           "https://download.pytorch.org/whl/cpu`).")


def _import_peers() -> tuple[Any, Any]:
    """``(torch, torch_pruning)``; ImportError with the missing module's name otherwise."""
    import torch
    import torch_pruning

    return torch, torch_pruning


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsities", default="0.3,0.5,0.7",
                   help="HESSO group sparsities; Torch-Pruning matches their parameters")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--periods", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--no-write", action="store_true",
                   help="print only: do not write the JSON or RESULTS.md")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- PyTorch side


def torch_cnn(torch: Any, c1: int = 48, c2: int = 96, num_classes: int = 10,
              in_channels: int = 1) -> Any:
    """The PyTorch twin of `hesso_jax.models.CNN` (NCHW; BatchNorm momentum 0.1 is flax's
    0.9, eps 1e-5 in both); PyTorch's default initialisers."""
    nn = torch.nn

    def conv_bn(cin: int, cout: int, stride: int = 1) -> Any:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                             nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5))

    class TorchCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = conv_bn(in_channels, c1)
            self.block_a = conv_bn(c1, c1)
            self.block_b = conv_bn(c1, c1)
            self.down = conv_bn(c1, c2, stride=2)
            self.head = nn.Linear(c2, num_classes)

        def forward(self, x: Any) -> Any:
            relu = torch.relu
            h = relu(self.stem(x))
            h = relu(h + self.block_b(relu(self.block_a(h))))
            h = relu(self.down(h))
            return self.head(h.mean(dim=(2, 3)))

    return TorchCNN()


def batch_indices(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """The batch order of `hesso_jax.train.train_classifier`: seeded permutations, epoch by
    epoch, the tail of an epoch dropped."""
    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(n), 0
    while True:
        if pos + batch_size > n:
            order, pos = rng.permutation(n), 0
        yield order[pos:pos + batch_size]
        pos += batch_size


def torch_train(torch: Any, model: Any, x: Any, y: Any, *, steps: int, lr: float,
                batch_size: int, seed: int) -> None:
    """``steps`` Adam steps of mean cross-entropy, in place (a fresh Adam, as after pruning)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    batches = batch_indices(len(x), batch_size, seed)
    for _ in range(steps):
        idx = torch.from_numpy(next(batches))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def torch_accuracy(torch: Any, model: Any, x: Any, y: Any) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def torch_latency_ratio(torch: Any, small: Any, dense: Any, x: Any, rounds: int = 20) -> float:
    """Median eval-mode forward time small / dense, interleaved in one run."""
    times: dict[int, list[float]] = {0: [], 1: []}
    small.eval()
    dense.eval()
    with torch.no_grad():
        small(x), dense(x)
        for _ in range(rounds):
            for i, m in enumerate((small, dense)):
                t0 = time.perf_counter()
                m(x)
                times[i].append(time.perf_counter() - t0)
    return float(np.median(times[0]) / np.median(times[1]))


def tp_prune(tp: Any, model: Any, example: Any, ratio: float,
             global_pruning: bool) -> Any:
    """A pruned copy of ``model``: Torch-Pruning's group-L2 magnitude pruner at channel
    ratio ``ratio`` (the classifier head's outputs are kept)."""
    model = copy.deepcopy(model)
    pruner = tp.pruner.BasePruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio, global_pruning=global_pruning, ignored_layers=[model.head])
    pruner.step()
    return model


def tp_prune_to_params(tp: Any, model: Any, example: Any, target: int,
                       global_pruning: bool, iters: int = 14) -> tuple[Any, float]:
    """Bisects the channel ratio so the pruned model's parameter count is the closest to
    ``target``; returns ``(pruned copy, ratio)``."""
    lo, hi = 0.0, 0.99
    best: tuple[int, Any, float] | None = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        pruned = tp_prune(tp, model, example, mid, global_pruning)
        n = sum(p.numel() for p in pruned.parameters())
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), pruned, mid)
        if n > target:
            lo = mid
        else:
            hi = mid
    assert best is not None
    return best[1], best[2]


def cnn_flops(c_in: int, c1: int, ca: int, c2: int, classes: int, side: int = 8) -> float:
    """FLOPs of one forward pass of the digits CNN from its channel counts, counted the
    same way for both frameworks: ``2 × MACs`` of the convs (padded taps included, as
    PyTorch profilers count) and the head; BatchNorm, ReLU and the mean are left out.

    stem ``c_in→c1`` and block ``c1→ca→c1`` at ``side²`` positions, the strided conv
    ``c1→c2`` at ``(side/2)²``, the head ``c2→classes``.
    """
    full, half = side * side, (side // 2) ** 2
    macs = 9 * (full * (c_in * c1 + 2 * c1 * ca) + half * c1 * c2) + c2 * classes
    return 2.0 * macs


def torch_flops(model: Any) -> float:
    """`cnn_flops` of a (pruned) `torch_cnn`."""
    return cnn_flops(model.stem[0].in_channels, model.stem[0].out_channels,
                     model.block_a[0].out_channels, model.down[0].out_channels,
                     model.head.out_features)


def jax_flops(model: Any) -> float:
    """`cnn_flops` of a (shrunk) `hesso_jax.models.CNN`."""
    return cnn_flops(model.stem.conv.in_features, model.stem.conv.out_features,
                     model.block_a.conv.out_features, model.down.conv.out_features,
                     model.head.out_features)


# --------------------------------------------------------------------------- the grid


def run_seed(args: argparse.Namespace, seed: int, sparsities: list[float],
             torch: Any, tp: Any) -> list[dict[str, Any]]:
    """Every row of one seed: dense (both frameworks), ours and Torch-Pruning's runs."""
    import optax
    import pareto_digits

    from hesso_jax.data import load_digits_split
    from hesso_jax.train import count_params, demo_schedule, evaluate
    from hesso_jax.train import train_classifier as jax_train

    data = load_digits_split(seed)
    rows: list[dict[str, Any]] = []

    def row(framework: str, method: str, sparsity: float, **kw: Any) -> None:
        rows.append({"framework": framework, "method": method, "sparsity": sparsity,
                     "seed": seed, **kw})

    # JAX dense, then ours at each sparsity (the pareto benchmark's recipe).
    dense = pareto_digits.ARCHS["cnn"][1](seed)
    t0 = time.perf_counter()
    jax_train(dense, optax.adam(args.lr), data, steps=args.steps, batch_size=args.batch_size,
              seed=seed, eval_every=args.steps, progress=False)
    row("hesso_jax", "dense", 0.0, acc=evaluate(dense, data.x_test, data.y_test),
        params=count_params(dense), flops=jax_flops(dense),
        latency_ratio=1.0, seconds=time.perf_counter() - t0)
    targets = {}
    for s in sparsities:
        for method in ("hesso", "magnitude"):
            r, small = pareto_digits.run_one(args, "cnn", method, s, seed, data, dense,
                                             return_model=True)
            row("hesso_jax", method, s, flops=jax_flops(small),
                **{k: r[k] for k in ("acc", "params", "latency_ratio", "seconds")})
            if method == "hesso":
                targets[s] = r["params"]

    # PyTorch: dense, and the pre-pruning checkpoint at the step HESSO's last period ends.
    torch.manual_seed(seed)
    x_tr = torch.from_numpy(np.ascontiguousarray(data.x_train.transpose(0, 3, 1, 2)))
    x_te = torch.from_numpy(np.ascontiguousarray(data.x_test.transpose(0, 3, 1, 2)))
    y_tr = torch.from_numpy(data.y_train.astype(np.int64))
    y_te = torch.from_numpy(data.y_test.astype(np.int64))
    example = x_tr[:1]
    warmup, period_len = demo_schedule(args.steps, args.periods)
    pre = warmup + args.periods * period_len
    fit = dict(lr=args.lr, batch_size=args.batch_size, seed=seed)

    t_dense = torch_cnn(torch)
    t0 = time.perf_counter()
    torch_train(torch, t_dense, x_tr, y_tr, steps=args.steps, **fit)
    row("torch", "dense", 0.0, acc=torch_accuracy(torch, t_dense, x_te, y_te),
        params=sum(p.numel() for p in t_dense.parameters()),
        flops=torch_flops(t_dense), latency_ratio=1.0,
        seconds=time.perf_counter() - t0)

    torch.manual_seed(seed)
    base = torch_cnn(torch)
    t0 = time.perf_counter()
    torch_train(torch, base, x_tr, y_tr, steps=pre, **fit)
    t_pre = time.perf_counter() - t0
    for s in sparsities:
        for global_pruning in (False, True):
            t0 = time.perf_counter()
            pruned, ratio = tp_prune_to_params(tp, base, example, targets[s],
                                               global_pruning)
            torch_train(torch, pruned, x_tr, y_tr, steps=args.steps - pre, **fit)
            seconds = t_pre + time.perf_counter() - t0
            row("torch", "tp_global" if global_pruning else "tp_uniform", s,
                acc=torch_accuracy(torch, pruned, x_te, y_te),
                params=sum(p.numel() for p in pruned.parameters()),
                flops=torch_flops(pruned),
                latency_ratio=torch_latency_ratio(torch, pruned, t_dense, x_te),
                seconds=seconds, ratio=ratio)
    return rows


LABELS = {("hesso_jax", "dense"): "hesso_jax dense", ("hesso_jax", "hesso"): "hesso_jax HESSO",
          ("hesso_jax", "magnitude"): "hesso_jax magnitude + FT",
          ("torch", "dense"): "PyTorch dense",
          ("torch", "tp_uniform"): "Torch-Pruning magnitude + FT (per layer)",
          ("torch", "tp_global"): "Torch-Pruning magnitude + FT (global)"}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (sparsity, framework, method), seed statistics as in the Pareto table."""
    from pareto_digits import aggregate

    key = lambda r: (r["sparsity"], r["framework"], r["method"])  # noqa: E731
    keys = sorted({key(r) for r in rows},
                  key=lambda k: (k[0], list(LABELS).index((k[1], k[2]))))
    return [{"sparsity": k[0], "framework": k[1], "method": k[2],
             **aggregate([r for r in rows if key(r) == k])} for k in keys]


def table(summary: list[dict[str, Any]]) -> str:
    """The markdown table of `summarize`'s lines."""
    from pareto_digits import flops_text

    lines = ["| target | method | seeds | test acc % (mean ± std) | params | FLOPs/example | "
             "latency pruned/dense | wall s (train + prune + FT) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        target = "dense" if s["method"] == "dense" else f"{100 * s['sparsity']:.0f}% groups"
        lines.append(f"| {target} | {LABELS[(s['framework'], s['method'])]} | {s['n']} | "
                     f"{s['acc_mean']:.2f} ± {s['acc_std']:.2f} | {s['params']:,.0f} | "
                     f"{flops_text(s['flops'])} | {s['latency_ratio']:.2f} | {s['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        torch, tp = _import_peers()
    except ImportError as err:
        print(MISSING.format(error=err), file=sys.stderr)
        return 2
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    rows: list[dict[str, Any]] = []
    for seed in tqdm(range(args.seeds), desc="seeds"):
        rows.extend(run_seed(args, seed, sparsities, torch, tp))
    summary = summarize(rows)
    text = table(summary)
    print(text)
    if not args.no_write:
        command = " ".join(["python benchmarks/peers/torch_pruning_digits.py",
                            *(argv if argv is not None else sys.argv[1:])])
        import jax
        import torch_pruning

        versions = (f"torch {torch.__version__}, torch-pruning "
                    f"{getattr(torch_pruning, '__version__', '?')}, jax {jax.__version__}")
        (HERE / "torch_pruning_digits.json").write_text(json.dumps(
            {"command": command, "versions": versions, "rows": rows, "summary": summary},
            indent=1))
        from common import environment_line, upsert_section

        body = (f"Command: `{command}` ({args.steps} steps, Adam lr {args.lr}, batch "
                f"{args.batch_size}, P={args.periods}; {versions}; {environment_line()}; "
                "wall times compare only within the table). Torch-Pruning's "
                "channel ratio is bisected to HESSO's shrunk parameter count of the same "
                "seed; HESSO's rows are those of the Pareto benchmark, run again here.\n\n"
                + text)
        upsert_section(HERE.parent / "RESULTS.md", SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
