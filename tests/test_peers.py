"""benchmarks/peers: the Torch-Pruning side by side (its helpers; the full grid is a benchmark).

Without the optional extra ``peers`` only the "not installed" message is checked; the
other tests skip.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from hesso_jax.models import CNN
from hesso_jax.train import count_params

PEERS = Path(__file__).resolve().parents[1] / "benchmarks" / "peers"


def _import(name):
    """A benchmarks/peers script as a module (its folder put on sys.path, as when run)."""
    if str(PEERS) not in sys.path:
        sys.path.insert(0, str(PEERS))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def peers():
    return _import("torch_pruning_digits")


def test_missing_extra_is_said_clearly(peers, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import now raises ImportError
    assert peers.main(["--seeds", "1", "--no-write"]) == 2
    err = capsys.readouterr().err
    assert "optional extra 'peers'" in err and "torch" in err
    assert "pip install" in err


def test_batch_order_matches_train_classifier(peers):
    # train_classifier draws its batches with this exact recipe; both must see the same data.
    rng = np.random.default_rng(3)
    n, b = 100, 32
    order, pos, want = rng.permutation(n), 0, []
    for _ in range(7):
        if pos + b > n:
            order, pos = rng.permutation(n), 0
        want.append(order[pos:pos + b])
        pos += b
    got = peers.batch_indices(n, b, 3)
    for w in want:
        np.testing.assert_array_equal(next(got), w)


def test_torch_twin_matches_the_jax_cnn(peers):
    torch = pytest.importorskip("torch")
    pytest.importorskip("torch_pruning")
    jax_model = CNN(rngs=nnx.Rngs(0))
    twin = peers.torch_cnn(torch)
    assert sum(p.numel() for p in twin.parameters()) == count_params(jax_model) == 84_826
    assert peers.torch_flops(twin) == peers.jax_flops(jax_model)
    # 2 × (9·64·(1·48 + 2·48·48) + 9·16·48·96 + 96·10) MACs
    assert peers.jax_flops(jax_model) == 2 * (9 * 64 * (48 + 2 * 48 * 48) + 9 * 16 * 48 * 96
                                              + 960)
    out = twin(torch.zeros(5, 1, 8, 8))
    assert tuple(out.shape) == (5, 10)


@pytest.mark.parametrize("global_pruning", [False, True])
def test_tp_prune_to_params_hits_the_target(peers, global_pruning):
    torch = pytest.importorskip("torch")
    tp = pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    model = peers.torch_cnn(torch)
    example = torch.zeros(1, 1, 8, 8)
    target = 20_000
    pruned, ratio = peers.tp_prune_to_params(tp, model, example, target, global_pruning)
    n = sum(p.numel() for p in pruned.parameters())
    assert 0.0 < ratio < 0.99
    assert abs(n - target) / target < 0.1
    # The original is untouched; the pruned copy runs, keeps 10 outputs and the residual
    # coupling (stem and block_b keep the same channels).
    assert sum(p.numel() for p in model.parameters()) == 84_826
    assert pruned.stem[0].out_channels == pruned.block_b[0].out_channels
    assert tuple(pruned.eval()(torch.zeros(2, 1, 8, 8)).shape) == (2, 10)
    assert peers.torch_flops(pruned) < peers.torch_flops(model)


def test_step_log_estimate_replaces_steps_by_their_median(peers):
    log = peers.StepLog()
    log.new().extend([5.0, 1.0, 1.0, 9.0])   # a first step (compilation), one stall
    log.new().extend([2.0, 2.0, 2.0])
    # wall 30 s: each segment's steps after the first at their median (1 s, 2 s).
    assert log.estimate(30.0) == pytest.approx(30.0 - 11.0 + 3 * 1.0 - 4.0 + 2 * 2.0)
    assert log.stalled() == 1
    assert log.median() == pytest.approx(2.0)
    fields = log.fields(30.0)
    assert fields["steps"] == 7 and fields["stalled"] == 1


# ------------------------------------------------------------------- Only-Train-Once


@pytest.fixture(scope="module")
def oto_bench():
    return _import("oto_digits")


def test_oto_missing_is_said_clearly(oto_bench, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "only_train_once", None)  # import now raises ImportError
    assert oto_bench.main(["--seeds", "1", "--no-write"]) == 2
    err = capsys.readouterr().err
    assert "only-train-once" in err and "pip install" in err


def test_step_kinds_follow_the_demo_schedule(oto_bench):
    kinds = oto_bench.step_kinds(1500, 5)
    assert [i for i, k in enumerate(kinds) if k == "start"] == [300, 450, 600, 750, 900]
    assert kinds[0] == "first" and kinds.count("warm-up") == 299
    assert kinds.count("period") == 745 and kinds.count("fine-tune") == 450


def test_oto_smoke_prunes_exactly_and_constructs_the_subnet(oto_bench):
    # Tiny steps, PyTorch side only (the JAX side is the demo recipe, tested elsewhere).
    torch = pytest.importorskip("torch")
    if importlib.util.find_spec("only_train_once") is None:
        pytest.skip("only_train_once (only-train-once 3.0.1, extra 'peers') is not installed")
    from hesso_jax.data import load_digits_split

    oto = oto_bench.import_oto(torch)
    torch.set_num_threads(1)
    args = oto_bench.parse_args(["--steps", "20", "--periods", "2"])
    data = load_digits_split(0)
    tensors = oto_bench.tpd.torch_data(torch, data)
    torch.manual_seed(0)
    twin = oto_bench.tpd.torch_cnn(torch)
    recipes = {"torch adam": oto_bench.TorchRecipe(args, torch, twin, tensors),
               "oto hesso": oto_bench.TorchRecipe(args, torch, oto_bench.tpd.torch_cnn(torch),
                                                  tensors, oto=oto)}
    batches = oto_bench.tpd.batch_indices(len(data.x_train), 64, 0)
    times = oto_bench.lockstep(recipes, [next(batches) for _ in range(20)])
    assert all(len(t) == 20 for t in times.values())
    out = recipes["oto hesso"].finish()
    assert out["G"] == 192 and 0 < out["K"] <= 96
    assert out["zero_groups"] == out["K"]          # exactly K groups at 0.0
    assert out["max_logit_diff"] < 1e-4            # the subnet computes the sparse model
    assert out["params"] < 84_826 and out["flops"] < oto_bench.tpd.torch_flops(twin)
    fields = oto_bench.time_fields(times["oto hesso"], oto_bench.step_kinds(20, 2), 0.0)
    assert set(fields["kind_ms"]) == set(oto_bench.KINDS)
    assert fields["seconds"] == pytest.approx(sum(times["oto hesso"]))


def test_xla_flops_is_the_pareto_count_of_the_same_channels(peers):
    # The FLOP convention of pareto_digits: XLA's count of the JAX CNN (forward_flops).
    from hesso_jax.train import forward_flops

    x = np.zeros((1, 8, 8, 1), np.float32)
    assert peers.xla_flops(1, 48, 48, 96, 10) == forward_flops(CNN(rngs=nnx.Rngs(0)), x)
    assert peers.xla_flops(1, 48, 24, 96, 10) < peers.xla_flops(1, 48, 48, 96, 10)


@pytest.mark.parametrize("global_pruning", [False, True])
def test_tp_prune_to_flops_lands_at_or_below_the_target(peers, global_pruning):
    torch = pytest.importorskip("torch")
    tp = pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    model = peers.torch_cnn(torch)
    example = torch.zeros(1, 1, 8, 8)
    full = peers.torch_flops(model)
    measure = lambda m: peers.torch_flops(m) / full  # noqa: E731  (fast analytic count)
    pruned, ratio, frac = peers.tp_prune_to_flops(tp, model, example, 0.5, global_pruning,
                                                  measure)
    assert frac == pytest.approx(measure(pruned))
    assert 0.4 < frac <= 0.5                       # at most the target, not far below
    assert 0.0 < ratio < 0.99
    assert sum(p.numel() for p in model.parameters()) == 84_826   # original untouched
    assert tuple(pruned.eval()(torch.zeros(2, 1, 8, 8)).shape) == (2, 10)
    with pytest.raises(RuntimeError, match="every channel ratio"):
        peers.tp_prune_to_flops(tp, model, example, 1e-6, global_pruning, measure, iters=3)


def test_flop_table_reads_torch_rows(peers):
    row = {"framework": "torch", "seed": 0, "steps": 500, "method": "tp_global",
           "sparsity": None, "budget_flops": 0.5, "acc": 0.99, "params": 40_000,
           "flops": 3.0e6, "flops_xla": 2.8e6, "flops_fraction": 0.49, "latency_ratio": 0.5,
           "seconds": 10.0, "ratio": 0.3}
    dense = {**row, "method": "dense", "budget_flops": None, "flops_fraction": 1.0,
             "ratio": 0.0, "flops_xla": 5.7e6}
    summary = peers.flop_summary([row, dense])
    assert [s["method"] for s in summary] == ["dense", "tp_global"]
    assert [s["steps"] for s in summary] == [500, 500]   # the recipe's, not steps timed
    text = peers.flop_table(summary)
    assert "≤ 50%" in text and "49.0%" in text and "2.80 M" in text


def test_pareto_reads_the_torch_pruning_flop_rows_without_torch(peers, tmp_path):
    # pareto_digits draws Torch-Pruning's FLOP-target rows from the peer JSON alone.
    import json

    import pareto_digits

    row = {"framework": "torch", "seed": 0, "steps": 500, "method": "tp_uniform",
           "sparsity": None, "budget_flops": 0.5, "acc": 0.99, "params": 40_000,
           "flops": 3.3e6, "flops_xla": 2.8e6, "flops_fraction": 0.49, "latency_ratio": 0.5,
           "seconds": 10.0}
    dense = {**row, "method": "dense", "budget_flops": None, "flops_fraction": 1.0}
    path = tmp_path / "peer.json"
    path.write_text(json.dumps({"command": "python x --flops 0.5", "rows": [row, dense]}))
    rows, commands = pareto_digits.peer_rows(path)
    assert commands == ["python x --flops 0.5"] and len(rows) == 1   # dense row left out
    assert rows[0]["flops"] == 2.8e6 and rows[0]["arch"] == "cnn"
    count = [{"arch": "cnn", "method": m, "sparsity": s, "budget_flops": None, "steps": 500,
              "seed": 0, "min_keep": 0, "acc": a, "params": 1, "flops": f,
              "flops_fraction": f / 5.6e6, "latency_ratio": 1.0, "seconds": 1.0}
             for m, s, a, f in (("dense", 0.0, 1.0, 5.6e6), ("hesso", 0.3, 0.98, 1.8e6))]
    text = pareto_digits.matched_table(pareto_digits.summarize(rows + count))
    assert "Torch-Pruning per layer (PyTorch twin) [500 steps]" in text
    # count-K interpolated at 2.8 M FLOPs: 98 + 2 · (2.8 − 1.8) / (5.6 − 1.8) = 98.53
    assert "| 99.00 ± 0.00 | 98.53 | +0.47 |" in text
    assert pareto_digits.peer_rows(tmp_path / "missing.json") == ([], [])


def test_pareto_pairs_a_budget_run_with_count_k_of_its_own_seed(peers):
    # paired_matched interpolates each seed's own count-K curve at the budget run's FLOPs.
    import pareto_digits

    def row(method, seed, sparsity, acc, flops, budget=None):
        return {"arch": "cnn", "method": method, "sparsity": sparsity, "budget_flops": budget,
                "steps": 500, "seed": seed, "min_keep": 0, "acc": acc, "flops": flops,
                "flops_fraction": flops / 10.0}

    rows = []
    for seed, shift in ((0, 0.0), (1, 0.01)):   # seed 1's count-K curve is 1 pp higher
        rows += [row("dense", seed, 0.0, 0.99 + shift, 10.0),
                 row("hesso", seed, 0.3, 0.97 + shift, 6.0),
                 row("hesso", seed, 0.5, 0.95 + shift, 4.0)]
        rows.append(row("hesso_fisher", seed, None, 0.97, 5.0, budget=0.5))
    rows.append(row("hesso_fisher", 2, None, 0.97, 5.0, budget=0.5))  # no count-K: left out
    (res,) = pareto_digits.paired_matched(rows)
    assert res["seeds"] == [0, 1] and res["bracket"] == [(0.5, 0.3), (0.5, 0.3)]
    np.testing.assert_allclose(res["ref"], [96.0, 97.0])     # halfway between 4 and 6 FLOPs
    np.testing.assert_allclose(res["diff"], [1.0, 0.0])
    assert res["diff_mean"] == pytest.approx(0.5)
    # 95 % Student-t half-width, 1 degree of freedom: 12.706 · s / √2 with s = √0.5
    assert res["ci95"] == pytest.approx(12.706 * 0.5 ** 0.5 / 2 ** 0.5, rel=1e-3)
