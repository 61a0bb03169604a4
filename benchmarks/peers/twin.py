"""The PyTorch twin of `hesso_jax.models.CNN`, defined at module level.

Only-Train-Once's ``construct_subnet`` saves the model with ``torch.save`` (a pickle of its
class), so the class must be importable by name; ``torch_pruning_digits.torch_cnn`` builds
it from here. Importing this module imports PyTorch.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3×3 convolution without bias (padding 1) and BatchNorm (flax's momentum 0.9 is
    PyTorch's 0.1; eps 1e-5 in both)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5))


class TorchCNN(nn.Module):
    """stem → residual block (``block_a``, ``block_b``) → strided ``down`` conv → global
    mean → ``head``, NCHW; PyTorch's default initialisers."""

    def __init__(self, c1: int = 48, c2: int = 96, num_classes: int = 10,
                 in_channels: int = 1) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, c1)
        self.block_a = conv_bn(c1, c1)
        self.block_b = conv_bn(c1, c1)
        self.down = conv_bn(c1, c2, stride=2)
        self.head = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch ``x`` of shape ``(N, in_channels, H, W)``."""
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.block_b(torch.relu(self.block_a(h))))
        h = torch.relu(self.down(h))
        return self.head(h.mean(dim=(2, 3)))
