"""benchmarks/llm.py: the LLM pruning runs, smoke-tested on a fresh tiny random Llama.

``--random-init`` keeps the test independent of the git-ignored pretrained checkpoint; the
properties asserted are the ones every real run checks too: each method reaches its
parameter budget, removes exactly-zero groups, and its shrunk model equals the masked one.
"""

from __future__ import annotations

import pytest
from helpers import load_benchmark


@pytest.fixture(scope="module")
def llm():
    return load_benchmark("llm")


def test_quick_run_prunes_to_budget_with_every_method(llm, tmp_path):
    result = llm.main(["--quick", "--random-init", "--no-write", "--out", str(tmp_path),
                       "--modules", "textwrap,json,argparse,collections", "--no-dense-ft"])
    assert not list(tmp_path.iterdir())   # --no-write writes nothing
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"dense", *llm.METHODS}   # --no-dense-ft: no control row
    dense = rows.pop("dense")
    assert dense["kept_params"] == 1.0 and dense["removed_groups"] == 0
    for method, r in rows.items():
        assert r["ratio"] == 0.25 and r["seed"] == 0
        assert 0.75 - llm.TOLERANCE <= r["kept_params"] <= 0.75, method
        assert r["params"] < dense["params"] and r["flops"] < dense["flops"], method
        assert r["removed_groups"] > 0, method
        assert r["max_abs_diff_masked_vs_shrunk"] < 1e-3, method
        lay = r["per_layer"]
        assert sum(lay["heads"]) + sum(lay["neurons"]) == r["removed_groups"], method
        assert all(h < n for h, n in zip(lay["heads"], lay["heads_of"], strict=True))
        assert r["heldout_perplexity"] > 1.0 and r["tokens_per_s"] > 0, method
    assert rows["hesso_cric"]["cric_cycles"] is not None
    assert "| HESSO-CRIC |" in llm.body_text(result)


def test_plot_has_one_panel_per_method(llm, tmp_path):
    lay = {"heads": [1, 0], "heads_of": [2, 2], "neurons": [10, 30],
           "neurons_of": [64, 64]}
    summary = [{"method": m, "ratio": 0.25, "n": 1, "ppl_mean": 5.0, "per_layer": lay}
               for m in llm.METHODS]
    llm.plot(summary, tmp_path / "llm.png")
    assert (tmp_path / "llm.png").stat().st_size > 0


@pytest.fixture(scope="module")
def ablation():
    return load_benchmark("llm_ablation")


def test_flop_budget_lands_on_the_flops_count_k_reached_and_resumes(ablation, tmp_path):
    from hesso_jax.groups import resolve_count

    argv = ["--quick", "--random-init", "--out", str(tmp_path), "--parts", "budget",
            "--modules", "textwrap,json,argparse,collections"]
    result = ablation.main(argv)
    rows = {(r["target"][0], r["saliency"]): r for r in result["rows"]}
    assert set(rows) == {("count", "norm"), ("flops", "norm"), ("flops", "additive")}
    count = rows["count", "norm"]
    G = sum(count["per_layer"]["heads_of"]) + sum(count["per_layer"]["neurons_of"])
    assert count["removed_groups"] == resolve_count(0.25, G)
    for mix in ("norm", "additive"):
        flops = rows["flops", mix]
        assert flops["target"][1] == count["kept_flops"]
        assert count["kept_flops"] - ablation.llm.TOLERANCE <= flops["kept_flops"] \
            <= count["kept_flops"] + 1e-9
    assert "Budget(flops=" in (tmp_path / "RESULTS.md").read_text()
    saved = (tmp_path / ablation.JSON).read_text()
    again = ablation.main([*argv, "--resume"])     # nothing left to run: same rows
    assert again["rows"] == result["rows"]
    assert (tmp_path / ablation.JSON).read_text().count('"part"') == saved.count('"part"')


def test_target_check_names_the_metric(llm):
    llm.check_target("hesso", ("flops", 0.5), {"flops": 0.49, "params": 0.9})
    with pytest.raises(RuntimeError, match="kept 0.5100 of the flops"):
        llm.check_target("hesso", ("flops", 0.5), {"flops": 0.51, "params": 0.4})


def test_merge_keeps_the_rows_not_rerun(llm):
    lay = {"heads": [1], "heads_of": [2], "neurons": [3], "neurons_of": [8]}

    def row(method, ppl, seed=0):
        return {"method": method, "ratio": 0.25, "seed": seed, "heldout_perplexity": ppl,
                "per_layer": lay, **dict.fromkeys(
                    ("kept_params", "kept_flops", "params", "flops", "speedup",
                     "tokens_per_s", "dense_tokens_per_s", "train_s"), 1.0)}

    old = {"command": "python benchmarks/llm.py", "rows": [row("hesso", 9.0),
                                                           row("taylor", 4.0)]}
    new = {"command": "python benchmarks/llm.py --methods hesso --merge",
           "rows": [row("hesso", 5.0), row("hesso", 6.0, seed=1)]}
    out = llm.merged(old, new)
    ppl = sorted((r["method"], r["seed"], r["heldout_perplexity"]) for r in out["rows"])
    assert ppl == [("hesso", 0, 5.0), ("hesso", 1, 6.0), ("taylor", 0, 4.0)]
    assert out["commands"] == [old["command"], new["command"]]
    hesso = next(s for s in out["summary"] if s["method"] == "hesso")
    assert hesso["n"] == 2 and hesso["ppl_mean"] == 5.5
