"""Source of 05_llm.ipynb (percent format, built by make_notebooks.py)."""

# %% [markdown]
# # A Llama-style language model: train, prune with HESSO-CRIC, shrink, generate
#
# `hesso_jax.models.Llama` is a small modern decoder: rotary position embeddings (RoPE),
# grouped-query attention (GQA), SwiGLU MLPs and RMSNorm, with a tied byte-level embedding.
# This notebook walks the whole path of the HESSO paper's language-model experiment:
#
# 1. **train** a byte-level model on text that ships with Python (the standard library's
#    docstrings, `hesso_jax.text`), or load the checkpoint of `benchmarks/llm_pretrain.py`;
# 2. **discover** its prunable groups (`hj.discover_groups`): per layer the key/value heads
#    (each with the query heads that read it) and the SwiGLU neurons;
# 3. **prune** while fine-tuning with HESSO-CRIC under a parameter budget,
#    `hj.hesso(groups, hj.Budget(params=0.75), ...)`: a quarter of the parameters go;
# 4. **shrink** the model physically (`hj.shrink_model`: fewer heads, fewer neurons);
# 5. **generate** text with `hesso_jax.models.llama.generate` from the dense, the masked and
#    the shrunk model (greedy decoding of the shrunk model equals the masked one's);
# 6. **compare** held-out perplexity, parameters and FLOPs.
#
# With `HESSO_JAX_NOTEBOOK_QUICK=1` (the test suite's setting) a tiny model is pretrained
# for a few hundred steps on a few modules' docstrings: its text is poor, the path is the
# same. Unset, the notebook loads `out/llm_pretrain` if it exists (else pretrains the
# 0.82 M-parameter model for 400 steps, about 6 minutes on 2 CPU cores) and prunes it for
# 200 steps as `benchmarks/llm.py` does ("LLM pruning" in `benchmarks/RESULTS.md`).

# %%
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx
from IPython.display import Markdown, display

import hesso_jax as hj
from hesso_jax import text
from hesso_jax.models.llama import (
    LlamaConfig,
    generate,
    heldout_windows,
    lm_eval_loss,
    load_pretrained,
    make_lm_train_chunk,
    pretrain,
    pretrain_optimizer,
    unigram_perplexity,
)
from hesso_jax.train import count_params, demo_schedule

# %matplotlib inline

QUICK = os.environ.get("HESSO_JAX_NOTEBOOK_QUICK", "") not in ("", "0")
if QUICK:   # smoke settings: the test suite runs these
    CONFIG = LlamaConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=96,
                         max_len=64)
    MODULES = ["argparse", "collections", "json", "textwrap"]
    PRETRAIN_STEPS, PRUNE_STEPS, BATCH, SEQ_LEN, CHUNK, PERIODS = 200, 40, 16, 32, 20, 2
    EVAL_WINDOWS, NUM_NEW = 32, 40
    CRIC = hj.CricConfig(sample_steps=1, learning_rate=1e-2, max_cycles=2)
else:       # the checkpoint of benchmarks/llm_pretrain.py, the recipe of benchmarks/llm.py
    CONFIG = LlamaConfig()
    MODULES = None      # the docstrings of the whole standard library
    PRETRAIN_STEPS, PRUNE_STEPS, BATCH, SEQ_LEN, CHUNK, PERIODS = 400, 200, 32, 128, 20, 5
    EVAL_WINDOWS, NUM_NEW = None, 200
    CRIC = hj.CricConfig(sample_steps=3, learning_rate=1e-2, max_cycles=3)
BUDGET = hj.Budget(params=0.75)     # keep 75 % of the parameters (the whole model's)
CKPT = next((p for p in (Path("out/llm_pretrain"), Path("../out/llm_pretrain"))
             if (p / "config.json").is_file()), None)
SEED = 0
T0 = time.perf_counter()
print(f"QUICK={QUICK}: prune {PRUNE_STEPS} steps x {BATCH} windows of {SEQ_LEN + 1} bytes; "
      f"checkpoint: {CKPT if CKPT and not QUICK else 'none (pretrain here)'}")

# %% [markdown]
# ## Data and a trained model
#
# The corpus is whole docstrings of the standard library, tokenised as UTF-8 bytes
# (256 tokens); a tenth of the documents is held out by a hash of their text. Held-out
# perplexity is scored on non-overlapping windows of that text. An add-one unigram byte
# model is the baseline a language model must beat clearly.

# %%
train_text, test_text = text.train_test_corpus(0.1, modules=MODULES)
train_ids, test_ids = text.encode_bytes(train_text), text.encode_bytes(test_text)
windows = heldout_windows(test_ids, SEQ_LEN, EVAL_WINDOWS)
unigram = unigram_perplexity(train_ids, windows)
if CKPT is not None and not QUICK:
    dense, CONFIG = load_pretrained(CKPT)
    curve = None
else:
    res = pretrain(CONFIG, train_ids, windows, steps=PRETRAIN_STEPS, batch_size=BATCH,
                   seq_len=SEQ_LEN, chunk=50 if QUICK else 25, seed=SEED, progress=False)
    dense, curve = res.model, res
ppl_dense = float(np.exp(lm_eval_loss(dense, windows)))
print(f"{len(train_ids):,} training bytes, {len(windows)} held-out windows; dense model "
      f"{count_params(dense):,} params, held-out perplexity {ppl_dense:.3f} "
      f"(unigram {unigram:.2f})")
if curve is not None:
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(curve.steps, curve.train_loss, label="training loss")
    ax.plot(curve.steps, curve.eval_loss, label="held-out loss")
    ax.axhline(np.log(unigram), color="grey", ls="--", label="unigram")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / byte")
    ax.legend()
    plt.show()

# %% [markdown]
# ## Groups
#
# `hj.discover_groups(model, tokens)` reads the model's jaxpr and finds the zero-invariant
# groups: zeroing a value head zeroes the output of every query head that reads it (GQA),
# so a *kv-head group* is the key and value head with its query heads (the attention
# output rows are dependents, removed at surgery); a *neuron* is a column of the SwiGLU
# gate and up projections (the down-projection row is its dependent). Discovery also
# records what each group costs in parameters and FLOPs, which `hj.Budget` needs.

# %%
x_example = jnp.asarray(windows[:1, :-1])
groups = hj.discover_groups(dense, x_example)
for fam, start in zip(groups.families, groups.starts, strict=True):
    print(f"{fam.name:20s} {fam.size:4d} groups of "
          f"{int(groups.costs.params[start]):5d} params each")
print(f"G = {groups.num_groups}; prunable {groups.costs.prunable_params:,} of "
      f"{groups.costs.dense_params:,} params")

# %% [markdown]
# ## Prune with HESSO-CRIC under a parameter budget
#
# HESSO is an optax transformation placed **last** in the chain: after a warm-up it
# identifies the most redundant groups at the start of each of `P` periods and projects
# them to zero progressively; CRIC re-checks the candidates with a few trial steps of the
# batch loss (`value_fn`, passed by `make_lm_train_chunk`) and swaps out groups whose
# removal would hurt. `hj.Budget(params=0.75)` picks how many groups to remove so that
# 75 % of the model's parameters remain (heads and neurons cost differently).

# %%
warmup, period_len = demo_schedule(PRUNE_STEPS, PERIODS)
tx = optax.chain(pretrain_optimizer(PRUNE_STEPS, 1e-3, min(10, PRUNE_STEPS // 4)),
                 hj.hesso(groups, BUDGET, PERIODS, period_len, warmup_steps=warmup,
                          cric=CRIC))
model = nnx.clone(dense)
graphdef, params = nnx.split(model, nnx.Param)
opt_state = tx.init(params)
run = make_lm_train_chunk(graphdef, tx, batch_size=BATCH, seq_len=SEQ_LEN, steps=CHUNK)
data = jnp.asarray(train_ids, jnp.int32)
losses = []
t = time.perf_counter()
for c in range(PRUNE_STEPS // CHUNK):
    params, opt_state, chunk_losses = run(params, opt_state, data,
                                          jax.random.fold_in(jax.random.key(SEED + 1), c))
    losses += np.asarray(chunk_losses).tolist()
nnx.update(model, params)
status = hj.hesso_status(opt_state)
zero = np.asarray(groups.zero_groups(params))
print(f"{PRUNE_STEPS} steps in {time.perf_counter() - t:.1f} s; phase {status.phase}, "
      f"{status.num_pruned} groups pruned, {int(zero.sum())} groups exactly zero, "
      f"CRIC cycles {status.cric_cycles}")

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(losses, lw=0.8)
for p in range(PERIODS + 1):
    ax.axvline(warmup + p * period_len, color="grey", ls=":", lw=0.8)
ax.set_xlabel("step (dotted: HESSO period boundaries)")
ax.set_ylabel("training loss")
ax.set_title("HESSO-CRIC fine-tuning")
plt.show()

# %% [markdown]
# ## Shrink
#
# `hj.shrink_model` drops the zero groups and their dependents and returns a module with
# smaller shapes; the Llama reads every size (heads, kv heads, MLP width) from its
# parameter shapes, so the shrunk module runs as it is. `shrink_model` checks on an
# example input that it computes what the masked model computes, and raises otherwise.

# %%
small = hj.shrink_model(model, groups)
logits_masked, logits_small = model(x_example), small(x_example)
max_abs_logit_diff = float(jnp.max(jnp.abs(logits_masked - logits_small)))
params_dense, params_small = count_params(dense), count_params(small)
flops_dense = int(groups.costs.dense_flops)
flops_small = int(hj.group_costs(small, None, x_example).dense_flops)
per_layer = []
for i, layer in enumerate(small.layers):
    per_layer.append(dict(
        kv_heads=(dense.layers[i].attn.key.shape[1], layer.attn.key.shape[1]),
        query_heads=(dense.layers[i].attn.query.shape[1], layer.attn.query.shape[1]),
        neurons=(dense.layers[i].mlp.gate.kernel.shape[1], layer.mlp.gate.kernel.shape[1])))
    print(f"layer {i}: kv heads {per_layer[-1]['kv_heads'][0]} -> "
          f"{per_layer[-1]['kv_heads'][1]}, query heads {per_layer[-1]['query_heads'][0]} -> "
          f"{per_layer[-1]['query_heads'][1]}, SwiGLU neurons {per_layer[-1]['neurons'][0]} "
          f"-> {per_layer[-1]['neurons'][1]}")
print(f"params {params_dense:,} -> {params_small:,} ({params_small / params_dense:.1%}); "
      f"max |masked - shrunk| logit {max_abs_logit_diff:.2e}")

fig, ax = plt.subplots(figsize=(6, 3))
idx = np.arange(len(per_layer))
for off, key, name in ((-0.2, "kv_heads", "kv-head groups"), (0.2, "neurons", "neurons")):
    kept = [100 * r[key][1] / r[key][0] for r in per_layer]
    ax.bar(idx + off, kept, 0.4, label=name)
ax.set_xticks(idx, [f"layer {i}" for i in idx])
ax.set_ylabel("% kept")
ax.set_ylim(0, 110)
ax.legend()
plt.show()

# %% [markdown]
# ## Generate
#
# `generate(model, prompt_tokens, num_new, temperature=0.0, key=None)` appends `num_new`
# tokens greedily (`temperature=0`) or by sampling `softmax(logits / temperature)`. It is
# one jitted `lax.fori_loop` that re-runs the model on a fixed-length buffer each step (no
# KV cache: simple, and fine for short continuations of small models). Greedy decoding is
# deterministic, so the shrunk model must write exactly what the masked model writes.

# %%
prompt = text.encode_bytes("Return the ")[None]
outs = {name: generate(m, prompt, NUM_NEW)
        for name, m in (("dense", dense), ("masked", model), ("shrunk", small))}
greedy_equal = bool(jnp.array_equal(outs["masked"], outs["shrunk"]))
sampled = generate(small, prompt, NUM_NEW, temperature=0.7, key=jax.random.key(SEED))
samples = {k: text.decode_bytes(np.asarray(v[0])) for k, v in outs.items()}
samples["shrunk, temperature 0.7"] = text.decode_bytes(np.asarray(sampled[0]))
for k, s in samples.items():
    print(f"{k:24s} {s!r}")
print("greedy shrunk == greedy masked:", greedy_equal)

# %% [markdown]
# ## Compare
#
# Held-out perplexity of the dense model, of the pruned model (masked) and of the shrunk
# model (the same numbers up to float rounding), with parameters and FLOPs per window.

# %%
ppl_masked = float(np.exp(lm_eval_loss(model, windows)))
ppl_small = float(np.exp(lm_eval_loss(small, windows)))
rows = [("dense", ppl_dense, params_dense, flops_dense),
        ("HESSO-CRIC, masked", ppl_masked, params_dense, flops_dense),
        ("HESSO-CRIC, shrunk", ppl_small, params_small, flops_small)]
lines = ["| model | held-out ppl | params | FLOPs / window |", "|---|---:|---:|---:|"]
lines += [f"| {n} | {p:.3f} | {k:,} ({k / params_dense:.1%}) | {f / 1e6:.2f} M "
          f"({f / flops_dense:.1%}) |" for n, p, k, f in rows]
display(Markdown(f"Unigram baseline: {unigram:.2f}\n\n" + "\n".join(lines)))

fig, axes = plt.subplots(1, 2, figsize=(8, 3))
names = ["dense", "shrunk"]
axes[0].bar(names, [ppl_dense, ppl_small], color=["C0", "C1"])
axes[0].set_ylabel("held-out perplexity")
axes[1].bar(names, [params_dense, params_small], color=["C0", "C1"])
axes[1].set_ylabel("parameters")
fig.tight_layout()
plt.show()

# %%
RESULT = dict(
    num_groups=groups.num_groups, zero_groups=int(zero.sum()),
    state_pruned=int(status.num_pruned), phase=status.phase,
    target_params=0.75, kept_params=params_small / params_dense,
    params_dense=params_dense, params_shrunk=params_small,
    flops_dense=flops_dense, flops_shrunk=flops_small,
    max_abs_logit_diff=max_abs_logit_diff, greedy_shrunk_equals_masked=greedy_equal,
    ppl_dense=ppl_dense, ppl_masked=ppl_masked, ppl_shrunk=ppl_small, ppl_unigram=unigram,
    generated_lengths={k: int(v.shape[1]) for k, v in outs.items()},
    prompt_len=int(prompt.shape[1]), num_new=NUM_NEW, samples=samples,
    per_layer=per_layer, seconds=time.perf_counter() - T0,
)
print("NOTEBOOK_RESULT", json.dumps(RESULT))
