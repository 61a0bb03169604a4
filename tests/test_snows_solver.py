"""SNOWS solver (hesso_jax.newton): one Newton-CG-Armijo iteration, two loop drivers.

The host driver (Python loops, concrete values) and the jit driver (``lax.while_loop``) must
give the same iterates, masks and losses on the same problems (issue 17 item 1), including
problems whose line search meets a non-finite trial point: both keep halving, and stop the
Newton loop on the last finite iterate when no finite Armijo point exists.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hesso_jax as hj
from hesso_jax.jaxpr.capture import trace
from hesso_jax.newton import HOST, JIT, MAX_TRIALS, Oracle, armijo, cg, newton_cg
from hesso_jax.snows import layer_objective, masked_hvp, nm_mask

_A = jnp.array([3.0, 1.0, 2.0, 0.5])
_TARGET = jnp.array([2.0, -1.0, 3.0, 1.0])


def _wall_oracle(wall: float) -> Oracle:
    """A separable quadratic whose loss is NaN once ``w_0 > wall`` (optimum ``w_0 = 2``)."""

    def loss(w):
        return jnp.where(w[0] > wall, jnp.nan, jnp.sum(_A * (w - _TARGET) ** 2))

    return Oracle(loss, lambda w: 2 * _A * (w - _TARGET), lambda w, v: 2 * _A * v)


def _both(oracle, w0, mask, *args):
    host = newton_cg(HOST, oracle, w0, mask, *args)
    jit = jax.jit(lambda w, m: newton_cg(JIT, oracle, w, m, *args))(w0, mask)
    return host, jit


def _assert_same(host, jit):
    np.testing.assert_allclose(np.asarray(host.w), np.asarray(jit.w), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(host.loss_end), float(jit.loss_end), rtol=1e-5,
                               atol=1e-7)
    for field in ("newton_steps", "cg_iterations", "nonfinite_trials"):
        assert int(getattr(host, field)) == int(getattr(jit, field)), field


# ------------------------------------------------------------------------ line search
@pytest.mark.parametrize("driver", [HOST, JIT], ids=lambda d: d.name)
def test_armijo_rejects_nonfinite_trial_and_keeps_halving(driver):
    loss = _wall_oracle(1.5).loss
    w = jnp.zeros(4)
    d = _TARGET - w                                   # the Newton step: w_0 -> 2 > wall
    f = loss(w)
    slope = jnp.vdot(2 * _A * (w - _TARGET), d)
    def run(w):
        return armijo(driver, loss, w, f, d, slope)

    ls = jax.jit(run)(w) if driver is JIT else run(w)
    assert bool(ls.accepted) and float(ls.t) == 0.5 and int(ls.nonfinite) == 1
    assert float(ls.loss) == pytest.approx(float(loss(w + 0.5 * d)))


def test_armijo_tries_nothing_without_descent():
    loss = _wall_oracle(10.0).loss
    for slope in (0.0, 1.0, jnp.nan):
        ls = armijo(HOST, loss, jnp.zeros(4), loss(jnp.zeros(4)), jnp.ones(4), slope)
        assert int(ls.trials) == 0 and not bool(ls.accepted)


# ------------------------------------------------------------------------ Newton loop
def test_drivers_agree_through_a_nan_wall():
    """Old behaviour: jit stopped at the first NaN trial (0 steps), host kept halving."""
    host, jit = _both(_wall_oracle(1.5), jnp.zeros(4), jnp.ones(4, bool), 2, 10, 1e-6, 0.0)
    _assert_same(host, jit)
    # step 1: t = 1 hits the wall (w_0 = 2), t = 1/2 is accepted (w_0 = 1); step 2 the same
    # from w_0 = 1 (w_0 = 1.5). Each step halves the distance to the optimum.
    assert int(host.newton_steps) == 2 and int(host.nonfinite_trials) == 2
    np.testing.assert_allclose(np.asarray(host.w), [1.5, -0.75, 2.25, 0.75], atol=1e-6)


def test_no_finite_armijo_point_stops_on_last_finite_iterate():
    # NaN everywhere except on the starting point: every trial is rejected.
    w0 = jnp.zeros(4)

    def loss(w):
        return jnp.where(jnp.any(w != 0), jnp.nan, jnp.sum((w - 1.0) ** 2))

    oracle = Oracle(loss, lambda w: 2 * (w - 1.0), lambda w, v: 2 * v)
    host, jit = _both(oracle, w0, jnp.ones(4, bool), 5, 10, 1e-6, 0.0)
    _assert_same(host, jit)
    assert int(host.newton_steps) == 0 and int(host.nonfinite_trials) == MAX_TRIALS
    np.testing.assert_array_equal(np.asarray(host.w), np.asarray(w0))
    assert float(host.loss_end) == float(host.loss_start) == 4.0


def test_nan_start_returns_start_for_both_drivers():
    oracle = _wall_oracle(-1.0)                        # the start w = 1 is past the wall
    host, jit = _both(oracle, jnp.ones(4), jnp.ones(4, bool), 3, 10, 1e-6, 0.0)
    for r in (host, jit):
        assert int(r.newton_steps) == 0 and np.isnan(float(r.loss_end))
        np.testing.assert_array_equal(np.asarray(r.w), np.ones(4))


def test_mask_is_respected_and_negative_curvature_falls_back_to_steepest_descent():
    a = jnp.array([[1.0, 0.0], [0.0, -1.0]])
    x, k = cg(HOST, lambda v: a @ v, jnp.array([0.0, 1.0]), 1e-6, 10)
    assert int(k) == 1 and [float(v) for v in x] == [0.0, 1.0]   # first direction: b
    host, jit = _both(_wall_oracle(10.0), jnp.ones(4), jnp.array([True, False, True, False]),
                      2, 10, 1e-6, 1e-4)
    _assert_same(host, jit)
    assert float(host.w[1]) == 0.0 and float(host.w[3]) == 0.0


# ------------------------------------------------------------------------ on SNOWS layers
def _wall_problem(seed: int = 0, pad: float = 0.01):
    """Two layers whose objective is NaN once a first-layer pre-activation passes a wall.

    The wall sits just above every dense and masked-start pre-activation, so the masked
    start is finite and re-fitting the kept weights pushes the full Newton step past it.
    """
    ks = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.uniform(ks[0], (64, 8))
    params = {"w1": jax.random.normal(ks[1], (8, 4)), "w2": jax.random.normal(ks[2], (4, 3))}
    start = params["w1"] * nm_mask(jnp.abs(params["w1"]), (0,), 2, 4)
    z, zs = np.asarray(x @ params["w1"]), np.asarray(x @ start)
    wall = float(max(z.max(), zs.max()) + pad * (z.max() - z.min()))

    def fn(p, x):
        z = x @ p["w1"]
        return jnp.where(z < wall, jnp.tanh(z), jnp.nan) @ p["w2"]

    return fn, params, x


def test_wall_problem_has_a_nan_trial_and_both_drivers_step_through_it():
    fn, params, x = _wall_problem()
    prog = trace(fn, params, x)
    seg = prog.segment(0, [o.out_key for o in prog.downstream_ops(0)])
    leaves = jax.tree.leaves(params)
    bnd = [v[None] for v in prog.capture_all(leaves, [x], seg.boundary)]
    tgt = [v[None] for v in prog.capture_all(leaves, [x], seg.targets)]
    loss, hvp = layer_objective(prog, seg), masked_hvp(prog, seg)
    mask = nm_mask(jnp.abs(params["w1"]), (0,), 2, 4)
    oracle = Oracle(jax.jit(lambda w: loss(w, bnd, tgt)),
                    jax.jit(lambda w: jax.grad(loss)(w, bnd, tgt)),
                    jax.jit(lambda w, v: hvp(w, mask, v, bnd, tgt)))
    host, jit = _both(oracle, params["w1"], mask, 3, 50, 1e-6, 1e-4)
    for r in (host, jit):
        assert int(r.nonfinite_trials) >= 1 and int(r.newton_steps) >= 1
        assert float(r.loss_end) < float(r.loss_start)
    np.testing.assert_allclose(np.asarray(host.w), np.asarray(jit.w), rtol=1e-3, atol=1e-4)
    assert float(host.loss_end) == pytest.approx(float(jit.loss_end), rel=1e-3)


def _two_layer(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def _problems():
    ks = jax.random.split(jax.random.key(11), 4)
    x = jax.random.normal(ks[0], (48, 8))
    two = {"w1": jax.random.normal(ks[1], (8, 8)), "b1": 0.1 * jnp.ones(8),
           "w2": jax.random.normal(ks[2], (8, 4))}
    return {
        "dense-2:4-K0": (lambda p, x: x @ p["w"], {"w": two["w1"]}, x,
                         dict(sparsity="2:4", K=0, cg_tol=1e-6, damping=0.0)),
        "tanh-unstructured-K1-batches": (_two_layer, two, x,
                                         dict(sparsity=0.5, K=1, batch_size=16)),
        "tanh-2:4-K1-gauss-newton": (_two_layer, two, x,
                                     dict(sparsity="2:4", K=1, gauss_newton=True)),
        "nan-wall-2:4-K1": (*_wall_problem(), dict(sparsity="2:4", K=1, layers=[("w1",)])),
    }


@pytest.mark.parametrize("name", list(_problems()))
def test_snows_host_and_jit_loops_agree(name):
    fn, params, x, kw = _problems()[name]
    kw = dict(newton_steps=3, cg_max_iters=50, **kw)
    (ph, rh), (pj, rj) = (hj.snows(fn, params, x, loop=loop, **kw) for loop in ("host", "jit"))
    assert [lr.path for lr in rh.layers] == [lr.path for lr in rj.layers]
    for lh, lj in zip(rh.layers, rj.layers, strict=True):
        assert lh.newton_steps == lj.newton_steps and lh.newton_steps >= 1
        assert abs(lh.cg_iterations - lj.cg_iterations) <= lh.newton_steps
        assert lh.objective_before == pytest.approx(lj.objective_before, rel=1e-5)
        assert lh.objective_after == pytest.approx(lj.objective_after, rel=1e-3, abs=1e-7)
        assert lh.objective_after < lh.objective_before
        assert lh.sparsity == lj.sparsity
    for a, b in zip(jax.tree.leaves(ph), jax.tree.leaves(pj), strict=True):
        np.testing.assert_array_equal(np.asarray(a) == 0, np.asarray(b) == 0)   # masks
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)
