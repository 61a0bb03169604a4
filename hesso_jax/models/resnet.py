"""ResNet with basic blocks (ResNet-18/34 layout) for NHWC images."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class BasicBlock(nnx.Module):
    """``relu(BN(conv3x3(relu(BN(conv3x3(x))))) + shortcut(x))``.

    The shortcut is the identity, or a 1×1 strided conv + BN when the width or the
    resolution changes.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, padding="SAME",
                              use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        if stride != 1 or cin != cout:
            self.proj = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
            self.proj_bn = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        else:
            self.proj = None
            self.proj_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """Forward pass."""
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        short = x if self.proj is None else self.proj_bn(self.proj(x))
        return nnx.relu(h + short)


class ResNet(nnx.Module):
    """``stem conv3x3+BN+relu → stages of BasicBlocks → global mean → Linear``.

    Args:
      widths: channels of each stage (ResNet-18: 64, 128, 256, 512).
      blocks: blocks per stage (ResNet-18: 2, 2, 2, 2).
      num_classes: outputs.
      in_channels: input channels.
      rngs: NNX random streams.
    """

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512),
                 blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10, *,
                 in_channels: int = 3, rngs: nnx.Rngs):
        self.stem = nnx.Conv(in_channels, widths[0], (3, 3), padding="SAME", use_bias=False,
                             rngs=rngs)
        self.stem_bn = nnx.BatchNorm(widths[0], momentum=0.9, rngs=rngs)
        layers = []
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1, rngs=rngs))
                cin = w
        self.blocks = nnx.List(layers)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Forward pass."""
        h = nnx.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            h = block(h)
        return self.head(jnp.mean(h, axis=(1, 2)))
