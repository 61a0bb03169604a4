"""A small CARN-style ×2 super-resolution network for single-channel (luminance) images.

After CARN (Ahn et al., 2018), shrunk for CPU training. With ``x`` the low-resolution input
``(N, H, W, 1)``, ``C`` the width and ``B`` the number of residual blocks:

* entry: ``o₀ = conv3×3(x)`` (1 → C, no activation);
* block ``i = 1..B``: ``bᵢ = relu(oᵢ₋₁ + conv2ᵢ(relu(conv1ᵢ(oᵢ₋₁))))`` (3×3 convs, C → C);
* cascading (``cascade=True``, CARN's cascading connections): the features are
  concatenated, ``cᵢ = [o₀, b₁, …, bᵢ]`` (``(i+1)·C`` channels), and fused,
  ``oᵢ = relu(conv1×1ᵢ(cᵢ))`` (``(i+1)·C → C``); without cascading ``oᵢ = bᵢ``;
* upsampler: ``u = relu(shuffle(conv3×3(o_B)))`` with the ``C → 4C`` conv followed by a
  depth-to-space by 2 (PyTorch's ``PixelShuffle`` layout: input channel ``4c + 2i + j``
  becomes pixel ``(2h + i, 2w + j)`` of output channel ``c``);
* exit: ``y = conv3×3(u) + bicubic₂(x)`` (C → 1), so the network learns a residual over
  bicubic upsampling.

`CARN.groups` lists every prunable channel; see its docstring for the zero-invariance
argument of each family.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hesso_jax.groups import GroupFamily, Groups, Member, Path

__all__ = ["CARN", "ResBlock", "bicubic_upsample", "conv_nhwc", "pixel_shuffle"]

SCALE = 2
_NHWC = ("NHWC", "HWIO", "NHWC")
Pads = tuple[tuple[int, int], tuple[int, int]]


def _lax_conv(x: jax.Array, k: jax.Array, pads: Pads | str) -> jax.Array:
    return jax.lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: jax.Array, k: jax.Array, pads: Pads) -> jax.Array:
    return _lax_conv(x, k, pads)


def _conv_fwd(x: jax.Array, k: jax.Array, pads: Pads) -> tuple[jax.Array, tuple]:
    return _lax_conv(x, k, pads), (x, k)


def _conv_bwd(pads: Pads, res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, k = res
    kh, kw = k.shape[:2]
    (pt, pb), (pl, pr) = pads
    # dx = correlation of g with the flipped kernel, in/out channels swapped.
    kt = jnp.flip(k, (0, 1)).transpose(0, 1, 3, 2)
    dx = _lax_conv(g, kt, ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)))
    # dk[i, j, c, o] = Σ_{n,h,w} xp[n, h+i, w+j, c] g[n, h, w, o]: a VALID NHWC conv with
    # the input channels as batch and the examples as features.
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    dk = _lax_conv(xp.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), "VALID")
    return dx, dk.transpose(1, 2, 0, 3).astype(k.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_nhwc(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
              padding: str | Sequence[tuple[int, int]], *, lhs_dilation: Any = None,
              rhs_dilation: Any = None, dimension_numbers: Any = None,
              feature_group_count: int = 1, **_unused: Any) -> jax.Array:
    """Stride-1 NHWC/HWIO convolution whose gradients are canonical NHWC convolutions.

    A drop-in ``conv_general_dilated`` for ``nnx.Conv``: the forward pass is
    ``y[n,h,w,o] = Σ_{i,j,c} xp[n,h+i,w+j,c] k[i,j,c,o]`` (``xp`` the padded input). The
    backward pass is written out as two convolutions in the canonical
    ``NHWC, HWIO → NHWC`` form:

    * ``∂x = g ⋆ flip(k)ᵀ`` (kernel flipped in space, in/out channels swapped, padding
      ``kernel − 1 − pad``);
    * ``∂k[i,j,c,o] = Σ_{n,h,w} xp[n,h+i,w+j,c] g[n,h,w,o]``, a VALID convolution with the
      input channels ``c`` as batch and the examples ``n`` as features.

    The values equal JAX's own transpose rules; the point is speed: XLA:CPU rewrites the
    non-canonical transposed convolutions into this form only at the top level of a
    program, and runs them 30–60× slower inside ``lax.cond``/``while_loop`` bodies, which
    is where HESSO-CRIC computes its trial gradients (a relative of jax-ml/jax#12868).
    CRIC now rewrites the convolutions of any model's trial gradients itself
    (`hesso_jax.jaxpr.conv_layout.canonical_convs`, all strides, dilations and groups), so
    ``CARN(canonical_grad=False)`` is fast there too; `conv_nhwc` still helps gradients a
    user computes inside their own ``lax`` loops.

    Other keyword arguments of ``lax.conv_general_dilated`` (``precision``,
    ``out_sharding``, ...) are accepted and ignored.

    Raises:
      NotImplementedError: for strides, dilations or feature groups other than 1, or
        dimension numbers other than ``NHWC, HWIO → NHWC``.
    """
    ones = (None, 1, (1, 1))
    if (tuple(window_strides) != (1, 1) or lhs_dilation not in ones
            or rhs_dilation not in ones or feature_group_count != 1):
        raise NotImplementedError("conv_nhwc supports stride 1, no dilation, one group")
    if dimension_numbers is not None and jax.lax.conv_dimension_numbers(
            lhs.shape, rhs.shape, dimension_numbers) != jax.lax.conv_dimension_numbers(
            lhs.shape, rhs.shape, _NHWC):
        raise NotImplementedError(f"conv_nhwc supports NHWC/HWIO only, got {dimension_numbers}")
    kh, kw = rhs.shape[:2]
    if padding == "SAME":
        pads = (((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2))
    elif padding == "VALID":
        pads = ((0, 0), (0, 0))
    elif isinstance(padding, str):
        raise NotImplementedError(f"conv_nhwc: padding {padding!r}")
    else:
        (a, b), (c, d) = padding
        pads = ((int(a), int(b)), (int(c), int(d)))
    return _conv(lhs, rhs, pads)


def pixel_shuffle(x: jax.Array, r: int = SCALE) -> jax.Array:
    """Depth-to-space: ``(N, H, W, C·r²) → (N, H·r, W·r, C)``.

    Output ``[n, h·r + i, w·r + j, c] = x[n, h, w, c·r² + i·r + j]`` (PyTorch's
    ``PixelShuffle`` channel order), so the ``r²`` consecutive input channels
    ``[c·r², (c+1)·r²)`` make up output channel ``c``. The channel count is read from the
    array, so a shrunk model (fewer channels) works unchanged.
    """
    n, h, w, crr = x.shape
    c = crr // (r * r)
    x = x.reshape(n, h, w, c, r, r)
    x = x.transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(n, h * r, w * r, c)


def bicubic_upsample(x: jax.Array, r: int = SCALE) -> jax.Array:
    """Bicubic (Keys, ``a = −0.5``) upsampling of ``(N, H, W, C)`` by ``r`` in H and W."""
    n, h, w, c = x.shape
    return jax.image.resize(x, (n, h * r, w * r, c), method="bicubic")


def _make_conv(cin: int, cout: int, k: int, rngs: nnx.Rngs, canonical: bool) -> nnx.Conv:
    fn = conv_nhwc if canonical else jax.lax.conv_general_dilated
    return nnx.Conv(cin, cout, (k, k), padding="SAME", conv_general_dilated=fn, rngs=rngs)


class ResBlock(nnx.Module):
    """``relu(x + conv2(relu(conv1(x))))`` with two 3×3 convs of ``C`` channels."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, canonical_grad: bool = True):
        self.conv1 = _make_conv(channels, channels, 3, rngs, canonical_grad)
        self.conv2 = _make_conv(channels, channels, 3, rngs, canonical_grad)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Forward pass."""
        return nnx.relu(x + self.conv2(nnx.relu(self.conv1(x))))


def _out(path: Path, block: int = 1) -> tuple[Member, ...]:
    """Members of a conv's output channels: kernel axis 3 and bias axis 0."""
    return (Member((*path, "kernel"), 3, block), Member((*path, "bias"), 0, block))


def _in(path: Path, offset: int = 0) -> Member:
    """Dependent: a conv's input channels (kernel axis 2) starting at ``offset``."""
    return Member((*path, "kernel"), 2, 1, offset)


class CARN(nnx.Module):
    """CARN-style ×2 super-resolution network (see the module docstring).

    Args:
      channels: width ``C`` of every feature map.
      num_blocks: residual blocks ``B``.
      cascade: use CARN's cascading concatenation + 1×1 fusion after every block.
      rngs: NNX random streams.
      canonical_grad: convolve with `conv_nhwc` (same values, fast gradients inside
        ``lax`` control flow on XLA:CPU) instead of ``lax.conv_general_dilated``.
    """

    def __init__(self, channels: int = 32, num_blocks: int = 3, *, cascade: bool = True,
                 rngs: nnx.Rngs, canonical_grad: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        c = channels
        self.channels = c
        self.num_blocks = num_blocks
        self.cascade = cascade
        cg = canonical_grad
        self.entry = _make_conv(1, c, 3, rngs, cg)
        self.blocks = nnx.List(
            [ResBlock(c, rngs=rngs, canonical_grad=cg) for _ in range(num_blocks)])
        self.fuses = nnx.List(
            [_make_conv((i + 2) * c, c, 1, rngs, cg) for i in range(num_blocks)]
            if cascade else [])
        self.upsample = _make_conv(c, SCALE * SCALE * c, 3, rngs, cg)
        self.exit = _make_conv(c, 1, 3, rngs, cg)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps low-resolution ``(N, H, W, 1)`` to high-resolution ``(N, 2H, 2W, 1)``."""
        o = self.entry(x)
        feats = [o]
        for i, block in enumerate(self.blocks):
            b = block(o)
            if self.cascade:
                feats.append(b)
                o = nnx.relu(self.fuses[i](jnp.concatenate(feats, axis=-1)))
            else:
                o = b
        u = nnx.relu(pixel_shuffle(self.upsample(o)))
        return self.exit(u) + bicubic_upsample(x)

    def groups(self) -> Groups:
        """Every prunable channel of the network, ``C`` groups per family.

        A group's *members* are kernel out-channels (axis 3) and biases; when they are all
        zero the channel is zero for every input, because ``relu(0) = 0`` and a residual
        sum ``a + b`` is zero where both summands are. The network input and the exit
        conv's single output channel are not prunable.

        With cascading (``B`` blocks, features ``cᵢ = [o₀, b₁, …, bᵢ]``):

        * ``entry+block1``: ``b₁ = relu(o₀ + conv2₁(·))`` couples the entry conv and
          ``block1.conv2``. Dependents: ``block1.conv1`` in-channels (it reads ``o₀``) and
          every fusion's in-channels at offset 0 (``o₀``) and at offset ``C`` (``b₁``).
        * ``block{i}.conv1``: its out-channels; dependent ``block{i}.conv2`` in-channels.
        * ``fuse{i-1}+block{i}`` (``i ≥ 2``): ``bᵢ = relu(oᵢ₋₁ + conv2ᵢ(·))`` couples fusion
          ``i−1`` and ``block{i}.conv2``. Dependents: ``block{i}.conv1`` in-channels and
          the in-channels at offset ``i·C`` (``bᵢ``) of fusions ``i..B``.
        * ``fuse{B}``: the last fusion ``o_B``; dependent: the upsampler's in-channels.
        * ``upsample``: the ``C → 4C`` conv; shuffled channel ``c`` is made of conv
          channels ``[4c, 4c + 4)`` (`pixel_shuffle`), so a group is ``block=4``
          consecutive out-channels (kernel and bias). Dependent: the exit conv's
          in-channel ``c``.

        Without cascading, ``oᵢ = bᵢ`` and every residual sum shares one channel space:
        ``trunk`` = the entry conv and every ``conv2`` (dependents: every ``conv1`` and the
        upsampler in-channels), one ``block{i}.conv1`` family per block, and ``upsample``.
        """
        c, nb = self.channels, self.num_blocks
        blk = [("blocks", i) for i in range(nb)]
        fus = [("fuses", i) for i in range(nb)]
        up, ex = ("upsample",), ("exit",)
        conv1 = [GroupFamily(c, _out((*blk[i], "conv1")), (_in((*blk[i], "conv2")),),
                             name=f"block{i + 1}.conv1") for i in range(nb)]
        upsample = GroupFamily(c, _out(up, block=SCALE * SCALE), (_in(ex),), name="upsample")
        if not self.cascade:
            trunk = GroupFamily(
                c, _out(("entry",)) + sum((_out((*b, "conv2")) for b in blk), ()),
                tuple(_in((*b, "conv1")) for b in blk) + (_in(up),), name="trunk")
            return Groups.from_families([trunk, *conv1, upsample])
        families = []
        for i in range(nb):
            # Block i (0-based) reads o_i; o_0 is the entry conv, o_i (i >= 1) fusion i-1.
            source = ("entry",) if i == 0 else fus[i - 1]
            label = "entry" if i == 0 else f"fuse{i}"
            deps = [_in((*blk[i], "conv1"))]
            if i == 0:  # o_0 is segment 0 of every concatenation
                deps += [_in(fus[j], 0) for j in range(nb)]
            deps += [_in(fus[j], (i + 1) * c) for j in range(i, nb)]  # b_{i+1} segment
            families.append(GroupFamily(c, _out(source) + _out((*blk[i], "conv2")),
                                        tuple(deps), name=f"{label}+block{i + 1}"))
            families.append(conv1[i])
        families.append(GroupFamily(c, _out(fus[nb - 1]), (_in(up),), name=f"fuse{nb}"))
        families.append(upsample)
        return Groups.from_families(families)
