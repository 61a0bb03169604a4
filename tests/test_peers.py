"""benchmarks/peers: the Torch-Pruning side by side (its helpers; the full grid is a benchmark).

Without the optional extra ``peers`` only the "not installed" message is checked; the
other tests skip.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from hesso_jax.models import CNN
from hesso_jax.train import count_params

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "torch_pruning_digits.py"


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("torch_pruning_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
