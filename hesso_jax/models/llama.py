"""A Llama-style causal decoder (RoPE, grouped-query attention, SwiGLU, RMSNorm) in Flax NNX.

For tokens ``c_0..c_{T-1}`` and ``L`` layers:

    h⁰ = E[c],   u = hˡ⁻¹ + Attn(RMSNorm(hˡ⁻¹)),   hˡ = u + SwiGLU(RMSNorm(u)),
    logits = RMSNorm(hᴸ) Eᵀ   (tied; ``RMSNorm(hᴸ) W_out`` when untied)

and ``logits_t`` predicts ``c_{t+1}`` from ``c_0..c_t`` only.

* **RMSNorm**: ``RMSNorm(x) = g ⊙ x / sqrt(mean(x²) + ε)`` over the model width.
* **RoPE** (rotate-half form): with ``D`` the head dimension, ``ω_i = θ^(-2i/D)`` for
  ``i < D/2`` and ``c = [cos(tω), cos(tω)]``, ``s = [sin(tω), sin(tω)]`` at position ``t``,
  ``rope_t(x) = x ⊙ c + rotate_half(x) ⊙ s`` with ``rotate_half([x₁, x₂]) = [-x₂, x₁]``
  (halves of the last axis). It rotates each pair ``(x_i, x_{i+D/2})`` by the angle
  ``t·ω_i``, so ``rope_m(q) · rope_n(k) = q · rope_{n-m}(k)``: scores depend on
  positions only through ``n - m``.
* **Grouped-query attention**: ``H_q`` query heads share ``H_kv`` key/value heads; query
  head ``j`` reads kv head ``j // r`` with ``r = H_q / H_kv`` (``r = 1`` is multi-head
  attention). ``o = Σ_j softmax(rope(q_j) rope(k_{j//r})ᵀ / √D + M) v_{j//r} W_o[j]``
  with the causal mask ``M`` (``0`` for ``s ≤ t``, the dtype's lowest value above).
* **SwiGLU**: ``MLP(x) = (silu(x W_gate) ⊙ (x W_up)) W_down``, ``silu(z) = z σ(z)``.

Every size (heads, kv heads, head dimension, MLP width) is read from the parameter shapes
when the model runs, so the module `hesso_jax.shrink_model` returns (fewer kv heads with
their query heads, fewer MLP neurons) runs without any static attribute being rewritten.

`generate` continues token prompts greedily or by temperature sampling (one jitted
``lax.fori_loop``); it too reads every size from the parameters, so a shrunk model
generates as it is.

The second half of the module is a pretraining recipe on a byte-level corpus that ships
with Python (`hesso_jax.text.train_test_corpus`): `LlamaConfig`, `make_lm_train_chunk`
(a jitted ``lax.scan`` of optimizer steps that works for any optax transformation,
HESSO included), `lm_eval_loss`, `unigram_perplexity`, `pretrain`, and the orbax
checkpoint pair `save_pretrained` / `load_pretrained`
(``benchmarks/llm_pretrain.py`` runs it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from hesso_jax.groups import GroupFamily, Groups, Member, check_int
from hesso_jax.models.charlm import lm_loss
from hesso_jax.text import BYTE_VOCAB_SIZE

__all__ = ["Llama", "LlamaAttention", "LlamaBlock", "LlamaConfig", "PretrainResult",
           "SwiGLU", "apply_rope", "generate", "heldout_windows", "llama_families", "lm_eval_loss",
           "load_pretrained", "make_lm_train_chunk", "pretrain", "pretrain_optimizer",
           "rope_tables", "rotate_half",
           "save_pretrained", "unigram_perplexity"]


# ------------------------------------------------------------------------------- RoPE
def rope_tables(length: int, head_dim: int, theta: float = 10000.0,
                offset: int = 0) -> tuple[jax.Array, jax.Array]:
    """``cos`` and ``sin`` tables ``float32[length, head_dim]`` of rotate-half RoPE.

    Row ``t`` (position ``p = offset + t``) is ``[cos(pω), cos(pω)]`` and
    ``[sin(pω), sin(pω)]`` with ``ω_i = theta^(-2i/head_dim)``, ``i < head_dim/2``.

    Args:
      length: number of positions.
      head_dim: ``D`` (even).
      theta: the RoPE base ``θ``.
      offset: position of row 0.

    Example:
      >>> cos, sin = rope_tables(4, 8)
      >>> cos.shape, float(cos[0, 0]), float(sin[0, 0])
      ((4, 8), 1.0, 0.0)
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    pos = jnp.arange(offset, offset + length, dtype=jnp.float32)
    angles = pos[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: jax.Array) -> jax.Array:
    """``[x₁, x₂] ↦ [-x₂, x₁]`` on the two halves of the last axis.

    Example:
      >>> rotate_half(jnp.array([1.0, 2.0, 3.0, 4.0])).tolist()
      [-3.0, -4.0, 1.0, 2.0]
    """
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x ⊙ cos + rotate_half(x) ⊙ sin`` for ``x: [batch, T, heads, D]``, tables ``[T, D]``.

    Example:
      >>> cos, sin = rope_tables(3, 4)
      >>> x = jnp.ones((1, 3, 2, 4))
      >>> bool(jnp.allclose(jnp.linalg.norm(apply_rope(x, cos, sin), axis=-1), 2.0))
      True
    """
    cos = cos[:, None, :].astype(x.dtype)
    sin = sin[:, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin


# ------------------------------------------------------------------------------ model
class LlamaAttention(nnx.Module):
    """Causal grouped-query self-attention with RoPE; sizes come from the kernel shapes.

    Kernels (no biases): ``query: (d, H_q, D)``, ``key, value: (d, H_kv, D)``,
    ``out: (H_q, D, d)``. Query head ``j`` reads kv head ``j // (H_q // H_kv)``: the kv
    heads are repeated ``r`` times along the head axis (``jnp.repeat``), so the query heads
    of kv head ``g`` are the contiguous block ``[g·r, (g+1)·r)``.

    Args:
      d_model: input and output width ``d``.
      num_heads: query heads ``H_q``.
      num_kv_heads: key/value heads ``H_kv`` (divides ``H_q``).
      head_dim: ``D`` (even; default ``d_model // num_heads``).
      rope_theta: the RoPE base ``θ``.
      rngs: NNX random streams.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int,
                 head_dim: int | None = None, *, rope_theta: float = 10000.0,
                 rngs: nnx.Rngs):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        head_dim = d_model // num_heads if head_dim is None else head_dim
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        self.rope_theta = float(rope_theta)
        init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        self.query = nnx.Param(init(rngs.params(), (d_model, num_heads, head_dim)))
        self.key = nnx.Param(init(rngs.params(), (d_model, num_kv_heads, head_dim)))
        self.value = nnx.Param(init(rngs.params(), (d_model, num_kv_heads, head_dim)))
        out_init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        self.out = nnx.Param(out_init(rngs.params(), (num_heads, head_dim, d_model)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x: [batch, T, d] -> [batch, T, d]``."""
        wq, wk, wv = self.query[...], self.key[...], self.value[...]
        rep = wq.shape[1] // wk.shape[1]
        cos, sin = rope_tables(x.shape[1], wq.shape[2], self.rope_theta)
        q = apply_rope(jnp.einsum("btd,dhk->bthk", x, wq), cos, sin)
        k = apply_rope(jnp.einsum("btd,dhk->bthk", x, wk), cos, sin)
        v = jnp.einsum("btd,dhk->bthk", x, wv)
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        logits = jnp.einsum("bqhk,bshk->bhqs", q, k) / jnp.sqrt(
            jnp.asarray(q.shape[-1], q.dtype))
        t = logits.shape[-1]
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
        heads = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(logits, axis=-1), v)
        return jnp.einsum("bqhk,hkd->bqd", heads, self.out[...])


class SwiGLU(nnx.Module):
    """``(silu(x W_gate) ⊙ (x W_up)) W_down`` with bias-free ``nnx.Linear`` layers.

    Args:
      d_model: input and output width.
      mlp_dim: hidden width (the neurons).
      rngs: NNX random streams.
    """

    def __init__(self, d_model: int, mlp_dim: int, *, rngs: nnx.Rngs):
        self.gate = nnx.Linear(d_model, mlp_dim, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(d_model, mlp_dim, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(mlp_dim, d_model, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Forward pass."""
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nnx.Module):
    """``u = x + Attn(RMSNorm(x))``, ``u + SwiGLU(RMSNorm(u))`` (pre-norm).

    Args:
      d_model, num_heads, num_kv_heads, mlp_dim: sizes (see `Llama`).
      rope_theta: the RoPE base.
      norm_eps: RMSNorm ``ε``.
      rngs: NNX random streams.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, mlp_dim: int, *,
                 rope_theta: float = 10000.0, norm_eps: float = 1e-6, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(d_model, epsilon=norm_eps, rngs=rngs)
        self.attn = LlamaAttention(d_model, num_heads, num_kv_heads, rope_theta=rope_theta,
                                   rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(d_model, epsilon=norm_eps, rngs=rngs)
        self.mlp = SwiGLU(d_model, mlp_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Forward pass."""
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
    """Token embedding → `LlamaBlock` × ``num_layers`` → RMSNorm → vocabulary logits.

    Args:
      vocab_size: tokens ``V``.
      d_model: residual width ``d``.
      num_layers: decoder blocks.
      num_heads: query heads per block; ``head_dim = d_model // num_heads`` (even).
      num_kv_heads: key/value heads per block (divides ``num_heads``).
      mlp_dim: SwiGLU hidden width.
      rngs: NNX random streams.
      max_len: longest sequence accepted (RoPE itself has no table to outgrow).
      rope_theta: the RoPE base ``θ``.
      tie_embeddings: output logits ``h Eᵀ`` with the embedding table (``embed.attend``);
        otherwise a separate bias-free ``lm_head`` ``(d, V)``.
      norm_eps: RMSNorm ``ε``.

    Example:
      >>> model = Llama(256, 32, 2, 4, 2, 64, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 10), jnp.int32)).shape
      (2, 10, 256)
      >>> model.groups().num_groups          # per layer: 2 kv heads + 64 neurons
      132
    """

    def __init__(self, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
                 num_kv_heads: int, mlp_dim: int, *, rngs: nnx.Rngs, max_len: int = 2048,
                 rope_theta: float = 10000.0, tie_embeddings: bool = True,
                 norm_eps: float = 1e-6):
        self.max_len = int(max_len)
        self.tie_embeddings = bool(tie_embeddings)
        self.embed = nnx.Embed(vocab_size, d_model,
                               embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = nnx.List([
            LlamaBlock(d_model, num_heads, num_kv_heads, mlp_dim, rope_theta=rope_theta,
                       norm_eps=norm_eps, rngs=rngs) for _ in range(num_layers)])
        self.norm = nnx.RMSNorm(d_model, epsilon=norm_eps, rngs=rngs)
        if not self.tie_embeddings:
            self.lm_head = nnx.Linear(d_model, vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Next-token logits ``float[B, T, V]`` of ``int[B, T]`` tokens (``T ≤ max_len``)."""
        if tokens.shape[-1] > self.max_len:
            raise ValueError(f"sequence of {tokens.shape[-1]} tokens > max_len={self.max_len}")
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h)
        return self.embed.attend(h) if self.tie_embeddings else self.lm_head(h)

    def groups(self) -> Groups:
        """Per layer: a family of kv heads (with their query heads) and one of SwiGLU neurons.

        See `llama_families`; the embedding, the norms and the output head are not prunable.
        """
        return Groups.from_families(llama_families(self.layers))


def llama_families(layers: Any, prefix: tuple[str, ...] = ("layers",)) -> list[GroupFamily]:
    """The hand-written groups of a sequence of `LlamaBlock` at ``prefix + (i,)``.

    *kv heads* (``H_kv`` groups, ``r = H_q / H_kv`` read from the kernel shapes): group
    ``g`` is ``key[:, g]``, ``value[:, g]`` and the query heads ``query[:, g·r:(g+1)·r]``
    (``Member(axis=1, block=r)``), the dependent is ``out[g·r:(g+1)·r]``. With ``value[:, g]``
    zero every one of those query heads outputs ``softmax(·) · 0 = 0`` (whatever RoPE does
    to ``q`` and ``k``); ``query`` and ``key`` are members so the whole head group is
    scored and removed together. *Neurons* (``mlp_dim`` groups): ``gate`` and ``up``
    columns ``j`` (``silu(0) · 0 = 0``), dependent ``down`` row ``j``. The residual width is
    RMS-normalised (and tied to the embedding) and is not prunable.

    Args:
      layers: the blocks in order (e.g. ``model.layers``).
      prefix: path of their container in the model's state.

    Returns:
      ``[heads_0, mlp_0, heads_1, mlp_1, ...]`` named ``'layers.{i}.heads'`` /
      ``'layers.{i}.mlp'``.
    """
    families = []
    for i, layer in enumerate(layers):
        a = (*prefix, i, "attn")
        kv_heads = layer.attn.key.shape[1]
        rep = layer.attn.query.shape[1] // kv_heads
        families.append(GroupFamily(
            kv_heads,
            (Member((*a, "query"), 1, block=rep), Member((*a, "key"), 1),
             Member((*a, "value"), 1)),
            (Member((*a, "out"), 0, block=rep),), name=f"{prefix[-1]}.{i}.heads"))
        m = (*prefix, i, "mlp")
        families.append(GroupFamily(
            layer.mlp.gate.kernel.shape[1],
            (Member((*m, "gate", "kernel"), 1), Member((*m, "up", "kernel"), 1)),
            (Member((*m, "down", "kernel"), 0),), name=f"{prefix[-1]}.{i}.mlp"))
    return families


# ------------------------------------------------------------------------ generation
@functools.partial(jax.jit, static_argnames=("graphdef", "num_new", "temperature"))
def _generate(graphdef: Any, state: Any, prompt: jax.Array, key: jax.Array, *,
              num_new: int, temperature: float) -> jax.Array:
    """The ``lax.fori_loop`` of `generate` on a fixed ``[B, P + num_new]`` buffer."""
    batch, plen = prompt.shape
    buf = jnp.concatenate([prompt, jnp.zeros((batch, num_new), prompt.dtype)], axis=1)

    def step(i: jax.Array, buf: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, state)(buf)
        last = jax.lax.dynamic_index_in_dim(logits, plen + i - 1, axis=1,
                                            keepdims=False).astype(jnp.float32)
        if temperature == 0.0:
            nxt = jnp.argmax(last, axis=-1)
        else:
            nxt = jax.random.categorical(jax.random.fold_in(key, i), last / temperature)
        return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(buf.dtype)[:, None],
                                                   plen + i, axis=1)

    return jax.lax.fori_loop(0, num_new, step, buf)


def generate(model: Llama, prompt_tokens: Any, num_new: int, *, temperature: float = 0.0,
             key: jax.Array | None = None) -> jax.Array:
    """Continues ``prompt_tokens`` by ``num_new`` tokens, greedily or by sampling.

    With ``P`` prompt tokens, step ``i = 0..num_new-1`` reads the logits ``z`` the model
    gives at position ``P + i - 1`` and appends

        c_{P+i} = argmax_v z_v                          (``temperature == 0``: greedy)
        c_{P+i} ~ softmax(z / temperature)              (``temperature > 0``)

    (the sampling key of step ``i`` is ``fold_in(key, i)``). Full recompute, no KV cache:
    every step runs the whole model on one fixed buffer ``int[B, P + num_new]`` (the
    tokens so far, zeros to their right), so the loop is a single jitted
    ``lax.fori_loop`` compiled once per ``(B, P, num_new, temperature)``; causal attention
    makes position ``t``'s logits independent of the padding after it. Cost
    ``O(num_new · (P + num_new)²)`` attention per sequence — fine for short continuations
    of small models; a KV cache is the way to long ones. Every size comes from the
    parameter shapes, so a model returned by `hesso_jax.shrink_model` generates as it is
    (and greedily exactly like the masked model it came from, up to float rounding).
    The function is traceable: it may be called inside ``nnx.jit``.

    Args:
      model: a `Llama` (or any module mapping ``int[B, T]`` to ``float[B, T, V]`` with
        causal attention and a ``max_len`` attribute).
      prompt_tokens: ``int[B, P]`` or ``int[P]`` token ids, ``P >= 1``.
      num_new: tokens to append (``>= 0``).
      temperature: ``0.0`` for greedy decoding, ``> 0`` to sample.
      key: a PRNG key, required when ``temperature > 0``.

    Returns:
      ``int[B, P + num_new]`` (``int[P + num_new]`` for a 1-D prompt): the prompt followed
      by the new tokens.

    Raises:
      ValueError: an empty prompt, ``P + num_new > model.max_len``, a negative
        ``num_new`` or ``temperature``, or sampling without a key.
      TypeError: non-integer tokens or ``num_new``.

    Example:
      >>> model = Llama(256, 16, 1, 2, 1, 32, rngs=nnx.Rngs(0))
      >>> out = generate(model, jnp.array([[72, 105]]), 4)       # greedy
      >>> out.shape, out[0, :2].tolist()
      ((1, 6), [72, 105])
      >>> bool((generate(model, jnp.array([72, 105]), 4) == out[0]).all())
      True
      >>> generate(model, jnp.array([1, 2]), 3, temperature=1.0,
      ...          key=jax.random.key(0)).shape
      (5,)
    """
    num_new = check_int("num_new", num_new, 0)
    temperature = _check_temperature(temperature, key)
    prompt = jnp.asarray(prompt_tokens)
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise TypeError(f"prompt_tokens must be integer token ids, got {prompt.dtype}")
    if prompt.ndim not in (1, 2) or prompt.shape[-1] < 1:
        raise ValueError(f"prompt_tokens must be int[B, P] or int[P] with P >= 1, got "
                         f"shape {tuple(prompt.shape)}")
    total = prompt.shape[-1] + num_new
    if total > getattr(model, "max_len", total):
        raise ValueError(f"{prompt.shape[-1]} prompt + {num_new} new tokens = {total} > "
                         f"max_len={model.max_len}")
    graphdef, state = nnx.split(model)
    out = _generate(graphdef, state, jnp.atleast_2d(prompt),
                    jax.random.key(0) if key is None else key, num_new=num_new,
                    temperature=temperature)
    return out[0] if prompt.ndim == 1 else out


def _check_temperature(temperature: Any, key: jax.Array | None) -> float:
    """``temperature`` as a float ``>= 0``; a key is needed to sample (``> 0``)."""
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise TypeError(f"temperature must be a float, got {temperature!r}")
    if not temperature >= 0.0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite float >= 0, got {temperature}")
    if temperature > 0.0 and key is None:
        raise ValueError(f"temperature={temperature} samples: pass key=jax.random.key(...)")
    return float(temperature)


# ------------------------------------------------------------------ pretraining recipe
@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The constructor arguments of a `Llama` (what a checkpoint needs to rebuild it).

    The defaults are the byte-level model of ``benchmarks/llm_pretrain.py``: ``V = 256``,
    ``d = 128``, 4 layers of 4 query / 2 kv heads (``D = 32``) and 384 SwiGLU neurons,
    tied embeddings (0.82 M parameters).

    Example:
      >>> cfg = LlamaConfig(d_model=32, num_layers=1, mlp_dim=64)
      >>> LlamaConfig.from_dict(cfg.to_dict()) == cfg
      True
    """

    vocab_size: int = BYTE_VOCAB_SIZE
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_dim: int = 384
    max_len: int = 512
    rope_theta: float = 10000.0
    tie_embeddings: bool = True

    def build(self, rngs: nnx.Rngs) -> Llama:
        """A freshly initialised `Llama` of this configuration."""
        return Llama(self.vocab_size, self.d_model, self.num_layers, self.num_heads,
                     self.num_kv_heads, self.mlp_dim, rngs=rngs, max_len=self.max_len,
                     rope_theta=self.rope_theta, tie_embeddings=self.tie_embeddings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Inverse of `to_dict` (unknown keys are an error)."""
        return cls(**d)


def _windows(data: jax.Array, starts: jax.Array, length: int) -> jax.Array:
    """``data[s : s + length]`` for every ``s`` in ``starts``: ``int[len(starts), length]``."""
    return data[starts[:, None] + jnp.arange(length)[None, :]]


def make_lm_train_chunk(graphdef: Any, tx: optax.GradientTransformation, *,
                        batch_size: int, seq_len: int, steps: int) -> Callable:
    """Jitted ``chunk(params, opt_state, data, key) -> (params, opt_state, losses[steps])``.

    One ``lax.scan`` of ``steps`` optimizer steps. Step ``n`` draws ``batch_size`` windows
    of ``seq_len + 1`` tokens at uniform random offsets of ``data`` (key
    ``split(key, steps)[n]``), computes the next-token loss
    ``L(θ) = -(1/BT) Σ log softmax(logits)[c_{t+1}]`` and its gradient, and applies
    ``tx`` (any optax transformation; the batch loss is passed as the extra argument
    ``value_fn`` for HESSO-CRIC). ``params`` are the model's ``nnx.Param`` state (a
    `Llama` has no other state).

    Args:
      graphdef: from ``nnx.split(model, nnx.Param)``.
      tx: the optimizer.
      batch_size: windows per step.
      seq_len: predicted tokens per window.
      steps: optimizer steps per call.

    Example:
      >>> model = Llama(256, 16, 1, 2, 1, 32, rngs=nnx.Rngs(0))
      >>> graphdef, params = nnx.split(model, nnx.Param)
      >>> tx = optax.adam(1e-2)
      >>> chunk = make_lm_train_chunk(graphdef, tx, batch_size=2, seq_len=8, steps=3)
      >>> data = jnp.arange(100, dtype=jnp.int32) % 7
      >>> params, state, losses = chunk(params, tx.init(params), data, jax.random.key(0))
      >>> losses.shape
      (3,)
    """
    tx = optax.with_extra_args_support(tx)

    def loss_fn(params: Any, windows: jax.Array) -> jax.Array:
        return lm_loss(nnx.merge(graphdef, params)(windows[:, :-1]), windows[:, 1:])

    def body(carry: tuple, xs: tuple) -> tuple:
        params, opt_state, data = carry
        starts = jax.random.randint(xs, (batch_size,), 0, data.shape[0] - seq_len)
        windows = _windows(data, starts, seq_len + 1)
        loss, grads = jax.value_and_grad(loss_fn)(params, windows)
        updates, opt_state = tx.update(grads, opt_state, params,
                                       value_fn=lambda p: loss_fn(p, windows))
        return (optax.apply_updates(params, updates), opt_state, data), loss

    @jax.jit
    def chunk(params: Any, opt_state: Any, data: jax.Array, key: jax.Array) -> tuple:
        (params, opt_state, _), losses = jax.lax.scan(
            body, (params, opt_state, data), jax.random.split(key, steps))
        return params, opt_state, losses

    return chunk


def heldout_windows(ids: np.ndarray, seq_len: int,
                    max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping evaluation windows ``int[n, seq_len + 1]`` of a token stream.

    Window ``i`` is ``ids[i·T : i·T + T + 1]`` (``T = seq_len``): consecutive windows share
    one token, so every token after the first is predicted exactly once, from up to ``T``
    tokens of context. ``max_windows`` keeps the first ones.
    """
    n = (len(ids) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"{len(ids)} tokens make no window of {seq_len + 1}")
    return np.stack([ids[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])


@functools.partial(jax.jit, static_argnums=0)
def _batch_nll_sum(graphdef: Any, state: Any, w: jax.Array, wt: jax.Array) -> jax.Array:
    """``Σ_b wt_b · mean_t -log p(w[b, t+1] | w[b, ≤t])`` (compiled once per graphdef)."""
    logp = jax.nn.log_softmax(nnx.merge(graphdef, state)(w[:, :-1]).astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, w[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll.mean(-1) * wt)


def lm_eval_loss(model: nnx.Module, windows: np.ndarray, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` over ``windows``.

    ``windows`` (e.g. from `heldout_windows`) is cut into batches of ``batch_size`` (the
    last one padded and weighted out), each run through one jitted forward pass; the
    perplexity is ``exp`` of the result.
    """
    graphdef, state = nnx.split(model)
    n = len(windows)
    pad = -n % batch_size
    padded = np.concatenate([windows, np.repeat(windows[:1], pad, axis=0)])
    weight = np.concatenate([np.ones(n), np.zeros(pad)]).astype(np.float32)
    total = sum(float(_batch_nll_sum(graphdef, state, jnp.asarray(padded[i:i + batch_size]),
                                     jnp.asarray(weight[i:i + batch_size])))
                for i in range(0, len(padded), batch_size))
    return total / n


def unigram_perplexity(train_ids: np.ndarray, windows: np.ndarray,
                       vocab_size: int = BYTE_VOCAB_SIZE) -> float:
    """Perplexity of the add-one unigram model of ``train_ids`` on the windows' targets.

    ``p(c) = (n_c + 1) / (N + V)`` from the training counts; the result is
    ``exp(-mean log p(c))`` over ``windows[:, 1:]`` (the tokens `lm_eval_loss` scores).

    Example:
      >>> unigram_perplexity(np.array([0, 1]), np.array([[0, 1, 0]]), vocab_size=2)
      2.0
    """
    counts = np.bincount(np.asarray(train_ids), minlength=vocab_size).astype(np.float64)
    logp = np.log((counts + 1.0) / (counts.sum() + vocab_size))
    return float(np.exp(-logp[np.asarray(windows)[:, 1:]].mean()))


@dataclasses.dataclass
class PretrainResult:
    """What `pretrain` returns: the trained model and its curves."""

    model: Llama
    config: LlamaConfig
    steps: list[int]
    train_loss: list[float]
    eval_loss: list[float]
    wall_s: float


def pretrain_optimizer(steps: int, lr: float = 3e-3, warmup: int = 50,
                       weight_decay: float = 0.01) -> optax.GradientTransformation:
    """``clip_by_global_norm(1) → adamw`` with linear warm-up and cosine decay to ``lr/10``."""
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, steps - 1), steps,
                                               end_value=lr / 10)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(sched, b2=0.99, weight_decay=weight_decay))


def pretrain(config: LlamaConfig, train_ids: np.ndarray, eval_windows: np.ndarray, *,
             steps: int, batch_size: int = 32, seq_len: int = 128, lr: float = 3e-3,
             warmup: int = 50, chunk: int = 25, seed: int = 0, progress: bool = True,
             model: Llama | None = None) -> PretrainResult:
    """Trains a fresh `Llama` on a token stream with `pretrain_optimizer`.

    The model is ``config.build(nnx.Rngs(seed))`` unless ``model`` is given (trained in
    place; e.g. to continue a run); call ``c`` of the jitted
    `make_lm_train_chunk` (``chunk`` steps) uses ``fold_in(key(seed + 1), c)``, so a run
    is a function of its arguments. After every call the loss on ``eval_windows`` is
    recorded (`lm_eval_loss`).

    Args:
      config: the architecture.
      train_ids: training tokens ``int[N]``.
      eval_windows: windows scored after every call (a few hundred keep this cheap).
      steps: optimizer steps (a multiple of ``chunk`` is run: rounded up).
      batch_size: windows per step.
      seq_len: tokens predicted per window.
      lr: peak learning rate of `pretrain_optimizer`.
      warmup: its linear warm-up steps.
      chunk: steps per jitted call (one progress-bar tick and one evaluation each).
      seed: initialisation and batch seed.
      progress: show a tqdm bar.
      model: start from this model (of ``config``'s architecture) instead of a fresh one.
    """
    model = config.build(nnx.Rngs(seed)) if model is None else model
    n_calls = math.ceil(steps / chunk)
    tx = pretrain_optimizer(n_calls * chunk, lr, warmup)
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)
    run = make_lm_train_chunk(graphdef, tx, batch_size=batch_size, seq_len=seq_len,
                              steps=chunk)
    data = jnp.asarray(train_ids, jnp.int32)
    key = jax.random.key(seed + 1)
    res = PretrainResult(model, config, [], [], [], 0.0)
    t0 = time.perf_counter()
    bar = tqdm(range(n_calls), desc="pretrain", disable=not progress)
    for c in bar:
        params, opt_state, losses = run(params, opt_state, data, jax.random.fold_in(key, c))
        nnx.update(model, params)
        res.steps.append((c + 1) * chunk)
        res.train_loss.append(float(jnp.mean(losses)))
        res.eval_loss.append(lm_eval_loss(model, eval_windows))
        bar.set_postfix(train=f"{res.train_loss[-1]:.3f}", heldout=f"{res.eval_loss[-1]:.3f}")
    res.wall_s = time.perf_counter() - t0
    return res


def save_pretrained(path: str | Path, model: Llama, config: LlamaConfig,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Writes ``config.json`` (config + ``metadata``) and the orbax ``params`` checkpoint.

    ``path/params`` is ``nnx.state(model, nnx.Param)`` saved with
    ``orbax.checkpoint.StandardCheckpointer`` (an existing checkpoint is replaced);
    `load_pretrained` reads both back.

    Returns:
      The checkpoint directory (absolute).
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "params", nnx.state(model, nnx.Param), force=True)
        ckpt.wait_until_finished()
    info = {"config": config.to_dict(), "metadata": metadata or {}}
    (path / "config.json").write_text(json.dumps(info, indent=1) + "\n")
    return path


def load_pretrained(path: str | Path) -> tuple[Llama, LlamaConfig]:
    """The `Llama` and `LlamaConfig` written by `save_pretrained` at ``path``.

    The model is built abstractly (``nnx.eval_shape``: no initialiser runs) and its
    parameters are restored with ``StandardCheckpointer.restore`` against that abstract
    state, so shapes and dtypes are checked.

    Raises:
      FileNotFoundError: no checkpoint at ``path`` (with the command that writes one).
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not (path / "config.json").is_file() or not (path / "params").is_dir():
        raise FileNotFoundError(f"no pretrained Llama checkpoint at {path}; write one with "
                                f"`python benchmarks/llm_pretrain.py --ckpt {path}`")
    config = LlamaConfig.from_dict(json.loads((path / "config.json").read_text())["config"])
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: config.build(nnx.Rngs(0))))
    with ocp.StandardCheckpointer() as ckpt:
        state = ckpt.restore(path / "params", abstract)
    return nnx.merge(graphdef, state), config
