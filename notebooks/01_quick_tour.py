"""Source of 01_quick_tour.ipynb (percent format, built by make_notebooks.py)."""

# %% [markdown]
# # Quick tour: train and prune the digits CNN with HESSO
#
# This notebook walks through the whole `hesso_jax` workflow on a small residual CNN and
# scikit-learn's bundled 8×8 digits (nothing is downloaded):
#
# 1. **discover** the prunable groups (channels) from the model's jaxpr,
# 2. **train and prune in one run**: `optax.chain(optax.adam(lr), hj.hesso(...))` projects
#    the least salient groups to *exactly* `0.0` on a schedule,
# 3. **inspect** the optimizer state with `hj.hesso_status`,
# 4. **shrink** the masked model into a physically smaller one (`hj.shrink_model`) and check
#    it computes the same outputs,
# 5. **compare** parameters, FLOPs and accuracy with a dense run trained on the same batches.
#
# It runs on CPU. Set `HESSO_JAX_NOTEBOOK_QUICK=1` before starting Jupyter for a smoke run
# (smaller model, fewer steps: what the test suite executes); unset, it trains the
# `hesso-jax demo` setting and takes about two minutes on 2 CPU cores.

# %%
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
from hesso_jax.data import load_digits_split
from hesso_jax.models import CNN
from hesso_jax.train import (
    count_params,
    demo_schedule,
    evaluate,
    forward_flops,
    make_eval,
    train_classifier,
)

# %matplotlib inline

QUICK = os.environ.get("HESSO_JAX_NOTEBOOK_QUICK", "") not in ("", "0")
if QUICK:   # smoke settings: the test suite runs these
    STEPS, C1, C2 = 240, 32, 64
else:       # the "few minutes" version (the defaults of `hesso-jax demo`)
    STEPS, C1, C2 = 1500, 48, 96
SPARSITY = 0.5      # fraction of groups to remove
PERIODS = 5         # HESSO pruning periods P
LR = 3e-3
SEED = 0
T0 = time.perf_counter()
print(f"QUICK={QUICK}: {STEPS} steps, CNN(c1={C1}, c2={C2}), jax {jax.__version__}, "
      f"devices {jax.devices()}")

# %% [markdown]
# ## Data and model
#
# `load_digits_split` returns 1437 training and 360 test images of shape `(8, 8, 1)` in
# [0, 1]. The reference `CNN` is `stem → residual block (block_a, block_b) → strided conv
# (down) → global mean → Linear`, every conv followed by BatchNorm.

# %%
data = load_digits_split(seed=SEED)
print("train", data.x_train.shape, "test", data.x_test.shape)

fig, axes = plt.subplots(1, 10, figsize=(10, 1.3))
for ax, img, label in zip(axes, data.x_train[:10], data.y_train[:10], strict=True):
    ax.imshow(img[..., 0], cmap="gray_r")
    ax.set_title(int(label))
    ax.axis("off")
plt.show()

model = CNN(c1=C1, c2=C2, rngs=nnx.Rngs(SEED))
print(type(model).__name__, "with", count_params(model), "parameters")

# %% [markdown]
# ## Discover the groups
#
# `hj.discover_groups(model, example_input)` traces the forward pass and follows every
# parameter axis through the jaxpr. A **group** is a set of parameter slices that, once all
# zero, make one output channel zero for *every* input (conv out-channel + BatchNorm scale
# and shift). Channels tied by the residual sum `h + r` form one family: the stem's and
# `block_b`'s channel `i` can only be removed together. **Dependents** (the next layer's
# in-channels, BatchNorm running statistics) are not touched by the optimizer; surgery
# removes them.
#
# Only shapes matter for the example input.

# %%
groups = hj.discover_groups(model, jnp.zeros((1, 8, 8, 1)))
print(groups, "\n")
for fam, start in zip(groups.families, groups.starts, strict=True):
    print(f"family {fam.name!r}: {fam.size} groups "
          f"(global indices {start}..{start + fam.size - 1})")
    for m in fam.members:
        print(f"    member     {'/'.join(map(str, m.path)):28s} axis {m.axis}")
    for m in fam.dependents:
        print(f"    dependent  {'/'.join(map(str, m.path)):28s} axis {m.axis}")

# The reference models keep hand-written groups as a test oracle: discovery agrees
# (same families, members and dependents; only the family names differ).
def canonical(gs):
    """Families as sorted text, ignoring names and order."""
    return sorted(repr((f.size, sorted(map(repr, f.members)), sorted(map(repr, f.dependents))))
                  for f in gs.families)


discovery_matches = canonical(groups) == canonical(model.groups())
print("\ndiscovered == hand-written (model.groups()):", discovery_matches)

# %% [markdown]
# ## Train densely and with HESSO, same initialisation and batches
#
# HESSO is an ordinary optax transformation and must be **last** in the chain: it sees the
# base optimizer's final update and projects the selected groups. The schedule is
# `warmup_steps` plain steps, then `P` periods of `Tp` steps; at each period start the
# saliency score picks `K/P` more groups, which then shrink geometrically to exactly `0.0`
# by the end of the period and stay there. The last 30% of the steps fine-tune the
# survivors (`demo_schedule`: warm-up 20%, pruning 50%).
#
# `train_classifier` is a small jitted functional loop (`hesso_jax/train.py`); both runs
# draw the same batches from the same seed.

# %%
warmup, Tp = demo_schedule(STEPS, PERIODS)
print(f"warm-up {warmup} steps, {PERIODS} periods of Tp={Tp}, fine-tune "
      f"{STEPS - warmup - PERIODS * Tp} steps")

dense = CNN(c1=C1, c2=C2, rngs=nnx.Rngs(SEED))
pruned = CNN(c1=C1, c2=C2, rngs=nnx.Rngs(SEED))   # identical initialisation
tx_dense = optax.adam(LR)
tx_hesso = optax.chain(
    optax.adam(LR),
    hj.hesso(groups, K=SPARSITY, P=PERIODS, Tp=Tp, warmup_steps=warmup, total_steps=STEPS),
)
common = dict(steps=STEPS, batch_size=64, seed=SEED, eval_every=max(1, STEPS // 50),
              progress=False)
t = time.perf_counter()
_, _, hist_dense = train_classifier(dense, tx_dense, data, **common)
print(f"dense: {time.perf_counter() - t:.1f} s")
t = time.perf_counter()
_, opt_state, hist = train_classifier(pruned, tx_hesso, data, groups=groups, **common)
print(f"HESSO: {time.perf_counter() - t:.1f} s")

# %% [markdown]
# ## Inspect the optimizer state
#
# `hj.hesso_status` reads the HESSO state out of the chain's state: phase, period, how
# many groups are pruned, and per-group boolean masks in global group order.

# %%
status = hj.hesso_status(opt_state)
print(f"step {status.step}, phase {status.phase!r}, target K = {status.target}, "
      f"pruned {status.num_pruned} of {groups.num_groups}")

params = nnx.state(pruned, nnx.Param)
zero = groups.zero_groups(params)          # bool[G]: every member slice exactly 0.0
print("groups exactly 0.0:", int(zero.sum()), "| same as the state's mask:",
      bool((zero == status.pruned).all()))
for fam, start in zip(groups.families, groups.starts, strict=True):
    print(f"  {fam.name:28s} pruned {int(zero[start:start + fam.size].sum()):3d} / {fam.size}")

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
ax1.plot(hist_dense.steps, [100 * a for a in hist_dense.test_accuracy], label="dense (Adam)")
ax1.plot(hist.steps, [100 * a for a in hist.test_accuracy], label="HESSO")
ax1.set(xlabel="step", ylabel="test accuracy (%)", ylim=(50, 100.5))
ax1.legend()
ax1.grid(alpha=0.3)
ax2.plot(hist.steps, hist.zero_groups, color="C1", label="groups exactly 0.0")
ax2.axhline(status.target, color="grey", ls="--", label=f"K = {status.target}")
for p in range(PERIODS + 1):
    ax2.axvline(warmup + p * Tp, color="grey", alpha=0.2)
ax2.set(xlabel="step", ylabel="zero groups")
ax2.legend()
ax2.grid(alpha=0.3)
plt.tight_layout()
plt.show()

# %% [markdown]
# The zero-group count is a staircase: nothing during warm-up, one step of `K/P` groups at
# the end of every period (the groups being projected reach `0.0` exactly at the period's
# last step), flat during fine-tuning.
#
# ## Surgery: a physically smaller model
#
# `hj.shrink_model(model, groups)` drops every group that is exactly zero, together with
# its dependents (next layer's in-channels, BatchNorm statistics), and returns a new NNX
# module whose static sizes (`in_features`, `out_features`, `num_features`, ...) are
# consistent. Its outputs equal the masked model's.

# %%
small = hj.shrink_model(pruned, groups)
for name in ("stem", "block_a", "block_b", "down"):
    big_k = getattr(pruned, name).conv.kernel[...].shape
    small_k = getattr(small, name).conv.kernel[...].shape
    print(f"{name:8s} conv kernel {big_k} -> {small_k}")
print("head kernel", pruned.head.kernel[...].shape, "->", small.head.kernel[...].shape)

x_test = jnp.asarray(data.x_test)
logits_masked = np.asarray(make_eval(pruned)(nnx.state(pruned), x_test))
logits_small = np.asarray(make_eval(small)(nnx.state(small), x_test))
max_abs_diff = float(np.max(np.abs(logits_masked - logits_small)))
print(f"max |masked - shrunk| logit difference: {max_abs_diff:.2e} "
      f"(logit scale {np.max(np.abs(logits_masked)):.1f})")

# %% [markdown]
# ## Compare
#
# Parameters count `nnx.Param` elements; FLOPs come from XLA's cost analysis of one
# evaluation-mode forward pass on a single image.

# %%
rows = {}
for label, m in (("dense", dense), ("HESSO, masked", pruned), ("HESSO, shrunk", small)):
    rows[label] = dict(acc=evaluate(m, data.x_test, data.y_test), params=count_params(m),
                       flops=forward_flops(m, data.x_test[:1]))
table = ["| model | test accuracy | parameters | FLOPs / example |", "|---|---:|---:|---:|"]
for label, r in rows.items():
    table.append(f"| {label} | {100 * r['acc']:.2f}% | {r['params']:,} | "
                 f"{r['flops'] / 1e6:.2f} M |")
display(Markdown("\n".join(table)))

fig, axes = plt.subplots(1, 3, figsize=(11, 3))
for ax, key, title in zip(axes, ("acc", "params", "flops"),
                          ("test accuracy", "parameters", "FLOPs / example"), strict=True):
    vals = [rows[k][key] for k in rows]
    ax.bar(range(3), vals, color=["C0", "C1", "C2"])
    ax.set_xticks(range(3), list(rows), rotation=15)
    ax.set_title(title)
    if key == "acc":
        ax.set_ylim(min(vals) - 0.05, 1.0)
plt.tight_layout()
plt.show()

# %% [markdown]
# The masked and the shrunk model are the same function (equal accuracy, logits equal up to
# float rounding), but the shrunk one has a fraction of the parameters and FLOPs. To keep
# training after surgery, `hj.shrink_opt_state(opt_state, params, groups)` cuts Adam's
# moments the same way and `hj.shrink_groups(groups, plan)` gives the groups of the smaller
# tree.
#
# The last cell collects the numbers the test suite checks (`tests/test_notebooks.py`).

# %%
RESULT = dict(
    K=int(status.target), num_groups=int(groups.num_groups), zero_groups=int(zero.sum()),
    discovery_matches=discovery_matches,
    state_pruned=int(status.num_pruned), max_abs_logit_diff=max_abs_diff,
    acc_dense=rows["dense"]["acc"], acc_masked=rows["HESSO, masked"]["acc"],
    acc_shrunk=rows["HESSO, shrunk"]["acc"], params_dense=rows["dense"]["params"],
    params_shrunk=rows["HESSO, shrunk"]["params"], flops_dense=rows["dense"]["flops"],
    flops_shrunk=rows["HESSO, shrunk"]["flops"], seconds=time.perf_counter() - T0,
)
print("NOTEBOOK_RESULT", json.dumps(RESULT))
