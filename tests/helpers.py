"""Shared test helpers: the two-layer MLP problem, reference models with random values,
tree oracles, hypothesis layouts and masking. Test modules import from here, never from
each other (``from helpers import ...``; pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from hypothesis import strategies as st
from jax.sharding import NamedSharding, PartitionSpec

import hesso_jax as hj
from hesso_jax import GroupFamily, Groups, Member
from hesso_jax.models import CNN, MLP, TinyTransformer

# ----------------------------------------------------------------------------- the MLP
# relu(x @ l1.kernel + l1.bias) @ l2.kernel + l2.bias: one family of `hidden` neurons
# (members: l1's output channels; dependent: l2's input rows).
D_IN, HIDDEN, D_OUT = 6, 12, 3


def mlp_params(d_in=D_IN, hidden=HIDDEN, d_out=D_OUT, *, seed=0, dtype=jnp.float32):
    """Normal kernels (key ``seed``), l1 bias 0.1 and l2 bias 0 (non-zero member bias)."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"l1": {"kernel": jax.random.normal(k1, (d_in, hidden), dtype),
                   "bias": jnp.full((hidden,), 0.1, dtype)},
            "l2": {"kernel": jax.random.normal(k2, (hidden, d_out), dtype),
                   "bias": jnp.zeros((d_out,), dtype)}}


def mlp_groups(hidden=HIDDEN, *, name=""):
    """The hidden neurons of `mlp_params` as one family."""
    return hj.Groups.from_families([hj.GroupFamily(
        hidden, (hj.Member(("l1", "kernel"), 1), hj.Member(("l1", "bias"), 0)),
        (hj.Member(("l2", "kernel"), 0),), name=name)])


def mlp_forward(params, x):
    h = jax.nn.relu(x @ params["l1"]["kernel"] + params["l1"]["bias"])
    return h @ params["l2"]["kernel"] + params["l2"]["bias"]


def mlp_loss(params, x, y):
    """Mean squared error, computed in float32 whatever the parameters' dtype."""
    return jnp.mean((mlp_forward(params, x).astype(jnp.float32) - y) ** 2)


def mlp_data(n, d_in=D_IN, d_out=D_OUT, *, batches=None):
    """``(x, y)`` from keys 1 and 2: shape ``(n, d)``, or ``(batches, n, d)``."""
    lead = (n,) if batches is None else (batches, n)
    return (jax.random.normal(jax.random.key(1), (*lead, d_in)),
            jax.random.normal(jax.random.key(2), (*lead, d_out)))


# ----------------------------------------------------------------- the sharded MLP
# The MLP at the sizes the 8-device tests use (every channel axis divisible by 8).
SHARD_DIMS = (16, 32, 8, 64)  # d_in, hidden, d_out, batch
SHARD_K, SHARD_PERIODS, SHARD_TP = 12, 2, 2
FSDP_SPECS = {"l1": {"kernel": PartitionSpec(None, "d"), "bias": PartitionSpec("d")},
              "l2": {"kernel": PartitionSpec("d", None), "bias": PartitionSpec()}}


def mesh_of(axis_type):
    """An 8-device mesh with one axis ``'d'`` of ``axis_type``."""
    return jax.make_mesh((8,), ("d",), axis_types=(axis_type,))


def put(mesh, tree, specs):
    """``tree`` placed on ``mesh`` with the PartitionSpecs ``specs`` (same structure)."""
    return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs)


def shard_params():
    return mlp_params(*SHARD_DIMS[:3])


def shard_groups():
    return mlp_groups(SHARD_DIMS[1], name="hidden")


def shard_data():
    return mlp_data(SHARD_DIMS[3], *SHARD_DIMS[0:3:2])


def shard_loss(params, x, y):
    """`mlp_loss`; on an Explicit mesh each FSDP weight is gathered before use."""
    if any(jax.sharding.get_abstract_mesh().explicit_axes):
        params = jax.tree.map(lambda a: jax.sharding.reshard(a, PartitionSpec()), params)
    return mlp_loss(params, x, y)


def shard_train(tx, params, x, y, steps):
    """``steps`` jitted steps of ``tx`` on `shard_loss` (``value_fn`` passed for CRIC)."""
    def step(p, s, x, y):
        g = jax.grad(shard_loss)(p, x, y)
        u, s = tx.update(g, s, p, value_fn=lambda q: shard_loss(q, x, y))
        return optax.apply_updates(p, u), s

    step = jax.jit(step)
    state = jax.jit(tx.init)(params)
    for _ in range(steps):
        params, state = step(params, state, x, y)
    return params, state


# ------------------------------------------------------------------- compiled programs
DEFAULT_PIPELINE = {"xla_cpu_use_fusion_emitters": True}
"""XLA's default CPU pipeline (conftest turns the fusion emitters off for compile speed)."""


def compile_default(lowered):
    """``lowered.compile()`` with XLA's default pipeline: for the tests that assert on the
    compiled program (HLO text, ``memory_analysis``, ``cost_analysis``), whatever flags
    conftest set for speed. The same HLO as ``compile()`` without those flags."""
    return lowered.compile(compiler_options=DEFAULT_PIPELINE)


# ----------------------------------------------------------------------------- models
MODEL_SPECS = {
    "mlp": lambda: MLP(64, (32, 24), 10, rngs=nnx.Rngs(0)),
    "cnn": lambda: CNN(c1=8, c2=12, rngs=nnx.Rngs(0)),
    "transformer": lambda: TinyTransformer(d_model=16, num_heads=4, mlp_dim=24,
                                           rngs=nnx.Rngs(0)),
}


def randomized(ctor, seed=0):
    """``ctor()`` with random values in every variable, built without compiling initialisers."""
    graphdef, state = nnx.split(nnx.eval_shape(ctor))
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    new = []
    for path, x in zip(hj.tree_paths(state), leaves, strict=True):
        v = rng.normal(size=x.shape)
        if path[-1] == "var":
            v = np.abs(v) + 0.5
        elif path[-1] == "scale":
            v = 1.0 + 0.2 * v
        elif len(x.shape) >= 2:
            v = v / np.sqrt(np.prod(x.shape[:-1]))
        else:
            v = 0.3 * v
        new.append(jnp.asarray(v, x.dtype))
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, new))


def make_model(name, seed=0):
    """A reference model with random values in every variable (biases, BatchNorm included).

    Built with ``nnx.eval_shape`` so no initialiser is compiled (each new kernel shape
    costs seconds of XLA compile on a small CPU); random biases and statistics also make
    every comparison stronger than the default zeros and ones.
    """
    return randomized(MODEL_SPECS[name], seed)


def jitted(module):
    """``f(x)`` = ``module(x)``, compiled once (eager NNX calls are slow on CPU)."""
    graphdef, state = nnx.split(module)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return lambda x: fn(state, x)


# ----------------------------------------------------------------------------- tree oracles
def flat_leaves(tree, prefix=()):
    """Independent of `tree_paths`: path -> leaf for nested dicts and lists of arrays."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flat_leaves(v, (*prefix, k)))
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            out.update(flat_leaves(v, (*prefix, i)))
    else:
        out[prefix] = tree
    return out


def group_slices(groups):
    """Explicit loop: per global group, the list of (path, axis, channel range) members."""
    out = []
    for fam in groups.families:
        for i in range(fam.size):
            out.append([(m.path, m.axis, [lo + i * m.block + t for lo in m.starts()
                                          for t in range(m.block)])
                        for m in fam.members])
    return out


def oracle_broadcast(groups, vec, tree, fill):
    vec = np.asarray(vec)
    flat = flat_leaves(tree)
    out = {p: np.full(x.shape, fill, vec.dtype) for p, x in flat.items()}
    for g, members in enumerate(group_slices(groups)):
        for path, axis, chans in members:
            arr = out[path]
            idx = [slice(None)] * arr.ndim
            idx[axis] = np.asarray(chans, int)
            arr[tuple(idx)] = vec[g]
    return out


def build_tree(paths, leaves):
    tree = {"d": {}, "s": []}
    for p, x in zip(paths, leaves, strict=True):
        if p[0] == "s":
            tree["s"].append(x)
        else:
            tree["d"][p[1]] = {"w": x}
    return tree


def zero_removed(groups, keep, tree, paths):
    """Numpy: ``tree`` (built by `build_tree` from ``paths``) with removed groups zeroed."""
    mask = oracle_broadcast(groups, np.asarray(keep, bool), tree, True)
    flat = flat_leaves(tree)
    leaves = []
    for p in paths:
        x = np.asarray(flat[p])
        leaves.append(jnp.asarray(np.where(mask[p], x, np.zeros((), x.dtype))))
    return build_tree(paths, leaves)


@functools.partial(jax.jit, static_argnums=(0, 1))
def jit_reduce(groups, name, *trees):
    """``groups.<name>(*trees)`` in one compiled call (cheaper than op-by-op on new shapes)."""
    return getattr(groups, name)(*trees)


@st.composite
def layouts(draw, *, with_dependents=False):
    """Random valid-by-construction groups on a random tree of nested dicts and a list.

    Each leaf has one member axis; channel ranges on every (leaf, axis) are carved
    disjointly by a cursor with random gaps, and the axis lengths are chosen afterwards.
    Each (leaf, axis) keeps one sign convention (negative or not) throughout.
    """
    n_leaves = draw(st.integers(1, 4))
    ndims = [draw(st.integers(1, 3)) for _ in range(n_leaves)]
    member_axis = [draw(st.integers(0, nd - 1)) for nd in ndims]
    negative = {(i, a): draw(st.booleans()) for i in range(n_leaves) for a in range(ndims[i])}
    cursor = {(i, a): 0 for i in range(n_leaves) for a in range(ndims[i])}

    def carve(i, a, size, block):
        gap = draw(st.integers(0, 2))
        off = cursor[(i, a)] + gap
        cursor[(i, a)] = off + size * block
        ax = a - ndims[i] if negative[(i, a)] else a
        return ax, off

    fams = []
    for _ in range(draw(st.integers(1, 4))):
        size = draw(st.integers(1, 3))
        members = []
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, n_leaves - 1))
            block = draw(st.integers(1, 2))
            ax, off = carve(i, member_axis[i], size, block)
            members.append((i, ax, block, off))
        deps = []
        if with_dependents:
            for _ in range(draw(st.integers(0, 2))):
                i = draw(st.integers(0, n_leaves - 1))
                a = draw(st.integers(0, ndims[i] - 1))
                block = draw(st.integers(1, 2))
                ax, off = carve(i, a, size, block)
                deps.append((i, ax, block, off))
        fams.append((size, members, deps))
    shapes = []
    for i in range(n_leaves):
        shape = []
        for a in range(ndims[i]):
            used = cursor[(i, a)]
            shape.append(used + draw(st.integers(0, 2)) if used else draw(st.integers(1, 3)))
        shapes.append(tuple(shape))
    paths = []
    n_seq = 0
    for i in range(n_leaves):
        if i % 2:
            paths.append(("s", n_seq))
            n_seq += 1
        else:
            paths.append(("d", f"l{i}", "w"))
    dtypes = [draw(st.sampled_from([jnp.float32, jnp.float32, jnp.bfloat16]))
              for _ in range(n_leaves)]
    groups = Groups.from_families(
        GroupFamily(size, tuple(Member(paths[i], ax, b, o) for i, ax, b, o in mem),
                    tuple(Member(paths[i], ax, b, o) for i, ax, b, o in dep), name=f"f{k}")
        for k, (size, mem, dep) in enumerate(fams))
    seed = draw(st.integers(0, 2**31 - 1))
    return groups, paths, shapes, dtypes, seed


# ----------------------------------------------------------------------------- masking
def assert_close_rel(a, b, rtol=1e-5):
    """``max|a - b| <= rtol * max|b|`` (float64), shapes equal; empty arrays pass."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    if not a.size:
        return
    scale = max(float(np.max(np.abs(b))), 1e-30)
    err = float(np.max(np.abs(a - b)))
    assert err <= rtol * scale, f"max abs diff {err} vs scale {scale}"


@functools.partial(jax.jit, static_argnums=1)
def _masked(state, groups, keep):
    mask = groups.broadcast(keep.astype(jnp.float32), state, fill=1.0)
    return jax.tree.map(lambda x, m: (x * m).astype(x.dtype), state, mask)


def masked(state, groups, keep):
    """``state`` with the member slices of the groups not in ``keep`` set to 0."""
    return _masked(state, groups, jnp.asarray(keep))


def random_keep(groups, rng, *, drop_family=None):
    """A random keep mask with at least one group removed and one kept in every family
    (all of family ``drop_family`` removed)."""
    keep = rng.random(groups.num_groups) < 0.6
    for fam, start in zip(groups.families, groups.starts, strict=True):
        seg = keep[start:start + fam.size]
        seg[rng.integers(fam.size)] = False  # at least one removed per family
        seg[rng.integers(fam.size)] |= seg.sum() == 0  # and at least one kept
    if drop_family is not None:
        start, size = groups.starts[drop_family], groups.families[drop_family].size
        keep[start:start + size] = False
    return keep


# --------------------------------------------------- tensor parallel over pruned axes
# A 2-D mesh ("fsdp", "tp"): the pruned axes (kv heads with their query heads, SwiGLU
# neurons) and the embedding's vocabulary are sharded over "tp", Megatron style; every
# weight's largest other axis over "fsdp". Used by tests/test_llama_sharding.py.
TP_MESH_SHAPE = (2, 4)  # fsdp, tp


def tp_mesh(axis_type, shape=TP_MESH_SHAPE):
    """A ``("fsdp", "tp")`` mesh of ``shape`` with both axes of ``axis_type``."""
    return jax.make_mesh(shape, ("fsdp", "tp"), axis_types=(axis_type, axis_type))


tp_specs = hj.tensor_parallel_specs  # the library's rule (hesso_jax/sharding.py)


def put_host(mesh, tree, specs):
    """`put` built from host slices (``make_array_from_callback``: nothing compiled)."""
    def one(a, s):
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, NamedSharding(mesh, s),
                                            lambda idx: host[idx])

    return jax.tree.map(one, tree, specs)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as the module ``benchmarks_<name>``, with ``benchmarks/`` on
    ``sys.path`` while it loads (the scripts import their siblings, `common`, `llm`)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"benchmarks_{name}",
                                                      BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module
