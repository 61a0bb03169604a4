"""What a period start computes, asserted on the compiled program, not on timings.

Issue 14 item 1 (the period start ≤ 1.5× the base step; ``benchmarks/period_start.py``):
the default saliency reads every member kernel in one pass (one multi-output reduction for
its five scores' sums), and the selection `hesso_jax.projection.bottom_k` sorts nothing
(it finds the ``k``-th smallest key by counting) yet picks what the first ``k`` of a
stable sort pick.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compile_default

import hesso_jax as hj
from hesso_jax.projection import bottom_k
from hesso_jax.saliency import evaluate, weighted

WIDE = 8192  # channels: beyond C ≈ 10⁴ a library sum per statistic slows tenfold


def mlp(rows, width):
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"l0": {"kernel": jax.random.normal(k1, (rows, width)), "bias": jnp.ones((width,))},
              "l1": {"kernel": jax.random.normal(k2, (width, 10)), "bias": jnp.zeros((10,))}}
    groups = hj.Groups.from_families([hj.GroupFamily(
        width, (hj.Member(("l0", "kernel"), 1), hj.Member(("l0", "bias"), 0)),
        (hj.Member(("l1", "kernel"), 0),))])
    return params, groups


def readers(hlo, shape):
    """Instructions of the entry computation that take the parameter of ``shape``."""
    entry = hlo.split("ENTRY")[1]
    dims = ",".join(str(d) for d in shape)
    names = re.findall(rf"(%\S+) = f32\[{dims}\]\{{[^}}]*\}} parameter\(", entry)
    return [line for line in entry.splitlines()
            if "parameter(" not in line and any(re.search(rf"{re.escape(n)}[,)]", line)
                                                 for n in names)]


@pytest.mark.parametrize("rows,width", [(64, 1000), (4, WIDE), (128, WIDE), (300, 100)])
def test_saliency_reads_each_member_kernel_once_and_sorts_nothing(rows, width):
    """Default saliency + selection: one instruction reads the kernel of ``x`` and of ``d``
    (one multi-output reduction for ‖x_g‖², ‖d_g‖², ⟨x_g, d_g⟩; before: one per sum), and
    there is no sort."""
    params, groups = mlp(rows, width)
    direction = jax.tree.map(lambda a: 0.1 * a + 0.01, params)
    cand = jnp.ones(width, bool)
    f = jax.jit(lambda p, d: bottom_k(evaluate(weighted(), p, d, groups), cand, width // 3))
    hlo = compile_default(f.lower(params, direction)).as_text()
    assert len(readers(hlo, (rows, width))) == 1, readers(hlo, (rows, width))
    assert " sort(" not in hlo


def test_one_statistic_on_a_wide_kernel_is_one_pass():
    params, groups = mlp(8, WIDE)
    hlo = compile_default(jax.jit(lambda p: groups.reduce(jnp.square, p)).lower(params)).as_text()
    assert len(readers(hlo, (8, WIDE))) == 1


@pytest.mark.parametrize("G", [1, 2, 5, 64, 999])
def test_bottom_k_is_the_first_k_of_a_stable_sort(G):
    """Same set as a stable sort by (not a candidate, score), NaN as +inf, −0 as 0."""
    rng = np.random.default_rng(G)
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 3e38], np.float32)
    f = jax.jit(bottom_k)
    for trial in range(24):
        s = [rng.normal(size=G), rng.integers(0, 3, G), rng.choice(special, G),
             np.where(rng.random(G) < 0.3, rng.choice(special, G), rng.normal(size=G))
             ][trial % 4].astype(np.float32)
        cand = rng.random(G) < [0.0, 0.5, 0.9, 1.0][trial // 6]
        order = np.lexsort((np.where(np.isnan(s), np.inf, s), ~cand))  # stable
        rank = np.empty(G, int)
        rank[order] = np.arange(G)
        for k in {0, 1, G // 2, G, G + 2, int(rng.integers(0, G + 1))}:
            np.testing.assert_array_equal(np.asarray(f(s, cand, k)), cand & (rank < k))
