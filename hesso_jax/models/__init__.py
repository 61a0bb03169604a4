"""Reference Flax NNX models.

MLP, CNN, TinyTransformer, CARN and CharLM carry hand-written ``groups()`` that serve as
the test oracle for `hesso_jax.discover_groups`; ResNet and BertEncoder rely on discovery.
"""

from hesso_jax.models.bert import BertEncoder
from hesso_jax.models.carn import CARN
from hesso_jax.models.charlm import CharLM
from hesso_jax.models.cnn import CNN
from hesso_jax.models.mlp import MLP
from hesso_jax.models.resnet import ResNet
from hesso_jax.models.transformer import TinyTransformer

__all__ = ["CARN", "CNN", "BertEncoder", "CharLM", "MLP", "ResNet", "TinyTransformer"]
