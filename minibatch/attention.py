"""Causal grouped-query attention over a KV cache, in NumPy.

The cache is addressed the way vLLM addresses it: per layer, a K pool and a V pool
shaped ``[num_blocks, block_size, num_kv_heads, head_dim]``; a sequence owns a list of
blocks (its *block table*); token ``j`` of the sequence lives in slot
``block_table[j // block_size] * block_size + j % block_size``. A plain contiguous
per-sequence cache is the special case of one block of ``max_len`` slots per sequence.

Each public function has a GPU twin with the same name and signature in
``minibatch_gpu/attention.py``.
"""

from __future__ import annotations

import numpy as np


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Grouped-query causal attention for one sequence whose last ``T`` tokens are queries.

    ``q`` holds the queries of context positions ``S-T .. S-1``; ``k``/``v`` hold all
    ``S`` keys and values. Query ``i`` sees keys ``0 .. S-T+i``.
    ``[T, Hq, D], [S, Hkv, D], [S, Hkv, D] -> [T, Hq, D]``.
    """
    num_queries, num_heads, head_dim = q.shape
    num_keys, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads  # query heads sharing one kv head
    q = q.reshape(num_queries, num_kv_heads, group, head_dim).transpose(1, 2, 0, 3)  # [Hkv, G, T, D]
    # a kv head's keys are broadcast to its G query heads (a view, no copy): one matmul per kv head
    scores = q @ k.transpose(1, 2, 0)[:, None] * scale  # [Hkv, G, T, D] @ [Hkv, 1, D, S] -> [Hkv, G, T, S]
    query_positions = np.arange(num_keys - num_queries, num_keys)  # [T]
    future = np.arange(num_keys)[None, :] > query_positions[:, None]  # [T, S]
    scores = np.where(future, -np.inf, scores)  # [Hkv, G, T, S]
    weights = softmax(scores)  # [Hkv, G, T, S]
    out = weights @ v.transpose(1, 0, 2)[:, None]  # [Hkv, G, T, S] @ [Hkv, 1, S, D] -> [Hkv, G, T, D]
    return out.transpose(2, 0, 1, 3).reshape(num_queries, num_heads, head_dim)  # [T, Hq, D]


def softmax(x: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis."""
    exp = np.exp(x - x.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def quantize_kv_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per token and head: ``[N, Hkv, D] -> int8 [N, Hkv, D],
    float32 [N, Hkv]``. Each element is off by at most half its scale, ``max|x| / 254``."""
    scale = np.max(np.abs(x), axis=-1) / 127  # [N, Hkv]
    scale = np.where(scale == 0, 1, scale).astype(np.float32)
    return np.clip(np.round(x / scale[..., None]), -127, 127).astype(np.int8), scale


def write_kv(k_cache: np.ndarray, v_cache: np.ndarray, k: np.ndarray, v: np.ndarray,
             slot_mapping: np.ndarray, k_scale: np.ndarray | None = None,
             v_scale: np.ndarray | None = None) -> None:
    """Store new tokens' keys and values in their cache slots, in place.

    ``k_cache``/``v_cache``: ``[num_blocks, block_size, Hkv, D]``; ``k``/``v``:
    ``[N, Hkv, D]``; ``slot_mapping``: ``[N]`` flat slot of each token (negative = skip).
    Non-negative slots must be distinct (on a GPU two writes to one slot would race).
    An int8 cache also passes ``k_scale``/``v_scale`` ``[num_blocks, block_size, Hkv]``:
    each token is quantized on its way in (:func:`quantize_kv_int8`).
    """
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    slots = slot_mapping  # [N]
    if len(slots) and slots.min() < 0:  # some tokens are not to be stored: drop them
        keep = slots >= 0  # [N]
        slots, k, v = slots[keep], k[keep], v[keep]
    if k_scale is not None:
        (k, k_scales), (v, v_scales) = quantize_kv_int8(k), quantize_kv_int8(v)
        k_scale.reshape(num_blocks * block_size, num_kv_heads)[slots] = k_scales
        v_scale.reshape(num_blocks * block_size, num_kv_heads)[slots] = v_scales
    k_cache.reshape(num_blocks * block_size, num_kv_heads, head_dim)[slots] = k
    v_cache.reshape(num_blocks * block_size, num_kv_heads, head_dim)[slots] = v


def copy_blocks(k_cache: np.ndarray, v_cache: np.ndarray, block_copies: np.ndarray,
                k_scale: np.ndarray | None = None, v_scale: np.ndarray | None = None) -> None:
    """Copy whole blocks, in place: ``block_copies`` is ``[P, 2]`` rows of ``(src, dst)``
    (with their scales, for an int8 cache).

    Copy-on-write uses it: a sequence about to write into a block it shares gets a
    private copy first.
    """
    if len(block_copies):
        for pool in (k_cache, v_cache) if k_scale is None else (k_cache, v_cache, k_scale, v_scale):
            pool[block_copies[:, 1]] = pool[block_copies[:, 0]]  # [P, block_size, ...]


def gather_kv(cache: np.ndarray, block_table: np.ndarray, context_len: int,
              scale: np.ndarray | None = None) -> np.ndarray:
    """One sequence's first ``context_len`` cached tokens, in order, dequantized when the
    cache is int8 (``scale``: ``[num_blocks, block_size, Hkv]``): ``-> [S, Hkv, D]``."""
    num_blocks = -(-context_len // cache.shape[1])  # ceil
    return gather_padded(cache, block_table[None, :num_blocks], context_len, scale)[0]  # [S, Hkv, D]


def gather_padded(pool: np.ndarray, tables: np.ndarray, length: int, scale: np.ndarray | None = None) -> np.ndarray:
    """The first ``length`` slots of each sequence's blocks, padded: ``pool`` is
    ``[num_blocks, block_size, ...]``, ``tables`` ``[S, B]`` block ids with
    ``B * block_size >= length``; ``-> [S, length, ...]``, dequantized when the pool is
    int8 (``scale``: ``[num_blocks, block_size, Hkv]``). Slots past a sequence's own
    context (and blocks named ``-1``) hold whatever is there: the caller masks them.
    """
    values = _gather_slots(pool, tables, length)  # [S, length, ...]
    return values if scale is None else values * _gather_slots(scale, tables, length)[..., None]


def _gather_slots(array: np.ndarray, tables: np.ndarray, length: int) -> np.ndarray:
    if tables.shape[1] == 1:  # one block each (a contiguous cache): copy the used slots, not whole rows
        return array[tables[:, 0], :length]  # [S, length, ...]
    return array[tables].reshape(len(tables), -1, *array.shape[2:])[:, :length]  # [S, length, ...]


def decode_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, block_tables: np.ndarray,
                     context_lens: np.ndarray, scale: float, k_scale: np.ndarray | None = None,
                     v_scale: np.ndarray | None = None) -> np.ndarray:
    """Attention for ``S`` sequences with one query each (decode), all at once.

    Gathers every sequence's blocks into one padded ``[S, L, Hkv, D]`` array (``L`` the
    longest context) and masks the padding, so the whole batch is two batched matmuls
    instead of ``S`` small ones. Same result as :func:`cached_attention` on single-query
    sequences. ``[S, Hq, D] -> [S, Hq, D]``.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_context = int(context_lens.max())
    max_blocks = -(-max_context // k_cache.shape[1])  # ceil: the blocks the longest context fills
    tables = block_tables[:, :max_blocks]  # [S, B] (-1 past a table's end: padding)
    k = gather_padded(k_cache, tables, max_context, k_scale)  # [S, L, Hkv, D]
    v = gather_padded(v_cache, tables, max_context, v_scale)  # [S, L, Hkv, D]
    q = q.reshape(num_seqs, num_kv_heads, group, head_dim)  # [S, Hkv, G, D]
    scores = q @ k.transpose(0, 2, 3, 1) * scale  # [S, Hkv, G, L]
    if context_lens.min() < k.shape[1]:  # some sequences are shorter than the gather: mask their padding
        padding = np.arange(k.shape[1])[None, :] >= np.asarray(context_lens)[:, None]  # [S, L]
        scores = np.where(padding[:, None, None, :], -np.inf, scores)  # [S, Hkv, G, L]
    out = softmax(scores) @ v.transpose(0, 2, 1, 3)  # [S, Hkv, G, D]
    return out.reshape(num_seqs, num_heads, head_dim)  # [S, Hq, D]


def cached_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
                     block_tables: np.ndarray, query_start_loc: np.ndarray,
                     context_lens: np.ndarray, scale: float, k_scale: np.ndarray | None = None,
                     v_scale: np.ndarray | None = None) -> np.ndarray:
    """Attention of a flat, ragged batch of queries against the cache.

    Sequence ``s`` owns queries ``q[query_start_loc[s]:query_start_loc[s+1]]``, which are
    the last tokens of its ``context_lens[s]`` cached tokens (their K/V already written).
    The same call serves prefill (many queries), chunked prefill (queries after earlier
    chunks) and decode (one query). ``[N, Hq, D] -> [N, Hq, D]``. ``query_start_loc``
    and ``context_lens`` are host integer arrays, and each sequence has at least as many
    cached tokens as queries. An int8 cache passes its ``k_scale``/``v_scale``
    ``[num_blocks, block_size, Hkv]`` and is dequantized as it is read.

    Sequences with several queries are taken one at a time; the decoding ones (one query
    each) go through :func:`decode_attention` in groups of similar length
    (:func:`decode_groups`): the same math, batched.
    """
    num_queries = np.diff(query_start_loc)  # [S]
    row_bytes = k_cache.shape[2] * k_cache.shape[3] * k_cache.itemsize  # one token's keys
    # N queries over S sequences with at least one each, N == S: one query each, a decode step
    if len(q) == len(num_queries) and len(q) and num_queries.min() == 1:
        if len(q) == 1 or len(q) * int(context_lens.max()) * row_bytes <= DECODE_GROUP_BYTES:  # one group
            return decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale)
        decoding = np.arange(len(num_queries))
        groups = decode_groups(context_lens, row_bytes, DECODE_GROUP_BYTES)
    else:
        decoding = np.flatnonzero(num_queries == 1)
        groups = decode_groups(context_lens[decoding], row_bytes, DECODE_GROUP_BYTES)
    out = np.empty(q.shape, dtype=np.float32)  # [N, Hq, D]
    for group in groups:
        seqs = decoding[group]
        rows = query_start_loc[seqs]
        out[rows] = decode_attention(q[rows], k_cache, v_cache, block_tables[seqs],
                                     context_lens[seqs], scale, k_scale, v_scale)
    for s in np.flatnonzero(num_queries != 1):
        start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
        k = gather_kv(k_cache, block_tables[s], int(context_lens[s]), k_scale)  # [S, Hkv, D]
        v = gather_kv(v_cache, block_tables[s], int(context_lens[s]), v_scale)  # [S, Hkv, D]
        out[start:end] = causal_attention(q[start:end], k, v, scale)  # [T, Hq, D]
    return out


DECODE_GROUP_BYTES = 1 << 20  # keys gathered per decode_attention call: about an L2 cache


def decode_groups(context_lens: np.ndarray, row_bytes: int, max_bytes: int = DECODE_GROUP_BYTES) -> list[np.ndarray]:
    """Split decoding sequences into groups for :func:`decode_attention`: indices into
    ``context_lens``, longest first, each group padding to its own longest context with
    at most ``max_bytes`` of gathered keys (one sequence at least).

    :func:`decode_attention` pads every sequence to the longest; taking sequences of
    similar length together wastes little on padding, and a small gather stays in
    cache, where one large padded copy per layer would be a fresh allocation of many
    megabytes every step. Short contexts make one group.
    """
    order = np.argsort(context_lens, kind="stable")[::-1]  # longest first
    groups, start = [], 0
    while start < len(order):
        longest = int(context_lens[order[start]])
        size = max(1, max_bytes // max(1, longest * row_bytes))
        groups.append(order[start:start + size])
        start += size
    return groups
