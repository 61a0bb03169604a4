"""CARN's hand-written groups: zeroing groups then shrinking leaves the output unchanged."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close_rel

import hesso_jax as hj
from hesso_jax.models.carn import CARN, pixel_shuffle

C = 8


def random_model(cascade, seed=1):
    """(graphdef, numpy state, groups) of CARN(C, 3) with N(0, 0.3²) entries everywhere.

    Built abstractly (no initialiser runs) and filled on the host; non-zero biases matter:
    zero biases would hide a forgotten bias member.
    """
    model = nnx.eval_shape(lambda: CARN(C, 3, cascade=cascade, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(a.dtype),
                         abstract)
    return graphdef, state, model.groups()


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


@functools.partial(jax.jit, static_argnums=0)
def mask_state(groups, state, keep):
    mask = groups.broadcast(keep.astype(jnp.float32), state, fill=1.0)
    return jax.tree.map(lambda a, m: a * m, state, mask)


def masked(groups, state, keep):
    return jax.tree.map(np.asarray, mask_state(groups, state, jnp.asarray(keep)))


def test_pixel_shuffle_layout():
    # Channel 4c + 2i + j of pixel (h, w) lands at (2h + i, 2w + j) of output channel c.
    x = np.arange(2 * 3 * 5 * 8, dtype=np.float32).reshape(2, 3, 5, 8)
    y = np.asarray(pixel_shuffle(jnp.asarray(x)))
    assert y.shape == (2, 6, 10, 2)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                np.testing.assert_array_equal(y[:, i::2, j::2, c], x[..., 4 * c + 2 * i + j])


@pytest.mark.parametrize("cascade", [True, False])
def test_masked_equals_shrunk(cascade):
    graphdef, state, groups = random_model(cascade)
    groups.validate(state)
    G = groups.num_groups
    assert G == C * (8 if cascade else 5)
    x = jnp.asarray(np.random.default_rng(2).uniform(size=(2, 9, 7, 1)), jnp.float32)
    full = forward(graphdef, state, x)
    rng = np.random.default_rng(3)
    for trial in range(2):
        keep = rng.random(G) > 0.5
        # Every family loses at least one group and keeps at least one.
        for start in groups.starts:
            keep[start + trial] = False
            keep[start + trial + 1] = True
        small_in = masked(groups, state, keep)
        np.testing.assert_array_equal(groups.zero_groups(small_in), ~keep)
        small, plan = hj.shrink(small_in, groups)
        assert plan.num_removed == int((~keep).sum())
        y_masked = forward(graphdef, small_in, x)
        y_small = forward(graphdef, small, x)
        assert y_small.shape == (2, 18, 14, 1)
        assert_close_rel(y_small, y_masked)
        # The masking matters (the comparison is not vacuous) and the model did shrink.
        assert float(jnp.max(jnp.abs(y_masked - full))) > 1e-3
        assert (sum(np.size(a) for a in jax.tree.leaves(small))
                < sum(np.size(a) for a in jax.tree.leaves(state)))


def test_upsample_family_is_blocks_of_four_shuffled_channels():
    # Zeroing upsample group c zeroes conv channels [4c, 4c+4), i.e. shuffled channel c.
    graphdef, state, groups = random_model(True)
    fam = [f.name for f in groups.families].index("upsample")
    assert {m.path: m.block for m in groups.families[fam].members} == {
        ("upsample", "kernel"): 4, ("upsample", "bias"): 4}
    keep = np.ones(groups.num_groups, bool)
    keep[groups.starts[fam] + 2] = False
    small_in = masked(groups, state, keep)
    h = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 5, C)), jnp.float32)
    u = np.asarray(jax.jit(lambda s: pixel_shuffle(nnx.merge(graphdef, s).upsample(h)))(
        small_in))
    assert np.all(u[..., 2] == 0)
    assert np.all(np.abs(np.delete(u, 2, axis=-1)).sum((0, 1, 2)) > 0)


@pytest.mark.parametrize("kernel,padding", [(3, "SAME"), (1, "SAME"), (3, ((2, 0), (1, 1))),
                                            (3, "VALID")])
def test_conv_nhwc_matches_lax_values_and_gradients(kernel, padding):
    from hesso_jax.models.carn import conv_nhwc

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 5, 3)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((kernel, kernel, 3, 4)), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")

    def ref(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=dn)

    def ours(x, k):
        return conv_nhwc(x, k, (1, 1), padding, dimension_numbers=dn)

    assert_close_rel(ours(x, k), ref(x, k))
    w = jnp.asarray(rng.standard_normal(ref(x, k).shape), jnp.float32)
    g_ref = jax.grad(lambda x, k: jnp.sum(w * ref(x, k)), argnums=(0, 1))(x, k)
    # Inside lax.cond, where XLA:CPU would otherwise run slow transposed convolutions.
    g_ours = jax.jit(lambda x, k: jax.lax.cond(
        True, lambda: jax.grad(lambda x, k: jnp.sum(w * ours(x, k)), argnums=(0, 1))(x, k),
        lambda: (x, k)))(x, k)
    for a, b in zip(g_ours, g_ref, strict=True):
        assert_close_rel(a, b)
