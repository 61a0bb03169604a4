"""Benchmark helpers: `step_cost.py --loop` times ordinary steps only; `fixed_cost.py`'s thunk
count; `ab_hesso.py` loads a revision of hesso.py beside the current one."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import load_benchmark

from hesso_jax.hesso import HessoState


@pytest.fixture(scope="module")
def step_cost():
    return load_benchmark("step_cost")


def _hesso_state(opt_state):
    return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, HessoState))
            if isinstance(s, HessoState)][0]


@pytest.mark.parametrize("variant", ["hesso", "hesso base= record"])
def test_looped_steps_stay_inside_one_pruning_period(step_cost, variant):
    """Every looped step projects the same K̂ groups and none ends a period: the loop's
    state advances only its counter (so ``loop`` prices the ordinary step)."""
    model = step_cost.build("wide1e2")
    case = step_cost.Case(model, variant, True, tp=step_cost.LOOP_TP)
    steps = 7
    params, state = case.inputs("ordinary")
    count = int(_hesso_state(state).count)  # read now: the steps donate the state
    for _ in range(steps):
        params, state, _ = case.step(params, state, model.batch)
    end = _hesso_state(state)
    assert int(end.count) == count + steps
    np.testing.assert_array_equal(np.asarray(end.redundant), case.mask)
    assert not np.any(np.asarray(end.pruned))
    assert count + steps < step_cost.TW + 2 * step_cost.LOOP_TP  # no period end
    assert case.loop(steps) > 0


def test_loop_refuses_a_case_whose_period_is_too_short(step_cost):
    case = step_cost.Case(step_cost.build("wide1e2"), "hesso", True)  # T_p = TP (20)
    with pytest.raises(ValueError, match="long period"):
        case.loop(step_cost.TP)


def test_entry_thunks_counts_what_the_runtime_runs():
    """`fixed_cost.entry_thunks`: fusions, copies and conditionals count; parameters,
    constants, tuples, get-tuple-elements and bitcasts do not; nested computations do not."""
    fixed_cost = load_benchmark("fixed_cost")
    hlo = """HloModule m

%fused (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(%p)
}

ENTRY %main (a: f32[4], b: pred[]) -> (f32[4], f32[4]) {
  %a = f32[4]{0} parameter(0)
  %b = pred[] parameter(1)
  %c = f32[] constant(1)
  %bc = f32[2,2]{1,0} bitcast(%a)
  %f = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused
  %cp = f32[4]{0} copy(%f)
  %t = (f32[4]{0}) tuple(%cp)
  %cond = (f32[4]{0}) conditional(%b, %t, %t), true_computation=%x, false_computation=%y
  %g = f32[4]{0} get-tuple-element(%cond), index=0
  ROOT %out = (f32[4]{0}, f32[4]{0}) tuple(%g, %f)
}
"""
    assert fixed_cost.entry_thunks(hlo) == 3


def test_ab_hesso_loads_a_revision_beside_the_current_module():
    """`ab_hesso.load_old`: hesso.py of a git revision as a second module, whose state
    class is its own (so the two versions' cases never share traced code)."""
    import shutil
    import subprocess

    if shutil.which("git") is None or subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parents[1],
            capture_output=True).returncode != 0:
        pytest.skip("needs a git checkout")
    ab = load_benchmark("ab_hesso")
    old = ab.load_old("HEAD")
    assert old.__name__ == "hesso_jax.hesso_old" and old.HessoState is not HessoState
    from hesso_jax.hesso import hesso
    assert callable(old.hesso) and old.hesso is not hesso


def test_targets_report_has_the_looped_ordinary_step():
    """``overhead.py --targets --target-loop N``: a donated row carries the looped ratio,
    judged against the ordinary-step target; a row without it shows ``–`` and no verdict."""
    overhead = load_benchmark("overhead")
    row = {"model": "MLP", "params": 2e4, "G": 100, "donate": True,
           "variant": "hesso base= record", "base_ms": 0.4, "ordinary": 1.2,
           "ordinary_cpu": 1.1, "start0": 1.4, "start1": 1.6, "amortised": 1.2,
           "temp_extra_bytes": 1000, "four_n": 8e4, "loop": 1.02, "loop_base_ms": 0.11}
    plain = {k: v for k, v in row.items() if not k.startswith("loop")} | {"donate": False}
    assert overhead.target_verdicts(row) == {"ordinary": False, "start": False,
                                             "amortised": False, "temp": True, "loop": True}
    assert "loop" not in overhead.target_verdicts(plain)
    info = {"cpu": "x", "cores": "2", "jax": jax.__version__, "load_start": "0",
            "load_end": "0"}
    lines = overhead.targets_report([row, plain], "cmd", info).splitlines()
    header, looped, unlooped = lines[-4], lines[-2], lines[-1]
    column = header.split(" | ").index("ordinary, looped (base ms)")
    assert looped.split(" | ")[column] == "1.020× (0.11 ms)"
    assert unlooped.split(" | ")[column] == "–"
    assert looped.endswith("**not amortised**, temp, loop |")
