"""A BERT-style post-LayerNorm transformer encoder (the MiniLM / BERT layout).

Names follow the usual BERT checkpoint layout so pretrained weights map one to one:
``embeddings.{word,position,token_type}`` + ``embeddings.norm``; per layer ``attention.
{query,key,value,output}`` (``nnx.Linear``, heads folded into the feature axis),
``attention_norm``, ``intermediate``, ``output``, ``output_norm``. `SentenceEncoder` adds
the sentence-transformers head (masked mean pooling, optionally L2-normalised);
`hesso_jax.models.minilm` loads the pretrained all-MiniLM-L6-v2 weights into it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class BertAttention(nnx.Module):
    """Multi-head self-attention with ``(d, heads*head_dim)`` projections.

    ``softmax(q_h k_hᵀ / √head_dim + mask) v_h`` per head ``h``; the head count is read
    from the query kernel's shape (``out_features // head_dim``), so removing heads only
    shrinks parameters.

    Args:
      d_model: width of the residual stream.
      num_heads: heads; ``head_dim = d_model // num_heads``.
      rngs: NNX random streams.
    """

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs):
        self.head_dim = d_model // num_heads
        self.query = nnx.Linear(d_model, d_model, rngs=rngs)
        self.key = nnx.Linear(d_model, d_model, rngs=rngs)
        self.value = nnx.Linear(d_model, d_model, rngs=rngs)
        self.output = nnx.Linear(d_model, d_model, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Forward pass; ``mask`` is ``bool[batch, tokens]`` (True = attend)."""
        b, t, _ = x.shape
        d = self.head_dim
        q = self.query(x).reshape(b, t, -1, d)
        k = self.key(x).reshape(b, t, -1, d)
        v = self.value(x).reshape(b, t, -1, d)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d).astype(x.dtype)
        if mask is not None:
            logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
        att = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, -1)
        return self.output(out)


class BertLayer(nnx.Module):
    """``h = LN(x + attn(x))``; ``LN(h + W2 gelu(W1 h))`` (post-LayerNorm)."""

    def __init__(self, d_model: int, num_heads: int, mlp_dim: int, *, eps: float = 1e-12,
                 rngs: nnx.Rngs):
        self.attention = BertAttention(d_model, num_heads, rngs=rngs)
        self.attention_norm = nnx.LayerNorm(d_model, epsilon=eps, rngs=rngs)
        self.intermediate = nnx.Linear(d_model, mlp_dim, rngs=rngs)
        self.output = nnx.Linear(mlp_dim, d_model, rngs=rngs)
        self.output_norm = nnx.LayerNorm(d_model, epsilon=eps, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Forward pass."""
        h = self.attention_norm(x + self.attention(x, mask))
        mlp = self.output(jax.nn.gelu(self.intermediate(h), approximate=False))
        return self.output_norm(h + mlp)


class Embeddings(nnx.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    def __init__(self, vocab_size: int, max_len: int, d_model: int, type_vocab: int = 2, *,
                 eps: float = 1e-12, rngs: nnx.Rngs):
        self.word = nnx.Embed(vocab_size, d_model, rngs=rngs)
        self.position = nnx.Embed(max_len, d_model, rngs=rngs)
        self.token_type = nnx.Embed(type_vocab, d_model, rngs=rngs)
        self.norm = nnx.LayerNorm(d_model, epsilon=eps, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Forward pass on ``int[batch, tokens]`` token ids (token type 0)."""
        pos = jnp.arange(ids.shape[1])[None, :]
        h = self.word(ids) + self.position(pos) + self.token_type(jnp.zeros_like(ids))
        return self.norm(h)


class BertEncoder(nnx.Module):
    """Embeddings → ``depth`` post-LN layers; returns token states ``(b, t, d)``.

    Args:
      vocab_size: token vocabulary.
      max_len: longest sequence (position table).
      d_model: hidden width (384 for MiniLM-L6).
      num_heads: attention heads per layer (12 for MiniLM-L6).
      mlp_dim: intermediate width (1536 for MiniLM-L6).
      depth: number of layers (6 for MiniLM-L6).
      eps: LayerNorm epsilon.
      rngs: NNX random streams.
    """

    def __init__(self, vocab_size: int = 1000, max_len: int = 128, d_model: int = 384,
                 num_heads: int = 12, mlp_dim: int = 1536, depth: int = 6, *,
                 eps: float = 1e-12, rngs: nnx.Rngs):
        self.embeddings = Embeddings(vocab_size, max_len, d_model, eps=eps, rngs=rngs)
        self.layers = nnx.List([BertLayer(d_model, num_heads, mlp_dim, eps=eps, rngs=rngs)
                                for _ in range(depth)])

    def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Token states for ``int[batch, tokens]`` ids and an optional attention mask."""
        h = self.embeddings(ids)
        for layer in self.layers:
            h = layer(h, mask)
        return h


def mean_pool(states: jax.Array, mask: jax.Array) -> jax.Array:
    """Sentence embedding: mean of the token states where ``mask`` is True.

    ``e_b = Σ_t m_bt h_bt / max(Σ_t m_bt, 1e-9)`` (the sentence-transformers clamp).
    """
    w = mask.astype(states.dtype)[..., None]
    return (states * w).sum(1) / jnp.maximum(w.sum(1), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(‖x‖₂, eps)`` along the last axis (``torch.nn.functional.normalize``)."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


class SentenceEncoder(nnx.Module):
    """A `BertEncoder` with the sentence-transformers pooling head.

    ``e = normalize(mean_pool(encoder(ids, mask), mask))``: the masked mean of the last
    layer's token states, divided by its L2 norm when ``normalize`` (all-MiniLM-L6-v2's
    ``Normalize`` module). The encoder lives in ``self.encoder`` (parameter paths
    ``encoder/embeddings/...``, ``encoder/layers/i/...``).

    Args:
      vocab_size, max_len, d_model, num_heads, mlp_dim, depth, eps: see `BertEncoder`.
      normalize: L2-normalise the pooled embedding.
      rngs: NNX random streams.
    """

    def __init__(self, vocab_size: int = 1000, max_len: int = 128, d_model: int = 384,
                 num_heads: int = 12, mlp_dim: int = 1536, depth: int = 6, *,
                 eps: float = 1e-12, normalize: bool = True, rngs: nnx.Rngs):
        self.encoder = BertEncoder(vocab_size, max_len, d_model, num_heads, mlp_dim, depth,
                                   eps=eps, rngs=rngs)
        self.normalize = normalize

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Sentence embeddings ``(batch, d_model)`` of ``int[batch, tokens]`` ids.

        ``mask`` is ``bool[batch, tokens]``, True on real tokens (attention and pooling).
        """
        pooled = mean_pool(self.encoder(ids, mask), mask)
        return l2_normalize(pooled) if self.normalize else pooled
