"""Offline English text from what ships with Python (no downloads): sentences and a corpus.

Sources, all read from the running interpreter's standard library directory
(``sysconfig.get_paths()["stdlib"]``) without importing anything:

* the docstrings (module, class, function) of the pure-Python standard-library modules
  named in ``sys.stdlib_module_names``, extracted with ``ast.get_docstring`` (test suites,
  ``idlelib``, ``lib2to3``, ``tkinter``, ``turtledemo``, ``ensurepip`` and
  ``site-packages`` skipped);
* the Zen of Python (``this.py`` stores it ROT13-encoded; decoded with ``codecs``).

Sentence splitting: a docstring is cut into paragraphs at blank lines; paragraphs with
indented, ``>>>`` or ``...`` lines (code, tables, option lists) are dropped; the rest are
joined into one line and split after ``.``, ``!`` or ``?`` followed by whitespace and an
upper-case letter. A sentence is kept if it starts with an upper-case letter, ends with
``.``, ``!`` or ``?``, has ``min_words``–``max_words`` words and at least 90% letters and
spaces. Sentences are deduplicated and sorted, so the result depends only on the Python
version's standard library; `train_test_sentences` then splits them with a seeded
permutation.

Language-model corpus (`stdlib_documents`, `train_test_documents`, `train_test_corpus`): the
whole docstrings
(code examples included) and the Zen, deduplicated, in file and AST order. The held-out
split is by document and depends on nothing but the document's text: document ``s`` is
held out iff ``u(s) < test_fraction`` with ``u(s) = int(sha256(s)[:8]) / 2⁶⁴ ∈ [0, 1)``, so
adding or removing other documents (another Python version) never moves a document
between the splits. Tokens are UTF-8 bytes (`encode_bytes` / `decode_bytes`,
``BYTE_VOCAB_SIZE = 256``): lossless, no vocabulary to build.
"""

from __future__ import annotations

import ast
import codecs
import functools
import hashlib
import re
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = ["BYTE_VOCAB_SIZE", "decode_bytes", "encode_bytes", "heldout_fraction",
           "stdlib_docstrings", "stdlib_documents", "split_sentences", "stdlib_sentences",
           "train_test_corpus", "train_test_documents", "train_test_sentences", "zen_of_python"]

BYTE_VOCAB_SIZE = 256
"""Vocabulary of the byte-level tokenizer: one token per byte value."""

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib",
                        "lib2to3", "tkinter", "turtledemo", "ensurepip", "__pycache__"})
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_files(modules: Iterable[str] | None) -> list[Path]:
    root = _stdlib_root()
    files = []
    for name in sorted(set(sys.stdlib_module_names if modules is None else modules)):
        if name in _SKIP_DIRS:
            continue
        if (root / f"{name}.py").is_file():
            files.append(root / f"{name}.py")
        elif (root / name).is_dir():
            files.extend(p for p in sorted((root / name).rglob("*.py"))
                         if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))
    return files


def stdlib_docstrings(modules: Iterable[str] | None = None) -> list[str]:
    """Every module, class and function docstring of the standard library's ``.py`` files.

    Args:
      modules: top-level module names to read (default: all of ``sys.stdlib_module_names``).

    Returns:
      The cleaned docstrings (``inspect.cleandoc`` indentation) in file and AST order.
    """
    docs: list[str] = []
    for path in _module_files(modules):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef |
                          ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    docs.append(doc)
    return docs


def zen_of_python() -> str:
    """The Zen of Python, decoded from ``this.py`` without importing it (it prints)."""
    source = (_stdlib_root() / "this.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and \
                any(isinstance(t, ast.Name) and t.id == "s" for t in node.targets):
            return codecs.decode(node.value.value, "rot13")
    raise ValueError("this.py holds no ROT13 string 's'")


def split_sentences(text: str, *, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Prose sentences of ``text`` (see the module docstring for the rules), in order."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines or any(ln.startswith((" ", "\t", ">>>", "...")) for ln in lines):
            continue
        joined = " ".join(ln.strip() for ln in lines)
        for sent in _SPLIT.split(joined):
            sent = sent.strip()
            n = len(sent.split())
            if not (min_words <= n <= max_words) or not sent[0].isupper() or \
                    sent[-1] not in ".!?":
                continue
            if sum(c.isalpha() or c.isspace() for c in sent) < 0.9 * len(sent):
                continue
            out.append(sent)
    return out


@functools.lru_cache(maxsize=4)
def _cached_docstrings(modules: tuple[str, ...] | None) -> tuple[str, ...]:
    return tuple(stdlib_docstrings(modules))


@functools.lru_cache(maxsize=4)
def _cached(modules: tuple[str, ...] | None, min_words: int, max_words: int) -> tuple[str, ...]:
    texts = list(_cached_docstrings(modules))
    if modules is None or "this" in modules:
        texts.append(zen_of_python().replace("\n", "\n\n"))  # one aphorism per paragraph
    found = set()
    for text in texts:
        found.update(split_sentences(text, min_words=min_words, max_words=max_words))
    return tuple(sorted(found))


def stdlib_sentences(modules: Iterable[str] | None = None, *, min_words: int = 6,
                     max_words: int = 40) -> list[str]:
    """The deduplicated, sorted sentences of the standard library's docstrings and the Zen.

    Args:
      modules: top-level modules to read (default: all; the Zen is included when
        ``modules`` is None or contains ``"this"``).
      min_words: shortest sentence kept (words split at whitespace).
      max_words: longest sentence kept.

    Returns:
      Sorted unique sentences (about 9,000 for CPython 3.11 with the defaults; reading
      every module takes several seconds, the result is cached).
    """
    key = _module_key(modules)
    return list(_cached(key, min_words, max_words))


def train_test_sentences(n_train: int, n_test: int, *, seed: int = 0,
                         modules: Iterable[str] | None = None) -> tuple[list[str], list[str]]:
    """Disjoint train and held-out sentences: a seeded permutation of `stdlib_sentences`.

    Args:
      n_train: training sentences (the first ``n_train`` of the permutation).
      n_test: held-out sentences (the next ``n_test``).
      seed: seed of ``numpy.random.default_rng(seed).permutation``.
      modules: passed to `stdlib_sentences`.

    Raises:
      ValueError: fewer than ``n_train + n_test`` sentences are available.
    """
    pool = stdlib_sentences(modules)
    if n_train < 0 or n_test < 0 or n_train + n_test > len(pool):
        raise ValueError(f"asked for {n_train} + {n_test} sentences, {len(pool)} available")
    order = np.random.default_rng(seed).permutation(len(pool))
    return ([pool[i] for i in order[:n_train]],
            [pool[i] for i in order[n_train:n_train + n_test]])


def _module_key(modules: Iterable[str] | None) -> tuple[str, ...] | None:
    return None if modules is None else tuple(sorted(set(modules)))


def stdlib_documents(modules: Iterable[str] | None = None) -> list[str]:
    """Whole standard-library docstrings and the Zen of Python, deduplicated.

    Args:
      modules: top-level modules to read (default: all; the Zen is included when
        ``modules`` is None or contains ``"this"``).

    Returns:
      Unique documents in file and AST order (first occurrence kept), the Zen last:
      about 6,600 documents and 1.5 M characters for CPython 3.11 (several seconds to
      read; cached).

    Example:
      >>> docs = stdlib_documents(["this"])
      >>> docs[-1].startswith("The Zen of Python")
      True
    """
    key = _module_key(modules)
    texts = list(_cached_docstrings(key))
    if key is None or "this" in key:
        texts.append(zen_of_python())
    return list(dict.fromkeys(t.strip() for t in texts if t.strip()))


def heldout_fraction(document: str) -> float:
    """``u(s) = int.from_bytes(sha256(s)[:8]) / 2⁶⁴ ∈ [0, 1)``: the split key of a document.

    A document is held out iff ``u(s) < test_fraction``; the value depends only on the
    document's UTF-8 bytes.

    Example:
      >>> 0.0 <= heldout_fraction("Beautiful is better than ugly.") < 1.0
      True
    """
    digest = hashlib.sha256(document.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def train_test_documents(test_fraction: float = 0.1, *,
                         modules: Iterable[str] | None = None) -> tuple[list[str], list[str]]:
    """The `stdlib_documents` split by `heldout_fraction`: ``(train_docs, test_docs)``.

    Args:
      test_fraction: expected fraction of documents held out, in ``(0, 1)``.
      modules: passed to `stdlib_documents`.

    Returns:
      Two disjoint lists in `stdlib_documents` order.

    Raises:
      ValueError: ``test_fraction`` outside ``(0, 1)`` or a split left empty.

    Example:
      >>> train, test = train_test_documents(0.5, modules=["this", "textwrap"])
      >>> len(train) > 0 and len(test) > 0 and not set(train) & set(test)
      True
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    docs = stdlib_documents(modules)
    test = [d for d in docs if heldout_fraction(d) < test_fraction]
    train = [d for d in docs if heldout_fraction(d) >= test_fraction]
    if not train or not test:
        raise ValueError(f"{len(docs)} documents give {len(train)} training and {len(test)} "
                         f"held-out documents at test_fraction={test_fraction}")
    return train, test


def train_test_corpus(test_fraction: float = 0.1, *, modules: Iterable[str] | None = None,
                      separator: str = "\n\n") -> tuple[str, str]:
    """`train_test_documents`, each split joined into one text with ``separator``.

    With the defaults (CPython 3.11): 1.35 M training and 0.14 M held-out bytes.

    Example:
      >>> train, test = train_test_corpus(0.5, modules=["this", "textwrap"])
      >>> len(train) > 0 and len(test) > 0
      True
    """
    train, test = train_test_documents(test_fraction, modules=modules)
    return separator.join(train), separator.join(test)


def encode_bytes(text: str) -> np.ndarray:
    """Byte-level tokens: the UTF-8 bytes of ``text`` as ``int32[n_bytes]`` in ``[0, 256)``.

    Example:
      >>> encode_bytes("é!").tolist()
      [195, 169, 33]
    """
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode_bytes(tokens: Iterable[int] | np.ndarray) -> str:
    """Inverse of `encode_bytes`; byte sequences that are not UTF-8 decode to ``U+FFFD``.

    Example:
      >>> decode_bytes(encode_bytes("naïve"))
      'naïve'
    """
    data = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if data.size and (data.min() < 0 or data.max() >= BYTE_VOCAB_SIZE):
        raise ValueError(f"byte tokens must be in [0, 256), got range "
                         f"[{data.min()}, {data.max()}]")
    return data.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
