"""Peer side by side: Only-Train-Once 3.0.1 (the PyTorch reference HESSO) vs hesso_jax.

The PyTorch reference implementation of HESSO (`only_train_once`, OTO 3.0.1) and
``hj.hesso`` train and prune the digits CNN (`hesso_jax.models.CNN` and its PyTorch twin,
``twin.TorchCNN``, the one ``torch_pruning_digits.py`` uses) with the same recipe: Adam lr
3e-3, batch 64, 1500 steps, 50% of the 192 channel groups, warm-up 300 steps, P=5 periods
of 150 steps (the demo schedule), fine-tuning to the end; same split and batch order. Each
framework also trains the dense model with its plain Adam (``torch.optim.Adam``,
``optax.adam``), the reference of the step-time ratios.

The four recipes (JAX Adam, JAX HESSO, PyTorch Adam, OTO HESSO) run in **lockstep**: step
i of each, in an order that rotates every step, every step timed (JAX steps blocked on,
PyTorch eager on ``--threads`` intra-op threads, 1 by default: with 2, PyTorch steps stall
on these shared 2-core machines). So every ratio compares steps taken at the same moment:

* step kinds: ``first`` (step 0, JAX's compilation), ``warm-up``, ``start`` (the P period
  starts: saliency and selection), ``period`` (ordinary steps inside the periods),
  ``fine-tune``; per kind the HESSO / Adam ratio of the medians over the same steps;
* recipe time, **measured**: the sum of the recipe's step times plus its setup (group
  discovery; OTO's graph tracing and optimizer set-up) and its surgery
  (`hj.shrink_model`; OTO's ``construct_subnet``); **step-median estimate**: the same with
  each kind's steps at that kind's median (stalls removed);
* accuracy, parameters and FLOPs (``cnn_flops``, counted the same way for both) of the
  *physically smaller* model, and **exact-K**: exactly K = 96 groups entirely 0.0 at the
  end (every member slice: conv out-channel, BatchNorm scale and shift).

OTO 3.0.1 needs two shims on current CPU builds of PyTorch, applied here (the installed
package is not edited): ``torch.onnx._globals`` and ``torch.onnx._optimize_graph`` moved
into ``torch.onnx._internal.torchscript_exporter`` (`onnx_shims`), and its selection calls
``.cuda()`` on a mask at every period start (`cpu_cuda_shim`). Its ``construct_subnet``
pickles the model, hence the module-level twin.

Needs the optional extra ``peers`` (PyTorch, Torch-Pruning, only-train-once)::

    python benchmarks/peers/oto_digits.py                       # 3 seeds, 1500 steps
    python benchmarks/peers/oto_digits.py --seeds 1 --steps 60 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch_pruning_digits as tpd  # noqa: I001 (puts benchmarks/ on sys.path)

SECTION = "## Peer side by side: Only-Train-Once 3.0.1 (PyTorch reference HESSO) on digits"
MISSING = ("benchmarks/peers/oto_digits.py needs PyTorch and only-train-once 3.0.1 "
           "(optional extra 'peers'), which are not installed here ({error}). Install "
           "them with `pip install -e \".[peers]\"` (on a CPU-only machine install "
           "PyTorch's CPU build first: `pip install torch --index-url "
           "https://download.pytorch.org/whl/cpu`).")
KINDS = ("first", "warm-up", "start", "period", "fine-tune")
RECIPES = ("jax adam", "jax hesso", "torch adam", "oto hesso")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (defaults: the recipe of the digits benchmarks)."""
    from common import parser

    p = parser(__doc__, out=tpd.HERE.parent,
               no_write_help="print only: do not write the JSON or RESULTS.md")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--periods", type=int, default=5)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (2 stall on shared 2-core machines)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ the shims


def onnx_shims(torch: Any) -> None:
    """Makes ``torch.onnx._globals`` and ``torch.onnx._optimize_graph`` (where OTO 3.0.1
    imports them from) point to their new home on PyTorch builds that moved them."""
    import torch.onnx

    try:
        import torch.onnx._globals  # noqa: F401 (older PyTorch: nothing to do)
    except ImportError:
        from torch.onnx._internal.torchscript_exporter import _globals

        sys.modules["torch.onnx._globals"] = _globals
        torch.onnx._globals = _globals
    if not hasattr(torch.onnx, "_optimize_graph"):
        from torch.onnx._internal.torchscript_exporter import utils

        torch.onnx._optimize_graph = utils._optimize_graph


def import_oto(torch: Any) -> Any:
    """The ``only_train_once`` module, imported after `onnx_shims`."""
    onnx_shims(torch)
    import only_train_once

    return only_train_once


@contextlib.contextmanager
def _cuda_is_identity(torch: Any) -> Iterator[None]:
    """Within the block ``Tensor.cuda()`` returns the tensor itself."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def cpu_cuda_shim(torch: Any, opt: Any) -> None:
    """Without CUDA, runs OTO's period-start selection (``identify_redundant_groups``,
    which moves a mask with ``.cuda()``) with ``.cuda()`` as the identity; only on this
    optimizer, only during that call."""
    if torch.cuda.is_available():
        return
    select = opt.identify_redundant_groups

    def identify_redundant_groups(*args: Any, **kwargs: Any) -> Any:
        with _cuda_is_identity(torch):
            return select(*args, **kwargs)

    opt.identify_redundant_groups = identify_redundant_groups


# ------------------------------------------------------------------------ schedule, timing


def step_kinds(steps: int, periods: int) -> list[str]:
    """The `KINDS` label of every step of the demo schedule (0-based step index = HESSO's
    counter; OTO's 1-based ``num_steps`` starts a period at the same step)."""
    from hesso_jax.train import demo_schedule

    warmup, tp = demo_schedule(steps, periods)
    kinds = []
    for i in range(steps):
        k = i - warmup
        kinds.append("first" if i == 0 else "warm-up" if k < 0
                     else ("start" if k % tp == 0 else "period") if k < periods * tp
                     else "fine-tune")
    return kinds


def lockstep(calls: dict[str, Callable[[np.ndarray], Any]],
             batches: list[np.ndarray]) -> dict[str, list[float]]:
    """Runs step i of every recipe in ``calls`` on batch i, in an order rotating with i;
    ``{name: wall seconds of each step}``."""
    from tqdm.auto import tqdm

    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i, idx in enumerate(tqdm(batches, desc="lockstep", leave=False)):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            calls[name](idx)
            times[name].append(time.perf_counter() - t0)
    return times


def kind_medians(times: list[float], kinds: list[str]) -> dict[str, float]:
    """Median step seconds per kind (kinds with no step left out)."""
    out = {}
    for kind in KINDS:
        sel = [t for t, k in zip(times, kinds, strict=True) if k == kind]
        if sel:
            out[kind] = float(np.median(sel))
    return out


def time_fields(times: list[float], kinds: list[str], overhead: float) -> dict[str, Any]:
    """A recipe's timing fields: per-kind medians, measured and step-median times."""
    med = kind_medians(times, kinds)
    counts = {k: kinds.count(k) for k in med}
    return {"kind_ms": {k: 1e3 * v for k, v in med.items()},
            "seconds": float(sum(times)) + overhead,
            "est_seconds": sum(med[k] * counts[k] for k in med) + overhead,
            "overhead_s": overhead,
            "stalled": int(sum(t > 3 * med[k] for t, k in zip(times, kinds, strict=True)))}


# ----------------------------------------------------------------------------- JAX side


class JaxRecipe:
    """hesso_jax's side of one seed: a CNN trained by `hesso_jax.train.make_step` one
    batch per call (``optax.adam``, or with ``hj.hesso`` last in the chain)."""

    def __init__(self, args: argparse.Namespace, seed: int, data: Any, hesso: bool) -> None:
        import optax
        from flax import nnx

        import hesso_jax as hj
        from hesso_jax.models import CNN
        from hesso_jax.train import demo_schedule, make_step

        self.data, self.model = data, CNN(rngs=nnx.Rngs(seed))
        t0 = time.perf_counter()
        self.groups = hj.discover_groups(self.model, data.x_train[:1]) if hesso else None
        tx = optax.adam(args.lr)
        if hesso:
            warmup, tp = demo_schedule(args.steps, args.periods)
            tx = optax.chain(tx, hj.hesso(self.groups, args.sparsity, args.periods, tp,
                                          warmup_steps=warmup))
        graphdef, self.params, self.rest = nnx.split(self.model, nnx.Param, ...)
        self.state, self.step = tx.init(self.params), make_step(graphdef, tx)
        self.setup_s = time.perf_counter() - t0

    def __call__(self, idx: np.ndarray) -> None:
        """One training step on batch ``idx`` (blocked on)."""
        import jax

        self.params, self.rest, self.state, loss = self.step(
            self.params, self.rest, self.state, self.data.x_train[idx], self.data.y_train[idx])
        jax.block_until_ready(loss)

    def finish(self) -> dict[str, Any]:
        """Accuracy, size and exact-K of the trained model (HESSO: shrunk by
        `hj.shrink_model`, which checks by running that it equals the masked model)."""
        from flax import nnx

        import hesso_jax as hj
        from hesso_jax.train import count_params, evaluate

        nnx.update(self.model, self.params, self.rest)
        row: dict[str, Any] = {"acc_masked": evaluate(self.model, self.data.x_test,
                                                      self.data.y_test)}
        model, t0 = self.model, time.perf_counter()
        if self.groups is not None:
            model = hj.shrink_model(self.model, self.groups)
            status = hj.hesso_status(self.state)
            row.update(zero_groups=int(self.groups.zero_groups(self.params).sum()),
                       K=int(status.target), G=self.groups.num_groups)
        surgery = time.perf_counter() - t0
        return {**row, "acc": evaluate(model, self.data.x_test, self.data.y_test),
                "params": count_params(model), "flops": tpd.jax_flops(model),
                "surgery_s": surgery}


# ------------------------------------------------------------------------- PyTorch side


class TorchRecipe:
    """PyTorch's side of one seed: the twin trained eagerly by ``torch.optim.Adam``, or by
    OTO's HESSO (its ``adam`` variant, the same schedule) with groups from OTO's graph."""

    def __init__(self, args: argparse.Namespace, torch: Any, model: Any, tensors: tuple,
                 oto: Any = None) -> None:
        from hesso_jax.train import demo_schedule

        self.torch, self.model, self.tensors, self.oto = torch, model, tensors, None
        t0 = time.perf_counter()
        if oto is None:
            self.opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        else:
            warmup, tp = demo_schedule(args.steps, args.periods)
            with contextlib.redirect_stdout(None):  # OTO prints its progress
                self.oto = oto.OTO(model=model, dummy_input=tensors[0][:1])
                self.opt = self.oto.hesso(
                    variant="adam", lr=args.lr, target_group_sparsity=args.sparsity,
                    start_pruning_step=warmup, pruning_periods=args.periods,
                    pruning_steps=args.periods * tp)
            cpu_cuda_shim(torch, self.opt)
        model.train()  # OTO's graph tracing leaves the model in eval mode
        self.setup_s = time.perf_counter() - t0

    def __call__(self, idx: np.ndarray) -> None:
        """One eager training step on batch ``idx``."""
        x, y = self.tensors[:2]
        tpd.torch_step(self.torch, self.model, self.opt, x, y, idx)

    def zero_groups(self) -> int:
        """OTO's prunable groups whose every parameter slice is exactly 0.0 (counted here
        from the tensors: each parameter's axis 0 is the group axis in this twin)."""
        zero = 0
        for group in self.oto._graph.get_param_groups():
            if group["is_prunable"] and not group["is_auxiliary"]:
                rows = [p.detach().reshape(group["num_groups"], -1) for p in group["params"]]
                zero += int(self.torch.stack([(r == 0).all(1) for r in rows]).all(0).sum())
        return zero

    def finish(self) -> dict[str, Any]:
        """Accuracy and size of the trained model (OTO: the model ``construct_subnet``
        builds, checked against the full group-sparse model's logits), exact-K."""
        x_te, y_te = self.tensors[2:]
        torch, model = self.torch, self.model
        row: dict[str, Any] = {"acc_masked": tpd.torch_accuracy(torch, model, x_te, y_te)}
        t0 = time.perf_counter()
        if self.oto is not None:
            row.update(zero_groups=self.zero_groups(), K=self.opt.target_num_redundant_groups,
                       G=self.opt.total_num_groups)
            with torch.no_grad():
                full = model.eval()(x_te)
            with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(None):
                self.oto.construct_subnet(out_dir=out)
                model = torch.load(self.oto.compressed_model_path, weights_only=False)
            with torch.no_grad():
                row["max_logit_diff"] = float((model.eval()(x_te) - full).abs().max())
        surgery = time.perf_counter() - t0
        return {**row, "acc": tpd.torch_accuracy(torch, model, x_te, y_te),
                "params": sum(p.numel() for p in model.parameters()),
                "flops": tpd.torch_flops(model), "surgery_s": surgery}


# ------------------------------------------------------------------------------- the runs


def run_seed(args: argparse.Namespace, seed: int, torch: Any, oto: Any) -> list[dict]:
    """The four recipes of one seed in lockstep; one row each."""
    from hesso_jax.data import load_digits_split

    data = load_digits_split(seed)
    tensors = tpd.torch_data(torch, data)
    torch.manual_seed(seed)
    twin = tpd.torch_cnn(torch)
    recipes = {"jax adam": JaxRecipe(args, seed, data, hesso=False),
               "jax hesso": JaxRecipe(args, seed, data, hesso=True),
               "torch adam": TorchRecipe(args, torch, copy.deepcopy(twin), tensors),
               "oto hesso": TorchRecipe(args, torch, twin, tensors, oto=oto)}
    batches = tpd.batch_indices(len(data.x_train), args.batch_size, seed)
    times = lockstep(recipes, [next(batches) for _ in range(args.steps)])
    kinds = step_kinds(args.steps, args.periods)
    rows = []
    for name, recipe in recipes.items():
        out = recipe.finish()
        if "K" in out:  # OTO lowers its K when a family would be emptied
            out["K_requested"] = int(out["G"] * args.sparsity)
        rows.append({"recipe": name, "seed": seed, **out,
                     **time_fields(times[name], kinds, recipe.setup_s + out["surgery_s"])})
    return rows


# ------------------------------------------------------------------------------ reporting

LABELS = {"jax adam": "hesso_jax dense (optax.adam)", "jax hesso": "hesso_jax HESSO",
          "torch adam": "PyTorch dense (torch.optim.Adam)",
          "oto hesso": "Only-Train-Once 3.0.1 HESSO"}
PAIRS = (("hesso_jax", "jax hesso", "jax adam"), ("OTO / PyTorch", "oto hesso", "torch adam"))


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Seed statistics per recipe, and the HESSO / Adam step ratios per kind and framework
    (one ratio of medians per seed; mean, min and max over seeds)."""
    out: dict[str, Any] = {"recipes": {}, "ratios": {}}
    for name in RECIPES:
        sel = [r for r in rows if r["recipe"] == name]
        acc = [100 * r["acc"] for r in sel]
        out["recipes"][name] = {
            "n": len(sel), "acc_mean": float(np.mean(acc)),
            "acc_std": float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
            **{k: float(np.mean([r[k] for r in sel]))
               for k in ("params", "flops", "seconds", "est_seconds")},
            "stalled": int(sum(r["stalled"] for r in sel)),
            "kind_ms": {k: float(np.mean([r["kind_ms"][k] for r in sel]))
                        for k in sel[0]["kind_ms"]},
            "zero_groups": [r.get("zero_groups") for r in sel],
            "K": [r.get("K") for r in sel], "K_requested": sel[0].get("K_requested"),
            "max_logit_diff": max((r.get("max_logit_diff", 0.0) for r in sel), default=0.0)}
    for label, num, den in PAIRS:
        per_seed = [[r_n["kind_ms"][k] / r_d["kind_ms"][k] for r_n, r_d in zip(
            [r for r in rows if r["recipe"] == num], [r for r in rows if r["recipe"] == den],
            strict=True)] for k in KINDS]
        out["ratios"][label] = {k: {"mean": float(np.mean(v)), "min": float(np.min(v)),
                                    "max": float(np.max(v))}
                                for k, v in zip(KINDS, per_seed, strict=True)}
    return out


def tables(summary: dict[str, Any], steps: int) -> str:
    """The two markdown tables of `summarize`: results per recipe, step times per kind."""
    from pareto_digits import flops_text

    lines = ["| recipe | seeds | test acc % (mean ± std) | params | FLOPs/example | "
             "groups exactly 0.0 / K (per seed) | recipe s, measured | recipe s, "
             "step-median est. | stalled steps (> 3× median) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary["recipes"].items():
        pairs = zip(s["zero_groups"], s["K"], strict=True)
        zero = ("–" if s["K_requested"] is None else
                ", ".join(f"{z} / {k}" for z, k in pairs)
                + f" (requested {s['K_requested']})")
        lines.append(f"| {LABELS[name]} | {s['n']} | {s['acc_mean']:.2f} ± {s['acc_std']:.2f}"
                     f" | {s['params']:,.0f} | {flops_text(s['flops'])} | {zero} | "
                     f"{s['seconds']:.1f} | {s['est_seconds']:.1f} | "
                     f"{s['stalled']} / {s['n'] * steps} |")
    lines += ["", "| framework | step kind | HESSO step (median) | Adam step (median) | "
              "HESSO / Adam, mean over seeds (min–max) |", "|---|---|---:|---:|---:|"]
    for label, num, den in PAIRS:
        for kind, r in summary["ratios"][label].items():
            lines.append(f"| {label} | {kind} | {summary['recipes'][num]['kind_ms'][kind]:.2f}"
                         f" ms | {summary['recipes'][den]['kind_ms'][kind]:.2f} ms | "
                         f"{r['mean']:.2f}× ({r['min']:.2f}–{r['max']:.2f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs the seeds, prints the tables; writes ``peers/oto_digits.json`` and the RESULTS
    section unless ``--no-write``. Exit status 2 when the extra is missing."""
    args = parse_args(argv)
    try:
        torch, _ = tpd._import_peers()
        oto = import_oto(torch)
    except ImportError as err:
        print(MISSING.format(error=err), file=sys.stderr)
        return 2
    from common import command_line, environment_line, publish
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    start = tpd.load_text()
    rows = [r for seed in tqdm(range(args.seeds), desc="seeds")
            for r in run_seed(args, seed, torch, oto)]
    summary = summarize(rows)
    loads = (start, tpd.load_text())
    versions = (f"torch {torch.__version__}, only-train-once "
                f"{_version('only-train-once')}")
    body = (f"- Command: `{command_line('peers/oto_digits.py', argv)}`.\n"
            f"- {environment_line()}; {versions}; load average (1/5/15 min) {loads[0]} at "
            f"the start, {loads[1]} at the end (2 CPU cores shared with other jobs).\n"
            f"- Recipe: {args.steps} steps, Adam lr {args.lr}, batch {args.batch_size}, "
            f"{100 * args.sparsity:.0f}% of the groups, demo schedule with P={args.periods}; "
            f"PyTorch eager on {args.threads} intra-op thread(s), JAX jitted (XLA's own "
            "threads). The four recipes run in lockstep (step i of each in turn, order "
            "rotating), so the ratios compare steps taken at the same time. Recipe time, "
            "measured: sum of the steps + set-up + surgery; step-median est.: each step "
            "kind at its median. Accuracy, params and FLOPs (`cnn_flops`, padded taps, "
            "both frameworks) are those of the physically smaller model.\n\n"
            + tables(summary, args.steps))
    publish(args.out, SECTION, body, results={"rows": rows, "summary": summary,
                                               "threads": args.threads, "versions": versions,
                                               "load_average": loads},
            json_name="peers/oto_digits.json", write=not args.no_write)
    return 0


def _version(package: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(package)


if __name__ == "__main__":
    sys.exit(main())
