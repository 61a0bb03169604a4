"""Tests of the Llama-style decoder: causality, RoPE, GQA, groups, surgery, HESSO, discovery,
the byte-level corpus and the pretraining recipe (tiny configurations, few steps)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import jitted

import hesso_jax as hj
from hesso_jax import text
from hesso_jax.models import Llama
from hesso_jax.models.llama import (
    LlamaConfig,
    apply_rope,
    heldout_windows,
    lm_eval_loss,
    load_pretrained,
    make_lm_train_chunk,
    pretrain,
    rope_tables,
    rotate_half,
    save_pretrained,
    unigram_perplexity,
)
from hesso_jax.train import count_params

V = 64  # vocabulary of the test models (tokens are random ids < V)


def rngs(seed: int = 0) -> nnx.Rngs:
    # unsafe_rbg: initialisers compile much faster than threefry on CPU
    return nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))


@functools.cache
def model_gqa(tie: bool = True) -> Llama:
    """2 layers, 4 query heads over 2 kv heads (head_dim 8), 24 SwiGLU neurons."""
    return Llama(V, 32, 2, 4, 2, 24, rngs=rngs(), max_len=32, tie_embeddings=tie)


def tokens(seed: int, shape=(2, 12)) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, V)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-30))


# ------------------------------------------------------------------ forward and RoPE
def test_forward_shape_and_causality():
    model = jitted(model_gqa())
    x = tokens(1)
    base = model(x)
    assert base.shape == (2, 12, V) and base.dtype == jnp.float32
    for t in (0, 6, 11):
        out = model(x.at[:, t].set((x[:, t] + 5) % V))
        np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
        assert not np.allclose(np.asarray(out[:, t:]), np.asarray(base[:, t:]))
    # a prefix sees the same logits
    assert rel_err(model(x[:, :7]), base[:, :7]) < 1e-5
    with pytest.raises(ValueError, match="max_len"):
        model_gqa()(jnp.zeros((1, 33), jnp.int32))


def test_rope_matches_complex_rotation_and_is_relative():
    d, t = 8, 10
    x = jax.random.normal(jax.random.key(0), (1, t, 1, d))
    cos, sin = rope_tables(t, d, theta=100.0)
    got = np.asarray(apply_rope(x, cos, sin))[0, :, 0]
    # independent form: pair (x_i, x_{i+d/2}) as a complex number times e^{i p ω_i}
    xn = np.asarray(x)[0, :, 0].astype(np.float64)
    z = (xn[:, : d // 2] + 1j * xn[:, d // 2:]) * np.exp(
        1j * np.arange(t)[:, None] * 100.0 ** (-np.arange(0, d, 2) / d))
    np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], axis=1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(rotate_half(rotate_half(x))), -np.asarray(x))
    # the score of q at position m and k at position n depends on n - m only
    q, k = jax.random.normal(jax.random.key(1), (2, d))
    qs = apply_rope(jnp.broadcast_to(q, (1, t, 1, d)), cos, sin)[0, :, 0]
    ks = apply_rope(jnp.broadcast_to(k, (1, t, 1, d)), cos, sin)[0, :, 0]
    scores = np.asarray(qs @ ks.T)
    for shift in range(-3, 4):
        diag = np.diagonal(scores, offset=shift)
        np.testing.assert_allclose(diag, diag[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.diagonal(scores, 0)[0], np.diagonal(scores, 2)[0])
    # rope_tables(offset=s) continues the same rotation
    c2, s2 = rope_tables(4, d, theta=100.0, offset=3)
    np.testing.assert_allclose(np.asarray(c2), np.asarray(cos[3:7]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(s2), np.asarray(sin[3:7]), atol=1e-6)


def reference_attention(attn, x) -> np.ndarray:
    """Per-head float64 NumPy attention: query head j uses kv head j // r, complex RoPE."""
    wq, wk, wv, wo = (np.asarray(a, np.float64) for a in
                      (attn.query[...], attn.key[...], attn.value[...], attn.out[...]))
    x = np.asarray(x, np.float64)
    hq, hkv, d = wq.shape[1], wk.shape[1], wq.shape[2]
    t = x.shape[1]
    rot = np.exp(1j * np.arange(t)[:, None] * attn.rope_theta ** (-np.arange(0, d, 2) / d))

    def rope(a):
        z = (a[..., : d // 2] + 1j * a[..., d // 2:]) * rot
        return np.concatenate([z.real, z.imag], axis=-1)

    out = np.zeros_like(x)
    for j in range(hq):
        g = j // (hq // hkv)
        q, k, v = rope(x @ wq[:, j]), rope(x @ wk[:, g]), x @ wv[:, g]
        s = q @ np.swapaxes(k, 1, 2) / np.sqrt(d)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out += (p / p.sum(-1, keepdims=True)) @ v @ wo[j]
    return out


def test_gqa_attention_matches_reference_and_reduces_to_mha():
    attn = model_gqa().layers[0].attn
    x = jax.random.normal(jax.random.key(3), (2, 9, 32))
    got = jitted(attn)(x)
    assert rel_err(got, reference_attention(attn, x)) < 1e-5
    # num_kv_heads == num_heads (MHA) with each kv head copied to its query heads
    mha = Llama(V, 32, 1, 4, 4, 24, rngs=rngs(1)).layers[0].attn
    mha.query[...], mha.out[...] = attn.query[...], attn.out[...]
    mha.key[...] = jnp.repeat(attn.key[...], 2, axis=1)
    mha.value[...] = jnp.repeat(attn.value[...], 2, axis=1)
    assert rel_err(jitted(mha)(x), got) < 1e-6
    assert rel_err(jitted(mha)(x), reference_attention(mha, x)) < 1e-5
    with pytest.raises(ValueError, match="multiple"):
        Llama(V, 32, 1, 4, 3, 24, rngs=rngs())


# ------------------------------------------------------------------------- groups
def test_groups_layout():
    model = model_gqa()
    groups = model.groups()
    assert [f.name for f in groups.families] == [
        "layers.0.heads", "layers.0.mlp", "layers.1.heads", "layers.1.mlp"]
    assert [f.size for f in groups.families] == [2, 24, 2, 24]
    heads = groups.families[0]
    assert hj.Member(("layers", 0, "attn", "query"), 1, block=2) in heads.members
    assert heads.dependents == (hj.Member(("layers", 0, "attn", "out"), 0, block=2),)
    groups.validate(nnx.state(model, nnx.Param))


def zero_members(state, groups, keep, noise_seed=None):
    """Members of dropped groups set to 0; with ``noise_seed``, their dependents perturbed."""
    layout = groups.layout(state)
    dropped = jnp.concatenate([jnp.asarray(~keep, jnp.float32), jnp.zeros(1)])
    leaves, treedef = jax.tree_util.tree_flatten(state)
    for m in layout.members:
        leaves[m.leaf] = leaves[m.leaf] * (1.0 - m.expand(dropped))
    if noise_seed is not None:
        rng = np.random.default_rng(noise_seed)
        for d in layout.dependents:
            noise = jnp.asarray(rng.normal(size=d.shape), jnp.float32)
            leaves[d.leaf] = leaves[d.leaf] + noise * d.expand(dropped)
    return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.mark.parametrize("seed", [0, 1])
def test_hand_written_groups_are_zero_invariant(seed):
    model = model_gqa()
    groups = model.groups()
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    keep = np.random.default_rng(seed).random(groups.num_groups) > 0.4
    keep[[0, 2]] = False  # a kv head (with its query heads) and a neuron of layer 0
    x = tokens(seed + 20)
    zeroed = zero_members(state, groups, keep)
    perturbed = zero_members(state, groups, keep, noise_seed=seed)
    assert int(groups.zero_groups(zeroed).sum()) == int((~keep).sum())
    assert not all(jax.tree.leaves(jax.tree.map(jnp.array_equal, zeroed, perturbed)))
    want = forward(zeroed, x)
    assert rel_err(forward(perturbed, x), want) < 1e-5
    assert rel_err(forward(state, x), want) > 1e-3  # the zeroing did change the model
    # every kv group of a layer zeroed: that attention block outputs exactly 0
    attn = nnx.merge(*nnx.split(model.layers[1].attn))
    attn.value[...] = jnp.zeros_like(attn.value[...])
    out = jitted(attn)(jax.random.normal(jax.random.key(0), (1, 5, 32)))
    np.testing.assert_array_equal(np.asarray(out), 0.0)


# ------------------------------------------------------------------------- surgery
def masked_copy(model, groups, keep):
    graphdef, state = nnx.split(model)
    mask = groups.broadcast(jnp.asarray(keep, jnp.float32), state, fill=1.0)
    return nnx.merge(graphdef, jax.tree.map(lambda a, m: (a * m).astype(a.dtype), state, mask))


@pytest.mark.parametrize("tie, case", [(True, "random"), (False, "whole_family")])
def test_masked_equals_shrunk_model(tie, case):
    model = model_gqa(tie)
    groups = model.groups()
    keep = np.random.default_rng(7).random(groups.num_groups) > 0.5
    keep[[0, 26]] = False, True  # layer 0 loses kv head 0; layer 1 keeps kv head 0
    if case == "whole_family":
        keep[:2] = False  # every head of layer 0: attention contributes nothing
    masked = masked_copy(model, groups, keep)
    small = hj.shrink_model(masked, groups)
    kept_heads = int(keep[26:28].sum())
    assert small.layers[1].attn.key.shape[1] == kept_heads
    assert small.layers[1].attn.query.shape[1] == 2 * kept_heads
    assert small.layers[0].mlp.gate.kernel.shape[1] == int(keep[2:26].sum())
    assert small.layers[0].mlp.down.in_features == int(keep[2:26].sum())
    x = tokens(4)
    assert rel_err(jitted(small)(x), jitted(masked)(x)) <= 1e-5
    assert count_params(small) < count_params(model)


def test_hesso_steps_then_shrink():
    model = model_gqa()
    groups = model.groups()
    K = 12
    tx = optax.chain(optax.adam(1e-2), hj.hesso(groups, K, P=2, Tp=2, warmup_steps=2))
    graphdef, params = nnx.split(model, nnx.Param)
    chunk = make_lm_train_chunk(graphdef, tx, batch_size=4, seq_len=12, steps=8)
    data = jnp.asarray(np.random.default_rng(0).integers(0, V, 400), jnp.int32)
    params, opt_state, losses = chunk(params, tx.init(params), data, jax.random.key(0))
    assert np.all(np.isfinite(np.asarray(losses)))
    status = hj.hesso_status(opt_state)
    assert status.phase == "finetune" and status.num_pruned == K
    np.testing.assert_array_equal(groups.zero_groups(params), status.pruned)
    trained = nnx.merge(graphdef, params)
    small = hj.shrink_model(trained, groups)
    x = tokens(5)
    assert rel_err(jitted(small)(x), jitted(trained)(x)) <= 1e-5
    assert count_params(small) < count_params(trained)


def _as_sets(groups):
    return {(f.size, frozenset(f.members), frozenset(f.dependents)) for f in groups.families}


@pytest.mark.parametrize("tie, kv", [(True, 2), (False, 4)])
def test_discovery_equals_hand_written_groups(tie, kv):
    model = model_gqa(tie) if kv == 2 else Llama(V, 32, 2, 4, kv, 24, rngs=rngs(2),
                                                  tie_embeddings=tie)
    found = hj.discover_groups(model, tokens(0))
    assert _as_sets(found) == _as_sets(model.groups())


# ---------------------------------------------------------------- corpus and recipe
MODULES = ("this", "textwrap", "json", "string")


def test_byte_tokenizer_and_corpus_split():
    s = "naïve → code\n"
    assert text.decode_bytes(text.encode_bytes(s)) == s
    assert text.encode_bytes(s).max() < text.BYTE_VOCAB_SIZE
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        text.decode_bytes([300])
    docs = text.stdlib_documents(MODULES)
    assert len(docs) == len(set(docs)) and any("Zen of Python" in d for d in docs)
    train, test = text.train_test_documents(0.3, modules=MODULES)
    assert (train, test) == text.train_test_documents(0.3, modules=MODULES)
    assert 0 < len(test) < len(docs) and sorted(train + test) == sorted(docs)
    assert not set(train) & set(test)
    assert all(text.heldout_fraction(d) < 0.3 for d in test)
    # a document's split does not depend on the other documents
    _, fewer_test = text.train_test_documents(0.3, modules=("this", "json"))
    assert set(fewer_test) <= set(test)
    joined_train, joined_test = text.train_test_corpus(0.3, modules=MODULES)
    assert joined_test == "\n\n".join(test) and joined_train == "\n\n".join(train)
    with pytest.raises(ValueError, match="test_fraction"):
        text.train_test_corpus(1.0, modules=MODULES)


def test_unigram_and_eval_loss():
    ids = np.array([1, 2, 3, 4, 5, 6, 7], np.int32)
    w = heldout_windows(ids, 3)
    np.testing.assert_array_equal(w, [[1, 2, 3, 4], [4, 5, 6, 7]])
    assert unigram_perplexity(np.zeros(98, np.int32), np.zeros((1, 5), np.int32), 3) == \
        pytest.approx(101 / 99)
    model = model_gqa()
    wins = np.asarray(tokens(6, (5, 9)))
    # batches of 2 with a padded last batch give the same mean as one batch of 5
    assert lm_eval_loss(model, wins, batch_size=2) == pytest.approx(
        lm_eval_loss(model, wins, batch_size=5), rel=1e-5)


def test_pretrain_save_load_roundtrip(tmp_path):
    train, test = text.train_test_corpus(0.2, modules=MODULES)
    tr, te = text.encode_bytes(train), text.encode_bytes(test)
    windows = heldout_windows(te, 32, max_windows=16)
    cfg = LlamaConfig(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=48,
                      max_len=64)
    res = pretrain(cfg, tr, windows, steps=60, batch_size=8, seq_len=32, lr=3e-2,
                   warmup=10, chunk=30, progress=False, model=cfg.build(rngs()))
    assert res.steps == [30, 60] and len(res.eval_loss) == 2 and res.wall_s > 0
    # (the few-minute recipe run beats the unigram model; 60 tiny steps learn its level)
    assert res.eval_loss[-1] < res.eval_loss[0]
    assert res.eval_loss[-1] < np.log(text.BYTE_VOCAB_SIZE) - 1.0
    assert res.train_loss[-1] < res.train_loss[0]
    graphdef, state = nnx.split(res.model)
    zeros = nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, state))
    save_pretrained(tmp_path / "ckpt", zeros, cfg)  # replaced by the next save
    path = save_pretrained(tmp_path / "ckpt", res.model, cfg, {"steps": 60})
    loaded, cfg2 = load_pretrained(path)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, nnx.state(loaded), nnx.state(res.model))
    assert lm_eval_loss(loaded, windows) == res.eval_loss[-1]
    with pytest.raises(FileNotFoundError, match="llm_pretrain.py"):
        load_pretrained(tmp_path / "missing")


# ------------------------------------------------------------------------ generation
def _greedy_reference(model, prompt, num_new):
    """Greedy decoding by growing the sequence one token at a time (no fixed buffer)."""
    seq = np.asarray(prompt)
    for _ in range(num_new):
        nxt = np.asarray(jnp.argmax(jitted(model)(jnp.asarray(seq))[:, -1], axis=-1))
        seq = np.concatenate([seq, nxt[:, None].astype(seq.dtype)], axis=1)
    return seq


def test_generate_greedy_matches_growing_sequence_reference():
    from hesso_jax.models.llama import generate

    model = model_gqa()
    prompt = tokens(30, (1, 5))
    out = generate(model, prompt, 4)
    assert out.shape == (1, 9) and out.dtype == prompt.dtype
    np.testing.assert_array_equal(np.asarray(out), _greedy_reference(model, prompt, 4))
    np.testing.assert_array_equal(np.asarray(generate(model, prompt, 0)), np.asarray(prompt))
    # a 1-D prompt is one sequence; the call is traceable (nnx.jit gives the same tokens)
    np.testing.assert_array_equal(np.asarray(generate(model, prompt[0], 4)),
                                  np.asarray(out[0]))
    jit_out = nnx.jit(lambda m, p: generate(m, p, 4))(model, prompt)
    np.testing.assert_array_equal(np.asarray(jit_out), np.asarray(out))


def test_generate_sampling_is_keyed_and_temperature_scaled():
    from hesso_jax.models.llama import generate

    model = model_gqa()
    prompt = tokens(31, (4, 3))
    a = generate(model, prompt, 12, temperature=1.0, key=jax.random.key(1))
    b = generate(model, prompt, 12, temperature=1.0, key=jax.random.key(1))
    c = generate(model, prompt, 12, temperature=1.0, key=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))    # same key, same tokens
    assert not np.array_equal(np.asarray(a), np.asarray(c))         # another key differs
    np.testing.assert_array_equal(np.asarray(a[:, :3]), np.asarray(prompt))
    assert int(a.min()) >= 0 and int(a.max()) < V
    # a vanishing temperature concentrates softmax(z / T) on the argmax: greedy
    cold = generate(model, prompt, 12, temperature=1e-6, key=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(cold), np.asarray(generate(model, prompt, 12)))


def test_generate_shrunk_equals_masked_greedy():
    from hesso_jax.models.llama import generate

    model = model_gqa()
    groups = model.groups()
    keep = np.random.default_rng(3).random(groups.num_groups) > 0.5
    keep[[0, 26]] = False, True   # layer 0 loses kv head 0 (with its query heads)
    masked = masked_copy(model, groups, keep)
    small = hj.shrink_model(masked, groups)
    assert count_params(small) < count_params(masked)
    prompt = tokens(32, (3, 4))
    want = generate(masked, prompt, 10)
    np.testing.assert_array_equal(np.asarray(generate(small, prompt, 10)), np.asarray(want))
    assert not np.array_equal(np.asarray(want), np.asarray(generate(model, prompt, 10)))
    key = jax.random.key(4)
    np.testing.assert_array_equal(
        np.asarray(generate(small, prompt, 10, temperature=0.8, key=key)),
        np.asarray(generate(masked, prompt, 10, temperature=0.8, key=key)))


def test_generate_rejects_bad_input():
    from hesso_jax.models.llama import generate

    model = model_gqa()   # max_len 32
    prompt = tokens(33, (1, 4))
    with pytest.raises(ValueError, match="max_len"):
        generate(model, prompt, 29)
    with pytest.raises(ValueError, match="key"):
        generate(model, prompt, 2, temperature=0.5)
    with pytest.raises(ValueError, match=">= 0"):
        generate(model, prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="num_new"):
        generate(model, prompt, -1)
    with pytest.raises(TypeError, match="num_new"):
        generate(model, prompt, 2.0)
    with pytest.raises(TypeError, match="integer"):
        generate(model, jnp.ones((1, 3)), 2)
    with pytest.raises(ValueError, match="P >= 1"):
        generate(model, jnp.zeros((1, 0), jnp.int32), 2)
