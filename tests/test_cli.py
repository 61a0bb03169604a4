"""The hesso-jax command: argument errors are one line; the demo writes its outputs."""

import json
import re
import subprocess
import sys

import pytest

from hesso_jax.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "hesso_jax.cli", *args], capture_output=True,
                          text=True, timeout=600)


def test_help():
    proc = run_cli("demo", "--help")
    assert proc.returncode == 0
    for flag in ("--sparsity", "--steps", "--seed", "--out"):
        assert flag in proc.stdout


def test_help_names_every_default(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    options = text.split("options:")[1]
    for flag, default in [("--sparsity", "0.5"), ("--steps", "1500"), ("--seed", "0"),
                          ("--out", "./hesso_demo_out"), ("--batch-size", "64"),
                          ("--lr", "0.003"), ("--periods", "5"), ("--min-keep", "0, none"),
                          ("--no-progress", "shown"), ("--flops", "none, the sparsity applies"),
                          ("--params", "none, the sparsity applies")]:
        after = options.split(f"{flag} ", 1)[1]
        help_text = re.split(r" --[a-z-]+ ", after, maxsplit=1)[0]
        assert f"(default: {default})" in help_text, flag


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"hesso-jax {version('hesso-jax')}"


@pytest.mark.parametrize("args", [["demo", "--steps", "x"], ["demo", "--bogus"], ["nonsense"],
                                  [], ["demo", "--steps", "20", "--periods", "50"]])
def test_every_error_has_one_prefix(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("hesso-jax: error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("args,fragment", [
    (["demo", "--sparsity", "1.5"], "strictly between 0 and 1"),
    (["demo", "--sparsity", "half"], "expected a number"),
    (["demo", "--steps", "-3"], "must be >= 20"),
    (["demo", "--seed", "x"], "expected an integer"),
    (["demo", "--lr", "0"], "must be > 0"),
    (["demo", "--min-keep", "-1"], "expected a count >= 0 or a fraction in (0, 1)"),
    (["demo", "--min-keep", "2.5"], "expected a count >= 0 or a fraction in (0, 1)"),
    (["nonsense"], "invalid choice"),
])
def test_bad_arguments_give_one_line_error(args, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert fragment in err


def test_sparsity_beyond_the_floor_is_a_usage_error(tmp_path, capsys):
    # 192 groups in 3 families; min_keep=0.5 keeps 96, so K = round(0.9 * 192) = 173 is refused.
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--sparsity", "0.9", "--min-keep", "0.5", "--out", str(tmp_path),
              "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "K=173" in err and "at most 96" in err


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli("demo", "--steps", "20", "--out", str(blocker / "sub"))
    assert proc.returncode != 0
    assert "cannot write to output folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_small_run_writes_outputs(tmp_path):
    """At 90% group sparsity a whole family is pruned (its placeholder channel stays): the
    demo still finishes, writes every output and a checkpoint that restores. (The fewest
    steps the demo accepts, 20, hold two periods; nothing checked depends on the count.)"""
    out = tmp_path / "out"
    proc = run_cli("demo", "--steps", "20", "--periods", "2", "--sparsity", "0.9",
                   "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["pruned_groups"] == round(0.9 * results["groups"])
    plan = json.loads((out / "keep_plan.json").read_text())
    assert [len(k) for k in plan["keep"]].count(1) >= 1  # an emptied family's placeholder
    assert results["checkpoint"] == str(out / "shrunk_checkpoint")
    assert results["shrunk_vs_masked_max_rel_logit_diff"] < 1e-5
    assert results["params"]["shrunk"] < results["params"]["dense"]
    assert results["test_accuracy"]["hesso_shrunk"] == results["test_accuracy"]["hesso_masked"]
    for name in ("groups.json", "keep_plan.json", "training.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "shrunk_checkpoint").is_dir()
    assert not (out / ".shrunk_checkpoint.tmp").exists()
    assert "HESSO shrunk" in proc.stdout


@pytest.mark.parametrize("args,fragment", [
    (["demo", "--flops", "0.5", "--sparsity", "0.3"], "not allowed with"),
    (["demo", "--flops", "0.5", "--params", "0.3"], "not allowed with"),
    (["demo", "--params", "1.5"], "strictly between 0 and 1"),
])
def test_budget_flags_are_exclusive_fractions(args, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_demo_flops_budget_reports_kept_fractions(tmp_path, capsys):
    """In-process (``test_demo_small_run_writes_outputs`` covers the entry point); the
    budget is met at any step count (20: the fewest the demo accepts)."""
    out = tmp_path / "out"
    assert main(["demo", "--steps", "20", "--periods", "2", "--flops", "0.5",
                 "--no-progress", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["budget"] == {"flops": 0.5} and results["sparsity"] is None
    kept = results["kept_fraction"]
    assert 0.45 <= kept["flops"] <= 0.52, kept
    assert kept["flops"] == results["flops_per_example"]["shrunk"] / results[
        "flops_per_example"]["dense"]
    assert "budget: 50% of the dense flops" in stdout
    assert "kept fraction: params / FLOPs" in stdout
