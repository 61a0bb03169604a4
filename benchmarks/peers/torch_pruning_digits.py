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
analytic count from the channel counts, `cnn_flops`, for both frameworks), the
pruned/dense CPU latency ratio of each framework's own model (interleaved medians on the
test set) and two wall times of the whole recipe (train + prune + fine-tune):

* **measured**: the recipe's wall clock, every step timed (JAX steps blocked on, PyTorch
  eager);
* **step-median estimate** (`StepLog.estimate`): the same wall clock with every training
  step after the first of each ``train`` call replaced by that call's median step, i.e.
  without the stalls a shared machine adds (the first step, which holds JAX's
  compilation, pruning and evaluation are kept as measured).

PyTorch runs on ``--threads`` intra-op threads, 1 by default: with 2, PyTorch steps on
these shared 2-core machines stall (up to ~1 s a step), which inflated earlier wall
times.

Needs the optional extra ``peers`` (PyTorch and Torch-Pruning)::

    pip install torch --index-url https://download.pytorch.org/whl/cpu   # CPU-only machine
    pip install -e ".[peers]"
    python benchmarks/peers/torch_pruning_digits.py                  # 3 seeds, 30/50/70%, 1 thread
    python benchmarks/peers/torch_pruning_digits.py --seeds 1 --steps 300 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).parent
# This script lives one folder below the benchmarks it reuses (pareto_digits, common);
# Python puts only its own folder on sys.path, so the parent folder is added here (and its
# own, for the sibling modules, when it is imported rather than run).
for _folder in (HERE, HERE.parent):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

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


@dataclasses.dataclass
class StepLog:
    """Wall seconds of every training step of one recipe, one segment per ``train`` call."""

    segments: list[list[float]] = dataclasses.field(default_factory=list)

    def new(self) -> list[float]:
        """A fresh segment (the list a training loop appends its step times to)."""
        self.segments.append([])
        return self.segments[-1]

    def median(self) -> float:
        """Median step of all segments pooled (first steps left out)."""
        rest = [t for seg in self.segments for t in seg[1:]]
        return float(np.median(rest)) if rest else float("nan")

    def stalled(self, factor: float = 3.0) -> int:
        """Steps over ``factor`` × their segment's median (first steps left out)."""
        return sum(int(np.sum(np.asarray(seg[1:]) > factor * np.median(seg[1:])))
                   for seg in self.segments if len(seg) > 1)

    def estimate(self, wall: float) -> float:
        """``wall`` with each segment's steps after its first at the segment's median."""
        for seg in self.segments:
            if len(seg) > 1:
                wall += (len(seg) - 1) * float(np.median(seg[1:])) - sum(seg[1:])
        return wall

    def fields(self, wall: float) -> dict[str, Any]:
        """The row fields of a recipe that took ``wall`` seconds."""
        return {"seconds": wall, "est_seconds": self.estimate(wall),
                "step_ms": 1e3 * self.median(), "stalled": self.stalled(),
                "steps": sum(len(seg) for seg in self.segments)}


@contextlib.contextmanager
def timed_jax_steps(log: StepLog) -> Iterator[StepLog]:
    """Within the block, every `hesso_jax.train.make_step` step (so every step of
    `train_classifier`) is blocked on and its wall time appended to a new ``log`` segment
    per compiled step. `hesso_jax.train` itself is restored afterwards."""
    import jax

    import hesso_jax.train as train

    original = train.make_step

    def make_step(graphdef: Any, tx: Any) -> Any:
        step, times = original(graphdef, tx), log.new()

        def timed(*args: Any) -> Any:
            t0 = time.perf_counter()
            out = jax.block_until_ready(step(*args))
            times.append(time.perf_counter() - t0)
            return out

        return timed

    train.make_step = make_step
    try:
        yield log
    finally:
        train.make_step = original


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from common import seeds_arg

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsities", default="0.3,0.5,0.7",
                   help="HESSO group sparsities; Torch-Pruning matches their parameters")
    p.add_argument("--seeds", default="3", type=seeds_arg,
                   help="a count N (seeds 0..N-1) or a comma list of seeds, e.g. '1,2'")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of this run's JSON that it does not rerun (same "
                        "seed, method, target and steps replaced)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--periods", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (2 stall on shared 2-core machines)")
    p.add_argument("--no-write", action="store_true",
                   help="print only: do not write the JSON or RESULTS.md")
    p.add_argument("--flops", default="",
                   help="FLOP-target mode, e.g. '0.7,0.5,0.3': Torch-Pruning's channel "
                        "ratio bisected until the pruned model keeps at most that fraction "
                        "of the dense FLOPs (XLA's count, as in pareto_digits); PyTorch rows "
                        "only, written to torch_pruning_digits_flops.json (--tag flops)")
    p.add_argument("--results", type=Path, default=HERE.parent / "RESULTS.md",
                   help="the RESULTS.md whose section this run rewrites")
    p.add_argument("--tag", default="",
                   help="write torch_pruning_digits_<tag>.json and a RESULTS section of "
                        "its own (a partial grid next to the full one)")
    p.set_defaults(min_keep=0)  # pareto_digits.run_one's per-family floor: none here
    args = p.parse_args(argv)
    if args.flops and not args.tag:
        args.tag = "flops"
    return args


# --------------------------------------------------------------------------- PyTorch side


def torch_cnn(torch: Any, c1: int = 48, c2: int = 96, num_classes: int = 10,
              in_channels: int = 1) -> Any:
    """The PyTorch twin of `hesso_jax.models.CNN` (``twin.TorchCNN``: NCHW; BatchNorm
    momentum 0.1 is flax's 0.9, eps 1e-5 in both); PyTorch's default initialisers.
    ``torch`` is the imported module (the caller has checked that it is installed)."""
    from twin import TorchCNN

    return TorchCNN(c1, c2, num_classes, in_channels)


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
                batch_size: int, seed: int, log: StepLog | None = None,
                opt: Any = None) -> None:
    """``steps`` steps of mean cross-entropy, in place: ``opt`` (default a fresh Adam, as
    after pruning); each step's wall time goes to a new segment of ``log`` if given."""
    opt = torch.optim.Adam(model.parameters(), lr=lr) if opt is None else opt
    times = log.new() if log is not None else []
    model.train()
    batches = batch_indices(len(x), batch_size, seed)
    for _ in range(steps):
        t0 = time.perf_counter()
        torch_step(torch, model, opt, x, y, next(batches))
        times.append(time.perf_counter() - t0)


def torch_step(torch: Any, model: Any, opt: Any, x: Any, y: Any, idx: np.ndarray) -> float:
    """One eager step of ``opt`` on the mean cross-entropy of batch ``idx``; its loss."""
    i = torch.from_numpy(idx)
    loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


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


def tp_prune_to_flops(tp: Any, model: Any, example: Any, target: float,
                      global_pruning: bool, measure: Any,
                      iters: int = 10) -> tuple[Any, float, float]:
    """Bisects the channel ratio for the *smallest* ratio whose pruned model keeps at most
    ``target`` of the dense FLOPs: ``measure(pruned) -> kept fraction`` is non-increasing
    in the ratio (up to channel rounding), so after ``iters`` halvings of ``[0, 0.99]`` the
    kept fraction lies in ``(target − step, target]``, ``step`` the FLOPs of one bisection
    interval. Returns ``(pruned copy, ratio, kept fraction)``: the feasible model with the
    largest kept fraction seen. Raises RuntimeError if no ratio tried is feasible."""
    lo, hi = 0.0, 0.99
    best, best_ratio, best_frac = None, hi, -1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        pruned = tp_prune(tp, model, example, mid, global_pruning)
        frac = measure(pruned)
        if frac <= target:
            hi = mid
            if frac > best_frac or (frac == best_frac and mid < best_ratio):
                best, best_ratio, best_frac = pruned, mid, frac
        else:
            lo = mid
    if best is None:
        raise RuntimeError(f"Torch-Pruning keeps more than {target:.0%} of the FLOPs at "
                           f"every channel ratio up to {hi:.3f}")
    return best, best_ratio, best_frac


def torch_channels(model: Any) -> tuple[int, int, int, int, int]:
    """``(c_in, c1, ca, c2, classes)`` of a (pruned) `torch_cnn`."""
    return (model.stem[0].in_channels, model.stem[0].out_channels,
            model.block_a[0].out_channels, model.down[0].out_channels,
            model.head.out_features)


@functools.cache
def xla_flops(c_in: int, c1: int, ca: int, c2: int, classes: int) -> float:
    """FLOPs of the JAX `hesso_jax.models.CNN` with these channel counts (``block_a``
    ``c1→ca``, ``block_b`` ``ca→c1``) on one 8×8 example, from XLA's cost analysis of the
    compiled evaluation forward (`hesso_jax.train.forward_flops`' count): the convention of
    ``pareto_digits``' FLOP columns (padded taps skipped; the stride-2 conv with SAME's 0/1
    padding where PyTorch pads 1/1). The model is abstract (`nnx.eval_shape`): only shapes
    are lowered, nothing is initialised."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from hesso_jax.models import CNN
    from hesso_jax.models.cnn import ConvBN
    from hesso_jax.train import make_eval

    def build() -> CNN:
        rngs = nnx.Rngs(0)
        model = CNN(c1, c2, classes, in_channels=c_in, rngs=rngs)
        model.block_a = ConvBN(c1, ca, rngs=rngs)
        model.block_b = ConvBN(ca, c1, rngs=rngs)
        return model

    model = nnx.eval_shape(build)
    x = jax.ShapeDtypeStruct((1, 8, 8, c_in), jnp.float32)
    cost = make_eval(model).lower(nnx.state(model), x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])


def torch_xla_flops(model: Any) -> float:
    """`xla_flops` of a (pruned) `torch_cnn`'s channel counts."""
    return xla_flops(*torch_channels(model))


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


def torch_data(torch: Any, data: Any) -> tuple[Any, Any, Any, Any]:
    """``(x_train, y_train, x_test, y_test)`` of a digits split as NCHW / int64 tensors."""
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # noqa: E731
    return (nchw(data.x_train), torch.from_numpy(data.y_train.astype(np.int64)),
            nchw(data.x_test), torch.from_numpy(data.y_test.astype(np.int64)))


def jax_rows(args: argparse.Namespace, seed: int, sparsities: list[float],
             data: Any) -> tuple[list[dict[str, Any]], dict[float, int]]:
    """hesso_jax's rows of one seed (dense, then HESSO and magnitude + FT at each sparsity,
    the Pareto benchmark's recipe) and HESSO's shrunk parameter count per sparsity."""
    import optax
    import pareto_digits

    from hesso_jax.train import count_params, evaluate
    from hesso_jax.train import train_classifier as jax_train

    base = {"framework": "hesso_jax", "seed": seed}
    dense = pareto_digits.ARCHS["cnn"][1](seed)
    with timed_jax_steps(StepLog()) as log:
        t0 = time.perf_counter()
        jax_train(dense, optax.adam(args.lr), data, steps=args.steps,
                  batch_size=args.batch_size, seed=seed, eval_every=args.steps, progress=False)
        wall = time.perf_counter() - t0
    rows = [{**base, "method": "dense", "sparsity": 0.0,
             "acc": evaluate(dense, data.x_test, data.y_test), "params": count_params(dense),
             "flops": jax_flops(dense), "latency_ratio": 1.0, **log.fields(wall)}]
    targets = {}
    for s in sparsities:
        for method in ("hesso", "magnitude"):
            with timed_jax_steps(StepLog()) as log:
                r, small = pareto_digits.run_one(args, "cnn", method, s, seed, data, dense,
                                                 return_model=True)
            rows.append({**base, "method": method, "sparsity": s, "flops": jax_flops(small),
                         **{k: r[k] for k in ("acc", "params", "latency_ratio")},
                         **log.fields(r["seconds"])})
            if method == "hesso":
                targets[s] = r["params"]
    return rows, targets


def torch_start(args: argparse.Namespace, seed: int, data: Any,
                torch: Any) -> tuple[dict[str, Any], Any, StepLog, float]:
    """PyTorch's dense row of one seed and the checkpoint Torch-Pruning prunes: the dense
    model trained ``--steps`` steps, and ``(pre model, its StepLog, its seconds)`` trained
    for the steps HESSO spends before its last period ends."""
    from hesso_jax.train import demo_schedule

    x_tr, y_tr, x_te, y_te = torch_data(torch, data)
    warmup, period_len = demo_schedule(args.steps, args.periods)
    fit = dict(lr=args.lr, batch_size=args.batch_size, seed=seed)
    torch.manual_seed(seed)
    t_dense, log = torch_cnn(torch), StepLog()
    t0 = time.perf_counter()
    torch_train(torch, t_dense, x_tr, y_tr, steps=args.steps, log=log, **fit)
    dense = {"framework": "torch", "seed": seed, "steps": args.steps, "method": "dense",
             "sparsity": 0.0, "acc": torch_accuracy(torch, t_dense, x_te, y_te),
             "params": sum(p.numel() for p in t_dense.parameters()),
             "flops": torch_flops(t_dense), "flops_xla": torch_xla_flops(t_dense),
             "latency_ratio": 1.0, "model": t_dense,
             **log.fields(time.perf_counter() - t0)}
    torch.manual_seed(seed)
    pre_model, pre_log = torch_cnn(torch), StepLog()
    t0 = time.perf_counter()
    torch_train(torch, pre_model, x_tr, y_tr, steps=warmup + args.periods * period_len,
                log=pre_log, **fit)
    return dense, pre_model, pre_log, time.perf_counter() - t0


def torch_finish(args: argparse.Namespace, seed: int, data: Any, torch: Any, pruned: Any,
                 dense: dict[str, Any], log: StepLog, seconds: float) -> dict[str, Any]:
    """Fine-tunes ``pruned`` (a fresh Adam, the steps after HESSO's last period) and
    returns its row fields; ``seconds`` is the wall time spent before fine-tuning."""
    from hesso_jax.train import demo_schedule

    x_tr, y_tr, x_te, y_te = torch_data(torch, data)
    warmup, period_len = demo_schedule(args.steps, args.periods)
    t0 = time.perf_counter()
    torch_train(torch, pruned, x_tr, y_tr, steps=args.steps - warmup - args.periods
                * period_len, log=log, lr=args.lr, batch_size=args.batch_size, seed=seed)
    return {"framework": "torch", "seed": seed, "steps": args.steps,
            "acc": torch_accuracy(torch, pruned, x_te, y_te),
            "params": sum(p.numel() for p in pruned.parameters()),
            "flops": torch_flops(pruned), "flops_xla": torch_xla_flops(pruned),
            "latency_ratio": torch_latency_ratio(torch, pruned, dense["model"], x_te),
            **log.fields(seconds + time.perf_counter() - t0)}


def torch_rows(args: argparse.Namespace, seed: int, sparsities: list[float], data: Any,
               targets: dict[float, int], torch: Any, tp: Any) -> list[dict[str, Any]]:
    """PyTorch's rows of one seed: dense, then Torch-Pruning per layer and global at each
    sparsity (channel ratio bisected to HESSO's parameter count ``targets[s]``), pruned
    from one checkpoint at the step HESSO's last period ends."""
    dense, pre_model, pre_log, t_pre = torch_start(args, seed, data, torch)
    example = torch_data(torch, data)[0][:1]
    rows = [{k: v for k, v in dense.items() if k != "model"}]
    for s in sparsities:
        for global_pruning in (False, True):
            log = StepLog(segments=list(pre_log.segments))
            t0 = time.perf_counter()
            pruned, ratio = tp_prune_to_params(tp, pre_model, example, targets[s],
                                               global_pruning)
            row = torch_finish(args, seed, data, torch, pruned, dense, log,
                               t_pre + time.perf_counter() - t0)
            rows.append({**row, "method": "tp_global" if global_pruning else "tp_uniform",
                         "sparsity": s, "ratio": ratio})
    return rows


def torch_flop_rows(args: argparse.Namespace, seed: int, fractions: list[float],
                    torch: Any, tp: Any) -> list[dict[str, Any]]:
    """FLOP-target mode, one seed: PyTorch dense, then Torch-Pruning per layer and global
    at each kept-FLOP fraction ``f`` (`tp_prune_to_flops`: the smallest channel ratio with
    ``xla_flops(pruned) / xla_flops(dense) ≤ f``), from the same checkpoint and with the
    same fine-tuning as `torch_rows`."""
    from hesso_jax.data import load_digits_split

    data = load_digits_split(seed)
    dense, pre_model, pre_log, t_pre = torch_start(args, seed, data, torch)
    example = torch_data(torch, data)[0][:1]
    full = dense["flops_xla"]
    measure = lambda m: torch_xla_flops(m) / full  # noqa: E731
    rows = [{**{k: v for k, v in dense.items() if k != "model"}, "budget_flops": None,
             "flops_fraction": 1.0}]
    for f in fractions:
        for global_pruning in (False, True):
            log = StepLog(segments=list(pre_log.segments))
            t0 = time.perf_counter()
            pruned, ratio, frac = tp_prune_to_flops(tp, pre_model, example, f,
                                                    global_pruning, measure)
            row = torch_finish(args, seed, data, torch, pruned, dense, log,
                               t_pre + time.perf_counter() - t0)
            rows.append({**row, "method": "tp_global" if global_pruning else "tp_uniform",
                         "sparsity": None, "budget_flops": f, "flops_fraction": frac,
                         "ratio": ratio, "channels": list(torch_channels(pruned))})
            tqdm_write(f"seed {seed} FLOPs ≤ {f}: {rows[-1]['method']} kept "
                       f"{100 * frac:.1f} %, acc {100 * row['acc']:.2f} %")
    return rows


def tqdm_write(text: str) -> None:
    """Prints ``text`` without breaking a tqdm progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(text)


def run_seed(args: argparse.Namespace, seed: int, sparsities: list[float],
             torch: Any, tp: Any) -> list[dict[str, Any]]:
    """Every row of one seed: dense (both frameworks), ours and Torch-Pruning's runs."""
    from hesso_jax.data import load_digits_split

    data = load_digits_split(seed)
    rows, targets = jax_rows(args, seed, sparsities, data)
    return rows + torch_rows(args, seed, sparsities, data, targets, torch, tp)


LABELS = {("hesso_jax", "dense"): "hesso_jax dense", ("hesso_jax", "hesso"): "hesso_jax HESSO",
          ("hesso_jax", "magnitude"): "hesso_jax magnitude + FT",
          ("torch", "dense"): "PyTorch dense",
          ("torch", "tp_uniform"): "Torch-Pruning magnitude + FT (per layer)",
          ("torch", "tp_global"): "Torch-Pruning magnitude + FT (global)"}


def time_stats(sel: list[dict[str, Any]]) -> dict[str, Any]:
    """Seed statistics of the `StepLog.fields` of some rows: mean step-median estimate and
    median step, stalled steps summed (rows without them, from older runs, give NaN)."""
    if not all("est_seconds" in r for r in sel):
        return {"est_seconds": float("nan"), "step_ms": float("nan"), "stalled": 0,
                "steps": 0}
    return {"est_seconds": float(np.mean([r["est_seconds"] for r in sel])),
            "step_ms": float(np.mean([r["step_ms"] for r in sel])),
            "stalled": int(sum(r["stalled"] for r in sel)),
            "steps": int(sum(r["steps"] for r in sel))}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (sparsity, framework, method), seed statistics as in the Pareto table."""
    from pareto_digits import aggregate

    key = lambda r: (r["sparsity"], r["framework"], r["method"])  # noqa: E731
    keys = sorted({key(r) for r in rows},
                  key=lambda k: (k[0], list(LABELS).index((k[1], k[2]))))
    out = []
    for k in keys:
        sel = [r for r in rows if key(r) == k]
        out.append({"sparsity": k[0], "framework": k[1], "method": k[2], **aggregate(sel),
                    **time_stats(sel)})
    return out


def table(summary: list[dict[str, Any]]) -> str:
    """The markdown table of `summarize`'s lines."""
    from pareto_digits import flops_text

    lines = ["| target | method | seeds | test acc % (mean ± std) | params | FLOPs/example | "
             "latency pruned/dense | wall s, measured | wall s, step-median est. | "
             "median step | stalled steps (> 3× median) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        target = "dense" if s["method"] == "dense" else f"{100 * s['sparsity']:.0f}% groups"
        lines.append(f"| {target} | {LABELS[(s['framework'], s['method'])]} | {s['n']} | "
                     f"{s['acc_mean']:.2f} ± {s['acc_std']:.2f} | {s['params']:,.0f} | "
                     f"{flops_text(s['flops'])} | {s['latency_ratio']:.2f} | "
                     f"{s['seconds']:.1f} | {s['est_seconds']:.1f} | {s['step_ms']:.1f} ms | "
                     f"{s['stalled']} / {s['steps']} |")
    return "\n".join(lines)


FLOP_LABELS = {"dense": "PyTorch dense",
               "tp_uniform": "Torch-Pruning magnitude + FT (per layer)",
               "tp_global": "Torch-Pruning magnitude + FT (global)"}


def flop_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """FLOP-target mode: one line per (steps, target, method), seed statistics as in the
    Pareto table, ``flops`` XLA's count (``flops_analytic``: `cnn_flops`, padded taps)."""
    from pareto_digits import aggregate

    key = lambda r: (r.get("steps", 0), r.get("budget_flops"), r["method"])  # noqa: E731
    keys = sorted({key(r) for r in rows},
                  key=lambda k: (-k[0], k[1] is not None, -(k[1] or 0),
                                 list(FLOP_LABELS).index(k[2])))
    out = []
    for k in keys:
        sel = [r for r in rows if key(r) == k]
        xla = [{**r, "flops": r["flops_xla"]} for r in sel]
        timing = time_stats(sel)
        timing["timed_steps"] = timing.pop("steps")  # training steps timed, all seeds
        out.append({**aggregate(xla), **timing, "steps": k[0], "budget_flops": k[1],
                    "framework": "torch", "method": k[2],
                    "flops_analytic": float(np.mean([r["flops"] for r in sel])),
                    "ratio": float(np.mean([r.get("ratio", 0.0) for r in sel]))})
    return out


def flop_table(summary: list[dict[str, Any]]) -> str:
    """The markdown table of `flop_summary`'s lines."""
    from pareto_digits import flops_text

    lines = ["| steps | FLOP target | method | seeds | test acc % (mean ± std) | params | "
             "FLOPs kept (XLA) | FLOPs/example (XLA) | FLOPs/example (padded, analytic) | "
             "channel ratio | latency pruned/dense | wall s, measured | wall s, "
             "step-median est. |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        target = "dense" if s["budget_flops"] is None else f"≤ {100 * s['budget_flops']:.0f}%"
        lines.append(f"| {s['steps']} | {target} | {FLOP_LABELS[s['method']]} | {s['n']} | "
                     f"{s['acc_mean']:.2f} ± {s['acc_std']:.2f} | {s['params']:,.0f} | "
                     f"{100 * s['flops_fraction']:.1f}% | {flops_text(s['flops'])} | "
                     f"{flops_text(s['flops_analytic'])} | {s['ratio']:.3f} | "
                     f"{s['latency_ratio']:.2f} | {s['seconds']:.1f} | "
                     f"{s['est_seconds']:.1f} |")
    return "\n".join(lines)


def load_text() -> str:
    """The 1/5/15-minute load averages now, ``'1.9/2.0/2.3'`` ("n/a" where unknown)."""
    import os

    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def write_results(args: argparse.Namespace, argv: list[str] | None, torch: Any,
                  rows: list[dict[str, Any]], summary: list[dict[str, Any]],
                  loads: tuple[str, str]) -> None:
    """``torch_pruning_digits.json`` and this benchmark's RESULTS.md section (with
    ``--tag``: ``torch_pruning_digits_<tag>.json`` and a section named after the tag)."""
    import jax
    import torch_pruning
    from common import command_line, environment_line, upsert_section

    command = command_line("peers/torch_pruning_digits.py", argv)
    versions = (f"torch {torch.__version__}, torch-pruning "
                f"{getattr(torch_pruning, '__version__', '?')}, jax {jax.__version__}")
    suffix = f"_{args.tag}" if args.tag else ""
    path = HERE / f"torch_pruning_digits{suffix}.json"
    old = json.loads(path.read_text()) if args.merge and path.exists() else {}
    path.write_text(json.dumps(
        {"command": command, "commands": [*old.get("commands", [old["command"]] if old
                                                   else []), command],
         "versions": versions, "threads": args.threads,
         "load_average": {"start": loads[0], "end": loads[1]}, "rows": rows,
         "summary": summary}, indent=1))
    matched = ("Torch-Pruning's channel ratio is bisected (`tp_prune_to_flops`) to the "
               "smallest ratio whose pruned model keeps at most the target fraction of the "
               "dense FLOPs, counted by XLA on the JAX CNN with the same channel counts "
               "(`xla_flops`, the convention of the Pareto benchmark's FLOP columns); the "
               "HESSO / one-shot rows at the same targets are the Pareto benchmark's."
               if args.flops else
               "Torch-Pruning's channel ratio is bisected to HESSO's shrunk parameter count "
               "of the same seed; HESSO's rows are those of the Pareto benchmark, run again "
               "here.")
    body = (f"Command: `{command}` ({args.steps} steps, Adam lr {args.lr}, batch "
            f"{args.batch_size}, P={args.periods}; PyTorch eager on {args.threads} intra-op "
            f"thread(s), JAX jitted (XLA's own thread pool); {versions}; "
            f"{environment_line()}; load average (1/5/15 min) {loads[0]} at the start, "
            f"{loads[1]} at the end; 2 CPU cores shared with other jobs). {matched}\n\n"
            "Wall times, two ways: *measured* is the recipe's wall clock (train + prune + "
            "fine-tune, every step timed: JAX steps blocked on), mean over seeds; "
            "*step-median est.* is the same with every training step after the first of "
            "each training call at that call's median step (stalls removed; JAX's "
            "compilation in the first step, pruning and bisection kept as measured). "
            "*Median step* is pooled over the recipe's training calls (pruned models "
            "fine-tune with smaller steps).\n\n"
            + (flop_table(summary) if args.flops else table(summary)))
    section = f"{SECTION} ({args.tag.replace('_', ' ')})" if args.tag else SECTION
    upsert_section(args.results, section, body)


def merge_rows(args: argparse.Namespace, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """With ``--merge``: the rows of this run's JSON that ``rows`` does not rerun, then
    ``rows``; else ``rows``."""
    path = HERE / f"torch_pruning_digits{'_' + args.tag if args.tag else ''}.json"
    if not (args.merge and path.exists()):
        return rows
    key = lambda r: (r["seed"], r["framework"], r["method"], r.get("sparsity"),  # noqa: E731
                     r.get("budget_flops"), r.get("steps", args.steps))
    new = {key(r) for r in rows}
    return [r for r in json.loads(path.read_text())["rows"] if key(r) not in new] + rows


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
    fractions = [float(f) for f in args.flops.split(",") if f]
    rows: list[dict[str, Any]] = []
    start = load_text()
    from common import seed_list

    for seed in tqdm(seed_list(args.seeds), desc="seeds"):
        rows.extend(torch_flop_rows(args, seed, fractions, torch, tp) if fractions
                    else run_seed(args, seed, sparsities, torch, tp))
    rows = merge_rows(args, rows)
    summary = flop_summary(rows) if fractions else summarize(rows)
    print(flop_table(summary) if fractions else table(summary))
    if not args.no_write:
        write_results(args, argv, torch, rows, summary, (start, load_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
