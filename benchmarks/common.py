"""What every benchmark script shares: argument parser, environment, timing, RESULTS.md.

The scripts are run as ``python benchmarks/<name>.py`` with the package installed
(``pip install -e .``); Python puts the script's own folder first on ``sys.path``, so they
import this module as ``common`` without touching the path.

* `parser` / `command_line`: the argument-parser skeleton (``--out``, ``--no-write``) and
  the command line a RESULTS section quotes.
* `environment` / `environment_line`: machine, cores, load average, devices and versions,
  read from the running process (never hard-coded).
* `time_call`, `median_time`, `min_time`, `interleaved`, `medians`, `ratio`: timing with
  ``jax.block_until_ready`` after every call; interleaving makes ratios robust to load
  that changes during a measurement on a shared machine.
* `upsert_section` / `publish`: rewrite one ``## `` section of ``RESULTS.md`` and write a
  script's JSON next to it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
VERSIONS = ("jax", "jaxlib", "flax", "optax", "numpy")

__all__ = ["HERE", "RESULTS_MD", "command_line", "environment", "environment_line",
           "interleaved", "median_time", "medians", "min_time", "parser",
           "publish", "ratio", "seed_list", "seeds_arg", "time_call", "upsert_section"]


# ------------------------------------------------------------------------- arguments
def seed_list(spec: str) -> list[int]:
    """The seeds of a ``--seeds`` value: a count ``N`` (seeds ``0..N-1``) or a comma list.

    ``'3'`` → ``[0, 1, 2]``; ``'1,2'`` → ``[1, 2]``; ``'2,'`` → ``[2]``. A spec naming no
    seed (``'0'``, ``','``) is an `argparse.ArgumentTypeError`: a run of no seed would
    write a results file with no rows over the one it replaces.

    Example:
      >>> seed_list("3"), seed_list("2,")
      ([0, 1, 2], [2])
    """
    try:
        seeds = ([int(x) for x in spec.split(",") if x.strip()] if "," in spec
                 else list(range(int(spec))))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds {spec!r}: expected a count N or a comma list of ints") from None
    if not seeds:
        raise argparse.ArgumentTypeError(
            f"--seeds {spec!r} names no seed (a count N >= 1 means seeds 0..N-1; for seed "
            "0 alone write '0,')")
    return seeds


def seeds_arg(spec: str) -> str:
    """``type=`` of a ``--seeds`` option: ``spec`` unchanged once `seed_list` accepts it,
    so a spec naming no seed is a usage error before anything runs or is written."""
    seed_list(spec)
    return spec


def parser(doc: str | None, *, out: Path | None = HERE, no_write: bool = True,
           no_write_help: str = "print only") -> argparse.ArgumentParser:
    """An `argparse.ArgumentParser` described by the first line of ``doc``.

    Adds ``--out`` (the output folder, default ``out``; ``None`` adds no flag) and
    ``--no-write`` (print only, write no file) when asked.
    """
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0]
                                if doc else None)
    if out is not None:
        p.add_argument("--out", type=Path, default=out)
    if no_write:
        p.add_argument("--no-write", action="store_true", help=no_write_help)
    return p


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """``python benchmarks/<script> <args>`` as the user typed it (``argv`` or sys.argv)."""
    args = list(argv) if argv is not None else sys.argv[1:]
    return " ".join(["python", f"benchmarks/{script}", *map(shlex.quote, args)])


# ----------------------------------------------------------------------- environment
def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, Any]:
    """The machine this process runs on, read now: JSON-ready.

    Keys: ``when`` (UTC, ISO), ``machine`` (CPU name or architecture), ``platform``,
    ``cpus``, ``load_average`` (1, 5, 15 minutes), ``backend``, ``devices`` (their names),
    ``python`` and one entry per package of `VERSIONS`.
    """
    try:
        load = list(os.getloadavg())
    except OSError:      # not available on this OS
        load = []
    return {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": load,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "python": platform.python_version(),
        **{name: _version(name) for name in VERSIONS},
    }


def environment_line(env: Mapping[str, Any] | None = None) -> str:
    """One line for a RESULTS section: machine, cores, load, devices, versions, date."""
    env = environment() if env is None else env
    load = env.get("load_average") or []
    load_text = f", load average {load[0]:.1f}" if load else ""
    versions = ", ".join(f"{k} {env[k]}" for k in VERSIONS if k in env)
    return (f"{env['machine']}, {env['cpus']} CPU cores{load_text}; devices: "
            f"{', '.join(env['devices'])}; Python {env['python']}, {versions}; "
            f"{env['when'][:16].replace('T', ' ')} UTC")


# ---------------------------------------------------------------------------- timing
def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall seconds, up to ``jax.block_until_ready`` of the result."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def time_call(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call of ``fn``, up to ``jax.block_until_ready`` of its result."""
    return timed(fn)[1]


def median_time(fn: Callable[[], Any], repeats: int, *, warmup: int = 1) -> float:
    """Median wall seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    return float(np.median([time_call(fn) for _ in range(repeats)]))


def min_time(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Minimum wall and process-CPU seconds of ``repeats`` calls (one untimed call first).

    Other jobs on a shared machine only ever *add* time, so the minimum over repeats is
    the most reproducible estimate of a call's own cost; CPU time (all threads of this
    process) is in addition insensitive to waiting for a core.
    """
    jax.block_until_ready(fn())
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return float(np.min(wall)), float(np.min(cpu))


def interleaved(calls: Mapping[str, Callable[[], Any]], rounds: int, *,
                warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds of every call, measured in turn: round after round, one call of each.

    ``warmup`` untimed rounds first (compilation). Returns ``{name: [seconds per round]}``
    in the order of ``calls``.
    """
    for _ in range(warmup):
        for fn in calls.values():
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(time_call(fn))
    return times


def medians(times: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """``{name: median seconds}`` of `interleaved`'s result."""
    return {name: float(np.median(t)) for name, t in times.items()}


def ratio(times: Mapping[str, Sequence[float]], num: str, den: str) -> float:
    """Ratio of medians ``median(times[num]) / median(times[den])``."""
    return float(np.median(times[num]) / np.median(times[den]))


# ------------------------------------------------------------------------ RESULTS.md
def upsert_section(path: Path, heading: str, body: str) -> None:
    """Replaces the section that starts with ``heading`` (up to the next ``## `` heading)
    with ``heading`` + ``body``, or appends it; every other section is kept as it is."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text)


def publish(out: Path, section: str | None, body: str, *,
            results: Mapping[str, Any] | None = None, json_name: str | None = None,
            write: bool = True, indent: int = 1) -> None:
    """Prints ``body``; unless ``write`` is false, also writes ``out/json_name`` (the
    ``results``; skipped when ``None``) and the ``section`` of ``out/RESULTS.md`` (skipped
    when ``None``)."""
    if body:
        print(body)
    if not write:
        return
    out.mkdir(parents=True, exist_ok=True)
    if json_name is not None:
        (out / json_name).write_text(json.dumps(results, indent=indent) + "\n")
    if section is not None:
        upsert_section(out / "RESULTS.md", section, body)
