"""The CPython standard library as a byte-level training and evaluation corpus.

The embedded tiny models in ``minibatch/models`` are trained on the Python
source of the standard library of whatever interpreter runs this module:

* **Files.** Every ``*.py`` file below ``sysconfig.get_paths()["stdlib"]``,
  recursively, skipping anything inside ``site-packages`` or ``__pycache__``.
  Files are read as raw bytes and sorted by their path relative to the stdlib
  root (POSIX separators), so the order does not depend on the file system.
* **Split.** A file is *held out* when
  ``int(sha256(relpath).hexdigest(), 16) % 50 == 0`` (about 2% of files);
  every other file is used for training. The rule depends only on the path,
  so it is stable across machines and Python patch releases.
* **Tokens.** The tokenizer is byte-level: ids 0..255 are the bytes
  themselves, 256 is BOS ``<s>`` and 257 is EOS ``</s>`` (vocabulary 258).
  Each document is ``[BOS] + file bytes + [EOS]``, and a split is the
  concatenation of its documents, as a ``numpy.uint16`` array.

Only the standard library and NumPy are used, so benchmarks and lessons can
import this module without PyTorch::

    from tools.stdlib_corpus import load_corpus
    split = load_corpus()
    split.heldout[:10], split.metadata["n_files_heldout"]
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BOS_ID = 256
EOS_ID = 257
VOCAB_SIZE = 258
HELDOUT_MODULUS = 50
EXCLUDED_DIRS = frozenset({"site-packages", "__pycache__"})


@dataclass
class CorpusSplit:
    """Train and held-out token streams plus a description of the corpus."""

    train: np.ndarray
    heldout: np.ndarray
    metadata: dict = field(default_factory=dict)
    train_paths: list[str] = field(default_factory=list)
    heldout_paths: list[str] = field(default_factory=list)


def stdlib_root() -> Path:
    """Return the directory holding this interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str) -> bool:
    """Return True when the file at ``relpath`` belongs to the held-out split."""
    digest = hashlib.sha256(relpath.encode()).hexdigest()
    return int(digest, 16) % HELDOUT_MODULUS == 0


def list_source_files(root: Path | None = None) -> list[str]:
    """Return the relative paths of all stdlib ``*.py`` files, sorted."""
    root = stdlib_root() if root is None else root
    relpaths = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        relpaths.append(rel.as_posix())
    return sorted(relpaths)


def encode_documents(docs: list[bytes]) -> np.ndarray:
    """Encode documents as ``[BOS] + bytes + [EOS]`` and concatenate them."""
    total = sum(len(doc) + 2 for doc in docs)
    tokens = np.empty(total, dtype=np.uint16)
    pos = 0
    for doc in docs:
        tokens[pos] = BOS_ID
        tokens[pos + 1 : pos + 1 + len(doc)] = np.frombuffer(doc, dtype=np.uint8)
        tokens[pos + 1 + len(doc)] = EOS_ID
        pos += len(doc) + 2
    return tokens


def decode_tokens(tokens: np.ndarray | list[int]) -> bytes:
    """Turn byte-level token ids back into bytes, dropping BOS/EOS ids."""
    return bytes(int(t) for t in tokens if int(t) < 256)


def load_corpus(root: Path | None = None) -> CorpusSplit:
    """Read the stdlib sources and return the deterministic train/held-out split."""
    root = stdlib_root() if root is None else root
    corpus_hash = hashlib.sha256()
    train_docs: list[bytes] = []
    heldout_docs: list[bytes] = []
    train_paths: list[str] = []
    heldout_paths: list[str] = []
    for rel in list_source_files(root):
        data = (root / rel).read_bytes()
        corpus_hash.update(data)
        if is_heldout(rel):
            heldout_docs.append(data)
            heldout_paths.append(rel)
        else:
            train_docs.append(data)
            train_paths.append(rel)
    metadata = {
        "python_version": ".".join(str(v) for v in sys.version_info[:3]),
        "n_files_train": len(train_docs),
        "n_files_heldout": len(heldout_docs),
        "n_bytes_train": sum(len(d) for d in train_docs),
        "n_bytes_heldout": sum(len(d) for d in heldout_docs),
        "sha256": corpus_hash.hexdigest(),
        "sha256_definition": "sha256 of all file bytes concatenated in sorted path order",
        "heldout_rule": f"int(sha256(relpath).hexdigest(), 16) % {HELDOUT_MODULUS} == 0",
    }
    return CorpusSplit(
        train=encode_documents(train_docs),
        heldout=encode_documents(heldout_docs),
        metadata=metadata,
        train_paths=train_paths,
        heldout_paths=heldout_paths,
    )


if __name__ == "__main__":
    split = load_corpus()
    for key, value in split.metadata.items():
        print(f"{key}: {value}")
