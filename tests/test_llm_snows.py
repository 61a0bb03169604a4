"""benchmarks/llm_snows.py: SNOWS on the Llama decoder, smoke-tested on a tiny random Llama.

``--quick --random-init`` keeps the test independent of the git-ignored checkpoint; the
properties asserted are the ones every real run checks too: the masks hold exactly, SNOWS
keeps the mask's zeros and never increases a layer's objective, and magnitude and Wanda
masks are different masks of the same sparsity.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import load_benchmark

MODULES = "textwrap,json,argparse,collections"


@pytest.fixture(scope="module")
def llm_snows():
    return load_benchmark("llm_snows")


def test_quick_run_checks_every_cell(llm_snows, tmp_path):
    result = llm_snows.main(["--quick", "--random-init", "--no-write", "--out",
                             str(tmp_path), "--modules", MODULES])
    assert not list(tmp_path.iterdir())   # --no-write writes nothing
    rows = result["rows"]
    cells = {(r["pattern"], r["criterion"], r["K"]) for r in rows}
    assert cells == {(p, c, k) for p in ("2:4", "0.5") for c in ("magnitude", "wanda")
                     for k in (None, 0, 2)}
    n_kernels = 2 * result["config"]["num_layers"]    # quick: query and down per layer
    for r in rows:
        assert r["mask_holds"] and r["keeps_mask_zeros"], r
        assert r["layers"] == n_kernels
        assert r["kernel_sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert 0 < r["param_sparsity"] < r["kernel_sparsity"]   # embedding stays dense
        assert np.isfinite(r["heldout_perplexity"]) and r["heldout_perplexity"] > 1
        if r["K"] is not None:
            assert r["objective_never_worse"] and r["objective_ratio_max"] <= 1 + 1e-6
        else:
            assert r["objective_ratio_mean"] == pytest.approx(1.0)   # mask only: no refit
    for pattern, agree in result["mask_overlap"].items():
        assert 0.5 < agree < 1.0, pattern          # different masks, same sparsity
    body = llm_snows.body_text(result)
    assert "| 2:4 | wanda |" in body and "| 50 % unstructured | magnitude |" in body
    assert "mask holds in every run: yes" in body


def test_mask_holds_detects_violations(llm_snows):
    w = np.ones((8, 2, 4))                      # (d, heads, head_dim), reduction axis 0
    w[::2] = 0.0
    assert llm_snows.mask_holds("2:4", {("layers", 0, "attn", "query"): w})
    assert not llm_snows.mask_holds("2:4", {("layers", 0, "attn", "query"): np.ones(
        (8, 2, 4))})
    out = np.zeros((2, 4, 3))                   # (heads, head_dim, d): reduction H·D
    out[:, :2] = 1.0                            # runs of 4 along head_dim: 2 nonzeros
    assert llm_snows.mask_holds("2:4", {("layers", 0, "attn", "out"): out})
    assert llm_snows.mask_holds("0.5", {("k",): w})
    assert not llm_snows.mask_holds("0.75", {("k",): w})


def test_layer_paths_rejects_unknown_kernels(llm_snows):
    model = llm_snows.load_model(llm_snows.parse_args(["--random-init"]))[0]
    assert len(llm_snows.layer_paths(model)) == 7 * len(model.layers)
    assert llm_snows.layer_paths(model, "down") == [("layers", 0, "mlp", "down", "kernel")]
    with pytest.raises(ValueError, match="unknown kernels"):
        llm_snows.layer_paths(model, "qkv")


def test_plot_writes_a_png(llm_snows, tmp_path):
    rows = [{"pattern": p, "criterion": c, "method": m, "heldout_perplexity": 5.0 + i}
            for i, (p, c, m) in enumerate([("2:4", "magnitude", "mask only"),
                                           ("2:4", "magnitude", "SNOWS K=0")])]
    llm_snows.plot({"rows": rows, "dense": {"heldout_perplexity": 4.6}},
                   tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
