"""Flax linen modules: `hj.shrink_model(module, groups, x, variables=...)` clones them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hesso_jax as hj

from .common import assert_close, check_sound, discover, sizes


class CNN(nn.Module):
    """Conv c1 → relu → Conv c2 (2 feature groups) → relu → mean → Dense hidden → Dense 5."""

    c1: int = 8
    c2: int = 12
    hidden: int = 16

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(self.c1, (3, 3))(x))
        h = nn.relu(nn.Conv(self.c2, (3, 3))(h))
        h = nn.relu(nn.Dense(self.hidden)(jnp.mean(h, axis=(1, 2))))
        return nn.Dense(5)(h)


class Attention(nn.Module):
    """Dense d → relu → MultiHeadDotProductAttention(heads, qkv) → mean → Dense 3."""

    d: int = 16
    heads: int = 4
    qkv: int = 16
    out: int = 16

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.d)(x))
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.qkv,
                                            out_features=self.out)(h)
        return nn.Dense(3)(jnp.mean(h, axis=1))


CASES = {
    # c1 8, c2 12, hidden 16; Dense 5 is the output
    "cnn": (CNN, (2, 6, 6, 3), [8, 12, 16]),
    # d: Dense's 16 outputs (the query/key/value in-channels are dependents); 4 heads;
    # the attention's 16 outputs (out_features) feed only a mean and Dense 3
    "attention": (Attention, (2, 5, 8), [16, 4, 16]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_linen_model(name):
    cls, shape, expected = CASES[name]
    module = cls()
    x = jnp.asarray(np.random.default_rng(3).normal(size=shape), jnp.float32)
    variables = module.init(jax.random.key(0), x)
    groups, caught = discover(module.apply, variables, x)
    assert sizes(groups) == sorted(expected), (groups.families, caught)
    masked, plan = check_sound(module.apply, variables, groups, (x,), seed=4)
    small_module, small_vars = hj.shrink_model(module, groups, x, variables=masked)
    assert_close(small_module.apply(small_vars, x), module.apply(masked, x), name)
    n_small = sum(a.size for a in jax.tree.leaves(small_vars))
    assert n_small < sum(a.size for a in jax.tree.leaves(variables))
    fields = {f: getattr(small_module, f) for f in ("c1", "c2", "hidden", "d", "heads",
                                                    "qkv", "out") if hasattr(small_module, f)}
    assert fields != {f: getattr(module, f) for f in fields}
    hj.check_shrinkable(module, groups, x, variables=variables)


def test_linen_constant_sizes_are_refused():
    class Fixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))

    module, x = Fixed(), jnp.ones((2, 4))
    variables = module.init(jax.random.key(0), x)
    groups, _ = discover(module.apply, variables, x)
    with pytest.raises(ValueError, match=r"cannot resize the linen module Fixed: "
                                         r"Dense.features = \d+ at 'Dense_1'"):
        hj.shrink_model(module, groups, x, variables=check_sound(
            module.apply, variables, groups, (x,))[0])
    with pytest.raises(ValueError, match="needs an example input"):
        hj.shrink_model(module, hj.Groups.from_families(groups.families),
                        variables=variables)
