"""benchmarks/cric_cost.py's trial trace: the trial-by-trial cycle is `hj.cric`'s own.

The what-if table of the CRIC period-start benchmark (other stopping rules, speculative
batching) is read off `trace_trials`; these properties make sure that trace is the cycle
`hj.cric` runs (same violating sets, cycles, selection and scores) and that the
speculation count is consistent (one trial a pass without guesses, never more passes
than trials, never more passes with a larger batch: guess ``i`` does not depend on ``B``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_benchmark, mlp_data, mlp_groups, mlp_loss, mlp_params

import hesso_jax as hj

HIDDEN, K = 32, 8
CONFIG = hj.CricConfig(sample_steps=3, learning_rate=0.5)  # 3 corrective cycles here


@pytest.fixture(scope="module")
def cc():
    return load_benchmark("cric_cost")


@pytest.fixture(scope="module")
def model(cc):
    x, y = mlp_data(32)
    return cc.Model("MLP", mlp_params(6, HIDDEN, 3, seed=1), (x, y),
                    lambda p, b: mlp_loss(p, *b), mlp_groups(HIDDEN), CONFIG)


@pytest.fixture(scope="module")
def trace(cc, model):
    return cc.trace_trials(model, K)


def test_trace_is_the_cycle_cric_runs(model, trace):
    res = hj.cric(lambda p: model.loss(p, model.batch), model.params, model.groups, K,
                  sample_steps=CONFIG.sample_steps, learning_rate=CONFIG.learning_rate)
    cycles = int(res.cycles)
    assert cycles >= 2  # the case needs corrective cycles to say anything
    assert len(trace.acc) == cycles + 1
    np.testing.assert_array_equal(trace.selected, res.redundant)
    np.testing.assert_array_equal(trace.sizes, np.asarray(res.violating_sizes)[:cycles + 1])
    # the same trial function on the same carries, compiled in another program
    np.testing.assert_allclose(trace.acc[-1], res.scores, rtol=1e-6, atol=1e-7)
    tested = trace.violating.sum(0)
    assert tested.max() == 1  # every group is tested at most once
    assert trace.violating[0].sum() == K  # the greedy trial tests K groups


def test_speculation_passes(cc, trace):
    n = len(trace.acc)
    passes = [cc.speculate(trace, K, batch) for batch in (1, 2, 4, 8)]
    assert passes[0] == n
    assert all(1 <= p <= n for p in passes)
    assert passes == sorted(passes, reverse=True)


def test_what_if_rows(cc, model, trace):
    rows = {r["setting"]: r for r in cc.what_if(trace, model, K)}
    run = rows["tolerance=0 (the run)"]
    n = len(trace.acc)
    assert (run["trials"], run["passes"], run["shared"]) == (n, n, K)
    assert run["gradients"] == CONFIG.gradient_count(n)
    keep = jnp.asarray(~trace.selected)
    zeroed = model.loss(model.groups.mask(model.params, keep), model.batch)
    assert run["zeroed_loss"] == pytest.approx(float(zeroed), rel=1e-6)
    capped = rows["max_cycles=3"]
    assert capped["trials"] == min(4, n)
    for batch in (2, 4, 8):
        spec = rows[f"speculative batch of {batch}"]
        assert spec["shared"] == K and spec["trials"] == n  # the run's own trials
        assert spec["gradients"] == 1 + (CONFIG.sample_steps - 1) * batch * spec["passes"]
    assert jax.tree.structure(model.params) == jax.tree.structure(
        model.groups.mask(model.params, keep))
