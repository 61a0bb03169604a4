"""Equinox models: discovery counts, soundness, and `hj.shrink_model` (static fields)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

eqx = pytest.importorskip("equinox", reason="the interop extra (equinox) is not installed")

import hesso_jax as hj  # noqa: E402

from .common import assert_close, check_sound, discover, sizes  # noqa: E402

KEYS = jax.random.split(jax.random.key(0), 8)


class CNN(eqx.Module):
    """Conv2d 3->8 → GroupNorm(4 groups of 2) → relu → Conv2d 8->6 (groups=2) → relu →
    mean → Linear 6->3."""

    conv: eqx.nn.Conv2d
    gn: eqx.nn.GroupNorm
    conv2: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self):
        self.conv = eqx.nn.Conv2d(3, 8, 3, padding=1, key=KEYS[0])
        self.gn = eqx.nn.GroupNorm(4, 8)
        self.conv2 = eqx.nn.Conv2d(8, 6, 3, padding=1, key=KEYS[1])
        self.head = eqx.nn.Linear(6, 3, key=KEYS[2])

    def __call__(self, x):
        h = jax.nn.relu(self.gn(self.conv(x)))
        return self.head(jnp.mean(jax.nn.relu(self.conv2(h)), axis=(1, 2)))


class Attention(eqx.Module):
    """MultiheadAttention(4 heads, 16) on a token sequence → mean → Linear 16->3."""

    attn: eqx.nn.MultiheadAttention
    head: eqx.nn.Linear

    def __init__(self):
        self.attn = eqx.nn.MultiheadAttention(4, 16, key=KEYS[3])
        self.head = eqx.nn.Linear(16, 3, key=KEYS[4])

    def __call__(self, x):
        return self.head(jnp.mean(self.attn(x, x, x), axis=0))


class GRU(eqx.Module):
    """GRUCell(4, 6) scanned over time from a zero state → Linear 6->3."""

    cell: eqx.nn.GRUCell
    head: eqx.nn.Linear

    def __init__(self):
        self.cell = eqx.nn.GRUCell(4, 6, key=KEYS[5])
        self.head = eqx.nn.Linear(6, 3, key=KEYS[6])

    def __call__(self, xs):
        h0 = jnp.zeros((self.cell.weight_hh.shape[1],))
        h, _ = jax.lax.scan(lambda h, x: (self.cell(x, h), None), h0, xs)
        return self.head(h)


def _x(*shape):
    return jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)


# (model, example input, hand-derived family sizes)
CASES = {
    # hidden widths 12 and 12 (input 8 and output 2 are the model's)
    "mlp": (lambda: eqx.nn.MLP(8, 2, 12, 2, key=KEYS[7]), _x(8), [12, 12]),
    # conv: 4 GroupNorm groups of 2 channels (a partial group changes its statistics);
    # conv2: 6 channels; Linear outputs are the model's
    "cnn": (CNN, _x(3, 6, 6), [4, 6]),
    # 4 heads (query/key/value rows in blocks of qk_size 4); output_proj's 16 channels
    # reach only a mean and the Linear head
    "mha": (Attention, _x(5, 16), [4, 16]),
    # 6 hidden units (each in the r, z, n gate rows), zero initial state
    "gru": (GRU, _x(5, 4), [6]),
}


def split(model):
    params, static = eqx.partition(model, eqx.is_array)
    return params, lambda p, *a: eqx.combine(p, static)(*a)


@pytest.mark.parametrize("name", list(CASES))
def test_equinox_model(name):
    build, x, expected = CASES[name]
    model = build()
    params, fn = split(model)
    groups, caught = discover(fn, params, x)
    assert sizes(groups) == sorted(expected), (groups.families, caught)
    masked, plan = check_sound(fn, params, groups, (x,), seed=len(name))
    masked_model = eqx.combine(masked, eqx.partition(model, eqx.is_array)[1])
    small = hj.shrink_model(masked_model, groups, x)       # verified on x
    assert_close(small(x), masked_model(x), f"{name}: shrunk vs masked")
    n = sum(a.size for a in jax.tree.leaves(eqx.filter(small, eqx.is_array)))
    assert n < sum(a.size for a in jax.tree.leaves(params))
    hj.check_shrinkable(model, groups, x)


def test_equinox_static_fields():
    """hj.shrink on the array half of eqx.partition fixes num_heads (stale: wrong output)."""
    model = Attention()
    params, fn = split(model)
    x = CASES["mha"][1]
    groups, _ = discover(fn, params, x)
    masked, _ = check_sound(fn, params, groups, (x,))
    small_params, plan = hj.shrink(masked, groups)
    attn = small_params.attn
    assert attn.num_heads < 4 and plan.num_removed > 0
    assert attn.num_heads * attn.qk_size == attn.query_proj.weight.shape[0]
    assert attn.query_proj.out_features == attn.query_proj.weight.shape[0]
    # the stale static half no longer combines with it: an error, not a wrong model
    with pytest.raises(ValueError, match="pytree"):
        eqx.combine(small_params, eqx.partition(model, eqx.is_array)[1])


def test_equinox_group_norm_partial_group_is_refused():
    model = CNN()
    params, fn = split(model)
    x = CASES["cnn"][1]
    conv = hj.GroupFamily(8, (hj.Member(("conv", "weight"), 0), hj.Member(("conv", "bias"), 0),
                              hj.Member(("gn", "weight"), 0), hj.Member(("gn", "bias"), 0)),
                          (hj.Member(("conv2", "weight"), 1),), name="conv")
    groups = hj.Groups.from_families([conv])
    with pytest.raises(ValueError, match=r"check_shrinkable: .*GroupNorm at 'gn'.*whole "
                                         r"normalisation groups"):
        hj.check_shrinkable(model, groups, x)
