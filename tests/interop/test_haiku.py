"""Haiku: modules live inside the transformed function, so there is no module to resize.

The supported path: write the function so that it takes its sizes from the parameter
shapes (or from arguments), shrink the params with `hj.shrink`, and rebuild the function
with the sizes read from the shrunk params.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

hk = pytest.importorskip("haiku", reason="the interop extra (dm-haiku) is not installed")

import hesso_jax as hj  # noqa: E402

from .common import assert_close, check_sound, discover, sizes  # noqa: E402


def mlp(widths):
    return hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([*widths, 3])(x)))


def cnn(c1, c2):
    def forward(x):
        h = jax.nn.relu(hk.Conv2D(c1, 3)(x))
        h = jax.nn.relu(hk.Conv2D(c2, 3)(h))
        return hk.Linear(3)(jnp.mean(h, axis=(1, 2)))
    return hk.without_apply_rng(hk.transform(forward))


CASES = {
    # hidden 12 and 8; the 3 outputs are the model's
    "mlp": (lambda: mlp((12, 8)), (2, 8), [12, 8],
            lambda p: mlp((p["mlp/~/linear_0"]["w"].shape[1],
                           p["mlp/~/linear_1"]["w"].shape[1]))),
    # conv 8 and conv 6 channels
    "cnn": (lambda: cnn(8, 6), (2, 6, 6, 3), [8, 6],
            lambda p: cnn(p["conv2_d"]["w"].shape[-1], p["conv2_d_1"]["w"].shape[-1])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_haiku_model(name):
    build, shape, expected, rebuild = CASES[name]
    net = build()
    x = jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)
    params = net.init(jax.random.key(0), x)
    groups, caught = discover(net.apply, params, x)
    assert sizes(groups) == sorted(expected), (groups.families, caught)
    masked, _ = check_sound(net.apply, params, groups, (x,))
    small, plan = hj.shrink(masked, groups)
    assert plan.num_removed > 0
    # the documented path: rebuild the function with the sizes the shrunk params have
    assert_close(jax.jit(rebuild(small).apply)(small, x), net.apply(masked, x), name)
    with pytest.raises(TypeError, match="for a parameter tree use hj.shrink"):
        hj.shrink_model(net, groups)
