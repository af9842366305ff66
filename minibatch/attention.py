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
    q = q.reshape(num_queries, num_kv_heads, group, head_dim)  # [T, Hkv, G, D]
    scores = np.einsum("tkgd,skd->kgts", q, k) * scale  # [Hkv, G, T, S]
    query_positions = np.arange(num_keys - num_queries, num_keys)  # [T]
    future = np.arange(num_keys)[None, :] > query_positions[:, None]  # [T, S]
    scores = np.where(future, -np.inf, scores)  # [Hkv, G, T, S]
    weights = softmax(scores)  # [Hkv, G, T, S]
    out = np.einsum("kgts,skd->tkgd", weights, v)  # [T, Hkv, G, D]
    return out.reshape(num_queries, num_heads, head_dim)  # [T, Hq, D]


def softmax(x: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis."""
    exp = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return exp / np.sum(exp, axis=-1, keepdims=True)


def write_kv(k_cache: np.ndarray, v_cache: np.ndarray, k: np.ndarray, v: np.ndarray,
             slot_mapping: np.ndarray) -> None:
    """Store new tokens' keys and values in their cache slots, in place.

    ``k_cache``/``v_cache``: ``[num_blocks, block_size, Hkv, D]``; ``k``/``v``:
    ``[N, Hkv, D]``; ``slot_mapping``: ``[N]`` flat slot of each token (negative = skip).
    Non-negative slots must be distinct (on a GPU two writes to one slot would race).
    """
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    keep = slot_mapping >= 0  # [N]
    k_cache.reshape(num_blocks * block_size, num_kv_heads, head_dim)[slot_mapping[keep]] = k[keep]
    v_cache.reshape(num_blocks * block_size, num_kv_heads, head_dim)[slot_mapping[keep]] = v[keep]


def copy_blocks(k_cache: np.ndarray, v_cache: np.ndarray, block_copies: np.ndarray) -> None:
    """Copy whole blocks, in place: ``block_copies`` is ``[P, 2]`` rows of ``(src, dst)``.

    Copy-on-write uses it: a sequence about to write into a block it shares gets a
    private copy first.
    """
    if len(block_copies):
        k_cache[block_copies[:, 1]] = k_cache[block_copies[:, 0]]  # [P, block_size, Hkv, D]
        v_cache[block_copies[:, 1]] = v_cache[block_copies[:, 0]]


def gather_kv(cache: np.ndarray, block_table: np.ndarray, context_len: int) -> np.ndarray:
    """One sequence's first ``context_len`` cached tokens, in order: ``-> [S, Hkv, D]``."""
    block_size = cache.shape[1]
    num_blocks = -(-context_len // block_size)  # ceil
    if num_blocks == 1:  # a view, no copy: the common case of a contiguous cache
        return cache[block_table[0], :context_len]  # [S, Hkv, D]
    blocks = cache[block_table[:num_blocks]]  # [num_blocks, block_size, Hkv, D]
    return blocks.reshape(-1, *cache.shape[2:])[:context_len]  # [S, Hkv, D]


def decode_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, block_tables: np.ndarray,
                     context_lens: np.ndarray, scale: float) -> np.ndarray:
    """Attention for ``S`` sequences with one query each (decode), all at once.

    Gathers every sequence's blocks into one padded ``[S, L, Hkv, D]`` array and masks
    the padding, so the whole batch is two batched matmuls instead of ``S`` small ones.
    Same result as :func:`cached_attention` on single-query sequences.
    ``[S, Hq, D] -> [S, Hq, D]``.
    """
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_blocks = -(-int(np.max(context_lens)) // block_size)
    tables = block_tables[:, :max_blocks]  # [S, B] (-1 past a table's end: padding, masked below)
    k = k_cache[tables].reshape(num_seqs, max_blocks * block_size, num_kv_heads, head_dim)  # [S, L, Hkv, D]
    v = v_cache[tables].reshape(num_seqs, max_blocks * block_size, num_kv_heads, head_dim)  # [S, L, Hkv, D]
    q = q.reshape(num_seqs, num_kv_heads, group, head_dim)  # [S, Hkv, G, D]
    scores = q @ k.transpose(0, 2, 3, 1) * scale  # [S, Hkv, G, L]
    padding = np.arange(k.shape[1])[None, :] >= np.asarray(context_lens)[:, None]  # [S, L]
    scores = np.where(padding[:, None, None, :], -np.inf, scores)  # [S, Hkv, G, L]
    out = softmax(scores) @ v.transpose(0, 2, 1, 3)  # [S, Hkv, G, D]
    return out.reshape(num_seqs, num_heads, head_dim)  # [S, Hq, D]


def cached_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
                     block_tables: np.ndarray, query_start_loc: np.ndarray,
                     context_lens: np.ndarray, scale: float) -> np.ndarray:
    """Attention of a flat, ragged batch of queries against the cache.

    Sequence ``s`` owns queries ``q[query_start_loc[s]:query_start_loc[s+1]]``, which are
    the last tokens of its ``context_lens[s]`` cached tokens (their K/V already written).
    The same call serves prefill (many queries), chunked prefill (queries after earlier
    chunks) and decode (one query). ``[N, Hq, D] -> [N, Hq, D]``. ``query_start_loc``
    and ``context_lens`` are host integer arrays, and each sequence has at least as many
    cached tokens as queries.

    Sequences are taken one at a time; when several are decoding, those go through
    :func:`decode_attention` together (the same math, batched).
    """
    out = np.empty_like(q)  # [N, Hq, D]
    num_queries = np.diff(query_start_loc)  # [S]
    decoding = np.flatnonzero(num_queries == 1)
    if len(decoding) > 1:
        rows = query_start_loc[decoding]
        out[rows] = decode_attention(q[rows], k_cache, v_cache, block_tables[decoding],
                                     context_lens[decoding], scale)
        one_by_one = np.flatnonzero(num_queries != 1)
    else:
        one_by_one = range(len(context_lens))
    for s in one_by_one:
        start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
        k = gather_kv(k_cache, block_tables[s], int(context_lens[s]))  # [S, Hkv, D]
        v = gather_kv(v_cache, block_tables[s], int(context_lens[s]))  # [S, Hkv, D]
        out[start:end] = causal_attention(q[start:end], k, v, scale)  # [T, Hq, D]
    return out
