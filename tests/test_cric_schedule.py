"""benchmarks/cric_schedule.py: the interleaved runs are the runs, the cycles are CRIC's.

The benchmark trains Adam, greedy HESSO and HESSO-CRIC one step of each in turn and reads
CRIC's corrective cycles at every period start; these properties check that interleaving
does not mix the runs (each ends bit-exactly where its own plain loop ends), that the
cycles recorded are those a plain HESSO-CRIC loop reports at the same steps, and that the
summary's counts and ratios are what they say.
"""

import jax
import numpy as np
import pytest
from helpers import load_benchmark, mlp_data, mlp_groups, mlp_loss, mlp_params

import hesso_jax as hj

HIDDEN, TOTAL, SCHEDULE = 32, 16, (4, 3, 3)  # T_w, P, T_p: starts at steps 4, 7, 10


@pytest.fixture(scope="module")
def cs():
    return load_benchmark("cric_schedule")


@pytest.fixture(scope="module")
def model(cs):
    x, y = mlp_data(16, batches=TOTAL)
    return cs.cric_cost.Model(
        "MLP", mlp_params(6, HIDDEN, 3, seed=1), (x[0], y[0]), lambda p, b: mlp_loss(p, *b),
        mlp_groups(HIDDEN), hj.CricConfig(sample_steps=3, learning_rate=0.5),
        lambda i: (x[i], y[i]), (x[-1] + 1.0, y[-1]))


@pytest.fixture(scope="module")
def out(cs, model):
    return cs.run_schedule(model, SCHEDULE, TOTAL)


def plain_loop(cs, model, run):
    """``run`` trained alone, with the CRIC cycles read after every period start."""
    tx = cs.transformation(model, run, SCHEDULE)
    state, params, cycles = tx.init(model.params), model.params, []
    step = cs.compiled_step(model, tx, state)
    for i in range(TOTAL):
        params, state, _ = step(params, state, model.batches(i))
        if run == "cric" and i in (4, 7, 10):
            cycles.append(hj.hesso_status(state).cric_cycles)
    return params, cycles


@pytest.mark.parametrize("run", ["adam", "hesso", "cric"])
def test_interleaved_runs_are_the_plain_runs(cs, model, out, run):
    params, cycles = plain_loop(cs, model, run)
    for a, b in zip(jax.tree.leaves(out["params"][run]), jax.tree.leaves(params),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(out["walls"][run]) == TOTAL and min(out["walls"][run]) > 0
    if run == "cric":
        assert out["starts"] == [4, 7, 10]
        assert out["cycles"] == cycles
        assert max(cycles) >= 1  # the case runs corrective cycles


def test_summary(cs, model, out):
    row = cs.summarise(model, out, rounds=2)
    k = hj.groups.resolve_count(0.5, HIDDEN)
    assert row["k"] == k == int(out["pruned"]["hesso"].sum())
    for start, c in zip(row["starts"], out["cycles"], strict=True):
        assert start["gradients"] == 1 + (c + 1) * (3 - 1)
    walls = {n: np.asarray(w) for n, w in out["walls"].items()}
    assert row["amortised"]["over_hesso"] == pytest.approx(
        walls["cric"].sum() / walls["hesso"].sum())
    ordinary = np.delete(walls["cric"], [4, 7, 10])
    assert row["starts"][1]["over_ordinary"] == pytest.approx(
        walls["cric"][7] / np.median(ordinary))
    assert row["held_out_loss"]["adam"] == pytest.approx(
        float(mlp_loss(out["params"]["adam"], *model.held_out)))
    assert set(out["replay"]) == {"start 0", "start 1", "start 2", "ordinary"}
    assert all(s["replayed_over_ordinary"] > 0 for s in row["starts"])
    assert "| MLP (G=32, K=16" in cs.format_rows([row])
