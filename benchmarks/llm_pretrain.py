"""Pretraining the byte-level Llama-style decoder on text that ships with Python.

The starting point of the LLM pruning runs: a `hesso_jax.models.Llama` (RoPE, GQA, SwiGLU,
RMSNorm; default `LlamaConfig`: d = 128, 4 layers of 4 query / 2 kv heads, 384 SwiGLU
neurons, tied 256-byte embedding, 0.82 M parameters) trained on the standard library's
docstrings (`hesso_jax.text.train_test_corpus`: whole docstrings and the Zen, deduplicated,
10% of the documents held out by a SHA-256 key of their text), tokenised as UTF-8 bytes.

Training (`hesso_jax.models.llama.pretrain`): jitted ``lax.scan`` chunks of
``clip_by_global_norm(1) → adamw`` steps (linear warm-up, cosine decay to lr/10), each
step on ``batch`` random windows of ``seq_len + 1`` bytes; the loss is the mean
next-byte cross-entropy. Reported, on every non-overlapping ``seq_len + 1`` window of the
held-out text (every held-out byte after the first predicted once):

* the held-out perplexity ``exp(mean NLL)`` and bits per byte ``mean NLL / ln 2``;
* the perplexity of the add-one unigram byte model of the training text on the same
  targets (the baseline a model must clearly beat);
* parameters, steps, tokens seen, wall time, process CPU time (all threads; on a shared
  machine the wall time depends on the other load, recorded as ``load_average``) and
  training tokens/s.

The model is saved with orbax (`save_pretrained`: ``config.json`` + ``params``) at
``--ckpt`` (default ``out/llm_pretrain``, git-ignored); pruning runs start from
``load_pretrained(CHECKPOINT)``. Writes ``llm_pretrain.json`` and ``llm_pretrain.png``
(training and held-out loss against steps, the unigram level as a line).

    python benchmarks/llm_pretrain.py              # about 6 min on 2 (shared) CPU cores
    python benchmarks/llm_pretrain.py --steps 50 --no-write     # a smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from common import command_line, environment, parser, publish
from flax import nnx

from hesso_jax import text
from hesso_jax.models.llama import (
    LlamaConfig,
    PretrainResult,
    heldout_windows,
    lm_eval_loss,
    load_pretrained,
    pretrain,
    save_pretrained,
    unigram_perplexity,
)
from hesso_jax.train import count_params

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "out" / "llm_pretrain"
"""Where the pretrained checkpoint lives by default (``load_pretrained(CHECKPOINT)``)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser(__doc__, no_write_help="print only (no json/png/ckpt)")
    d = LlamaConfig()
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--layers", type=int, default=d.num_layers)
    p.add_argument("--heads", type=int, default=d.num_heads)
    p.add_argument("--kv-heads", type=int, default=d.num_kv_heads)
    p.add_argument("--mlp-dim", type=int, default=d.mlp_dim)
    p.add_argument("--untied", action="store_true", help="separate output head")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--chunk", type=int, default=25, help="steps per jitted lax.scan call")
    p.add_argument("--eval-windows", type=int, default=96,
                   help="held-out windows scored after every chunk (the final score uses all)")
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--sample-bytes", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", type=Path, default=CHECKPOINT)
    return p.parse_args(argv)


def sample(model: nnx.Module, prompt: str, n: int, seq_len: int, seed: int,
           temperature: float = 0.7) -> str:
    """``n`` bytes sampled after ``prompt`` at ``temperature`` (window of ``seq_len``).

    The context sits left-aligned in a fixed ``seq_len`` buffer (causal attention: the
    padding to its right does not affect position ``t``), so one compiled forward serves
    every step.
    """
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
    ids = list(text.encode_bytes(prompt))
    key = jax.random.key(seed)
    for _ in range(n):
        ctx = ids[-seq_len:]
        buf = jnp.zeros((1, seq_len), jnp.int32).at[0, :len(ctx)].set(jnp.asarray(ctx))
        logits = forward(state, buf)[len(ctx) - 1]
        key, sub = jax.random.split(key)
        ids.append(int(jax.random.categorical(sub, logits / temperature)))
    return text.decode_bytes(ids)


def summarise(args: argparse.Namespace, cfg: LlamaConfig, res: PretrainResult,
              corpus: dict[str, int], final: float, unigram: float, smp: str,
              argv: list[str]) -> dict:
    tokens_seen = res.steps[-1] * args.batch * args.seq_len
    env = environment()
    return {
        "config": cfg.to_dict(),
        "params": count_params(res.model),
        "steps": res.steps[-1], "batch": args.batch, "seq_len": args.seq_len,
        "lr": args.lr, "warmup": args.warmup, "seed": args.seed,
        "tokens_seen": tokens_seen, "wall_s": res.wall_s,
        "train_tokens_per_s": tokens_seen / res.wall_s,
        "train_cpu_s": corpus.pop("train_cpu_s"),
        "load_average": env["load_average"],
        "corpus": corpus,
        "heldout_loss": final, "heldout_perplexity": float(np.exp(final)),
        "heldout_bits_per_byte": final / float(np.log(2.0)),
        "unigram_perplexity": unigram,
        "unigram_bits_per_byte": float(np.log(unigram) / np.log(2.0)),
        "curve": {"steps": res.steps, "train_loss": res.train_loss,
                  "heldout_loss_subset": res.eval_loss,
                  "subset_windows": args.eval_windows},
        "sample": smp,
        "checkpoint": str(args.ckpt),
        "command": command_line("llm_pretrain.py", argv),
        "machine": env,
        "date": env["when"],
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result["curve"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(c["steps"], c["train_loss"], label="training loss (chunk mean)")
    ax.plot(c["steps"], c["heldout_loss_subset"],
            label=f"held-out loss ({c['subset_windows']} windows)")
    ax.axhline(np.log(result["unigram_perplexity"]), color="grey", ls="--",
               label=f"unigram (ppl {result['unigram_perplexity']:.1f})")
    ax.axhline(result["heldout_loss"], color="k", ls=":",
               label=f"final held-out, all windows (ppl {result['heldout_perplexity']:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / byte")
    ax.set_title(f"Byte-level Llama, {result['params'] / 1e6:.2f} M params")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace, argv: list[str]) -> tuple[dict, nnx.Module]:
    cfg = LlamaConfig(d_model=args.d_model, num_layers=args.layers, num_heads=args.heads,
                      num_kv_heads=args.kv_heads, mlp_dim=args.mlp_dim,
                      max_len=max(512, args.seq_len), tie_embeddings=not args.untied)
    train, test = text.train_test_corpus(args.test_fraction)
    tr, te = text.encode_bytes(train), text.encode_bytes(test)
    windows = heldout_windows(te, args.seq_len)
    corpus = {"train_bytes": int(tr.size), "heldout_bytes": int(te.size),
              "heldout_windows": len(windows)}
    print(f"corpus: {tr.size:,} training bytes, {te.size:,} held-out bytes "
          f"({len(windows)} windows of {args.seq_len + 1})")
    cpu0 = time.process_time()
    res = pretrain(cfg, tr, windows[:args.eval_windows], steps=args.steps,
                   batch_size=args.batch, seq_len=args.seq_len, lr=args.lr,
                   warmup=args.warmup, chunk=args.chunk, seed=args.seed)
    corpus["train_cpu_s"] = time.process_time() - cpu0  # process CPU time, all threads
    t0 = time.perf_counter()
    final = lm_eval_loss(res.model, windows)
    print(f"final held-out evaluation: {time.perf_counter() - t0:.1f} s")
    unigram = unigram_perplexity(tr, windows)
    smp = sample(res.model, "Return the ", args.sample_bytes, args.seq_len, args.seed)
    return summarise(args, cfg, res, corpus, final, unigram, smp, argv), res.model


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    result, model = run(args, argv)
    print(f"params {result['params']:,}  steps {result['steps']}  "
          f"wall {result['wall_s']:.0f} s  ({result['train_tokens_per_s']:,.0f} tokens/s)")
    print(f"held-out perplexity {result['heldout_perplexity']:.3f} "
          f"({result['heldout_bits_per_byte']:.3f} bits/byte)  vs unigram "
          f"{result['unigram_perplexity']:.3f} ({result['unigram_bits_per_byte']:.3f})")
    print("sample:", repr(result["sample"]))
    if args.no_write:
        return result
    args.out.mkdir(parents=True, exist_ok=True)
    path = save_pretrained(args.ckpt, model, LlamaConfig.from_dict(result["config"]),
                           {k: result[k] for k in ("steps", "heldout_perplexity",
                                                   "unigram_perplexity", "command")})
    loaded, _ = load_pretrained(path)  # the checkpoint reads back to the same model
    jax.tree.map(np.testing.assert_array_equal, nnx.state(loaded), nnx.state(model))
    publish(args.out, None, "", results=result, json_name="llm_pretrain.json")
    plot(result, args.out / "llm_pretrain.png")
    print(f"wrote {path}, {args.out / 'llm_pretrain.json'}, {args.out / 'llm_pretrain.png'}")
    return result


if __name__ == "__main__":
    main()
