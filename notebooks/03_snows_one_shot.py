"""Source of 03_snows_one_shot.ipynb (percent format, built by make_notebooks.py)."""

# %% [markdown]
# # SNOWS: one-shot pruning of a trained model, without retraining
#
# HESSO prunes *while* training. When a model is already trained and retraining is not an
# option, `hj.snows` prunes it in one shot from a few hundred unlabelled calibration inputs
# (SNOWS, [arXiv 2411.18376](https://arxiv.org/abs/2411.18376)):
#
# 1. pick a mask per layer: N:M (`"2:4"`: 2 weights kept in every 4 along the reduction
#    axis, the pattern sparse tensor cores accelerate), an unstructured fraction (`0.9`),
#    or a HESSO group mask;
# 2. refit the kept weights of each layer, in forward order, so that the outputs of the
#    next `K+1` linear operations match the dense network's on the calibration inputs.
#    `K=0` is layer-wise reconstruction (as in OBC/SparseGPT); larger `K` looks further
#    downstream. The problem is solved with Hessian-free Newton steps (Hessian-vector
#    products by `jax.jvp` of `jax.grad`, conjugate gradient, Armijo line search).
#
# `newton_steps=0` applies the mask alone: that is plain magnitude pruning, the baseline.
#
# This notebook trains an MLP on scikit-learn's digits, prunes it at 2:4 and at 90%
# unstructured sparsity with magnitude, SNOWS `K=0` and SNOWS `K=2`, and compares test
# accuracy. With `HESSO_JAX_NOTEBOOK_QUICK=1` (the test suite's setting) the MLP is smaller
# and the solver budget lower; unset it takes a minute or two on 2 CPU cores.
# `benchmarks/RESULTS.md` ("SNOWS one-shot pruning") has the full grid with a CNN and a
# transformer too.

# %%
import json
import os
import time

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx
from IPython.display import Markdown, display

import hesso_jax as hj
from hesso_jax.data import load_digits_split
from hesso_jax.models import MLP
from hesso_jax.train import count_params, evaluate, make_eval, train_classifier

# %matplotlib inline

QUICK = os.environ.get("HESSO_JAX_NOTEBOOK_QUICK", "") not in ("", "0")
if QUICK:   # smoke settings: the test suite runs these
    HIDDEN, STEPS, CALIB, NEWTON_STEPS, CG_MAX_ITERS = (128,) * 3, 400, 128, 3, 30
else:       # the setting of benchmarks/snows.py
    HIDDEN, STEPS, CALIB, NEWTON_STEPS, CG_MAX_ITERS = (128,) * 6, 1500, 256, 3, 30
SEED = 0
T0 = time.perf_counter()
print(f"QUICK={QUICK}: MLP(64, {HIDDEN}, 10), {STEPS} training steps, {CALIB} calibration "
      f"images, {NEWTON_STEPS} Newton steps per layer, CG cap {CG_MAX_ITERS}")

# %% [markdown]
# ## A trained model
#
# Any trained model works; here a plain MLP trained densely with Adam on the 8×8 digits.

# %%
data = load_digits_split(seed=SEED)
model = MLP(64, HIDDEN, 10, rngs=nnx.Rngs(SEED))
train_classifier(model, optax.adam(1e-3), data, steps=STEPS, seed=SEED,
                 eval_every=STEPS, progress=False)
acc_dense = evaluate(model, data.x_test, data.y_test)
x_test = jnp.asarray(data.x_test)
logits_dense = make_eval(model)(nnx.state(model), x_test)
print(f"dense MLP: {count_params(model):,} parameters, test accuracy {100 * acc_dense:.2f}%")

# %% [markdown]
# ## Prune in one shot
#
# `hj.snows(model, calib_x, sparsity=..., K=...)` returns a new module (the input is not
# modified) and a `SnowsReport`. The calibration set is the first training images, without
# labels. Every `dot_general`/`conv` kernel found in the jaxpr is a layer, the output layer
# included.

# %%
calib = jnp.asarray(data.x_train[:CALIB])
PATTERNS = ["2:4", 0.9]
METHODS = {"magnitude": dict(K=0, newton_steps=0),
           "SNOWS K=0": dict(K=0, newton_steps=NEWTON_STEPS),
           "SNOWS K=2": dict(K=2, newton_steps=NEWTON_STEPS)}
results, pruned_models, reports = {}, {}, {}
for pattern in PATTERNS:
    for method, kw in METHODS.items():
        t = time.perf_counter()
        pruned, report = hj.snows(model, calib, sparsity=pattern, cg_max_iters=CG_MAX_ITERS,
                                  **kw)
        logits = make_eval(pruned)(nnx.state(pruned), x_test)
        key = (str(pattern), method)
        results[key] = dict(acc=evaluate(pruned, data.x_test, data.y_test),
                            logit_mse=float(jnp.mean((logits - logits_dense) ** 2)),
                            sparsity=report.sparsity, seconds=time.perf_counter() - t)
        pruned_models[key], reports[key] = pruned, report
        print(f"{str(pattern):4s} {method:10s} acc {100 * results[key]['acc']:6.2f}%  "
              f"logit MSE {results[key]['logit_mse']:8.3f}  zero fraction "
              f"{report.sparsity:.3f}  ({results[key]['seconds']:.1f} s)")

# %% [markdown]
# ## Accuracy
#
# Magnitude pruning at high sparsity breaks the network; refitting the kept weights to the
# dense network's outputs recovers most of the accuracy, and looking `K=2` operations
# downstream usually recovers more than layer-wise reconstruction (`K=0`), most visibly at
# 90%. At 2:4 (50%) a small MLP has little to lose, so all refits sit near dense.

# %%
lines = ["| pattern | " + " | ".join(METHODS) + " |", "|---|" + "---:|" * len(METHODS)]
for pattern in PATTERNS:
    lines.append(f"| {pattern} | " + " | ".join(
        f"{100 * results[(str(pattern), m)]['acc']:.1f}%" for m in METHODS) + " |")
display(Markdown(f"Dense: **{100 * acc_dense:.1f}%**\n\n" + "\n".join(lines)))

fig, ax = plt.subplots(figsize=(7, 3.8))
w = 0.8 / len(METHODS)
for i, m in enumerate(METHODS):
    ax.bar(np.arange(len(PATTERNS)) - 0.4 + (i + 0.5) * w,
           [100 * results[(str(p), m)]["acc"] for p in PATTERNS], w, label=m)
ax.axhline(100 * acc_dense, color="k", ls="--", label="dense")
ax.set_xticks(range(len(PATTERNS)), [f"{p}" if isinstance(p, str) else f"{p:.0%} unstructured"
                                     for p in PATTERNS])
ax.set_ylabel("test accuracy (%)")
ax.set_ylim(0, 105)
ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
plt.show()

# %% [markdown]
# ## Per-layer report
#
# `report.layers` has one `LayerReport` per pruned kernel, in forward order: the linear ops
# in its objective (its own op, then up to `K` downstream), the reconstruction objective
# at the masked start `W_dense ⊙ m` and after the Newton steps (never larger), CG
# iterations, accepted Newton steps, and the zero fraction of the kernel.

# %%
report = reports[("0.9", "SNOWS K=2")]
lines = ["| layer | ops | objective before | objective after | ratio | CG its | Newton "
         "| zero fraction | s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
for lr in report.layers:
    ratio = lr.objective_after / max(lr.objective_before, 1e-30)
    lines.append(f"| `{'/'.join(map(str, lr.path))}` | {lr.ops} | {lr.objective_before:.3g} "
                 f"| {lr.objective_after:.3g} | {ratio:.3f} | {lr.cg_iterations} "
                 f"| {lr.newton_steps} | {lr.sparsity:.3f} | {lr.seconds:.2f} |")
display(Markdown(f"`{report.pattern}`, K={report.K}, total {report.seconds:.1f} s\n\n"
                 + "\n".join(lines)))

fig, ax = plt.subplots(figsize=(7, 3))
names = ["/".join(map(str, lr.path[:-1])) for lr in report.layers]
x = np.arange(len(names))
ax.bar(x - 0.2, [lr.objective_before for lr in report.layers], 0.4, label="masked start")
ax.bar(x + 0.2, [lr.objective_after for lr in report.layers], 0.4, label="after SNOWS")
ax.set_yscale("log")
ax.set_xticks(x, names)
ax.set_ylabel("K-step reconstruction objective")
ax.set_title("90% unstructured, K=2")
ax.legend()
plt.show()

# %% [markdown]
# ## Check the masks
#
# The kept weights were refitted, but the masks hold exactly: every run of 4 consecutive
# input weights of a 2:4 kernel has at most 2 nonzeros, and every 90% kernel has at least
# `round(0.9 · size)` zeros.

# %%
def kernels(m):
    """``{path: kernel}`` of a module's Dense kernels."""
    return {"/".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(
        nnx.state(m, nnx.Param)) if p[-1] == "kernel"}


max_nonzeros_per_4 = 0
for key in [k for k in pruned_models if k[0] == "2:4"]:
    for w in kernels(pruned_models[key]).values():
        runs = (w.reshape(w.shape[0] // 4, 4, -1) != 0).sum(axis=1)   # Dense (in, out)
        max_nonzeros_per_4 = max(max_nonzeros_per_4, int(runs.max()))
# zeros beyond the required round(0.9 * size), minimum over the 90% kernels (>= 0)
min_extra_zeros_90 = min(int((w == 0).sum()) - round(0.9 * w.size)
                         for key in pruned_models if key[0] == "0.9"
                         for w in kernels(pruned_models[key]).values())
objective_never_worse = all(lr.objective_after <= lr.objective_before * (1 + 1e-6)
                            for rep in reports.values() for lr in rep.layers)
print("max nonzeros in a run of 4 (2:4):", max_nonzeros_per_4)
print("every 90% kernel has >= round(0.9 * size) zeros:", min_extra_zeros_90 >= 0)
print("objective after <= before in every layer:", objective_never_worse)

# %% [markdown]
# SNOWS also takes a structured `hj.GroupMask(groups, keep)` (e.g.
# `hj.GroupMask.from_hesso(groups, opt_state)` after a HESSO run), in which case the
# consumers of removed channels are refitted to compensate, and `criterion="wanda"` scores
# weights by `|W| · ‖X‖` instead of magnitude. For GELU/softmax models pass
# `gauss_newton=True`.

# %%
RESULT = dict(
    acc_dense=acc_dense,
    acc={f"{p} {m}": r["acc"] for (p, m), r in results.items()},
    logit_mse={f"{p} {m}": r["logit_mse"] for (p, m), r in results.items()},
    max_nonzeros_per_4=max_nonzeros_per_4, min_extra_zeros_90=min_extra_zeros_90,
    objective_never_worse=objective_never_worse,
    layers=[dict(path="/".join(map(str, lr.path)), before=lr.objective_before,
                 after=lr.objective_after) for lr in reports[("0.9", "SNOWS K=2")].layers],
    seconds=time.perf_counter() - T0,
)
print("NOTEBOOK_RESULT", json.dumps(RESULT))
