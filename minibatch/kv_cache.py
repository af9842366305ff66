"""KV-cache storage and bookkeeping.

Two halves, as in vLLM:

* **storage** (:class:`KVStorage`): per layer, a K pool and a V pool shaped
  ``[num_blocks, block_size, num_kv_heads, head_dim]``, allocated by the backend that
  runs the model;
* **bookkeeping** (a cache manager): which blocks a sequence owns (its block table) and
  the slot each new token's K/V is written to (the slot mapping). Plain Python, the same
  for every backend.

:class:`ContiguousKVCache` is the simplest manager: every sequence gets one block of
``max_len`` slots, i.e. a contiguous row. It reserves memory for the longest possible
sequence up front, which is exactly the waste a paged cache avoids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from minibatch.config import ModelConfig


@dataclass(slots=True)
class KVStorage:
    """Per-layer K and V pools, each ``[num_blocks, block_size, num_kv_heads, head_dim]``."""

    k: list[Any]
    v: list[Any]

    @classmethod
    def allocate(cls, config: ModelConfig, num_blocks: int, block_size: int, xp: Any = np,
                 dtype: Any = np.float32) -> KVStorage:
        """Zeroed pools for every layer, on the array module ``xp`` (numpy or cupy)."""
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        return cls(k=[xp.zeros(shape, dtype=dtype) for _ in range(config.num_layers)],
                   v=[xp.zeros(shape, dtype=dtype) for _ in range(config.num_layers)])

    @property
    def num_bytes(self) -> int:
        return sum(int(a.nbytes) for a in self.k + self.v)


def kv_bytes_per_token(config: ModelConfig, dtype_bytes: int = 4) -> int:
    """Bytes of K and V one token occupies across all layers."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype_bytes


class CacheFullError(RuntimeError):
    """No free room in the KV cache for another sequence."""


class ContiguousKVCache:
    """One contiguous row of ``max_len`` slots per sequence (block size = ``max_len``).

    Sequences are named by any hashable id. ``allocate`` hands out a free row,
    ``free`` returns it; rows are reused, never moved.
    """

    def __init__(self, max_seqs: int, max_len: int):
        if max_seqs < 1 or max_len < 1:
            raise ValueError(f"max_seqs and max_len must be >= 1, got {max_seqs} and {max_len}")
        self.max_seqs = max_seqs
        self.block_size = max_len
        self.num_blocks = max_seqs
        self._free_rows = list(range(max_seqs - 1, -1, -1))
        self._row_of: dict[Any, int] = {}

    @property
    def max_len(self) -> int:
        return self.block_size

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def allocate(self, seq_id: Any) -> None:
        """Give ``seq_id`` a row; raises :class:`CacheFullError` when none is free."""
        if seq_id in self._row_of:
            raise ValueError(f"sequence {seq_id!r} already has a cache row")
        if not self._free_rows:
            raise CacheFullError(f"all {self.max_seqs} cache rows are in use")
        self._row_of[seq_id] = self._free_rows.pop()

    def free(self, seq_id: Any) -> None:
        """Return ``seq_id``'s row to the free list."""
        self._free_rows.append(self._row_of.pop(seq_id))

    def block_table(self, seq_id: Any) -> list[int]:
        """The blocks ``seq_id`` owns: a single row."""
        return [self._row_of[seq_id]]

    def slot_mapping(self, seq_id: Any, positions: np.ndarray) -> np.ndarray:
        """Flat slots for ``positions`` of ``seq_id``; fails if past ``max_len``."""
        if len(positions) and int(np.max(positions)) >= self.max_len:
            raise ValueError(f"position {int(np.max(positions))} is past the cache row length {self.max_len}")
        return self._row_of[seq_id] * self.block_size + np.asarray(positions, dtype=np.int64)
