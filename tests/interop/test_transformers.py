"""Hugging Face Flax models (transformers 4.x), tiny random-init configs, no download.

Their sizes come from a global config object, so `hj.shrink_model` refuses them with a
clear error (out of scope, issue 12 item 9); discovery and soundness are checked.
"""

import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip("transformers",
                                   reason="the interop extra (transformers<5) is not installed")

import hesso_jax as hj  # noqa: E402

from .common import check_sound, discover, sizes  # noqa: E402

IDS = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 7)), jnp.int32)


def bert():
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=20,
                                  max_position_embeddings=16)
    return transformers.FlaxBertModel(cfg, seed=0)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2,
                                  n_positions=16, n_inner=24)
    return transformers.FlaxGPT2Model(cfg, seed=0)


CASES = {
    # per layer: 2 heads and 20 intermediate neurons; the pooler's 16 outputs are not
    # part of last_hidden_state (dead, hence prunable); the residual width is LayerNorm'd
    "bert": (bert, [2, 20, 2, 20, 16]),
    # per layer: 2 heads (c_attn's q/k/v thirds) and 24 MLP neurons
    "gpt2": (gpt2, [2, 24, 2, 24]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hugging_face_flax_model(name):
    build, expected = CASES[name]
    model = build()

    def fn(params, ids):
        return model(ids, params=params).last_hidden_state

    groups, caught = discover(fn, model.params, IDS)
    assert sizes(groups) == sorted(expected), (groups.families, caught)
    masked, _ = check_sound(fn, model.params, groups, (IDS,))
    small, plan = hj.shrink(masked, groups)
    assert plan.num_removed > 0
    ones, pos = jnp.ones_like(IDS), jnp.broadcast_to(jnp.arange(IDS.shape[1]), IDS.shape)
    call = (IDS, ones, jnp.zeros_like(IDS), pos) if name == "bert" else (IDS, ones, pos)
    with pytest.raises(ValueError, match="read from a config object|rebuild it yourself"):
        hj.shrink_model(model.module, groups, *call, variables={"params": masked})
