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

from minibatch import kivi
from minibatch.config import ModelConfig

KV_CACHE_DTYPES = ("float32", "int8", "kivi2")


@dataclass(slots=True)
class KVStorage:
    """Per-layer K and V pools, each ``[num_blocks, block_size, num_kv_heads, head_dim]``.

    An ``int8`` cache also keeps one float32 scale per token and head,
    ``k_scale``/``v_scale`` ``[num_blocks, block_size, num_kv_heads]`` per layer.
    A ``kivi2`` cache (:mod:`minibatch.kivi`) keeps 2-bit codes, four per byte, with
    scales and zero points (keys per block and channel, values per token and group) and
    one float32 residual row per sequence for its unfinished last block.
    """

    k: list[Any]
    v: list[Any]
    k_scale: list[Any] | None = None
    v_scale: list[Any] | None = None
    k_zero: list[Any] | None = None
    v_zero: list[Any] | None = None
    k_residual: list[Any] | None = None
    v_residual: list[Any] | None = None

    @classmethod
    def allocate(cls, config: ModelConfig, num_blocks: int, block_size: int, xp: Any = np,
                 kv_cache_dtype: str = "float32", num_residual_rows: int = 0) -> KVStorage:
        """Zeroed pools for every layer, on the array module ``xp`` (numpy or cupy).
        ``kivi2`` needs ``num_residual_rows`` >= 1: one per sequence that can run at once."""
        check_kv_cache_dtype(kv_cache_dtype)
        heads, dim = config.num_kv_heads, config.head_dim
        shape = (num_blocks, block_size, heads, dim)

        def pools(dtype: Any, pool_shape: tuple[int, ...] = shape) -> list[Any]:
            return [xp.zeros(pool_shape, dtype=dtype) for _ in range(config.num_layers)]

        if kv_cache_dtype == "int8":
            return cls(pools(np.int8), pools(np.int8), pools(np.float32, shape[:3]), pools(np.float32, shape[:3]))
        if kv_cache_dtype == "kivi2":
            if num_residual_rows < 1:
                raise ValueError("a kivi2 cache needs num_residual_rows >= 1 (one per running sequence)")
            if dim % 4:
                raise ValueError(f"kivi2 packs four 2-bit codes per byte: head_dim {dim} must be a multiple of 4")
            packed, per_channel = (*shape[:3], dim // 4), (num_blocks, heads, dim)
            per_token = (*shape[:3], dim // kivi.value_group_size(dim))
            residual = (num_residual_rows, block_size, heads, dim)
            return cls(pools(np.uint8, packed), pools(np.uint8, packed), k_scale=pools(np.float32, per_channel),
                       v_scale=pools(np.float32, per_token), k_zero=pools(np.float32, per_channel),
                       v_zero=pools(np.float32, per_token), k_residual=pools(np.float32, residual),
                       v_residual=pools(np.float32, residual))
        return cls(pools(np.float32), pools(np.float32))

    @property
    def is_kivi(self) -> bool:
        return self.k_residual is not None

    def layer(self, index: int) -> dict[str, Any]:
        """Layer ``index``'s pools as keyword arguments of ``write_kv``/``cached_attention``
        (or, for a ``kivi2`` cache, of ``kivi_attention``)."""
        if self.is_kivi:
            names = ("k_cache", "v_cache", "k_scale", "k_zero", "v_scale", "v_zero", "k_residual", "v_residual")
            pools = (self.k, self.v, self.k_scale, self.k_zero, self.v_scale, self.v_zero,
                     self.k_residual, self.v_residual)
            return {name: pool[index] for name, pool in zip(names, pools, strict=True)}
        quantized = self.k_scale is not None
        return {"k_cache": self.k[index], "v_cache": self.v[index],
                "k_scale": self.k_scale[index] if quantized else None,
                "v_scale": self.v_scale[index] if quantized else None}

    @property
    def num_bytes(self) -> int:
        extra = [pool for pool in (self.k_scale, self.v_scale, self.k_zero, self.v_zero,
                                   self.k_residual, self.v_residual) if pool is not None]
        return sum(int(a.nbytes) for pools in (self.k, self.v, *extra) for a in pools)


def check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    """Raise a ``ValueError`` naming the choices for an unknown KV-cache dtype."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype '{kv_cache_dtype}' is not supported: choose one of "
                         f"{', '.join(KV_CACHE_DTYPES)}")


def kv_bytes_per_block(config: ModelConfig, kv_cache_dtype: str = "float32", block_size: int = 16) -> int:
    """Bytes of K and V one block of ``block_size`` tokens occupies across all layers.

    int8: values plus one float32 scale per token and head. kivi2: 2-bit codes, the keys'
    float32 scale and zero per channel (one pair per block), the values' per token and
    group of channels. A kivi2 cache also holds :func:`kivi_residual_bytes` per sequence.
    """
    check_kv_cache_dtype(kv_cache_dtype)
    dim = config.head_dim
    if kv_cache_dtype == "float32":
        per_head = block_size * 2 * dim * 4
    elif kv_cache_dtype == "int8":
        per_head = block_size * 2 * (dim + 4)
    else:
        codes = block_size * 2 * dim // 4
        key_scales = 2 * 4 * dim
        value_scales = block_size * 2 * 4 * (dim // kivi.value_group_size(dim))
        per_head = codes + key_scales + value_scales
    return config.num_layers * config.num_kv_heads * per_head


def kv_bytes_per_token(config: ModelConfig, kv_cache_dtype: str = "float32", block_size: int = 16) -> float:
    """Bytes of K and V per cached token across all layers: :func:`kv_bytes_per_block`
    over ``block_size`` (an integer for float32 and int8, whatever the block size)."""
    per_token = kv_bytes_per_block(config, kv_cache_dtype, block_size) / block_size
    return int(per_token) if per_token.is_integer() else per_token


def kivi_residual_bytes(config: ModelConfig, block_size: int) -> int:
    """The float32 residual row one sequence needs in a kivi2 cache (K and V, all layers)."""
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * 4


class CacheFullError(MemoryError):
    """No free room in the KV cache (for another sequence, or for more tokens)."""


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


# ---------------------------------------------------------------------- the paged cache


@dataclass(slots=True)
class Block:
    """One block of ``block_size`` slots. ``ref_count`` sequences use it; a full block
    whose contents are known is registered in the prefix cache under ``block_hash``."""

    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = ()  # the tokens a hashed block holds (guards collisions)


@dataclass(slots=True)
class CacheCounters:
    """Running totals a lesson can plot."""

    prefix_hit_blocks: int = 0  # full blocks reused from the prefix cache
    prefix_miss_blocks: int = 0  # full prompt blocks that had to be computed
    evictions: int = 0  # cached blocks reclaimed for new data
    copy_on_writes: int = 0  # shared partial blocks copied before a write


def block_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """The prefix-cache key of a full block: chained over every block before it, so equal
    hashes mean equal *prefixes*, not just equal blocks."""
    return hash((parent_hash, token_ids))


class PagedKVCache:
    """Block allocator with reference counts, prefix caching and copy-on-write (vLLM).

    A sequence's tokens live in fixed-size blocks listed in its block table; blocks are
    handed out from a free pool and come back when no sequence uses them. Any free block
    would do, but a sequence gets the block after its last one when that is free, so its
    blocks mostly lie in order and attention reads them as one stream. Full blocks
    are remembered by a hash of their whole prefix, so a later prompt that starts the
    same way reuses them instead of recomputing. A freed block keeps its contents and
    hash until it is reclaimed, least recently freed first (LRU).

    The caller (the scheduler) asks before it acts: ``can_allocate`` / ``can_append``,
    then ``allocate`` / ``append_slots``. Copies needed by copy-on-write are queued in
    ``pending_copies`` for the model runner to perform before its next forward.

    With ``num_residual_rows`` > 0 (a KIVI cache, :mod:`minibatch.kivi`) every sequence
    also owns one residual row, where its unfinished last block waits in float; a fork
    queues a copy of the parent's row in ``pending_row_copies``.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_residual_rows: int = 0):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # free blocks, in two queues: plain ones are reused first; ones still holding a
        # cached prefix are reclaimed least recently freed first (dicts keep order)
        self.free_plain: dict[int, None] = dict.fromkeys(range(num_blocks))
        self.free_cached: dict[int, None] = {}
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.tables: dict[Any, list[int]] = {}
        self.num_tokens: dict[Any, int] = {}  # slots each sequence has claimed
        self._committed: dict[Any, tuple[int, int | None]] = {}  # seq -> (blocks hashed, last hash)
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) for the runner
        self.counters = CacheCounters()
        self.num_residual_rows = num_residual_rows
        self.free_rows = list(range(num_residual_rows - 1, -1, -1))  # a stack: row 0 first
        self.residual_row: dict[Any, int] = {}  # seq -> its residual row
        self.pending_row_copies: list[tuple[int, int]] = []  # (src, dst) residual rows for the runner

    # ----------------------------------------------------------------- queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence uses (some may still hold reusable cached data)."""
        return len(self.free_plain) + len(self.free_cached)

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks that still hold a registered prefix."""
        return len(self.free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: Any) -> list[int]:
        return self.tables[seq_id]

    def cached_prefix(self, token_ids: list[int]) -> list[int]:
        """Block ids of the longest cached prefix of ``token_ids`` (whole blocks only,
        always leaving at least the last token to compute, so it yields logits)."""
        if not self.enable_prefix_caching:
            return []
        found, parent = [], None
        for start in range(0, len(token_ids) - 1 - (len(token_ids) - 1) % self.block_size, self.block_size):
            chunk = tuple(token_ids[start:start + self.block_size])
            parent = block_hash(parent, chunk)
            block_id = self.cached.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            found.append(block_id)
        return found

    def can_allocate(self, token_ids: list[int], watermark_blocks: int = 0, hits: list[int] | None = None) -> bool:
        """Whether ``allocate(seq, token_ids)`` would succeed leaving ``watermark_blocks`` free.
        ``hits`` is ``cached_prefix(token_ids)`` if the caller has it already (hashing a long
        prompt is not free)."""
        if self.num_residual_rows and not self.free_rows:
            return False
        hits = self.cached_prefix(token_ids) if hits is None else hits
        hits_in_free_pool = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        new_blocks = self.blocks_needed(len(token_ids)) - len(hits)
        return self.num_free_blocks - hits_in_free_pool - new_blocks >= watermark_blocks

    def can_append(self, seq_id: Any, num_new_tokens: int) -> bool:
        """Whether ``append_slots(seq_id, num_new_tokens)`` has the blocks it needs."""
        return self._new_blocks_for_append(seq_id, num_new_tokens) <= self.num_free_blocks

    # ----------------------------------------------------------------- actions

    def allocate(self, seq_id: Any, token_ids: list[int], hits: list[int] | None = None) -> int:
        """Give a new sequence blocks for ``token_ids``, reusing cached prefix blocks.

        Returns the number of leading tokens whose K/V is already cached (a multiple of
        the block size, less than ``len(token_ids)``). Raises :class:`CacheFullError` (a
        ``MemoryError``) and changes nothing when the blocks are not there; call
        ``can_allocate`` first. ``hits`` as in :meth:`can_allocate`.
        """
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        hits = self.cached_prefix(token_ids) if hits is None else hits
        if not self.can_allocate(token_ids, hits=hits):
            raise CacheFullError(f"not enough free KV blocks for {len(token_ids)} tokens")
        for block_id in hits:
            self._take(block_id)
        full_prompt_blocks = len(token_ids) // self.block_size
        self.counters.prefix_hit_blocks += len(hits)
        self.counters.prefix_miss_blocks += full_prompt_blocks - len(hits)
        table = list(hits)
        for _ in range(self.blocks_needed(len(token_ids)) - len(hits)):
            table.append(self._take_free(after=table[-1] if table else None))
        self.tables[seq_id] = table
        self.num_tokens[seq_id] = len(token_ids)
        if self.num_residual_rows:
            self.residual_row[seq_id] = self.free_rows.pop()
        return len(hits) * self.block_size

    def append_slots(self, seq_id: Any, num_new_tokens: int) -> np.ndarray:
        """Claim slots for ``num_new_tokens`` (>= 0) more tokens of a sequence; returns their
        slot mapping. A shared last block is copied first (copy-on-write)."""
        if num_new_tokens < 0:
            raise ValueError(f"cannot append {num_new_tokens} tokens: the count must be >= 0 (to drop tokens, "
                             "use rewind)")
        if not self.can_append(seq_id, num_new_tokens):
            raise CacheFullError(f"not enough free KV blocks to append {num_new_tokens} tokens")
        table, start = self.tables[seq_id], self.num_tokens[seq_id]
        if start % self.block_size and self.blocks[table[-1]].ref_count > 1:
            self._copy_on_write(table)
        elif start % self.block_size:
            self._forget_hash(table[-1])  # its contents are about to change
        end = start + num_new_tokens
        while len(table) < self.blocks_needed(end):
            table.append(self._take_free(after=table[-1] if table else None))
        self.num_tokens[seq_id] = end
        return self.slots(seq_id, start, end)

    def slots(self, seq_id: Any, start: int, end: int) -> np.ndarray:
        """Flat slots of token positions ``start .. end-1`` of a sequence."""
        table = np.asarray(self.tables[seq_id], dtype=np.int64)
        positions = np.arange(start, end)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def commit(self, seq_id: Any, token_ids: list[int]) -> None:
        """Register the sequence's full blocks in the prefix cache. ``token_ids`` are the
        tokens whose K/V is now written (a prefix of the sequence)."""
        if not self.enable_prefix_caching:
            return
        table = self.tables[seq_id]
        done, parent = self._committed.get(seq_id, (0, None))
        for index in range(done, len(token_ids) // self.block_size):
            chunk = tuple(token_ids[index * self.block_size:(index + 1) * self.block_size])
            parent = block_hash(parent, chunk)
            block = self.blocks[table[index]]
            if block.block_hash is None and parent not in self.cached:
                block.block_hash, block.token_ids = parent, chunk
                self.cached[parent] = block.block_id
            done = index + 1
        self._committed[seq_id] = (done, parent)

    def fork(self, parent_id: Any, child_id: Any) -> None:
        """The child shares every block of the parent (copy-on-write on the first write)
        and, in a KIVI cache, starts from a copy of the parent's residual row. Raises
        ``ValueError`` (and changes nothing) if the parent has no blocks or the child has."""
        if parent_id not in self.tables:
            raise ValueError(f"cannot fork sequence {parent_id!r}: it has no blocks")
        if child_id in self.tables:
            raise ValueError(f"sequence {child_id!r} already has blocks: fork into a new sequence id")
        if self.num_residual_rows:
            if not self.free_rows:
                raise CacheFullError(f"no free residual row for sequence {child_id!r}: all "
                                     f"{self.num_residual_rows} are in use")
            self.residual_row[child_id] = self.free_rows.pop()
            self.pending_row_copies.append((self.residual_row[parent_id], self.residual_row[child_id]))
        self.tables[child_id] = list(self.tables[parent_id])
        self.num_tokens[child_id] = self.num_tokens[parent_id]
        if parent_id in self._committed:
            self._committed[child_id] = self._committed[parent_id]
        for block_id in self.tables[child_id]:
            self.blocks[block_id].ref_count += 1

    def free(self, seq_id: Any) -> None:
        """Release a finished, aborted or preempted sequence's blocks."""
        if seq_id not in self.tables:
            raise ValueError(f"sequence {seq_id!r} has no blocks to free (never allocated, or already freed)")
        for block_id in reversed(self.tables.pop(seq_id)):  # tail first: evicted first
            self._release(block_id)
        del self.num_tokens[seq_id]
        self._committed.pop(seq_id, None)
        if seq_id in self.residual_row:
            self.free_rows.append(self.residual_row.pop(seq_id))

    def rewind(self, seq_id: Any, num_tokens: int) -> None:
        """Forget the last ``num_tokens`` tokens of a sequence (e.g. rejected speculative
        tokens); blocks that become empty are released."""
        if not 0 <= num_tokens <= self.num_tokens[seq_id]:
            raise ValueError(f"cannot rewind {num_tokens} of {self.num_tokens[seq_id]} tokens")
        end = self.num_tokens[seq_id] - num_tokens
        full = self.num_tokens[seq_id] // self.block_size * self.block_size
        if self.num_residual_rows and end < full and end % self.block_size:
            raise ValueError(f"cannot rewind to {end} tokens in a KIVI cache: the block holding token {end} "
                             "is already quantized and its float values are gone; rewind to a block boundary "
                             f"({end // self.block_size * self.block_size}) or within the last block ({full}+)")
        table = self.tables[seq_id]
        while len(table) > self.blocks_needed(end):
            self._release(table.pop())
        self.num_tokens[seq_id] = end
        done, _ = self._committed.get(seq_id, (0, None))
        if done * self.block_size > end:  # hashes past the rewind point are recomputed
            self._committed.pop(seq_id)

    # ----------------------------------------------------------------- internals

    def _new_blocks_for_append(self, seq_id: Any, num_new_tokens: int) -> int:
        table, start = self.tables[seq_id], self.num_tokens[seq_id]
        needed = self.blocks_needed(start + num_new_tokens) - len(table)
        shared_tail = start % self.block_size and self.blocks[table[-1]].ref_count > 1
        return needed + (1 if shared_tail else 0)

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.free_plain.pop(block_id, None)
            self.free_cached.pop(block_id, None)
        block.ref_count += 1

    def _take_free(self, after: int | None = None) -> int:
        """Take a free block for new data: ``after + 1`` (``after`` being the sequence's
        previous block) whenever it is free, so that a sequence's blocks lie side by side
        in the pool and reading them back streams through memory; if it holds a cached
        prefix, that prefix is forgotten even when plain blocks are free elsewhere.
        Otherwise a plain free block, :meth:`_roomiest_plain_block`, and only when none is
        left a cached one, least recently freed first (LRU).
        """
        if after is not None and (after + 1 in self.free_plain or after + 1 in self.free_cached):
            block_id = after + 1
        elif self.free_plain:
            block_id = self._roomiest_plain_block()
        else:
            block_id = next(iter(self.free_cached))
        block = self.blocks[block_id]
        if block.block_hash is not None:
            self.counters.evictions += 1
            self._forget_hash(block_id)
        self._take(block_id)
        return block_id

    def _roomiest_plain_block(self) -> int:
        """The plain free block in the middle of the longest run of consecutive plain free
        ids: a sequence that starts there has free blocks to grow into, and so does the
        one whose blocks end just before the run."""
        free = np.sort(np.fromiter(self.free_plain, dtype=np.int64, count=len(self.free_plain)))  # [F]
        breaks = np.flatnonzero(np.diff(free) != 1) + 1  # where a run of consecutive ids ends
        starts, ends = np.r_[0, breaks], np.r_[breaks, len(free)]  # [R], [R] runs as index ranges
        longest = int(np.argmax(ends - starts))
        return int(free[(starts[longest] + ends[longest]) // 2])

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            queue = self.free_plain if block.block_hash is None else self.free_cached
            queue[block_id] = None  # most recently freed: reclaimed last

    def _forget_hash(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None and self.cached.get(block.block_hash) == block_id:
            del self.cached[block.block_hash]
        block.block_hash, block.token_ids = None, ()

    def _copy_on_write(self, table: list[int]) -> None:
        source = table[-1]
        target = self._take_free(after=table[-2] if len(table) > 1 else None)
        self.pending_copies.append((source, target))
        self.blocks[source].ref_count -= 1  # still used by the others, so never freed here
        table[-1] = target
        self.counters.copy_on_writes += 1
