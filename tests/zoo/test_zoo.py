"""Model zoo: discovered groups against hand-derived counts, exact surgery, HESSO + shrink.

For every model of `ZOO` (see models.py for the derivations):

(a) ``hj.discover_groups`` finds exactly the hand-derived number of groups and family sizes;
(b) with a seeded random subset of groups zeroed (members only), ``hj.shrink_model`` (or
    ``hj.shrink`` for the pure-function linen model) computes what the masked model does,
    with fewer parameters, and discovery on the small model finds the kept sizes;
(c) the shrunk model runs under ``nnx.jit`` (every forward here is jitted);
(d) a few HESSO steps through ``nnx.Optimizer`` prune exactly K groups, and the shrunk
    model computes what the pruned model does (eval mode for BatchNorm models, so the
    running statistics are exercised).
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hesso_jax as hj

from .models import ZOO, LinenCase, make_rngs

NAMES = list(ZOO)
RTOL = 1e-5
HESSO_STEPS = 6          # warm-up 1 + 2 periods of 2 steps + 1 fine-tuning step
K_FRACTION = 0.3


# ------------------------------------------------------------------------ helpers
@functools.cache
def _built(name):
    """The freshly built model of ``name`` (built once; copies are handed out)."""
    case = ZOO[name]
    built = case.build(make_rngs(0))
    return built if case.pure else nnx.split(built)


def build(name):
    """An independent copy of the zoo model ``name`` (train mode)."""
    built = _built(name)
    if ZOO[name].pure:
        return LinenCase(built.module, built.params)
    graphdef, state = built
    # new Variable objects around the same (immutable) arrays: copies share nothing
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))


def example(name, seed=0):
    return ZOO[name].example_input(100 + seed)


def discover(name, model, args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if ZOO[name].pure:
            groups = hj.discover_groups(model.fn, model.params, *args)
        else:
            groups = hj.discover_groups(model, *args)
    return groups, [str(w.message) for w in caught]


@functools.cache
def discovered(name):
    """Groups discovered on the original model (cached: discovery does not mutate)."""
    return discover(name, build(name), example(name))


def describe(groups):
    lines = []
    for fam in groups.families:
        members = ", ".join(f"{hj.groups.format_path(m.path)}@{m.axis}"
                            + (f"/b{m.block}" if m.block > 1 else "")
                            + (f"+{m.offset}" if m.offset else "") for m in fam.members)
        lines.append(f"  {fam.name or '?'}: size {fam.size}: {members}")
    return "\n".join(lines)


def n_params(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def param_count(model):
    if isinstance(model, LinenCase):
        return n_params(model.params)
    return n_params(nnx.state(model, nnx.Param))


def has_batchnorm(model):
    return any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(model))


def random_keep(groups, seed):
    """``bool[G]``: per family at least one group kept and at least one removed."""
    rng = np.random.default_rng(seed)
    keep = rng.random(groups.num_groups) < 0.5
    for fam, start in zip(groups.families, groups.starts, strict=True):
        seg = keep[start:start + fam.size]
        if fam.size > 1 and seg.all():
            seg[rng.integers(fam.size)] = False
        if not seg.any():
            seg[rng.integers(fam.size)] = True
    return keep


@functools.partial(jax.jit, static_argnums=1)
def _masked(params, groups, keep):
    mask = groups.broadcast(keep.astype(jnp.float32), params, fill=1.0)
    return jax.tree.map(lambda p, m: p * m.astype(p.dtype), params, mask)


def masked(params, groups, keep):
    """``params`` with the member slices of the groups not in ``keep`` multiplied by 0."""
    return _masked(params, groups, jnp.asarray(keep))


@functools.partial(jax.jit, static_argnums=0)
def _nonzero_counts(groups, params):
    return groups.nonzero_counts(params)


def zero_groups(groups, params):
    """``bool[G]``: groups whose members are exactly zero (one compiled reduction)."""
    return np.asarray(_nonzero_counts(groups, params)) == 0


def random_target(shape):
    return jnp.asarray(np.random.default_rng(3).normal(size=shape), jnp.float32)


def assert_close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, what
    assert np.all(np.isfinite(want)), what
    scale = max(float(np.abs(want).max()), 1e-6)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale, err_msg=what)


@nnx.jit
def forward(model, *args):
    return model(*args)


@nnx.jit
def train_step(model, optimizer, args, target):
    def loss(m):
        return jnp.mean((m(*args).astype(jnp.float32) - target) ** 2)

    optimizer.update(model, nnx.grad(loss)(model))


apply_small = jax.jit(LinenCase.apply)


# ------------------------------------------------------------------------ (a) counts
@pytest.mark.parametrize("name", NAMES)
def test_discovered_group_count(name):
    case = ZOO[name]
    groups, caught = discovered(name)
    sizes = tuple(sorted(f.size for f in groups.families))
    msg = (f"{name}: discovered G={groups.num_groups} families {sizes}, expected "
           f"G={case.expected_num_groups} families {case.expected_families}\n"
           f"{describe(groups)}\nwarnings: {caught}\nderivation: {case.notes}")
    assert (groups.num_groups, sizes) == (case.expected_num_groups,
                                          case.expected_families), msg
    model = build(name)
    if case.pure:
        groups.validate(model.params)
    else:
        groups.validate(nnx.state(model))                     # dependents (BN stats) too
        groups.validate(nnx.state(model, nnx.Param), dependents="present")


# ------------------------------------------------- (b) + (c) masked == shrunk under jit
@functools.cache
def shrunk(name):
    """``(masked model or LinenCase, shrunk model or LinenCase, keep, args)`` for ``name``.

    A seeded random subset of groups is zeroed (members only; every family keeps at least
    one group and, where it has two, loses one).
    """
    case = ZOO[name]
    groups, _ = discovered(name)
    seed = NAMES.index(name)
    keep = random_keep(groups, seed)
    model = build(name)
    before = param_count(model)
    if case.pure:
        params = masked(model.params, groups, keep)
        np.testing.assert_array_equal(zero_groups(groups, params), ~keep)
        small, plan = hj.shrink(params, groups)
        np.testing.assert_array_equal(plan.keep_mask(), keep)
        model = LinenCase(model.module, params)
        small = LinenCase(type(model.module).from_params(small), small)
    else:
        nnx.update(model, masked(nnx.state(model, nnx.Param), groups, keep))
        np.testing.assert_array_equal(zero_groups(groups, nnx.state(model, nnx.Param)), ~keep)
        small = hj.shrink_model(model, groups)
        assert param_count(model) == before          # the original is not modified
    return model, small, keep, example(name, seed)


@pytest.mark.parametrize("name", NAMES)
def test_shrink_matches_masked(name):
    model, small, _, args = shrunk(name)
    assert param_count(small) < param_count(model)
    if ZOO[name].pure:
        want = jax.jit(model.fn)(model.params, *args)
        got = apply_small(small.params, *args)
    else:
        # both in train mode: BatchNorm normalises with batch statistics (and updates
        # the running ones), which must agree on the kept channels
        want = forward(model, *args)
        got = forward(small, *args)                  # (c): the shrunk model under jit
    assert_close(got, want, f"{name}: shrunk vs masked")


@pytest.mark.parametrize("name", NAMES)
def test_rediscover_shrunk(name):
    """Discovery is shape-generic: on the shrunk model it finds the kept groups, family by
    family. A family left with a single group is the exception: JAX squeezes, broadcasts
    and reshapes size-1 axes freely, so discovery blocks a class of length 1 wherever its
    axis is dropped or broadcast (conservative, never a wrong group); such a family may
    or may not be found again, and may leave room for a family it used to win the
    outer-axis tie-break against (the value projection's head_dim once one head is left:
    exact, since only query/key head_dim enter the 1/sqrt(d) scale)."""
    groups, _ = discovered(name)
    _, small, keep, args = shrunk(name)
    small_groups, caught = discover(name, small, args)
    kept = [int(keep[s:s + f.size].sum())
            for f, s in zip(groups.families, groups.starts, strict=True)]
    got = sorted(f.size for f in small_groups.families)
    singles = [k for k in kept if k == 1]
    extra = list(got)
    for k in kept:
        if k > 1:
            assert k in extra, (
                f"{name}: kept per family {kept}, rediscovered:\n{describe(small_groups)}\n"
                f"original:\n{describe(groups)}\nwarnings: {caught}")
            extra.remove(k)
    # each family left with one group may vanish and make room for at most one other
    assert len(extra) <= len(singles), (
        f"{name}: kept per family {kept}, rediscovered:\n{describe(small_groups)}\n"
        f"original:\n{describe(groups)}\nwarnings: {caught}")


# ------------------------------------------------------------ (d) HESSO, then shrink
@pytest.mark.parametrize("name", NAMES)
def test_hesso_then_shrink(name):
    case = ZOO[name]
    groups, _ = discovered(name)
    args = example(name, 7)
    model = build(name)
    K = hj.groups.resolve_count(K_FRACTION, groups.num_groups)
    tx = optax.chain(optax.adam(1e-2),
                     hj.hesso(groups, K_FRACTION, 2, 2, warmup_steps=1))

    if case.pure:
        params = model.params
        out = jax.eval_shape(model.fn, params, *args)
        target = random_target(out.shape)
        state = tx.init(params)

        @jax.jit
        def step(params, state):
            grads = jax.grad(lambda p: jnp.mean((model.fn(p, *args) - target) ** 2))(params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        for _ in range(HESSO_STEPS):
            params, state = step(params, state)
        opt_state, pruned_params = state, params
    else:
        out = nnx.eval_shape(lambda m: m(*args), model)
        target = random_target(out.shape)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        for _ in range(HESSO_STEPS):
            train_step(model, optimizer, args, target)
        opt_state, pruned_params = optimizer.opt_state, nnx.state(model, nnx.Param)

    status = hj.hesso_status(opt_state)
    assert status.phase == "finetune"
    zero = zero_groups(groups, pruned_params)
    assert status.num_pruned == K and zero.sum() == K
    np.testing.assert_array_equal(status.pruned, zero)

    if case.pure:
        small, plan = hj.shrink(pruned_params, groups)
        assert plan.num_removed == K
        want = jax.jit(model.fn)(pruned_params, *args)
        assert_close(apply_small(small, *args), want, f"{name}: shrunk vs HESSO-pruned")
        assert n_params(small) < n_params(pruned_params)
        return

    small = hj.shrink_model(model, groups)
    assert param_count(small) < param_count(model)
    if has_batchnorm(model):
        # eval mode: the running statistics gathered during the HESSO steps are used
        # (without BatchNorm the mode changes nothing here; staying in train mode reuses
        # the compiled forward of test_shrink_matches_masked)
        model.eval()
        small.eval()
    want = forward(model, *args)
    assert_close(forward(small, *args), want, f"{name}: shrunk vs HESSO-pruned")
