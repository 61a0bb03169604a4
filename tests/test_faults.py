"""Faults and bad input: non-finite gradients with optax.apply_if_finite, schedules that do
not fit the run, parameters that change between init and update, groups of another model,
a fraction K that prunes nothing, checkpoints of a model with an emptied family, and the
CLI's handling of bad schedules, unwritable outputs, interrupted checkpoint writes, a
failure after the results were written and a run killed mid-way."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import D_IN, D_OUT, HIDDEN, mlp_data, mlp_groups, mlp_loss, mlp_params

import hesso_jax as hj
from hesso_jax import cli
from hesso_jax.hesso import HessoState

K, PERIODS, TP, TW = 6, 2, 3, 2


def make_params(dtype=jnp.float32):
    return mlp_params(dtype=dtype)


make_groups = mlp_groups
X, Y = mlp_data(32)


def loss(params):
    return mlp_loss(params, X, Y)


# ---------------------------------------------------------------- non-finite gradients
def guarded_tx():
    return optax.apply_if_finite(
        optax.chain(optax.adam(1e-2), hj.hesso(make_groups(), K, PERIODS, TP,
                                               warmup_steps=TW)),
        max_consecutive_errors=5)


def run_with_faults(tx, steps, bad_steps, bad_value):
    @jax.jit
    def step(params, state, poison):
        grads = jax.grad(loss)(params)
        grads = jax.tree.map(lambda g: jnp.where(poison, bad_value, g), grads)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = make_params()
    state = tx.init(params)
    for t in range(steps):
        params, state = step(params, state, jnp.asarray(t in bad_steps))
    return jax.device_get(params), jax.device_get(state)


@pytest.mark.parametrize("bad_value", [jnp.nan, jnp.inf], ids=["nan", "inf"])
def test_apply_if_finite_skips_steps_without_touching_the_schedule(bad_value):
    """A skipped step is invisible: same parameters and inner state, bit for bit, as the
    run that never saw it. Faults hit the warm-up, a period start, the middle and the last
    step of a period, and the placement-check step."""
    clean_steps = TW + PERIODS * TP + 2
    bad = {1, TW + 1, TW + 3, TW + 5, TW + 7, TW + 9, TW + 10}  # positions in the faulty run
    tx = guarded_tx()
    ref_params, ref_state = run_with_faults(tx, clean_steps, set(), 0.0)
    params, state = run_with_faults(tx, clean_steps + len(bad), bad, bad_value)

    jax.tree.map(np.testing.assert_array_equal, params, ref_params)
    jax.tree.map(np.testing.assert_array_equal, state.inner_state, ref_state.inner_state)
    assert int(state.total_notfinite) == len(bad)
    status = hj.hesso_status(state)
    assert status.step == clean_steps  # skipped steps did not advance the schedule
    assert status.num_pruned == K
    np.testing.assert_array_equal(make_groups().zero_groups(params), status.pruned)
    assert np.all(np.isfinite(np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])))


def test_skipped_step_at_period_start_keeps_old_masks():
    """The identification of a skipped period-start step is discarded with the step."""
    tx = guarded_tx()
    params, state = run_with_faults(tx, TW + 1, {TW}, jnp.nan)
    hs = state.inner_state[1]
    assert isinstance(hs, HessoState)
    assert int(hs.count) == TW and not hs.redundant.any() and not hs.scores.any()


# ---------------------------------------------------------------- schedule vs. step budget
@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(warmup_steps=10, total_steps=10), ValueError,
     "warmup_steps=10 is not shorter than total_steps=10"),
    (dict(warmup_steps=30, total_steps=10), ValueError, "before the first pruning period"),
    (dict(warmup_steps=4, total_steps=9), ValueError,
     re.escape("ends at step warmup_steps + P * Tp = 4 + 2 * 3 = 10, after total_steps=9")),
    (dict(total_steps=0), ValueError, "total_steps must be >= 1"),
    (dict(total_steps=5.0), TypeError, "total_steps must be an int"),
])
def test_schedule_longer_than_the_run_is_rejected(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        hj.hesso(make_groups(), K, PERIODS, TP, **kwargs)


def test_schedule_that_exactly_fits_the_run_prunes_k():
    total = TW + PERIODS * TP
    tx = optax.chain(optax.adam(1e-2), hj.hesso(make_groups(), K, PERIODS, TP,
                                                warmup_steps=TW, total_steps=total))
    params = make_params()
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    for _ in range(total):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    assert make_groups().zero_groups(params).sum() == K


# ---------------------------------------------------------------- params changed after init
def changed_dtype(params):
    params["l1"]["kernel"] = params["l1"]["kernel"].astype(jnp.bfloat16)
    return params


def changed_shape(params):  # still fits the groups: only the init record can tell
    params["l1"]["kernel"] = jnp.ones((D_IN + 1, HIDDEN))
    return params


def dependent_shape(params):  # a dependent leaf (not a member) changed
    params["l2"]["kernel"] = jnp.ones((HIDDEN, D_OUT + 2))
    return params


def extra_leaf(params):
    params["l3"] = {"kernel": jnp.ones((2, 2))}
    return params


@pytest.mark.parametrize("change,fragment", [
    (changed_dtype, "'l1/kernel' is bfloat16[6, 12] but was float32[6, 12] at init"),
    (changed_shape, "'l1/kernel' is float32[7, 12] but was float32[6, 12] at init"),
    (dependent_shape, "'l2/kernel' is float32[12, 5] but was float32[12, 3] at init"),
    (extra_leaf, "params have 5 leaves but the tree given to init had 4"),
], ids=["dtype", "member-shape", "dependent-shape", "extra-leaf"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_params_changed_between_init_and_update(change, fragment, jit):
    tx = hj.hesso(make_groups(), K, PERIODS, TP)
    state = tx.init(make_params())
    params = change(make_params())
    update = jax.jit(tx.update) if jit else tx.update
    # A plain ValueError raised while tracing, before anything is compiled or run.
    with pytest.raises(ValueError, match=re.escape(fragment)):
        update(params, state, params)


def test_no_false_alarm_for_restored_state_or_several_inits():
    """A transformation that never ran init (state restored from a checkpoint) skips the
    check; one initialised for two trees accepts both."""
    # eval_shape traces update (where the check runs) without compiling or running it.
    fresh = hj.hesso(make_groups(), K, PERIODS, TP)
    state = hj.hesso(make_groups(), K, PERIODS, TP).init(make_params())
    params = changed_dtype(make_params())
    jax.eval_shape(fresh.update, params, state, params)
    tx = hj.hesso(make_groups(), K, PERIODS, TP)
    tx.init(make_params())
    with pytest.raises(ValueError, match="is bfloat16"):
        jax.eval_shape(tx.update, params, state, params)
    tx.init(params)
    jax.eval_shape(tx.update, params, state, params)
    jax.eval_shape(tx.update, make_params(), state, make_params())


def test_state_for_other_groups_is_rejected():
    tx = hj.hesso(make_groups(), K, PERIODS, TP)
    other = hj.Groups.from_families([hj.GroupFamily(
        HIDDEN // 2, (hj.Member(("l1", "bias"), 0),))])
    state = hj.hesso(other, 2, 1, 1).init(make_params())
    with pytest.raises(ValueError,
                       match=re.escape("masks have shape (6,) but groups has 12 groups")):
        tx.update(make_params(), state, make_params())


# ---------------------------------------------------------------- CLI
def test_cli_schedule_that_does_not_fit_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--steps", "20", "--periods", "50"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "--periods 50 does not fit in --steps 20" in err


def test_cli_output_folder_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--steps", "20", "--out", str(target), "--no-progress"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"hesso-jax: error: cannot write to output folder {target}: ")


def test_interrupted_checkpoint_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    old_state = {"w": np.arange(4.0, dtype=np.float32)}
    final = cli._save_checkpoint(tmp_path, old_state)
    real_save = ocp.StandardCheckpointer.save

    def save_then_die(self, path, state, *args, **kwargs):
        real_save(self, path, state, *args, **kwargs)  # part of the work is on disk
        raise KeyboardInterrupt

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        cli._save_checkpoint(tmp_path, {"w": np.full(4, 7.0, np.float32)})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shrunk_checkpoint"]
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(final, {"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    np.testing.assert_array_equal(restored["w"], old_state["w"])

    # An uninterrupted save replaces it, leaving nothing else behind.
    cli._save_checkpoint(tmp_path, {"w": np.full(4, 7.0, np.float32)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shrunk_checkpoint"]
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(final, {"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    np.testing.assert_array_equal(restored["w"], np.full(4, 7.0, np.float32))


def test_interrupted_file_write_leaves_no_partial_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"old": true}')

    def write_half(p):
        p.write_text('{"new": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cli._write_atomic(path, write_half)
    assert path.read_text() == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_cli_write_error_later_in_the_run_is_one_line(monkeypatch, capsys, tmp_path):
    def fail(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "results.json"))

    monkeypatch.setattr(cli, "run_demo", fail)
    assert cli.main(["demo", "--steps", "20", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("hesso-jax: error: cannot write output") and "Permission denied" in err


# ---------------------------------------------------------------- K that prunes nothing
def test_fraction_k_that_rounds_to_zero_groups_is_refused():
    with pytest.raises(ValueError, match=re.escape(
            "K=0.001 of G=12 groups rounds to 0 groups, so nothing would be pruned; pass a "
            "fraction of at least 1/G = 0.083 or an int count (K=0 prunes nothing on purpose)")):
        hj.hesso(make_groups(), 0.001, PERIODS, TP)
    hj.hesso(make_groups(), 0, PERIODS, TP)  # an int 0 is a deliberate choice
    assert hj.hesso_status(hj.hesso(make_groups(), 0.05, PERIODS, TP).init(
        make_params())).target == 1


# ---------------------------------------------------------------- groups of another model
class TwoLayer(nnx.Module):
    def __init__(self, act, residual, seed=0):
        rngs = nnx.Rngs(seed)
        self.a = nnx.Linear(D_IN, HIDDEN, rngs=rngs)
        self.b = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
        self.c = nnx.Linear(HIDDEN, D_OUT, rngs=rngs)
        self.act, self.residual = act, residual

    def __call__(self, x):
        h = self.act(self.a(x))
        g = self.act(self.b(h))
        return self.c(g + h if self.residual else g)


@pytest.mark.parametrize("other", [TwoLayer(jax.nn.sigmoid, False), TwoLayer(nnx.relu, True)],
                         ids=["sigmoid", "extra-residual"])
def test_groups_of_another_model_are_refused(other):
    """Same paths and shapes, another program: discovery's fingerprint tells them apart."""
    model = TwoLayer(nnx.relu, False)
    groups = hj.discover_groups(model, X[:1])
    assert groups.fingerprint is not None and groups.fingerprint.inputs == (((1, D_IN),
                                                                             "float32"),)
    groups.validate(nnx.state(other))  # paths and shapes fit: only the program differs
    groups.check_structure(TwoLayer(nnx.relu, False, seed=3))  # other values: accepted
    groups.check_structure(model, X[1:2])  # inputs given explicitly (discovery's shapes)
    with pytest.raises(ValueError, match="shrink_model: these groups were discovered on a "
                                         "different model: its traced program"):
        groups.check_structure(other, who="shrink_model")
    # the fingerprint survives JSON (groups.json next to a checkpoint) ...
    back = hj.Groups.from_json(groups.to_json())
    assert back == groups and back.fingerprint == groups.fingerprint
    with pytest.raises(ValueError, match="discovered on a different model"):
        back.check_structure(other)
    # ... and the pure-function form records and checks it the same way
    graphdef, state = nnx.split(model)
    fn_groups = hj.discover_groups(lambda st, x: nnx.merge(graphdef, st)(x), state, X[:1])
    assert fn_groups.fingerprint.digest == groups.fingerprint.digest
    # hand-written groups carry none (nothing to check); shrunk groups describe a new tree
    assert hj.Groups.from_families(groups.families).fingerprint is None
    plan = hj.KeepPlan.from_mask(groups, np.arange(groups.num_groups) % 2 == 0)
    assert hj.shrink_groups(groups, plan).fingerprint is None


# ---------------------------------------------------------------- emptied family
def _cnn_with_empty_family():
    from hesso_jax.models import CNN

    model = CNN(8, 16, rngs=nnx.Rngs(0))
    groups = model.groups()
    keep = np.ones(groups.num_groups, bool)
    keep[groups.starts[1]:groups.starts[1] + groups.families[1].size] = False  # block_a
    state = nnx.state(model)
    mask = groups.broadcast(jnp.asarray(keep, jnp.float32), state, fill=1.0)
    nnx.update(model, jax.tree.map(lambda x, m: (x * m).astype(x.dtype), state, mask))
    return model, groups


def test_checkpoint_of_a_model_with_an_emptied_family(tmp_path):
    """A fully pruned family keeps one exactly-zero channel: no zero-size leaf, so orbax
    saves the shrunk model, and the restored model equals the masked one."""
    model, groups = _cnn_with_empty_family()
    small = hj.shrink_model(model, groups)
    assert small.block_a.conv.kernel.shape == (3, 3, 8, 1)
    assert not np.any(np.asarray(small.block_a.bn.scale[...]))
    assert all(x.size for x in jax.tree.leaves(nnx.state(small)))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", nnx.state(small))
        ckpt.wait_until_finished()
        graphdef = nnx.graphdef(small)
        abstract = nnx.eval_shape(lambda: nnx.merge(graphdef, nnx.state(small)))
        restored = ckpt.restore(tmp_path / "ckpt", nnx.state(abstract))
    loaded = nnx.merge(graphdef, restored)
    x = jax.random.normal(jax.random.key(3), (4, 8, 8, 1))
    model.eval()
    loaded.eval()
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-5,
                               atol=1e-6)
    # the demo's writer: saved, restored and compared before it takes its final name
    final = cli._save_checkpoint(tmp_path, nnx.state(small))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "shrunk_checkpoint"]
    assert final == tmp_path / "shrunk_checkpoint"


# ---------------------------------------------------------------- demo: late failure, kill
def _no_space(self, *args, **kwargs):
    raise OSError(28, "No space left on device")


def _surgery_fails(*args, **kwargs):
    raise ValueError("shrunk != masked")


_TRAINED = {}  # the demo's training, by its arguments (all but --out)


def _train_once(train):
    """``cli._train_both`` run once per set of arguments: the late-failure cases share
    one training (the failures come after it; surgery does not change the models)."""
    def cached(args):
        key = tuple(sorted((k, str(v)) for k, v in vars(args).items() if k != "out"))
        if key not in _TRAINED:
            _TRAINED[key] = train(args)
        return _TRAINED[key]

    return cached


@pytest.mark.parametrize("where", ["surgery", "checkpoint"])
def test_demo_keeps_its_results_when_a_late_step_fails(where, tmp_path, monkeypatch, capsys):
    """Training is never lost: a failure after it (surgery, plot, checkpoint) is one line,
    exit status 1, and leaves complete results and no temporary file."""
    monkeypatch.setattr(cli, "_train_both", _train_once(cli._train_both))
    if where == "surgery":
        monkeypatch.setattr(hj, "shrink_model", _surgery_fails)
    else:
        monkeypatch.setattr(ocp.StandardCheckpointer, "save", _no_space)
    out = tmp_path / "out"
    code = cli.main(["demo", "--steps", "20", "--periods", "1", "--no-progress",
                     "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    err = captured.err.strip().splitlines()[-1]
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoint"] is None and results["pruned_groups"] == 96
    written = ["groups.json", "keep_plan.json", "results.json"]
    if where == "surgery":
        assert err == ("hesso-jax: error: surgery failed (ValueError: shrunk != masked); the "
                       f"training results are in {out / 'results.json'}")
        assert set(results["test_accuracy"]) == {"dense", "hesso_masked"}
    else:
        assert err == ("hesso-jax: error: could not write the shrunk checkpoint (OSError: "
                       "[Errno 28] No space left on device); results.json, groups.json and "
                       f"keep_plan.json in {out} are complete")
        assert "HESSO shrunk" in captured.out  # the table was printed before the checkpoint
        assert results["params"]["shrunk"] < results["params"]["dense"]
        written.append("training.png")
    assert sorted(p.name for p in out.iterdir()) == written


def test_demo_killed_mid_run_then_rerun_restarts_cleanly(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "hesso_jax.cli", "demo", "--steps", "20",
                             "--no-progress", "--out", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        line = proc.stderr.readline()  # printed when training starts
        assert line.startswith("hesso-jax: training the digits CNN"), line
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()  # nothing half-written
    # what a kill during the checkpoint write leaves behind
    (out / ".shrunk_checkpoint.tmp" / "ckpt.orbax-checkpoint-tmp-1").mkdir(parents=True)
    (out / ".results.json.tmp").write_text('{"steps": ')

    # the rerun's training is the late-failure tests' (same arguments): what is checked
    # here, the clean-up before training and the outputs after it, runs in full
    monkeypatch.setattr(cli, "_train_both", _train_once(cli._train_both))
    assert cli.main(["demo", "--steps", "20", "--periods", "1", "--no-progress",
                     "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert (f"hesso-jax: removed .shrunk_checkpoint.tmp, .results.json.tmp left in {out} by "
            "an interrupted run") in err
    assert sorted(p.name for p in out.iterdir()) == [
        "groups.json", "keep_plan.json", "results.json", "shrunk_checkpoint", "training.png"]
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoint"] == str(out / "shrunk_checkpoint")
    assert results["pruned_groups"] == 96


def test_rerun_puts_back_a_checkpoint_set_aside_by_a_killed_swap(tmp_path):
    """Killed between the swap's two renames: the old checkpoint is only under its
    set-aside name; the next run puts it back before anything else."""
    cli._save_checkpoint(tmp_path, {"w": np.arange(3.0, dtype=np.float32)})
    os.replace(tmp_path / "shrunk_checkpoint", tmp_path / ".shrunk_checkpoint.old")
    (tmp_path / ".write-test-abc").write_text("")
    assert cli._clean_stale(tmp_path) == [".write-test-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shrunk_checkpoint"]
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "shrunk_checkpoint",
                                {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    np.testing.assert_array_equal(restored["w"], np.arange(3.0))


def test_fingerprint_accepts_the_same_model_in_the_other_mode():
    """Train/eval mode changes the traced program (BatchNorm), not the model: a model
    discovered in train mode and shrunk in eval mode (or back) is accepted, unchanged."""
    from hesso_jax.models import CNN

    model = CNN(8, 16, rngs=nnx.Rngs(0))
    groups = hj.discover_groups(model, jnp.zeros((1, 8, 8, 1)))
    model.eval()
    groups.check_structure(model)
    assert model.stem.bn.use_running_average  # still in eval mode
    eval_groups = hj.discover_groups(model, jnp.zeros((1, 8, 8, 1)))
    model.train()
    eval_groups.check_structure(model)
    wider = CNN(8, 17, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="discovered on a different model"):
        groups.check_structure(wider)
