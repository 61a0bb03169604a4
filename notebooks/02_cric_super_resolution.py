"""Source of 02_cric_super_resolution.ipynb (percent format, built by make_notebooks.py)."""

# %% [markdown]
# # HESSO-CRIC on super-resolution: when greedy saliency picks the wrong channels
#
# HESSO chooses what to prune with a *greedy* saliency score measured at the current
# parameters. In image super-resolution that can go wrong (HESSO paper §4.1): a channel with
# a small norm but large downstream weights looks redundant, and at high sparsity greedy
# HESSO can remove the **whole entry convolution**, cutting the input off the learned
# residual branch. The network then degrades to its bicubic skip connection.
#
# **CRIC** (Corrective Redundant Identification Cycle, `hj.CricConfig`) tests the greedy
# candidates before committing: at every period start it restarts from the current
# parameters, runs a few trial gradient steps while projecting the candidates towards zero,
# accumulates every group's saliency along the way and re-tests the groups that newly enter
# the bottom-K, until the set is stable.
#
# This notebook trains a small CARN-style ×2 super-resolution network (luminance) three
# times from the same initialisation and batches, densely, with HESSO and with HESSO-CRIC
# at 90% group sparsity, and compares held-out PSNR and *which* channels each method
# removed. The setup is the one of `benchmarks/super_resolution.py` (its data helpers are
# imported below); `benchmarks/RESULTS.md` has the full table over sparsities and seeds.
#
# **Settings.** With `HESSO_JAX_NOTEBOOK_QUICK=1` (what the test suite runs) the network,
# the patches and the step budget are much smaller and the run takes well under a minute;
# the collapse is a property of the full setting (and even there of some seeds only) and a
# quick run usually does **not** reproduce it: the point of the quick run is the workflow.
# Unset, the notebook runs the benchmark's setting for seed 2 (C=32, B=3, 1000 steps), where
# `RESULTS.md` recorded greedy HESSO collapsing to bicubic quality; this takes about 3–4
# minutes on 2 CPU cores (4 min measured while they were shared with other jobs; that run
# reproduced the table: HESSO 24.12 dB with the whole head family removed, HESSO-CRIC
# 24.55 dB).

# %%
import importlib
import json
import os
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx
from IPython.display import Markdown, display

import hesso_jax as hj
from hesso_jax.groups import resolve_count
from hesso_jax.models.carn import CARN, bicubic_upsample
from hesso_jax.train import count_params, make_train_step

# %matplotlib inline

QUICK = os.environ.get("HESSO_JAX_NOTEBOOK_QUICK", "") not in ("", "0")
if QUICK:   # smoke settings: the test suite runs these
    CHANNELS, BLOCKS, STEPS, BATCH, PATCH, PERIODS, SEED = 16, 1, 120, 16, 32, 3, 0
else:       # benchmarks/super_resolution.py, seed 2 (the collapse in RESULTS.md)
    CHANNELS, BLOCKS, STEPS, BATCH, PATCH, PERIODS, SEED = 32, 3, 1000, 16, 32, 5, 2
SPARSITY = 0.9
LR = 1e-3
CRIC = hj.CricConfig(sample_steps=5, learning_rate=1.0, tolerance=0, max_cycles=4)
T0 = time.perf_counter()

# The data helpers of the benchmark (scikit-learn's two sample photographs, nothing is
# downloaded): benchmarks/super_resolution.py, imported from the repository's benchmarks
# folder (found upwards from the working directory) as the benchmark scripts import
# each other.
root = next(p for p in (Path.cwd(), *Path.cwd().parents)
            if (p / "benchmarks" / "super_resolution.py").exists())
sys.path.insert(0, str(root / "benchmarks"))
sr = importlib.import_module("super_resolution")
print(f"QUICK={QUICK}: CARN(C={CHANNELS}, B={BLOCKS}), {STEPS} steps of {BATCH} "
      f"{PATCH}x{PATCH} patches, sparsity {SPARSITY:.0%}, seed {SEED}")

# %% [markdown]
# ## Data
#
# scikit-learn's `china.jpg` and `flower.jpg` as luminance in [0, 1]. A central vertical
# strip (25% of the width) of each image is held out for testing; training patches are cut
# from the regions left and right of it. The low-resolution input is the antialiased
# bicubic ×2 downsampling of the high-resolution image. PSNR is computed on the luma with a
# 2-pixel border shaved; *pooled* is the PSNR of the mean squared error over both strips.

# %%
data = sr.load_images(0.25)
sampler = sr.PatchSampler(data["train"], PATCH, BATCH, SEED)
lr_batch, hr_batch = sampler()
print("training regions (HR):", [hr.shape for hr, _ in data["train"]])
print("test strips (HR):", [(name, hr.shape) for name, hr, _ in data["test"]])
print("one batch: LR", lr_batch.shape, "HR", hr_batch.shape)

bicubic = sr.bicubic_psnr(data["test"])
print("bicubic upsampling PSNR:", {k: round(v, 2) for k, v in bicubic.items()})

fig, axes = plt.subplots(1, 4, figsize=(10, 2.8))
for ax, (name, hr, _) in zip(axes[::2], data["test"], strict=True):
    ax.imshow(hr, cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"{name}: HR test strip")
for ax, (name, _, lr) in zip(axes[1::2], data["test"], strict=True):
    ax.imshow(lr, cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"{name}: LR input")
for ax in axes:
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Model and groups
#
# `CARN`: an entry 3×3 conv, `B` residual blocks with CARN's cascading concatenation and
# 1×1 fusion convs, a pixel-shuffle upsampler and an exit conv added to bicubic upsampling of
# the input (the network learns a residual). Discovery finds one family per channel space:
# the residual sums couple the entry conv with the first block's second conv (the *head*
# family), each fusion with the next block's second conv, and the upsampler's groups are
# blocks of 4 consecutive out-channels (the pixel shuffle's `2×2`).

# %%
model = CARN(CHANNELS, BLOCKS, rngs=nnx.Rngs(SEED))
groups = hj.discover_groups(model, jnp.zeros((1, 8, 8, 1)))
K = resolve_count(SPARSITY, groups.num_groups)
FAMILIES = [f.name for f in groups.families]
print(f"{count_params(model):,} parameters, {groups.num_groups} groups, K = {K} to prune")
for fam in groups.families:
    print(f"  {fam.name:28s} {fam.size} groups, members "
          + ", ".join("/".join(map(str, m.path)) for m in fam.members))

# %% [markdown]
# ## Training: dense, HESSO, HESSO-CRIC
#
# One jitted step per method: L1 loss, `optax.chain(optax.adam(lr), hj.hesso(...))`. With
# `cric=` HESSO needs the loss of the current batch as a function of the parameters, passed
# as the optax extra argument `value_fn` (CRIC's trial steps differentiate it). The
# library's recipe `hesso_jax.train.make_train_step(loss_fn, tx)` builds that step; greedy
# HESSO ignores `value_fn`, so one recipe serves both. Warm-up is 20% of the steps, `P`
# periods span the next 50%, the last 30% fine-tune.

# %%
def make_step(graphdef, tx):
    """Jitted ``step(params, opt_state, lr, hr) -> (params, opt_state, loss)``, L1 loss."""

    def loss_of(params, lr, hr):
        """The L1 loss of the batch: also ``value_fn`` for CRIC's trial steps."""
        return jnp.mean(jnp.abs(nnx.merge(graphdef, params)(lr) - hr))

    return make_train_step(loss_of, tx)


WARMUP, TP = STEPS // 5, max(1, (STEPS // 2) // PERIODS)


def run(kind):
    """Trains one method ('dense', 'hesso', 'cric'); same init and batches for each."""
    model = CARN(CHANNELS, BLOCKS, rngs=nnx.Rngs(SEED))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(LR)
    if kind != "dense":
        tx = optax.chain(tx, hj.hesso(groups, SPARSITY, PERIODS, TP, warmup_steps=WARMUP,
                                      cric=CRIC if kind == "cric" else None,
                                      total_steps=STEPS))
    opt_state = tx.init(params)
    step = make_step(graphdef, tx)
    sampler = sr.PatchSampler(data["train"], PATCH, BATCH, SEED)
    losses, cycles = [], []
    t0 = time.perf_counter()
    for t in range(1, STEPS + 1):
        lr, hr = sampler()
        params, opt_state, loss = step(params, opt_state, lr, hr)
        losses.append(float(loss))
        period_start = WARMUP < t <= WARMUP + PERIODS * TP and (t - WARMUP - 1) % TP == 0
        if kind == "cric" and period_start:
            cycles.append(hj.hesso_status(opt_state).cric_cycles)
    seconds = time.perf_counter() - t0
    nnx.update(model, params)
    zero = groups.zero_groups(params)
    return dict(kind=kind, model=model, params=params, losses=losses, seconds=seconds,
                psnr=sr.test_psnr(sr.make_predict(graphdef), params, data["test"]),
                zero=zero, cric_cycles=cycles,
                per_family={f.name: int(zero[s:s + f.size].sum())
                            for f, s in zip(groups.families, groups.starts, strict=True)})


runs = {}
for kind in ("dense", "hesso", "cric"):
    runs[kind] = run(kind)
    r = runs[kind]
    print(f"{kind:6s} {r['seconds']:6.1f} s  pooled test PSNR {r['psnr']['pooled']:.2f} dB"
          f"  zero groups {int(r['zero'].sum())}"
          + (f"  CRIC cycles per period {r['cric_cycles']}" if kind == "cric" else ""))

# %% [markdown]
# ## Results
#
# The bars on the left are pooled test PSNR; the dashed line is bicubic upsampling, the
# floor the network falls back to when its learned branch is cut off. On the right: how many
# of each family's groups every method removed. The first family is the *head* (the entry
# conv, coupled with block 1's second conv): removing all of it disconnects the input from
# everything but the bicubic skip. The last two are the *tail* (last fusion, upsampler).

# %%
names = {"dense": "dense (Adam)", "hesso": "HESSO", "cric": "HESSO-CRIC"}
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 2]})
vals = [runs[k]["psnr"]["pooled"] for k in names]
ax1.bar(range(3), vals, color=["C2", "C0", "C1"])
ax1.axhline(bicubic["pooled"], color="grey", ls="--", label="bicubic")
ax1.set_xticks(range(3), list(names.values()))
ax1.set_ylim(bicubic["pooled"] - 0.5, max(vals) + 0.3)
ax1.set_ylabel("pooled test PSNR (dB)")
ax1.legend(loc="lower right")
x = np.arange(len(FAMILIES))
for i, kind in enumerate(("hesso", "cric")):
    ax2.bar(x + (i - 0.5) * 0.38, [runs[kind]["per_family"][f] for f in FAMILIES], 0.38,
            color=f"C{i}", label=names[kind])
ax2.axhline(CHANNELS, color="grey", ls=":", label="family size")
ax2.set_xticks(x, FAMILIES, rotation=25, ha="right")
ax2.set_ylabel("pruned groups")
ax2.set_title(f"pruned groups per family (K = {K} of {groups.num_groups})")
ax2.set_ylim(0, 1.35 * CHANNELS)
ax2.legend(ncol=3, loc="upper center")
plt.tight_layout()
plt.show()

fig, ax = plt.subplots(figsize=(8, 3))
w = max(1, STEPS // 50)
for kind in names:
    sm = np.convolve(runs[kind]["losses"], np.ones(w) / w, mode="valid")
    ax.plot(np.arange(len(sm)) + w, sm, label=names[kind])
for p in range(PERIODS + 1):
    ax.axvline(WARMUP + p * TP, color="grey", alpha=0.2)
ax.set(xlabel="step", ylabel="L1 training loss (smoothed)", yscale="log")
ax.legend()
plt.show()

# %%
head, tail = FAMILIES[0], FAMILIES[-2:]
dense_psnr = runs["dense"]["psnr"]["pooled"]
lines = ["| method | pooled PSNR | Δ vs dense | head pruned | tail pruned "
         "| families removed whole |", "|---|---:|---:|---:|---:|---|",
         f"| bicubic | {bicubic['pooled']:.2f} | {bicubic['pooled'] - dense_psnr:+.2f} "
         "| – | – | – |"]
collapsed = {}
for kind in names:
    r = runs[kind]
    ps = r["psnr"]["pooled"]
    if kind == "dense":
        lines.append(f"| {names[kind]} | {ps:.2f} | +0.00 | – | – | – |")
        continue
    whole = [f for f, n in r["per_family"].items() if n == CHANNELS]
    # collapse: less than 10% of dense's gain over bicubic left
    collapsed[kind] = bool(ps - bicubic["pooled"] < 0.1 * (dense_psnr - bicubic["pooled"]))
    lines.append(f"| {names[kind]} | {ps:.2f} | {ps - dense_psnr:+.2f} | "
                 f"{r['per_family'][head]}/{CHANNELS} | "
                 f"{sum(r['per_family'][f] for f in tail)}/{2 * CHANNELS} | "
                 f"{', '.join(whole) or 'none'} |")
display(Markdown("\n".join(lines)))
for kind in ("hesso", "cric"):
    print(f"{names[kind]}: collapsed to bicubic quality: {collapsed[kind]}; "
          f"head family removed entirely: {runs[kind]['per_family'][head] == CHANNELS}")

# %% [markdown]
# **Reading the result.** In the full setting (seed 2, `RESULTS.md`), greedy HESSO removed
# all 32 groups of the head family and its PSNR fell to the bicubic baseline, while
# HESSO-CRIC kept part of the head and stayed above it. CRIC does not win everywhere: at
# 90% with other seeds greedy HESSO sometimes ends higher, and CRIC's trial steps make each
# period start roughly 10× an ordinary step (still a small fraction of a period). Your
# numbers can differ from the table (different CPU, different XLA version): the table above
# says what happened in *this* run. In the quick setting the network is tiny and barely
# trained, so which families empty out is mostly noise.
#
# Whatever the choice, both methods leave exactly `K` groups at `0.0`, and surgery turns the
# masked CARN into a smaller one with the same outputs:

# %%
small = hj.shrink_model(runs["cric"]["model"], groups)
name, hr, lr = data["test"][0]
x = jnp.asarray(lr)[None, ..., None]
y_masked = np.asarray(runs["cric"]["model"](x))
y_small = np.asarray(small(x))
max_abs_diff = float(np.max(np.abs(y_masked - y_small)))
print(f"HESSO-CRIC CARN: {count_params(runs['cric']['model']):,} -> {count_params(small):,} "
      f"parameters; max |masked - shrunk| output difference on the {name} strip: "
      f"{max_abs_diff:.2e}")

crop = (slice(100, 228), slice(16, 144))
fig, axes = plt.subplots(1, 4, figsize=(12, 3.3))
panels = [("HR", hr), ("bicubic", np.asarray(bicubic_upsample(x))[0, ..., 0])]
panels += [(names[k], np.asarray(runs[k]["model"](x))[0, ..., 0]) for k in ("hesso", "cric")]
for ax, (title, img) in zip(axes, panels, strict=True):
    ax.imshow(np.clip(img, 0, 1)[crop], cmap="gray", vmin=0, vmax=1)
    ax.set_title(title)
    ax.axis("off")
plt.tight_layout()
plt.show()

# %%
RESULT = dict(
    K=int(K), num_groups=int(groups.num_groups), channels=CHANNELS, families=FAMILIES,
    psnr={k: runs[k]["psnr"]["pooled"] for k in runs}, bicubic=bicubic["pooled"],
    zero_groups={k: int(runs[k]["zero"].sum()) for k in ("hesso", "cric")},
    per_family={k: runs[k]["per_family"] for k in ("hesso", "cric")},
    collapsed=collapsed, cric_cycles=runs["cric"]["cric_cycles"],
    params_shrunk=count_params(small), max_abs_diff=max_abs_diff,
    seconds=time.perf_counter() - T0,
)
print("NOTEBOOK_RESULT", json.dumps(RESULT))
