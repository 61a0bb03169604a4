"""benchmarks/common.py: the helpers every benchmark script shares."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("benchmarks_common", COMMON)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_upsert_section_replaces_only_its_section(common, tmp_path):
    path = tmp_path / "RESULTS.md"
    common.upsert_section(path, "## A", "first")
    common.upsert_section(path, "## B", "other")
    common.upsert_section(path, "## A", "second")
    text = path.read_text()
    assert text == "# Benchmark results\n\n## A\n\nsecond\n\n## B\n\nother\n"


def test_environment_is_read_from_the_process(common):
    import os

    import jax

    env = common.environment()
    assert env["cpus"] == os.cpu_count()
    assert env["jax"] == jax.__version__
    assert env["devices"] == [str(d) for d in jax.devices()]
    line = common.environment_line(env)
    assert f"{env['cpus']} CPU cores" in line and f"jax {jax.__version__}" in line
    assert common.environment_line({**env, "load_average": []}).count("load average") == 0


def test_interleaved_calls_in_turn_and_ratio(common):
    order: list[str] = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    times = common.interleaved(calls, 3, warmup=1)
    assert order == ["a", "b"] * 4
    assert [len(t) for t in times.values()] == [3, 3]
    assert set(common.medians(times)) == {"a", "b"}
    assert common.ratio({"x": [2.0, 4.0, 6.0], "y": [1.0, 2.0, 3.0]}, "x", "y") == 2.0


def test_parser_and_command_line(common, tmp_path):
    p = common.parser("Title line.\n\nMore.", out=tmp_path)
    args = p.parse_args(["--no-write"])
    assert args.no_write and args.out == tmp_path and p.description == "Title line."
    assert common.command_line("x.py", ["--a", "b c"]) == "python benchmarks/x.py --a 'b c'"


def test_publish_writes_json_and_section(common, tmp_path, capsys):
    common.publish(tmp_path, "## S", "body", results={"k": 1}, json_name="r.json")
    assert (tmp_path / "r.json").read_text() == '{\n "k": 1\n}\n'
    assert "## S\n\nbody" in (tmp_path / "RESULTS.md").read_text()
    assert "body" in capsys.readouterr().out
    common.publish(tmp_path / "none", "## S", "body", write=False)
    assert not (tmp_path / "none").exists()


def test_seed_list_and_a_spec_naming_no_seed(common):
    assert common.seed_list("3") == [0, 1, 2]
    assert common.seed_list("0,") == [0] and common.seed_list("1,2") == [1, 2]
    for bad in ("0", ",", "x"):  # '0' is a count: no seed, and the run would write no rows
        with pytest.raises(argparse.ArgumentTypeError, match="--seeds"):
            common.seed_list(bad)
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="3", type=common.seeds_arg)
    assert p.parse_args(["--seeds", "2,"]).seeds == "2,"
    with pytest.raises(SystemExit):
        p.parse_args(["--seeds", "0"])
