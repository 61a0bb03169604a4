"""SNOWS: one-shot post-training pruning with a K-step reconstruction objective.

Implements "Preserving Deep Representations in One-Shot Pruning: A Hessian-Free
Second-Order Optimization Framework" (arXiv 2411.18376) for any JAX function or Flax NNX
module, with N:M, unstructured and group (structured) masks. (Equation and algorithm
numbers of the paper are not cited here because they were not checked against the paper
text while writing this module.)

**Layers.** A *layer* is a parameter leaf consumed as the kernel of a linear operation: a
``dot_general`` or ``conv_general_dilated`` whose other operand is an activation (found in
the jaxpr by `hesso_jax.jaxpr.capture`; biases, norm scales, embeddings added to
activations and BatchNorm statistics are never pruned). Linear operations inside
``cond``/``scan``/``while`` bodies are evaluated opaquely and are not layers. Layers are
processed in forward order (the order of their first linear op in the jaxpr).

**Objective** (the paper's K-step reconstruction problem). For layer ``l``
with kernel ``W`` and mask ``m`` (``True`` = kept), let ``f_{l}, f_{l+1}, …`` be the
outputs (pre-activations) of the linear operations whose value depends on ``W``, in
forward order (parallel branches that do not see ``W``, e.g. the key projection when ``W``
is the query kernel, are skipped), and ``X`` the calibration inputs. SNOWS solves

    min_W  L(W) = Σ_{k=0..K} mean( (f_{l+k}(X; W, θ_pruned<l, θ_dense>l)
                                     − f_{l+k}(X; θ_dense))² )   s.t.  W ⊙ (1 − m) = 0,

with earlier layers already pruned (the cascade: inputs from the pruned network) and
later layers dense; targets come from the dense network. ``K = 0`` is layer-wise
reconstruction (as in OBC/SparseGPT); fewer than ``K + 1`` ops are used near the output.
The mean is over the elements of each op's output and over calibration batches.

**Solver** (the paper's Hessian-free Newton method; `hesso_jax.newton`). In the active
coordinates ``w = W ⊙ m`` each Newton step solves ``(H + λ I) d = −g`` with
``g = m ⊙ ∇L(w)`` and ``H v = m ⊙ ∇²L(w) (m ⊙ v)``: the Hessian-vector product is
forward-over-reverse (``jax.jvp`` of ``jax.grad``) or, with ``gauss_newton=True``, the
positive semi-definite ``Σ_k (2/n_k) J_kᵀ J_k v`` (``jax.jvp`` then ``jax.vjp`` of the op
outputs), the choice for GELU/softmax models whose exact Hessian may be indefinite. The
damping is relative to the curvature along the gradient, ``λ = damping · |gᵀHg| / gᵀg``.
Conjugate gradient runs from 0 until ``‖r‖ ≤ cg_tol · ‖g‖``, ``cg_max_iters`` iterations
or a direction of non-positive (or non-finite) curvature (then it keeps its last iterate,
or ``−g`` on the first iteration). The step length follows Armijo backtracking
``L(w + t d) ≤ L(w) + c t gᵀd`` (``c = 1e-4``, ``t = 1, ½, ¼, …``, at most 30 trials).
A trial point whose loss is NaN or ±inf is rejected like a failed Armijo test and the
halving goes on; when no trial is accepted the layer's Newton loop stops on its last
(finite) iterate. The returned weights are never worse than the masked start
``W_dense ⊙ m``.

One solver, two drivers. `hesso_jax.newton.newton_cg` is written once against a loop
driver; ``loop="jit"`` (`newton_solve`) runs it with ``lax.while_loop`` / ``lax.cond`` as
one jitted call per layer, the calibration batches in a ``lax.map``; ``loop="host"``
(default) runs the same iteration as Python loops on concrete values, with the loss,
gradient and HVP jitted top-level functions of one calibration batch, averaged on the
host. The two agree up to floating-point rounding. XLA:CPU runs convolution gradients
inside loop bodies ~35× slower than at the top level (measured on the digits CNN: 0.33 s
vs 9 ms per HVP), hence the default.

**Masks.**
* ``sparsity="N:M"``: N weights kept in every M consecutive weights along the reduction
  axis: axis 0 of a Dense ``(in, out)`` kernel, the input-channel axis of a conv kernel
  (HWIO), and for a ``dot_general`` that contracts several kernel axes (attention output
  ``(heads, head_dim, d)``) those axes flattened row-major (so runs of M lie along
  ``head_dim`` within one head when M divides it).
* ``sparsity=0.9`` (a float in (0, 1)): unstructured, exactly ``round(s · size)`` weights
  removed per layer (``scope="layer"``), or exactly ``round(s · Σ size)`` over all layers
  with the lowest scores globally, at most ``max_layer_sparsity`` of any one layer
  (``scope="global"``).
* ``sparsity=GroupMask(groups, keep)``: structured. Every member slice (kernel columns,
  biases, BatchNorm scale and shift) and dependent slice (consumer input channels) of a
  removed group is zeroed. The layers refined are the kernels that hold a member or a
  dependent slice of a removed group: the producers' surviving output channels and,
  mostly, the consumers, whose remaining input channels are re-fitted to compensate for
  the missing ones (the paper leaves structured pruning open). Other layers stay dense.
* ``mask=...``: any user mask (per kernel path, bool arrays; ``True`` = kept) — SNOWS
  refines it.

Scores for N:M and unstructured masks: ``criterion="magnitude"`` (``|W|``) or ``"wanda"``
(``|W_ij| · ‖X_j‖``, Sun et al. 2023), where ``‖X_j‖²`` is the energy of the inputs that
multiply ``W_ij`` over the calibration set, computed for any linear op as
``∂/∂W Σ f(X ⊙ X; W)`` at ``W = 1`` (for a conv this is exact per kernel tap). Masks are
chosen on the dense network.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from hesso_jax.groups import Groups, Path, check_int, format_path, tree_paths
from hesso_jax.jaxpr.capture import LinearOp, Program, Segment, trace
from hesso_jax.newton import HOST, JIT, NewtonResult, Oracle, newton_cg

__all__ = ["GroupMask", "LayerReport", "SnowsReport", "layer_objective", "masked_hvp",
           "newton_solve", "nm_mask", "parse_nm", "snows", "unstructured_mask"]


# ---------------------------------------------------------------------------- masks
def parse_nm(pattern: str) -> tuple[int, int]:
    """``"N:M"`` → ``(N, M)``; ValueError unless ``1 <= N < M``.

    Examples:
      >>> parse_nm("2:4")
      (2, 4)
    """
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if match is None:
        raise ValueError(f"N:M pattern must look like '2:4', got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise ValueError(f"N:M pattern {pattern!r} needs 1 <= N < M (N weights kept of "
                         f"every M), got N={n}, M={m}")
    return n, m


def nm_mask(scores: jax.Array, axes: Sequence[int], n: int, m: int, *,
            path: Path = ()) -> jax.Array:
    """Keeps the ``n`` highest scores in every ``m`` consecutive entries along ``axes``.

    ``axes`` (the reduction axes) are moved to the front in the given order and flattened
    row-major into one axis of length ``R``; runs ``[j·m, (j+1)·m)`` of it are ranked
    independently for each position of the remaining axes. Ties are broken by position, so
    every run keeps exactly ``n``. Jittable (``axes``, ``n``, ``m`` static).

    Raises:
      ValueError: if ``m`` does not divide ``R`` (names ``path``).

    Examples:
      >>> nm_mask(jnp.array([[3.0], [1.0], [2.0], [4.0]]), (0,), 2, 4).ravel()
      Array([ True, False, False,  True], dtype=bool)
    """
    axes = tuple(a % scores.ndim for a in axes)
    moved = jnp.moveaxis(scores, axes, tuple(range(len(axes))))
    red = int(np.prod([scores.shape[a] for a in axes]))
    if red % m:
        raise ValueError(
            f"{format_path(path)!r}: N:M with M={m} needs M to divide the reduction length "
            f"{red} (axes {axes} of shape {tuple(scores.shape)}); leave the layer out with "
            "snows(..., layers=[...])")
    runs = moved.reshape(red // m, m, -1)
    rank = jnp.argsort(jnp.argsort(-runs, axis=1, stable=True), axis=1, stable=True)
    keep = (rank < n).reshape(moved.shape)
    return jnp.moveaxis(keep, tuple(range(len(axes))), axes)


def unstructured_mask(scores: jax.Array, sparsity: float) -> jax.Array:
    """Removes exactly ``round(sparsity · size)`` entries with the lowest scores.

    Ties are broken by position (stable sort). Jittable (``sparsity`` static).

    Examples:
      >>> unstructured_mask(jnp.array([0.5, -2.0, 0.1, 3.0]), 0.5)   # the 2 lowest go
      Array([ True, False, False,  True], dtype=bool)
    """
    _check_fraction("sparsity", sparsity)
    flat = scores.reshape(-1)
    k = int(round(float(sparsity) * flat.size))
    rank = jnp.argsort(jnp.argsort(flat, stable=True), stable=True)
    return (rank >= k).reshape(scores.shape)


def _global_masks(scores: list[np.ndarray], sparsity: float,
                  cap: float) -> list[np.ndarray]:
    """Exactly ``round(s · Σ n_l)`` lowest scores overall, ``<= floor(cap · n_l)`` per layer."""
    sizes = [s.size for s in scores]
    total = int(round(sparsity * sum(sizes)))
    caps = [int(np.floor(cap * n)) for n in sizes]
    if sum(caps) < total:
        raise ValueError(
            f"global sparsity {sparsity} removes {total} weights but max_layer_sparsity={cap} "
            f"allows only {sum(caps)}")
    eligible_scores, owners, positions = [], [], []
    for li, (s, c) in enumerate(zip(scores, caps, strict=True)):
        order = np.argsort(s.reshape(-1), kind="stable")[:c]
        eligible_scores.append(s.reshape(-1)[order])
        owners.append(np.full(c, li))
        positions.append(order)
    all_scores = np.concatenate(eligible_scores)
    pick = np.argsort(all_scores, kind="stable")[:total]
    own, pos = np.concatenate(owners)[pick], np.concatenate(positions)[pick]
    masks = [np.ones(n, bool) for n in sizes]
    for li in range(len(scores)):
        masks[li][pos[own == li]] = False
    return [mk.reshape(s.shape) for mk, s in zip(masks, scores, strict=True)]


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, float | int | np.floating):
        raise TypeError(f"{name} must be a float in (0, 1), got {value!r}")
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {value}")
    return float(value)


@dataclasses.dataclass(frozen=True, eq=False)
class GroupMask:
    """A structured mask: the groups of ``groups`` with ``keep[g] == False`` are removed.

    Attributes:
      groups: the `Groups` (paths as in the model's state / parameter tree).
      keep: ``bool[G]`` in global group order.

    Examples:
      >>> from hesso_jax.groups import GroupFamily, Member
      >>> groups = Groups.from_families([GroupFamily(3, (Member(("w",), 1),))])
      >>> gm = GroupMask(groups, np.array([True, False, True]))   # remove column 1
      >>> gm.leaf_masks({"w": np.ones((2, 3))})[0]
      array([[ True, False,  True],
             [ True, False,  True]])
      >>> GroupMask.from_zeros(groups, {"w": np.array([[1.0, 0.0, 2.0]])}).keep
      array([ True, False,  True])
    """

    groups: Groups
    keep: np.ndarray

    def __post_init__(self) -> None:
        keep = np.asarray(self.keep)
        if keep.shape != (self.groups.num_groups,) or keep.dtype != bool:
            raise ValueError(f"GroupMask keep must be bool[{self.groups.num_groups}], got "
                             f"{keep.dtype}{list(keep.shape)}")
        object.__setattr__(self, "keep", keep)

    @classmethod
    def from_hesso(cls, groups: Groups, opt_state: Any) -> GroupMask:
        """The groups HESSO has pruned (``hesso_status(opt_state).pruned``) are removed."""
        from hesso_jax.hesso import hesso_status

        return cls(groups, ~np.asarray(hesso_status(opt_state).pruned, bool))

    @classmethod
    def from_zeros(cls, groups: Groups, params: Any) -> GroupMask:
        """Groups whose member elements are all exactly 0.0 in ``params`` are removed."""
        return cls(groups, ~groups.zero_groups(params))

    def leaf_masks(self, tree: Any, *, dependents: bool = True) -> dict[int, np.ndarray]:
        """Per leaf index of ``tree``: a bool mask, False on removed groups' slices.

        Member slices always, dependent slices too when ``dependents``; only leaves that
        lose something appear.
        """
        layout = self.groups.layout(tree, dependents="present")
        ext = np.concatenate([self.keep, [True]])
        out: dict[int, np.ndarray] = {}
        maps = (*layout.members, *layout.dependents) if dependents else layout.members
        for amap in maps:
            shape = [1] * len(amap.shape)
            shape[amap.axis] = amap.shape[amap.axis]
            keep = np.broadcast_to(ext[amap.index].reshape(shape), amap.shape)
            if keep.all():
                continue
            prev = out.get(amap.leaf)
            out[amap.leaf] = keep.copy() if prev is None else prev & keep
        return out


# ---------------------------------------------------------------------------- reports
@dataclasses.dataclass(frozen=True)
class LayerReport:
    """What SNOWS did to one layer.

    Attributes:
      path: the kernel's path.
      ops: indices (`Program.ops`) of the linear ops in the objective (first = own op).
      objective_before: ``L`` at the masked start ``W_dense ⊙ m``.
      objective_after: ``L`` at the returned weights (``<= objective_before``).
      cg_iterations: CG iterations over all Newton steps.
      newton_steps: Newton steps taken (accepted by the line search).
      sparsity: fraction of the kernel's entries that are zero after pruning.
      seconds: wall time of the layer (capture + solve, compilation included).
    """

    path: Path
    ops: tuple[int, ...]
    objective_before: float
    objective_after: float
    cg_iterations: int
    newton_steps: int
    sparsity: float
    seconds: float


@dataclasses.dataclass(frozen=True)
class SnowsReport:
    """Per-layer reports and totals.

    Attributes:
      layers: one `LayerReport` per refined layer, in forward order.
      seconds: total wall time of `snows`.
      sparsity: zero fraction over all refined kernels.
      pattern: the mask kind, e.g. ``'2:4'``, ``'unstructured 0.9 (layer)'``, ``'groups'``.
      K: the K used.
      opaque: control-flow equations whose insides were not searched for layers.
    """

    layers: tuple[LayerReport, ...]
    seconds: float
    sparsity: float
    pattern: str
    K: int
    opaque: tuple[str, ...] = ()


# ---------------------------------------------------------------------------- objective
def _batch_loss(program: Program, seg: Segment) -> Callable[..., jax.Array]:
    """``loss(w, b, t)``: the objective on one calibration batch (``Σ_k mean (f_k − y_k)²``)."""

    def loss(w: jax.Array, b: list, t: list) -> jax.Array:
        outs = program.eval_segment(seg, w, b)
        return sum(jnp.mean(jnp.square((o - y).astype(jnp.float32)))
                   for o, y in zip(outs, t, strict=True))

    return loss


def _batch_hvp(program: Program, seg: Segment, gauss_newton: bool
               ) -> Callable[..., jax.Array]:
    """``hvp(w, m, v, b, t) = m ⊙ ∇²L_b(w)(m ⊙ v)`` on one batch (or its Gauss-Newton form)."""
    loss = _batch_loss(program, seg)

    def exact(w: jax.Array, m: jax.Array, v: jax.Array, b: list, t: list) -> jax.Array:
        grad = jax.grad(loss)
        return m * jax.jvp(lambda x: grad(x, b, t), (w,), (m * v,))[1]

    def gn(w: jax.Array, m: jax.Array, v: jax.Array, b: list, t: list) -> jax.Array:
        f = lambda x: program.eval_segment(seg, x, b)  # noqa: E731
        _, jv = jax.jvp(f, (w,), (m * v,))
        _, vjp = jax.vjp(f, w)
        return m * vjp([2.0 * j / j.size for j in jv])[0]

    return gn if gauss_newton else exact


def layer_objective(program: Program, seg: Segment) -> Callable[..., jax.Array]:
    """``L(w, boundary, targets)`` of one segment (see the module docstring).

    ``boundary`` and ``targets`` are lists of arrays with a leading calibration-batch axis
    (``[num_batches, ...]``, in ``seg.boundary`` / ``seg.targets`` order); the batches are
    mapped sequentially (``lax.map``) and averaged: ``L = mean_b Σ_k mean (f_k − y_k)²``.

    Examples:
      >>> prog = trace(lambda p, x: x @ p["w"], {"w": jnp.eye(2)}, jnp.ones((3, 2)))
      >>> seg = prog.segment(0, [prog.ops[0].out_key])
      >>> x = jnp.ones((1, 3, 2))                     # 1 batch of 3 inputs
      >>> loss = layer_objective(prog, seg)
      >>> float(loss(2 * jnp.eye(2), [x], [x]))       # (2x − x)² = 1 everywhere
      1.0
    """
    per_batch = _batch_loss(program, seg)

    def loss(w: jax.Array, boundary: list, targets: list) -> jax.Array:
        return jnp.mean(jax.lax.map(lambda bt: per_batch(w, *bt), (boundary, targets)))

    return loss


def masked_hvp(program: Program, seg: Segment, *, gauss_newton: bool = False
               ) -> Callable[..., jax.Array]:
    """``hvp(w, mask, v, boundary, targets) = m ⊙ ∇²L(w)(m ⊙ v)`` (or Gauss-Newton).

    Exact: forward-over-reverse, ``jax.jvp(jax.grad(L_b))`` per batch. Gauss-Newton:
    ``m ⊙ mean_batches Σ_k (2/n_k) J_kᵀ J_k (m ⊙ v)`` with ``J_k = ∂f_{l+k}/∂w``. Batches
    are mapped (``lax.map``) and averaged, as in `layer_objective`.

    Examples:
      >>> prog = trace(lambda p, x: x @ p["w"], {"w": jnp.ones((2, 1))}, jnp.ones((4, 2)))
      >>> seg = prog.segment(0, [prog.ops[0].out_key])
      >>> x, y = jnp.ones((1, 4, 2)), jnp.zeros((1, 4, 1))
      >>> hvp = masked_hvp(prog, seg)                 # H = (2/4) XᵀX = 2 everywhere
      >>> hvp(jnp.zeros((2, 1)), jnp.array([[True], [False]]), jnp.ones((2, 1)), [x], [y])
      Array([[2.],
             [0.]], dtype=float32)
    """
    per_batch = _batch_hvp(program, seg, gauss_newton)

    def hvp(w: jax.Array, mask: jax.Array, v: jax.Array, boundary: list,
            targets: list) -> jax.Array:
        m = mask.astype(w.dtype)
        return jnp.mean(jax.lax.map(lambda bt: per_batch(w, m, v, *bt),
                                    (boundary, targets)), axis=0)

    return hvp


# ---------------------------------------------------------------------------- solver
def _jit_solver(program: Program, seg: Segment, gauss_newton: bool
                ) -> Callable[..., NewtonResult]:
    """The jitted `newton_cg` under the `JIT` driver for one segment (memoised)."""

    def make() -> Callable[..., NewtonResult]:
        loss = layer_objective(program, seg)
        hvp = masked_hvp(program, seg, gauss_newton=gauss_newton)

        @jax.jit
        def solve(w0: jax.Array, mask: jax.Array, boundary: list, targets: list,
                  newton_steps: jax.Array, cg_max_iters: jax.Array, cg_tol: jax.Array,
                  damping: jax.Array) -> NewtonResult:
            oracle = Oracle(lambda w: loss(w, boundary, targets),
                            lambda w: jax.grad(loss)(w, boundary, targets),
                            lambda w, v: hvp(w, mask, v, boundary, targets))
            return newton_cg(JIT, oracle, w0, mask, newton_steps, cg_max_iters, cg_tol,
                             damping)

        return solve

    return program.memo(("newton_cg", seg, bool(gauss_newton)), make)


def newton_solve(program: Program, seg: Segment, *, gauss_newton: bool = False
                 ) -> Callable[..., tuple]:
    """The jitted per-layer solver: `hesso_jax.newton.newton_cg` under ``JIT`` (memoised).

    Returns:
      ``solve(w0, mask, boundary, targets, newton_steps, cg_max_iters, cg_tol, damping)
      -> (w, L_start, L_end, cg_iterations, newton_steps_taken)`` where ``w`` is supported
      on ``mask`` and ``L_end <= L_start = L(w0 ⊙ mask)``.

    Examples:
      >>> prog = trace(lambda p, x: x @ p["w"], {"w": jnp.ones((2, 1))}, jnp.ones((4, 2)))
      >>> seg = prog.segment(0, [prog.ops[0].out_key])
      >>> x = jnp.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]])
      >>> y = x @ jnp.array([[2.0], [3.0]])
      >>> w, f0, f1, cg_it, steps = newton_solve(prog, seg)(
      ...     jnp.ones((2, 1)), jnp.array([[True], [False]]), [x], [y], 2, 10, 1e-6, 0.0)
      >>> round(float(w[0, 0]), 4), float(w[1, 0]), int(steps)   # least squares on x_0
      (2.0, 0.0, 1)
    """

    def make() -> Callable[..., tuple]:
        inner = _jit_solver(program, seg, gauss_newton)
        return jax.jit(lambda *a: tuple(inner(*a))[:5])

    return program.memo(("solve5", seg, bool(gauss_newton)), make)


def _host_oracle(program: Program, seg: Segment, gauss_newton: bool, mask: jax.Array,
                 boundary: list, targets: list) -> Oracle:
    """The `HOST` oracle: jitted per-batch loss, gradient and HVP, averaged on the host.

    Every evaluation is one top-level jitted call per calibration batch: XLA:CPU runs
    convolution gradients inside loop bodies ~35× slower than at the top level.
    """

    def make() -> tuple:
        loss = _batch_loss(program, seg)
        return (jax.jit(loss), jax.jit(jax.grad(loss)),
                jax.jit(_batch_hvp(program, seg, gauss_newton)))

    loss_b, grad_b, hvp_b = program.memo(("host_oracle", seg, bool(gauss_newton)), make)
    nb = (boundary or targets)[0].shape[0]
    batches = [([v[i] for v in boundary], [v[i] for v in targets]) for i in range(nb)]
    m = mask.astype(jnp.float32)
    return Oracle(lambda w: sum(loss_b(w, b, t) for b, t in batches) / nb,
                  lambda w: sum(grad_b(w, b, t) for b, t in batches) / nb,
                  lambda w, v: sum(hvp_b(w, m.astype(w.dtype), v, b, t)
                                   for b, t in batches) / nb)


# ---------------------------------------------------------------------------- driver
def _capture_fn(program: Program, keys: tuple) -> Callable[..., list]:
    """``(leaves, batches) -> [values of keys, each [num_batches, ...]]``.

    One jitted forward pass per calibration batch (a host loop over batches: XLA:CPU runs
    convolutions inside loop bodies far slower than at the top level).
    """

    def make() -> Callable[..., list]:
        return jax.jit(lambda leaves, xb: program.capture_all(leaves, xb, keys))

    fn = program.memo(("capture", keys), make)

    def cap(leaves: list, batches: list) -> list:
        per = [fn(leaves, [x[i] for x in batches]) for i in range(batches[0].shape[0])]
        return [jnp.stack(vals) for vals in zip(*per, strict=True)] if per else []

    return cap


def _energy_fn(program: Program, op: LinearOp) -> tuple[Callable[..., jax.Array], Segment]:
    """``(w, boundary) -> Σ_X ‖X_j‖²`` per kernel entry (the Wanda input energy)."""
    seg = program.segment(op.leaf, [op.out_key])
    if op.act_key is None or op.act_key not in seg.boundary:
        raise ValueError(f"{format_path(op.path)!r}: the activation of its linear op "
                         "depends on the kernel itself; wanda scores are undefined")
    pos = seg.boundary.index(op.act_key)

    def make() -> Callable[..., jax.Array]:
        @jax.jit
        def per_batch(w: jax.Array, b: list) -> jax.Array:
            b = list(b)
            b[pos] = jnp.square(b[pos])
            return jax.grad(lambda x: jnp.sum(program.eval_segment(seg, x, b)[0]))(
                jnp.ones_like(w))

        return per_batch

    fn = program.memo(("energy", op.index), make)

    def energy(w: jax.Array, boundary: list) -> jax.Array:
        return sum(fn(w, [v[i] for v in boundary]) for i in range(boundary[0].shape[0]))

    return energy, seg


def _split_batches(calib: tuple, batch_size: int | None) -> tuple[list, int]:
    n = int(np.shape(calib[0])[0])
    for x in calib:
        if np.shape(x)[0] != n:
            raise ValueError(f"calibration inputs disagree on the batch size: "
                             f"{[np.shape(c)[0] for c in calib]}")
    bs = n if batch_size is None else check_int("batch_size", batch_size, 1)
    if bs > n:
        raise ValueError(f"batch_size={bs} exceeds the {n} calibration inputs")
    nb = n // bs
    flat = [jnp.asarray(x)[: nb * bs].reshape(nb, bs, *np.shape(x)[1:]) for x in calib]
    return flat, bs


def _resolve_model(model_or_fn: Any, args: tuple) -> tuple[Callable, Any, tuple, Callable]:
    """``(fn, params, calib, rebuild)``; NNX modules in eval mode (BN running stats)."""
    if isinstance(model_or_fn, nnx.Module):
        if len(args) != 1:
            raise TypeError("snows(model, calib_inputs, ...) takes one positional argument "
                            f"after the module, got {len(args)}")
        view = nnx.merge(*nnx.split(model_or_fn))
        view.eval()
        graphdef, state = nnx.split(view)
        orig_def = nnx.graphdef(model_or_fn)

        def fn(s: Any, *xs: Any) -> Any:
            return nnx.merge(graphdef, s)(*xs)

        def rebuild(new_state: Any) -> Any:
            return nnx.merge(orig_def, new_state)

        calib = args[0]
    elif callable(model_or_fn):
        if len(args) != 2:
            raise TypeError("snows(fn, params, calib_inputs, ...) takes two positional "
                            f"arguments after the function, got {len(args)}")
        fn, (state, calib) = model_or_fn, args

        def rebuild(new_state: Any) -> Any:
            return new_state
    else:
        raise TypeError(f"snows takes an nnx.Module or a function fn(params, *inputs), got "
                        f"{type(model_or_fn).__name__}")
    calib = tuple(calib) if isinstance(calib, tuple | list) else (calib,)
    return fn, state, calib, rebuild


def _user_masks(mask: Any, params: Any, paths: list[Path]) -> dict[int, np.ndarray]:
    where = {p: i for i, p in enumerate(paths)}
    leaves = jax.tree.leaves(params)
    out: dict[int, np.ndarray] = {}
    if isinstance(mask, Mapping) and all(isinstance(k, tuple) for k in mask):
        items = list(mask.items())
    else:
        mpaths = tree_paths(mask)
        items = list(zip(mpaths, jax.tree.leaves(mask), strict=True))
    for path, mk in items:
        if mk is None:
            continue
        if path not in where:
            raise ValueError(f"mask path {format_path(path)!r} is not a parameter leaf")
        leaf = where[path]
        mk = np.asarray(mk)
        if mk.shape != np.shape(leaves[leaf]):
            raise ValueError(f"mask for {format_path(path)!r} has shape {mk.shape}, the "
                             f"leaf has {np.shape(leaves[leaf])}")
        if mk.dtype != bool:
            raise TypeError(f"mask for {format_path(path)!r} must be bool, got {mk.dtype}")
        out[leaf] = mk
    return out


@dataclasses.dataclass(frozen=True)
class _SolverConfig:
    """The solver options of `snows` (validated by `_check_options`)."""

    newton_steps: int
    cg_max_iters: int
    cg_tol: float
    damping: float
    gauss_newton: bool
    loop: str


def _check_options(cfg: _SolverConfig, criterion: str, scope: str, sparsity: Any,
                   mask: Any, max_layer_sparsity: float) -> None:
    """Stage 0 of `snows`: argument checks that need no model (ValueError / TypeError)."""
    if not cfg.cg_tol > 0 or not cfg.damping >= 0:
        raise ValueError(f"need cg_tol > 0 and damping >= 0, got {cfg.cg_tol}, "
                         f"{cfg.damping}")
    if criterion not in ("magnitude", "wanda"):
        raise ValueError(f"criterion must be 'magnitude' or 'wanda', got {criterion!r}")
    if cfg.loop not in ("host", "jit"):
        raise ValueError(f"loop must be 'host' or 'jit', got {cfg.loop!r}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if (sparsity is None) == (mask is None):
        raise ValueError("give exactly one of sparsity= (N:M, fraction or GroupMask) and "
                         "mask=")
    if isinstance(sparsity, str):
        parse_nm(sparsity)
    elif sparsity is not None and not isinstance(sparsity, GroupMask):
        _check_fraction("sparsity", sparsity)
        _check_fraction("max_layer_sparsity", max_layer_sparsity)


def _select_layers(program: Program, layers: Sequence[Path] | None
                   ) -> tuple[dict[int, LinearOp], list[int]]:
    """Stage 1: ``(first linear op of each kernel leaf, layer leaves in forward order)``."""
    paths = program.paths
    first_op: dict[int, LinearOp] = {}
    for op in program.ops:
        first_op.setdefault(op.leaf, op)
    layer_leaves = [op.leaf for op in program.ops if first_op[op.leaf] is op]
    if layers is not None:
        wanted = {tuple(p) for p in layers}
        unknown = wanted - {paths[i] for i in layer_leaves}
        if unknown:
            raise ValueError(f"layers {sorted(map(format_path, unknown))} are not kernels of "
                             "linear ops (dot_general/conv) outside control flow")
        layer_leaves = [i for i in layer_leaves if paths[i] in wanted]
    return first_op, layer_leaves


def _user_layer_masks(program: Program, mask: Any, params: Any,
                      first_op: dict[int, LinearOp], layer_leaves: list[int]) -> tuple:
    """Stage 2 (``mask=``): ``(layer_leaves, masks, zero_only={}, pattern)``."""
    masks = _user_masks(mask, params, program.paths)
    bad = [format_path(program.paths[i]) for i in masks if i not in first_op]
    if bad:
        raise ValueError(f"mask given for {bad}, which are not kernels of linear ops")
    return [i for i in layer_leaves if i in masks], masks, {}, "user mask"


def _group_layer_masks(gmask: GroupMask, params: Any, layer_leaves: list[int]) -> tuple:
    """Stage 2 (`GroupMask`): ``(layer_leaves, masks, zero_only, 'groups')``.

    Kernels holding a removed slice are refined; non-kernel members (biases, norm
    scale/shift) are only zeroed (``zero_only``); dependents outside kernels (BatchNorm
    statistics) are left alone (they multiply zeros).
    """
    gm = gmask.leaf_masks(params)
    layer_leaves = [i for i in layer_leaves if i in gm]
    if not layer_leaves:
        raise ValueError("GroupMask removes no slice of any linear-op kernel")
    masks = {i: gm[i] for i in layer_leaves}
    zero_only = {i: mk for i, mk in gmask.leaf_masks(params, dependents=False).items()
                 if i not in masks}
    return layer_leaves, masks, zero_only, "groups"


def _score_masks(program: Program, leaves: list, batches: list,
                 first_op: dict[int, LinearOp], layer_leaves: list[int], sparsity: Any,
                 criterion: str, scope: str, max_layer_sparsity: float
                 ) -> tuple[dict[int, np.ndarray], str]:
    """Stage 2 (N:M or a fraction): masks from magnitude or Wanda scores, and the pattern."""
    scores = {i: jnp.abs(leaves[i]) for i in layer_leaves}
    if criterion == "wanda":
        for i in layer_leaves:
            energy, seg = _energy_fn(program, first_op[i])
            bnd = _capture_fn(program, seg.boundary)(leaves, batches)
            scores[i] = scores[i] * jnp.sqrt(energy(leaves[i], bnd))
    if isinstance(sparsity, str):
        n, m = parse_nm(sparsity)
        return {i: np.asarray(nm_mask(scores[i], first_op[i].nm_axes, n, m,
                                      path=program.paths[i])) for i in layer_leaves}, sparsity
    if scope == "global":
        got = _global_masks([np.asarray(scores[i]) for i in layer_leaves], float(sparsity),
                            max_layer_sparsity)
        return (dict(zip(layer_leaves, got, strict=True)),
                f"unstructured {float(sparsity):g} (global)")
    return ({i: np.asarray(unstructured_mask(scores[i], float(sparsity)))
             for i in layer_leaves}, f"unstructured {float(sparsity):g} (layer)")


def _cascade(program: Program, leaves: list, batches: list, layer_leaves: list[int],
             masks: dict[int, np.ndarray], zero_only: dict[int, np.ndarray], K: int,
             cfg: _SolverConfig, progress: bool) -> list[LayerReport]:
    """Stage 3: refine the layers in forward order, in place in ``leaves``.

    Targets come from the dense network; each layer's boundary inputs from the network
    pruned so far (earlier layers refined, ``zero_only`` members zeroed).
    """
    dense = list(leaves)
    for i, mk in zero_only.items():
        leaves[i] = leaves[i] * jnp.asarray(mk, leaves[i].dtype)
    plans = []
    for i in layer_leaves:
        ops = program.downstream_ops(i)[:K + 1]
        plans.append((i, ops, program.segment(i, [op.out_key for op in ops])))
    target_keys = tuple(sorted({k for _, _, s in plans for k in s.targets},
                               key=lambda k: k[1:]))
    dense_vals = dict(zip(target_keys,
                          _capture_fn(program, target_keys)(dense, batches), strict=True))
    reports = []
    for i, ops, seg in tqdm(plans, desc="snows", disable=not progress, leave=False):
        t0 = time.perf_counter()
        boundary = _capture_fn(program, seg.boundary)(leaves, batches)
        targets = [dense_vals[k] for k in seg.targets]
        w, f0, f1, cg_it, taken, _ = _solve_layer(
            program, seg, leaves[i], jnp.asarray(masks[i]), boundary, targets, cfg)
        leaves[i] = w = jax.block_until_ready(w)
        reports.append(LayerReport(
            program.paths[i], tuple(op.index for op in ops), float(f0), float(f1),
            int(cg_it), int(taken), float(np.mean(np.asarray(w) == 0)),
            time.perf_counter() - t0))
    return reports


def _solve_layer(program: Program, seg: Segment, w0: jax.Array, mask: jax.Array,
                 boundary: list, targets: list, cfg: _SolverConfig) -> NewtonResult:
    """One layer's `newton_cg` with the driver ``cfg.loop`` (`JIT` or `HOST`).

    Both drivers run the same iteration (`hesso_jax.newton`); they differ only in where
    the loops run and how the oracle evaluates the calibration batches.
    """
    if cfg.loop == "jit":
        return _jit_solver(program, seg, cfg.gauss_newton)(
            w0, mask, boundary, targets, jnp.int32(cfg.newton_steps),
            jnp.int32(cfg.cg_max_iters), jnp.float32(cfg.cg_tol), jnp.float32(cfg.damping))
    oracle = _host_oracle(program, seg, cfg.gauss_newton, mask, boundary, targets)
    return newton_cg(HOST, oracle, w0, mask, cfg.newton_steps, cfg.cg_max_iters,
                     cfg.cg_tol, cfg.damping)


def snows(model_or_fn: Any, *args: Any, sparsity: str | float | GroupMask | None = None,
          K: int = 2, mask: Any = None, criterion: Literal["magnitude", "wanda"] = "magnitude",
          scope: Literal["layer", "global"] = "layer", max_layer_sparsity: float = 0.99,
          layers: Sequence[Path] | None = None, newton_steps: int = 3,
          cg_max_iters: int = 50, cg_tol: float = 1e-3, damping: float = 1e-4,
          gauss_newton: bool = False, batch_size: int | None = None,
          loop: Literal["host", "jit"] = "host",
          progress: bool = False) -> tuple[Any, SnowsReport]:
    """Prunes a trained model in one shot and re-fits the kept weights (SNOWS).

    ``snows(module, calib_inputs, ...)`` or ``snows(fn, params, calib_inputs, ...)`` with
    ``fn(params, *inputs)``; ``calib_inputs`` is an array or a tuple of arrays (one per
    positional input) with the calibration examples on axis 0. NNX modules run in
    evaluation mode (BatchNorm running statistics); the input module is not modified.
    See the module docstring for the objective, the solver and the mask kinds.

    Args:
      model_or_fn: an ``nnx.Module`` or a pure function.
      *args: ``(calib_inputs,)`` for a module, ``(params, calib_inputs)`` for a function.
      sparsity: ``"N:M"``, a float fraction in (0, 1), or a `GroupMask`.
      K: downstream linear ops in each layer's objective (0 = layer-wise).
      mask: instead of ``sparsity``, a user mask: a dict ``{path: bool array}`` or a pytree
        like the parameters with bool leaves (None = not pruned). ``True`` = kept.
      criterion: ``'magnitude'`` or ``'wanda'`` (scores for N:M / unstructured masks).
      scope: unstructured only: ``'layer'`` (every layer at ``sparsity``) or ``'global'``.
      max_layer_sparsity: cap per layer for ``scope='global'``.
      layers: kernel paths to prune (default: every layer).
      newton_steps: Newton steps per layer; 0 only applies the mask (the pruning
        baseline, e.g. magnitude pruning, with the objectives still reported).
      cg_max_iters: CG iteration cap per Newton step.
      cg_tol: CG relative residual tolerance.
      damping: relative damping (``λ = damping · |gᵀHg|/gᵀg``).
      gauss_newton: use the Gauss-Newton (PSD) matrix instead of the exact Hessian.
      batch_size: calibration batch size (inputs past a multiple of it are dropped);
        default: all inputs in one batch.
      loop: ``'host'`` (default) drives the Newton/CG/line-search iterations from Python,
        every loss, gradient and HVP being one jitted top-level call per calibration batch;
        ``'jit'`` runs each layer's whole solve as one jitted ``lax.while_loop``
        (`newton_solve`; all batches in one ``lax.map``). Same mathematics; on XLA:CPU
        convolution gradients inside loop bodies are ~35× slower than at the top level,
        so ``'host'`` is the fast choice there, ``'jit'`` avoids per-call dispatch.
      progress: show a tqdm bar over layers.

    Returns:
      ``(pruned, report)``: the pruned module (or parameter tree) and a `SnowsReport`.

    Raises:
      ValueError: bad pattern ("5:4", M not dividing a reduction axis — naming the path),
        sparsity outside (0, 1), both or neither of ``sparsity`` and ``mask``, unknown
        layer paths, a `GroupMask` that removes nothing a layer holds.
      TypeError: wrong argument kinds.

    Examples:
      >>> x = jax.random.normal(jax.random.key(0), (32, 8))
      >>> params = {"w": jax.random.normal(jax.random.key(1), (8, 4))}
      >>> pruned, report = snows(lambda p, x: x @ p["w"], params, x, sparsity="2:4", K=0)
      >>> report.pattern, report.sparsity, [lr.path for lr in report.layers]
      ('2:4', 0.5, [('w',)])
      >>> lr = report.layers[0]
      >>> bool(lr.objective_after < lr.objective_before), lr.newton_steps >= 1
      (True, True)
      >>> int((pruned["w"] != 0).reshape(2, 4, 4).sum(axis=1).max())   # 2 of every 4
      2
    """
    t_start = time.perf_counter()
    K = check_int("K", K, 0)
    cfg = _SolverConfig(check_int("newton_steps", newton_steps, 0),
                        check_int("cg_max_iters", cg_max_iters, 1), cg_tol, damping,
                        bool(gauss_newton), loop)
    _check_options(cfg, criterion, scope, sparsity, mask, max_layer_sparsity)
    fn, params, calib, rebuild = _resolve_model(model_or_fn, args)
    batches, _ = _split_batches(calib, batch_size)
    program = trace(fn, params, *(b[0] for b in batches))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = list(leaves)
    first_op, layer_leaves = _select_layers(program, layers)
    if mask is not None:
        layer_leaves, masks, zero_only, pattern = _user_layer_masks(
            program, mask, params, first_op, layer_leaves)
    elif isinstance(sparsity, GroupMask):
        layer_leaves, masks, zero_only, pattern = _group_layer_masks(
            sparsity, params, layer_leaves)
    else:
        masks, pattern = _score_masks(program, leaves, batches, first_op, layer_leaves,
                                      sparsity, criterion, scope, max_layer_sparsity)
        zero_only = {}
    reports = _cascade(program, leaves, batches, layer_leaves, masks, zero_only, K, cfg,
                       progress)
    sizes = np.array([np.size(leaves[i]) for i in layer_leaves], float)
    zeros = np.array([np.sum(np.asarray(leaves[i]) == 0) for i in layer_leaves], float)
    new_params = jax.tree_util.tree_unflatten(treedef, leaves)
    report = SnowsReport(tuple(reports), time.perf_counter() - t_start,
                         float(zeros.sum() / max(sizes.sum(), 1.0)), pattern, K,
                         tuple(program.opaque))
    return rebuild(new_params), report
