"""Tests of the causal character-level LM: causal mask, groups, masked == shrunk outputs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import jitted

import hesso_jax as hj
from hesso_jax.models import CharLM
from hesso_jax.models.charlm import VOCAB, VOCAB_SIZE, decode, encode, lm_loss
from hesso_jax.models.transformer import SelfAttention


@functools.cache
def small_model() -> CharLM:
    """One model for the whole module (eager NNX initialisation is slow on CPU)."""
    return CharLM(VOCAB_SIZE, seq_len=16, d_model=16, num_heads=4, mlp_dim=24, depth=2,
                  rngs=nnx.Rngs(0))


def tokens(seed: int, shape=(3, 16)) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB_SIZE)


def test_encode_decode_roundtrip():
    text = "def f(x):\n    return x ~ 1\t\u00e9"
    ids = encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert ids.min() >= 0 and ids.max() == VOCAB_SIZE - 1
    assert decode(ids) == text[:-2] + "??"
    assert decode(encode(VOCAB)) == VOCAB


def test_causal_mask_later_tokens_do_not_change_earlier_logits():
    model = jitted(small_model())
    x = tokens(1)
    base = model(x)
    for t in (0, 5, 15):
        changed = x.at[:, t].set((x[:, t] + 7) % VOCAB_SIZE)
        out = model(changed)
        np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
        assert not np.allclose(np.asarray(out[:, t:]), np.asarray(base[:, t:]))


def test_shorter_sequences_are_prefixes():
    model = jitted(small_model())
    x = tokens(2)
    np.testing.assert_allclose(np.asarray(model(x[:, :9])), np.asarray(model(x)[:, :9]),
                               rtol=1e-5, atol=1e-6)


def test_default_attention_stays_bidirectional():
    attn = SelfAttention(16, 4, rngs=nnx.Rngs(0))
    assert attn.causal is False  # the default, as TinyTransformer uses it
    bidir = jitted(attn)
    attn.causal = True
    causal = jitted(attn)
    x = jax.random.normal(jax.random.key(0), (2, 8, 16))
    changed = x.at[:, -1].add(1.0)
    assert not np.allclose(np.asarray(bidir(x)[:, 0]), np.asarray(bidir(changed)[:, 0]))
    np.testing.assert_array_equal(np.asarray(causal(x)[:, :-1]),
                                  np.asarray(causal(changed)[:, :-1]))
    # the mask only hides the future: the last position sees everything in both
    np.testing.assert_allclose(np.asarray(causal(x)[:, -1]), np.asarray(bidir(x)[:, -1]),
                               rtol=1e-5, atol=1e-6)


def test_groups_layout():
    model = small_model()
    groups = model.groups()
    assert [f.name for f in groups.families] == [
        "blocks.0.heads", "blocks.0.mlp", "blocks.1.heads", "blocks.1.mlp"]
    assert groups.num_groups == 2 * (4 + 24)
    groups.validate(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("seed", [0, 2])
def test_masked_output_equals_shrunk_output(seed):
    model = small_model()
    groups = model.groups()
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)
    keep = rng.random(groups.num_groups) > 0.5
    if seed == 2:  # a whole family removed: every head of block 0
        keep[:4] = False
    mask = groups.broadcast(jnp.asarray(keep, jnp.float32), state, fill=1.0)
    masked = jax.tree.map(lambda x, m: (x * m).astype(x.dtype), state, mask)
    assert int(groups.zero_groups(masked).sum()) == int((~keep).sum())
    small, plan = hj.shrink(masked, groups)
    # an emptied family keeps one exactly-zero placeholder group (no zero-size leaves)
    starts = np.cumsum([0] + [f.size for f in groups.families])[:-1]
    emptied = sum(not keep[o:o + f.size].any()
                  for o, f in zip(starts, groups.families, strict=True))
    assert emptied == (seed == 2)
    assert plan.num_removed == int((~keep).sum()) - emptied
    x = tokens(seed + 10)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    want = np.asarray(forward(masked, x), np.float64)
    got = np.asarray(forward(small, x), np.float64)
    assert got.shape == want.shape
    err = np.max(np.abs(got - want))
    assert err <= 1e-5 * np.max(np.abs(want)), err
    n_small = sum(x.size for x in jax.tree.leaves(small))
    n_big = sum(x.size for x in jax.tree.leaves(state))
    assert n_small < n_big


def test_lm_loss_matches_uniform():
    logits = jnp.zeros((2, 5, VOCAB_SIZE))
    targets = jnp.zeros((2, 5), jnp.int32)
    np.testing.assert_allclose(float(jnp.exp(lm_loss(logits, targets))), VOCAB_SIZE,
                               rtol=1e-5)
