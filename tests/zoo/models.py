"""A zoo of tiny models with hand-derived group counts: the oracle for `discover_groups`.

Every model reads its sizes (channels, heads, head_dim, kv heads, patch grid) from
parameter shapes at call time, so that a model whose parameters were physically shrunk
still runs. The only sizes stored as Python attributes are those Flax itself stores on its
layers (``nnx.Conv.feature_group_count``, ``nnx.MultiHeadAttention.num_heads`` ...), which
``hj.shrink_model`` is expected to fix.

Each `ZooCase` carries the number of groups ``G`` and the sorted list of family sizes that
automatic discovery must find. The rules these counts follow (see the test file and the
issue text) are, in short:

* a *family* is a channel space (axes tied by elementwise ops, residual adds, per-channel
  BatchNorm, bias adds, free axes of dot_general/conv, contracted pairs, reshapes with the
  outer factor winning, concatenation segments) that has a trainable producer, never
  touches a model input or output axis, has no normalisation statistic / softmax / max
  over it, and is zero-invariant when its producers are zeroed;
* attention: one family per layer over the (kv) heads; MLP/SwiGLU hidden neurons: one
  family per layer; residual streams normalised by LayerNorm/RMSNorm: not prunable; all
  blocks sharing an identity shortcut: one family; concatenated producers: one family
  each; the final layer's outputs: never.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["ZOO", "LinenCase", "ZooCase", "make_rngs"]


@dataclasses.dataclass(frozen=True)
class ZooCase:
    """One zoo model.

    Attributes:
      build: ``build(rngs) -> model``: an ``nnx.Module`` or, when ``pure``, a `LinenCase`.
      example_input: ``example_input(seed) -> tuple`` of positional call arguments.
      expected_num_groups: G that discovery must find (hand-derived below).
      expected_families: sorted family sizes that discovery must find.
      notes: the derivation and anything ambiguous.
      pure: the model is a pure function ``fn(params, *args)`` (`LinenCase`).
    """

    build: Callable[[nnx.Rngs], Any]
    example_input: Callable[[int], tuple]
    expected_num_groups: int
    expected_families: tuple[int, ...]
    notes: str = ""
    pure: bool = False

    def __post_init__(self) -> None:
        fams = tuple(sorted(self.expected_families))
        object.__setattr__(self, "expected_families", fams)
        if sum(fams) != self.expected_num_groups:
            raise ValueError(f"family sizes {fams} do not sum to G={self.expected_num_groups}")


# Example inputs come from numpy (no PRNG program to compile per shape).
def _normal(*shape: int) -> Callable[[int], tuple]:
    def make(seed: int) -> tuple:
        x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
        return (jnp.asarray(x),)
    return make


def _image(batch: int = 2, size: int = 8, channels: int = 3) -> Callable[[int], tuple]:
    return _normal(batch, size, size, channels)


def _vector(batch: int = 4, features: int = 16) -> Callable[[int], tuple]:
    return _normal(batch, features)


def _tokens(batch: int = 2, length: int = 6, features: int = 8) -> Callable[[int], tuple]:
    return _normal(batch, length, features)


class ConvBN(nnx.Module):
    """``Conv (no bias) -> BatchNorm`` (train mode until ``.eval()``)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, *, strides: int = 1,
                 groups: int = 1, rngs: nnx.Rngs):
        self.conv = nnx.Conv(cin, cout, (kernel, kernel), strides=strides, padding="SAME",
                             feature_group_count=groups, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


# ------------------------------------------------------------------------------- MLP
class MLP(nnx.Module):
    """``Linear(16,12) relu Linear(12,8) gelu Linear(8,4)``."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(16, 12, rngs=rngs)
        self.fc2 = nnx.Linear(12, 8, rngs=rngs)
        self.fc3 = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc3(jax.nn.gelu(self.fc2(jax.nn.relu(self.fc1(x)))))


# The input width 16 touches the model input, the output width 4 is the model output;
# the hidden widths 12 and 8 are one family each (relu(0) = gelu(0) = 0).
MLP_FAMILIES = (12, 8)


# --------------------------------------------------------------------------- VGG + BN
class VGG(nnx.Module):
    """``[ConvBN relu]x2 -> maxpool -> ConvBN relu -> maxpool -> flatten -> MLP``.

    8x8x3 -> conv1 8 -> conv2 8 -> pool 4x4 -> conv3 12 -> pool 2x2 -> flatten 48 ->
    Linear 16 relu -> Linear 10.
    """

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = ConvBN(3, 8, rngs=rngs)
        self.conv2 = ConvBN(8, 8, rngs=rngs)
        self.conv3 = ConvBN(8, 12, rngs=rngs)
        self.fc1 = nnx.Linear(2 * 2 * 12, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.conv1(x))
        h = jax.nn.relu(self.conv2(h))
        h = nnx.max_pool(h, (2, 2), strides=(2, 2))
        h = jax.nn.relu(self.conv3(h))
        h = nnx.max_pool(h, (2, 2), strides=(2, 2))
        h = h.reshape(h.shape[0], -1)
        return self.fc2(jax.nn.relu(self.fc1(h)))


# conv1 (8), conv2 (8), conv3 (12; fc1's rows p*12+c, p<4, are its strided dependents),
# fc1 hidden (16). Max pooling reduces over spatial windows only (window 1 on channels),
# so channels pass through it; fc2's 10 outputs are the model output.
VGG_FAMILIES = (8, 8, 12, 16)


# ------------------------------------------------------------------------ ResNet basic
class BasicBlock(nnx.Module):
    """``relu(BN(conv_b(relu(BN(conv_a(x))))) + shortcut(x))``; projection if needed."""

    def __init__(self, cin: int, cout: int, *, strides: int = 1, rngs: nnx.Rngs):
        self.a = ConvBN(cin, cout, strides=strides, rngs=rngs)
        self.b = ConvBN(cout, cout, rngs=rngs)
        if strides != 1 or cin != cout:
            self.proj = ConvBN(cin, cout, 1, strides=strides, rngs=rngs)
        else:
            self.proj = None

    def __call__(self, x: jax.Array) -> jax.Array:
        r = self.b(jax.nn.relu(self.a(x)))
        s = x if self.proj is None else self.proj(x)
        return jax.nn.relu(s + r)


class ResNetBasic(nnx.Module):
    """stem ConvBN 3->8; stage 1: 2 identity blocks (8); stage 2: 8->16 stride 2 with a
    1x1 projection shortcut, then an identity block (16); mean pool; Linear 16->10."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = ConvBN(3, 8, rngs=rngs)
        self.blocks = nnx.List([
            BasicBlock(8, 8, rngs=rngs),
            BasicBlock(8, 8, rngs=rngs),
            BasicBlock(8, 16, strides=2, rngs=rngs),
            BasicBlock(16, 16, rngs=rngs),
        ])
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.stem(x))
        for block in self.blocks:
            h = block(h)
        return self.head(jnp.mean(h, axis=(1, 2)))


# stage 1: {stem, blocks.0.b, blocks.1.b} (8) — the identity shortcuts tie them; inner
# blocks.0.a (8), blocks.1.a (8). stage 2: {blocks.2.proj, blocks.2.b, blocks.3.b} (16)
# — the projection shortcut starts the new stage's family; inner blocks.2.a (16),
# blocks.3.a (16). G = 3*8 + 3*16 = 72.
RESNET_BASIC_FAMILIES = (8, 8, 8, 16, 16, 16)


# ------------------------------------------------------------------- ResNet bottleneck
class Bottleneck(nnx.Module):
    """``relu(BN(c3(relu(BN(c2(relu(BN(c1(x))))))) + shortcut(x))``: 1x1, 3x3, 1x1."""

    def __init__(self, cin: int, mid: int, cout: int, *, strides: int = 1,
                 rngs: nnx.Rngs):
        self.c1 = ConvBN(cin, mid, 1, rngs=rngs)
        self.c2 = ConvBN(mid, mid, 3, strides=strides, rngs=rngs)
        self.c3 = ConvBN(mid, cout, 1, rngs=rngs)
        if strides != 1 or cin != cout:
            self.proj = ConvBN(cin, cout, 1, strides=strides, rngs=rngs)
        else:
            self.proj = None

    def __call__(self, x: jax.Array) -> jax.Array:
        r = self.c3(jax.nn.relu(self.c2(jax.nn.relu(self.c1(x)))))
        s = x if self.proj is None else self.proj(x)
        return jax.nn.relu(s + r)


class ResNetBottleneck(nnx.Module):
    """stem ConvBN 3->8; bottleneck 8->4->16 stride 2 with projection; bottleneck
    16->6->16 identity; mean pool; Linear 16->10."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = ConvBN(3, 8, rngs=rngs)
        self.blocks = nnx.List([
            Bottleneck(8, 4, 16, strides=2, rngs=rngs),
            Bottleneck(16, 6, 16, rngs=rngs),
        ])
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.stem(x))
        for block in self.blocks:
            h = block(h)
        return self.head(jnp.mean(h, axis=(1, 2)))


# stem (8): its only consumers are blocks.0.c1 and blocks.0.proj (no identity add), so
# it is a family on its own. blocks.0.c1 (4), blocks.0.c2 (4), blocks.1.c1 (6),
# blocks.1.c2 (6); {blocks.0.proj, blocks.0.c3, blocks.1.c3} (16). G = 8+4+4+6+6+16 = 44.
RESNET_BOTTLENECK_FAMILIES = (8, 4, 4, 6, 6, 16)


# ------------------------------------------------------------------------ MobileNetV2
class InvertedResidual(nnx.Module):
    """``expand 1x1 ConvBN relu6 -> depthwise 3x3 ConvBN relu6 -> project 1x1 ConvBN``,
    plus the input when the stride is 1 and the widths agree (linear bottleneck)."""

    def __init__(self, cin: int, hidden: int, cout: int, *, strides: int = 1,
                 rngs: nnx.Rngs):
        self.expand = ConvBN(cin, hidden, 1, rngs=rngs)
        self.dw = ConvBN(hidden, hidden, 3, strides=strides, groups=hidden, rngs=rngs)
        self.project = ConvBN(hidden, cout, 1, rngs=rngs)
        self.residual = strides == 1 and cin == cout

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu6(self.expand(x))
        h = jax.nn.relu6(self.dw(h))
        h = self.project(h)
        return x + h if self.residual else h


class MobileNetV2(nnx.Module):
    """stem ConvBN 3->8 relu6; IR 8->16->8 (residual); IR 8->20->12 stride 2; head
    1x1 ConvBN 12->16 relu6; mean pool; Linear 16->10."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = ConvBN(3, 8, rngs=rngs)
        self.blocks = nnx.List([
            InvertedResidual(8, 16, 8, rngs=rngs),
            InvertedResidual(8, 20, 12, strides=2, rngs=rngs),
        ])
        self.last = ConvBN(12, 16, 1, rngs=rngs)
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu6(self.stem(x))
        for block in self.blocks:
            h = block(h)
        h = jax.nn.relu6(self.last(h))
        return self.head(jnp.mean(h, axis=(1, 2)))


# {stem, blocks.0.project} (8): the residual ties them. {blocks.0.expand, blocks.0.dw}
# (16): the depthwise conv (feature_group_count = channels, kernel (3,3,1,C)) passes
# channel c to channel c. {blocks.1.expand, blocks.1.dw} (20). blocks.1.project (12):
# no residual (stride 2, 8 != 12). last (16). G = 8+16+20+12+16 = 72.
MOBILENET_FAMILIES = (8, 16, 20, 12, 16)


# --------------------------------------------------------------------------- DenseNet
class DenseLayer(nnx.Module):
    """Pre-activation ``conv(relu(BN(x)))`` producing ``growth`` new channels."""

    def __init__(self, cin: int, growth: int, *, rngs: nnx.Rngs):
        self.bn = nnx.BatchNorm(cin, momentum=0.9, rngs=rngs)
        self.conv = nnx.Conv(cin, growth, (3, 3), padding="SAME", use_bias=False,
                             rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jax.nn.relu(self.bn(x)))


class DenseNet(nnx.Module):
    """stem ConvBN 3->8 relu = x0; y1 = layer1(x0) (4); y2 = layer2([x0, y1]) (6);
    transition ``conv1x1(relu(BN([x0, y1, y2])))`` 18->10 (with bias); mean; Linear 10->5."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = ConvBN(3, 8, rngs=rngs)
        self.layer1 = DenseLayer(8, 4, rngs=rngs)
        self.layer2 = DenseLayer(12, 6, rngs=rngs)
        self.trans_bn = nnx.BatchNorm(18, momentum=0.9, rngs=rngs)
        self.trans = nnx.Conv(18, 10, (1, 1), rngs=rngs)
        self.head = nnx.Linear(10, 5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x0 = jax.nn.relu(self.stem(x))
        y1 = self.layer1(x0)
        h = jnp.concatenate([x0, y1], axis=-1)
        y2 = self.layer2(h)
        h = jnp.concatenate([h, y2], axis=-1)
        h = self.trans(jax.nn.relu(self.trans_bn(h)))
        return self.head(jnp.mean(h, axis=(1, 2)))


# x0 = stem (8): with layer1.bn, layer2.bn[0:8], trans_bn[0:8] scale/bias (BN of a zero
# channel in train mode outputs its bias, so the post-concat BN bias must be zeroed too)
# and the consumers' in-channels at offset 0. y1 = layer1.conv (4): layer2.bn[8:12],
# trans_bn[8:12]. y2 = layer2.conv (6): trans_bn[12:18]. trans (10). G = 8+4+6+10 = 28.
DENSENET_FAMILIES = (8, 4, 6, 10)


# ------------------------------------------------------------------------------ U-Net
class UNet(nnx.Module):
    """e1 = ConvBN 3->8 relu (8x8); e2 = ConvBN 8->12 relu on maxpool(e1) (4x4);
    d = ConvBN 20->6 relu on [e1, nearest-upsample(e2)]; out = conv1x1 6->2 (per pixel)."""

    def __init__(self, rngs: nnx.Rngs):
        self.enc1 = ConvBN(3, 8, rngs=rngs)
        self.enc2 = ConvBN(8, 12, rngs=rngs)
        self.dec = ConvBN(20, 6, rngs=rngs)
        self.out = nnx.Conv(6, 2, (1, 1), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        e1 = jax.nn.relu(self.enc1(x))
        e2 = jax.nn.relu(self.enc2(nnx.max_pool(e1, (2, 2), strides=(2, 2))))
        up = jnp.repeat(jnp.repeat(e2, 2, axis=1), 2, axis=2)
        h = jnp.concatenate([e1, up], axis=-1)
        return self.out(jax.nn.relu(self.dec(h)))


# enc1 (8): dependents enc2 in-channels and dec in-channels [0:8]; enc2 (12): dec
# in-channels [8:20] (the nearest upsampling repeats spatial positions only); dec (6):
# out in-channels. out's 2 channels are the model output. G = 8+12+6 = 26.
UNET_FAMILIES = (8, 12, 6)


# ----------------------------------------------------------------- transformer encoder
class EncoderBlock(nnx.Module):
    """Self-attention (``nnx.MultiHeadAttention``) and a GELU MLP, pre- or post-LN."""

    def __init__(self, d: int, heads: int, mlp: int, *, pre_ln: bool, rngs: nnx.Rngs):
        self.pre_ln = pre_ln
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = nnx.Linear(d, mlp, rngs=rngs)
        self.fc2 = nnx.Linear(mlp, d, rngs=rngs)

    def mlp(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x)))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pre_ln:
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))


class Encoder(nnx.Module):
    """``Linear 8->16 + positions -> blocks -> [LN] -> mean over tokens -> Linear 16->5``."""

    def __init__(self, blocks: tuple[tuple[int, int], ...], *, pre_ln: bool,
                 rngs: nnx.Rngs, d: int = 16, tokens: int = 6):
        self.embed = nnx.Linear(8, d, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (tokens, d)))
        self.blocks = nnx.List([EncoderBlock(d, h, m, pre_ln=pre_ln, rngs=rngs)
                                for h, m in blocks])
        self.ln = nnx.LayerNorm(d, rngs=rngs) if pre_ln else None
        self.head = nnx.Linear(d, 5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.embed(x) + self.pos[...]
        for block in self.blocks:
            h = block(h)
        if self.ln is not None:
            h = self.ln(h)
        return self.head(jnp.mean(h, axis=1))


PRE_LN_BLOCKS = ((4, 32), (2, 24))   # (heads, mlp) per block; d_model 16
POST_LN_BLOCKS = ((2, 20), (4, 12))
# Per block: heads (one family over the head axis of query/key/value kernels (16, H, D)
# and biases (H, D); dependent: out kernel (H, D, 16)) and MLP neurons (fc1). The
# residual width 16 is LayerNorm'd (pre-LN: ln1/ln2/ln inside; post-LN: ln1/ln2 over the
# sums) -> not prunable. pre-LN: 4+32+2+24 = 62; post-LN: 2+20+4+12 = 38.
PRE_LN_FAMILIES = tuple(n for hm in PRE_LN_BLOCKS for n in hm)
POST_LN_FAMILIES = tuple(n for hm in POST_LN_BLOCKS for n in hm)


# ----------------------------------------------------------------- GPT (GQA, SwiGLU)
class GQAttention(nnx.Module):
    """Causal grouped-query attention; every size comes from the kernel shapes.

    ``wq: (d, Hq, D)``, ``wk, wv: (d, Hkv, D)``, ``wo: (Hq, D, d)``, no biases. Query head
    ``j`` reads kv head ``j // (Hq // Hkv)`` (kv heads repeated with ``jnp.repeat``).
    """

    def __init__(self, d: int, q_heads: int, kv_heads: int, head_dim: int, *,
                 rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        self.wq = nnx.Param(init(rngs.params(), (d, q_heads, head_dim)))
        self.wk = nnx.Param(init(rngs.params(), (d, kv_heads, head_dim)))
        self.wv = nnx.Param(init(rngs.params(), (d, kv_heads, head_dim)))
        out_init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        self.wo = nnx.Param(out_init(rngs.params(), (q_heads, head_dim, d)))

    def __call__(self, x: jax.Array) -> jax.Array:
        wq, wk, wv = self.wq[...], self.wk[...], self.wv[...]
        rep = wq.shape[1] // wk.shape[1]
        q = jnp.einsum("btd,dhk->bthk", x, wq)
        k = jnp.repeat(jnp.einsum("btd,dhk->bthk", x, wk), rep, axis=2)
        v = jnp.repeat(jnp.einsum("btd,dhk->bthk", x, wv), rep, axis=2)
        logits = jnp.einsum("bqhk,bshk->bhqs", q, k) / jnp.sqrt(
            jnp.asarray(q.shape[-1], q.dtype))
        t = logits.shape[-1]
        causal = jnp.tril(jnp.ones((t, t), bool))
        logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
        heads = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(logits, axis=-1), v)
        return jnp.einsum("bqhk,hkd->bqd", heads, self.wo[...])


class GPTBlock(nnx.Module):
    """``x + attn(rms1(x))`` then ``x + W_down(silu(W_gate h) * (W_up h))``, h = rms2(x)."""

    def __init__(self, d: int, q_heads: int, kv_heads: int, head_dim: int, ffn: int, *,
                 rngs: nnx.Rngs):
        self.rms1 = nnx.RMSNorm(d, rngs=rngs)
        self.attn = GQAttention(d, q_heads, kv_heads, head_dim, rngs=rngs)
        self.rms2 = nnx.RMSNorm(d, rngs=rngs)
        self.gate = nnx.Linear(d, ffn, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(d, ffn, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(ffn, d, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.rms1(x))
        h = self.rms2(x)
        return x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))


class GPT(nnx.Module):
    """Token ``nnx.Embed`` (vocab 32, d 16) + learned positions, two blocks, final
    RMSNorm and an LM head tied to the embedding (``embed.attend``)."""

    def __init__(self, rngs: nnx.Rngs, *, vocab: int = 32, d: int = 16, tokens: int = 8):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (tokens, d)))
        self.blocks = nnx.List([GPTBlock(d, q, kv, hd, f, rngs=rngs)
                                for q, kv, hd, f in GPT_BLOCKS])
        self.rms = nnx.RMSNorm(d, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        h = self.embed(ids) + self.pos[...][: ids.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.embed.attend(self.rms(h))


GPT_BLOCKS = ((4, 2, 4, 24), (4, 4, 4, 20))   # (q heads, kv heads, head_dim, ffn)
# Per block: one family of Hkv groups (kv head g with q heads [g*rep, (g+1)*rep): wq
# axis 1 block rep, wk/wv axis 1; dependent wo axis 0 block rep) and one SwiGLU family
# (gate and up columns together). Block 1 has rep = 1 (plain MHA). The residual width is
# RMSNorm'd and tied to the embedding table; the vocab axis is input and output.
# G = 2+24+4+20 = 50.
GPT_FAMILIES = tuple(n for q, kv, hd, f in GPT_BLOCKS for n in (kv, f))


def _gpt_input(seed: int) -> tuple:
    return (jnp.asarray(np.random.default_rng(seed).integers(0, 32, (2, 8)), jnp.int32),)


# -------------------------------------------------------------------------------- ViT
class ViT(nnx.Module):
    """Patch conv 4x4/4 3->16 on 8x8 (4 patches) + cls token + positions, one pre-LN
    encoder block (2 heads, MLP 24), LN, cls token -> Linear 16->5."""

    def __init__(self, rngs: nnx.Rngs, *, d: int = 16):
        self.patch = nnx.Conv(3, d, (4, 4), strides=(4, 4), padding="VALID", rngs=rngs)
        self.cls = nnx.Param(jnp.zeros((1, 1, d)))
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (5, d)))
        self.block = EncoderBlock(d, 2, 24, pre_ln=True, rngs=rngs)
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, 5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch(x)
        b = p.shape[0]
        p = p.reshape(b, -1, p.shape[-1])
        cls = jnp.broadcast_to(self.cls[...], (b, 1, p.shape[-1]))
        h = jnp.concatenate([cls, p], axis=1) + self.pos[...]
        h = self.block(h)
        return self.head(self.ln(h)[:, 0])


# The patch conv's 16 out channels are the LayerNorm'd residual stream (with cls and
# pos) -> not prunable. Prunable: the block's 2 heads and 24 MLP neurons. G = 26.
VIT_FAMILIES = (2, 24)


# ------------------------------------------------------------------------------ linen
class LinenNet(nn.Module):
    """``Conv 3->c1 relu -> Conv c1->c2 relu -> mean -> Dense hidden relu -> Dense 5``.

    Linen stores output widths as attributes (and checks stored parameter shapes against
    them), so a shrunk parameter tree runs through a module rebuilt with `from_params`.
    """

    c1: int = 8
    c2: int = 12
    hidden: int = 16
    out: int = 5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.relu(nn.Conv(self.c1, (3, 3), name="conv1")(x))
        h = nn.relu(nn.Conv(self.c2, (3, 3), name="conv2")(h))
        h = jnp.mean(h, axis=(1, 2))
        h = nn.relu(nn.Dense(self.hidden, name="fc1")(h))
        return nn.Dense(self.out, name="fc2")(h)

    @classmethod
    def from_params(cls, params: Any) -> LinenNet:
        """The module whose widths match ``params``' shapes (e.g. after ``hj.shrink``)."""
        return cls(c1=params["conv1"]["kernel"].shape[-1],
                   c2=params["conv2"]["kernel"].shape[-1],
                   hidden=params["fc1"]["kernel"].shape[-1],
                   out=params["fc2"]["kernel"].shape[-1])


@dataclasses.dataclass
class LinenCase:
    """A linen model in the pure-function form.

    Attributes:
      module: the linen module the params were initialised with.
      params: its ``'params'`` collection.
    """

    module: LinenNet
    params: Any

    def fn(self, params: Any, x: jax.Array) -> jax.Array:
        """``module.apply`` of the original module: what discovery traces."""
        return self.module.apply({"params": params}, x)

    @staticmethod
    def apply(params: Any, x: jax.Array) -> jax.Array:
        """Apply through a module rebuilt from ``params``' shapes (runs shrunk params)."""
        return LinenNet.from_params(params).apply({"params": params}, x)


def build_linen(rngs: nnx.Rngs) -> LinenCase:
    module = LinenNet()
    x = jnp.zeros((2, 8, 8, 3), jnp.float32)
    params = module.init(rngs.params(), x)["params"]
    return LinenCase(module, params)


# conv1 (8), conv2 (12), fc1 (16); fc2's 5 outputs are the model output. G = 36.
LINEN_FAMILIES = (8, 12, 16)


def _case(build: Callable, example_input: Callable, families: tuple[int, ...], notes: str,
          *, pure: bool = False) -> ZooCase:
    return ZooCase(build, example_input, sum(families), families, notes, pure)


ZOO: dict[str, ZooCase] = {
    "mlp": _case(MLP, _vector(), MLP_FAMILIES, "hidden 12 and 8: one family each; G = 20"),
    "vgg_bn": _case(VGG, _image(), VGG_FAMILIES,
                    "conv1 8, conv2 8, conv3 12 (flattened into fc1: strided dependents), "
                    "fc1 16; max pooling does not reduce over channels; G = 44"),
    "resnet_basic": _case(ResNetBasic, _image(), RESNET_BASIC_FAMILIES,
                          "stage families {stem,b0.b,b1.b}=8 and {b2.proj,b2.b,b3.b}=16, "
                          "inner a-convs 8,8,16,16; G = 72"),
    "resnet_bottleneck": _case(ResNetBottleneck, _image(), RESNET_BOTTLENECK_FAMILIES,
                               "stem 8 (no identity add), inner 4,4 and 6,6, stage "
                               "{b0.proj,b0.c3,b1.c3}=16; G = 44"),
    "mobilenet_v2": _case(MobileNetV2, _image(), MOBILENET_FAMILIES,
                          "{stem,b0.project}=8, {b0.expand,b0.dw}=16, {b1.expand,b1.dw}=20,"
                          " b1.project=12, last=16; G = 72"),
    "densenet": _case(DenseNet, _image(), DENSENET_FAMILIES,
                      "concat producers keep their families: x0 8, y1 4, y2 6; "
                      "transition 10; post-concat BN scale/bias are members; G = 28"),
    "unet": _case(UNet, _image(), UNET_FAMILIES,
                  "enc1 8, enc2 12 (upsampled and concatenated at offset 8), dec 6; "
                  "per-pixel output conv not pruned; G = 26"),
    "encoder_pre_ln": _case(
        lambda rngs: Encoder(PRE_LN_BLOCKS, pre_ln=True, rngs=rngs), _tokens(),
        PRE_LN_FAMILIES, "heads 4, mlp 32, heads 2, mlp 24; LN'd residual; G = 62"),
    "encoder_post_ln": _case(
        lambda rngs: Encoder(POST_LN_BLOCKS, pre_ln=False, rngs=rngs), _tokens(),
        POST_LN_FAMILIES, "heads 2, mlp 20, heads 4, mlp 12; LN'd residual; G = 38"),
    "gpt_gqa": _case(GPT, _gpt_input, GPT_FAMILIES,
                     "kv-head families 2 (Hq 4) and 4 (Hq 4, rep 1), SwiGLU 24 and 20; "
                     "RMSNorm'd residual tied to the embedding; G = 50"),
    "vit": _case(ViT, _image(), VIT_FAMILIES,
                 "patch-embedding width is the LN'd residual: not prunable; heads 2, "
                 "mlp 24; G = 26"),
    "linen_cnn": _case(build_linen, _image(), LINEN_FAMILIES,
                       "pure-function form over linen params: conv1 8, conv2 12, fc1 16; "
                       "shrunk params run through LinenNet.from_params; G = 36",
                       pure=True),
}


def make_rngs(seed: int = 0) -> nnx.Rngs:
    """NNX streams on the ``unsafe_rbg`` PRNG: initialisers compile in a fraction of the
    time threefry needs on CPU (each new parameter shape is a new PRNG program)."""
    return nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))
