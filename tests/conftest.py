"""Test configuration: 8 virtual CPU devices for multi-device tests, set before JAX starts."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# XLA:CPU compilation, not execution, dominates the suite; LLVM's -O0 halves it (cric +
# snows: 196 -> 110 s CPU) and changes no HLO (buffers, fusions, memory_analysis are
# decided before LLVM). Set the flag yourself to test other optimisation levels.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# XLA:CPU's fusion emitters (its MLIR code generator for fusions) double the backend
# compile time of the suite's many small programs (tests/test_hesso.py 99 -> 47 s CPU; the
# whole suite 31 -> 21 min CPU) and the classic emitters compute the same functions. Unlike
# -O0 the flag does change the optimised HLO (fusions, copies, scratch bytes; not XLA's
# FLOP counts): the tests that assert on a compiled program compile it with XLA's default
# pipeline (helpers.compile_default), so they check what users get. Set the flag
# yourself to run everything with the fusion emitters.
if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _session_cache_dir() -> str:
    """One JAX compilation cache per test run, shared by xdist workers and subprocesses.

    Tests compile the same programs many times over (every CLI demo, notebook kernel and
    test that builds the same step); XLA:CPU compilation dominates the suite's time. The
    directory is keyed by xdist's run id (the same in every worker of one run) or, without
    xdist, made fresh, so no run reads another run's entries; subprocesses (the CLI demo,
    notebook kernels) inherit it through the environment.
    """
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    root = os.path.join(tempfile.gettempdir(), f"hesso_jax_test_cache_{os.getuid()}")
    if run is None:
        os.makedirs(root, exist_ok=True)
        return tempfile.mkdtemp(prefix="run-", dir=root)
    path = os.path.join(root, f"xdist-{run}")
    os.makedirs(path, exist_ok=True)
    return path


if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _session_cache_dir()
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=30, deadline=None)
settings.register_profile("dev", max_examples=15, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
