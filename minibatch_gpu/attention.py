"""Causal grouped-query attention over a paged KV cache, as Numba CUDA kernels.

Twins of ``write_kv`` and ``cached_attention`` in ``minibatch/attention.py``, with the
same signatures and the same cache layout: per layer, K and V pools shaped
``[num_blocks, block_size, num_kv_heads, head_dim]``; token ``j`` of sequence ``s``
lives in block ``block_tables[s, j // block_size]`` at offset ``j % block_size``.

The NumPy twin gathers each sequence's keys into a contiguous array and runs a
softmax over it. The kernel here never gathers: it reads K and V straight through the
block table, and it never holds a whole row of scores either, because it runs an
*online* softmax (Milakov & Gimelshein, 2018; the trick inside FlashAttention): keep a
running maximum, a running sum of exponentials and a running weighted sum of values,
and rescale the sums whenever the maximum grows. One kernel serves prefill, chunked
prefill and decode, since all three are "these queries are the last tokens of that
context".

A block works on one (query, head) pair, and a decode step of a few sequences has too
few pairs to occupy a GPU: batch 1 of SmolLM2-135M is 9 blocks for an H100's 132
multiprocessors. Then each context is split into *partitions* of keys, one block each,
and a second kernel merges the partitions' softmaxes with the same rescaling a block
applies from one tile of keys to the next (split-K decoding: Flash-Decoding, vLLM's paged
attention v2).

Within a block, keys go through shared memory a tile at a time: the warp copies a tile
of keys with consecutive threads on consecutive dims (coalesced reads, whole cache lines),
each thread scores one key, and for the values each thread accumulates its own dims. A
thread never walks a key row of its own in global memory, which would have the warp's
32 reads of one instruction land on 32 different cache lines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import cuda, float32

from minibatch_gpu.device import (
    as_float32,
    as_index,
    blocks_for,
    check_array,
    launch_stream,
    multiprocessor_count,
    threads_per_block,
    to_host,
    xp,
)

MAX_HEAD_DIM = 256  # shared memory is sized at compile time, so head_dim has a bound
ATTENTION_THREADS = 32  # one warp per block, and a tile of 32 keys: 32 x 257 float32 words, about 32 KiB shared
# A tile row is one word longer than the longest head: shared memory has 32 banks of
# 4-byte words, and with rows of 256 words element d of every key would sit in the same
# bank, so a warp scoring 32 keys (thread i reads element d of key i) would queue its 32
# reads one after another. Rows of 257 words put key i's element d in bank (i + d) % 32.
TILE_ROW_WORDS = MAX_HEAD_DIM + 1
WRITE_KV_THREADS = 256
# Split contexts into partitions until a launch has this many blocks per multiprocessor
# (a block holds one warp and 32 KiB of shared memory, so a few fit on each at once) ...
TARGET_BLOCKS_PER_MULTIPROCESSOR = 8
# ... but never into partitions shorter than this: 4 tiles per block, so that reading
# keys, not writing and merging partitions, stays the larger part of the work.
MIN_PARTITION_KEYS = 128

# ------------------------------------------------------------------------- kernels


@cuda.jit
def _write_kv_kernel(k_cache, v_cache, k, v, slot_mapping):
    """One thread per (token, kv head, dim) element: copy it into the token's cache slot."""
    num_tokens, num_kv_heads, head_dim = k.shape  # [N, Hkv, D]
    block_size = k_cache.shape[1]  # k_cache, v_cache: [num_blocks, block_size, Hkv, D]
    for item in range(cuda.grid(1), num_tokens * num_kv_heads * head_dim, cuda.gridsize(1)):
        token = item // (num_kv_heads * head_dim)
        head = (item // head_dim) % num_kv_heads
        d = item % head_dim
        slot = slot_mapping[token]
        if slot < 0:  # a token whose K/V is not to be stored
            continue
        block, offset = slot // block_size, slot % block_size
        k_cache[block, offset, head, d] = k[token, head, d]
        v_cache[block, offset, head, d] = v[token, head, d]


@cuda.jit
def _write_kv_int8_kernel(k_cache, v_cache, k_scale, v_scale, k, v, slot_mapping):
    """One thread per (token, kv head): find max|x| over the head's D values, store the
    scale ``max / 127`` and the rounded int8 values (twin of ``quantize_kv_int8``)."""
    num_tokens, num_kv_heads, head_dim = k.shape  # [N, Hkv, D]
    block_size = k_cache.shape[1]  # k_cache, v_cache: int8 [num_blocks, block_size, Hkv, D]
    for item in range(cuda.grid(1), num_tokens * num_kv_heads, cuda.gridsize(1)):
        token, head = item // num_kv_heads, item % num_kv_heads
        slot = slot_mapping[token]
        if slot < 0:
            continue
        block, offset = slot // block_size, slot % block_size
        _quantize_head(k, token, head, head_dim, k_cache, k_scale, block, offset)
        _quantize_head(v, token, head, head_dim, v_cache, v_scale, block, offset)


@cuda.jit(device=True)
def _quantize_head(x, token, head, head_dim, cache, scales, block, offset):
    largest = float32(0)
    for d in range(head_dim):
        largest = max(largest, abs(x[token, head, d]))
    scale = largest / float32(127) if largest > 0 else float32(1)
    scales[block, offset, head] = scale
    for d in range(head_dim):
        # round half to even, like np.round, so both backends store the same bytes
        cache[block, offset, head, d] = max(-127, min(127, _round_half_even(x[token, head, d] / scale)))


@cuda.jit(device=True)
def _round_half_even(value):
    nearest = math.floor(value + float32(0.5))
    if nearest - value == float32(0.5) and nearest % 2 != 0:  # exactly halfway: go to the even side
        nearest -= 1
    return nearest


@cuda.jit(device=True)
def _score_tile(q_row, tile, weights, tile_len, thread, head_dim):
    """Thread ``i`` scores key ``i`` of the tile: ``weights[i] = q_row . tile[i]``. Ends
    with a barrier, so every score is there and the tile may be overwritten."""
    if thread < tile_len:
        score = float32(0)
        for d in range(head_dim):
            score += q_row[d] * tile[thread, d]
        weights[thread] = score
    cuda.syncthreads()


@cuda.jit(device=True)
def _exponentiate_tile(weights, tile_len, running_max, thread):
    """Online softmax, one tile at a time: the new running max (every thread computes
    the same), the factor that rescales what was summed under the old one, and
    ``weights[i] = exp(score_i - new max)`` in place. The caller's next barrier makes
    the weights visible to all threads."""
    new_max = running_max
    for i in range(tile_len):
        new_max = max(new_max, weights[i])
    correction = math.exp(running_max - new_max)  # 0 before the first tile (running_max = -inf)
    cuda.syncthreads()  # every thread has read the scores before they turn into weights
    if thread < tile_len:
        weights[thread] = math.exp(weights[thread] - new_max)
    return new_max, correction


@cuda.jit(device=True)
def _accumulate_tile(weights, tile, acc, tile_len, correction, running_sum, thread, num_threads, head_dim):
    """Add the tile's weighted values (``tile`` now holds the values) to ``acc``, whose
    dims ``thread, thread + T, ...`` this thread owns, after rescaling them by
    ``correction``; return the new running sum. Ends with a barrier: the tile and the
    weights are free for the next tile."""
    tile_sum = float32(0)
    for i in range(tile_len):
        tile_sum += weights[i]
    for d in range(thread, head_dim, num_threads):
        weighted_values = float32(0)
        for i in range(tile_len):
            weighted_values += weights[i] * tile[i, d]
        acc[d] = acc[d] * correction + weighted_values
    cuda.syncthreads()
    return running_sum * correction + tile_sum


@cuda.jit(device=True)
def _write_partition(acc, running_max, running_sum, part_max, part_sum, part_out, token, slot, thread, num_threads,
                     head_dim):
    """The partition's normalized output ``part_out[token, slot] = acc / sum``, and its max
    score and sum of ``exp(score - max)`` in ``part_max``/``part_sum[token, slot]`` for
    the merge (a launch with one partition has nothing to merge and passes them empty)."""
    for d in range(thread, head_dim, num_threads):
        part_out[token, slot, d] = acc[d] / running_sum
    if thread == 0 and part_max.shape[0]:
        part_max[token, slot] = running_max
        part_sum[token, slot] = running_sum


@cuda.jit(device=True)
def _start_query(q, token, head, scale, q_row, acc, thread, num_threads, head_dim):
    """Stage ``q[token, head] * scale`` in ``q_row`` and zero the accumulator; ends with a
    barrier. Returns the running max and sum of a softmax over no keys yet."""
    for d in range(thread, head_dim, num_threads):
        q_row[d] = q[token, head, d] * scale
        acc[d] = 0
    cuda.syncthreads()
    return float32(-math.inf), float32(0)


@cuda.jit(device=True)
def _stage_tile(pool, scales, quantized, block_tables, seq, kv_head, tile_start, tile_len, tile, thread, num_threads,
                head_dim):
    """Copy keys (or values) ``tile_start .. tile_start + tile_len - 1`` of sequence ``seq``
    into ``tile``, dequantized when the cache is int8. Consecutive threads copy
    consecutive dims of one key, so a warp reads whole cache lines (coalesced)."""
    block_size = pool.shape[1]
    for i in range(tile_len):
        j = tile_start + i
        block, offset = block_tables[seq, j // block_size], j % block_size
        dequant = scales[block, offset, kv_head] if quantized else float32(1)
        for d in range(thread, head_dim, num_threads):
            tile[i, d] = pool[block, offset, kv_head, d] * dequant


@cuda.jit(device=True)
def _visible_keys(token, seq_of_token, query_start_loc, context_lens):
    """How many keys query ``token`` attends to. A sequence's queries are the last
    ``num_queries`` of its ``context_len`` tokens, so its query ``i`` sees keys
    ``0 .. context_len - num_queries + i``, its own included."""
    seq = seq_of_token[token]
    num_queries = query_start_loc[seq + 1] - query_start_loc[seq]
    return context_lens[seq] - num_queries + (token - query_start_loc[seq]) + 1


@cuda.jit
def _cached_attention_kernel(q, k_cache, v_cache, k_scale, v_scale, quantized, block_tables, seq_of_token,
                             query_start_loc, context_lens, scale, partition_size, part_max, part_sum, part_out):
    """One block per (query token, query head, partition of its keys), walking the
    partition a tile of ``T`` keys (one per thread) at a time.

    For each tile the block copies the keys into shared memory (coalesced), thread ``i``
    scores key ``i``, the running max and sum of the online softmax take in the tile's
    exponentials, then the same tile buffer takes the values and each thread adds their
    weighted sum to its own dims of the accumulator. Partition ``p`` of ``P`` holds keys
    ``p * partition_size ..`` and writes its normalized output to ``part_out[token, head
    * P + p]`` (``[N, Hq * P, D]``), its max score and sum of exponentials to
    ``part_max``/``part_sum`` ``[N, Hq * P]``. With one partition, ``part_out`` is the
    attention's output itself and ``part_max``/``part_sum`` are empty. A partition past
    the query's last visible key writes nothing.

    An int8 cache (``quantized``) multiplies each key and value by its token's scale as
    it is copied; a float cache passes 1-element dummy scales.
    """
    q_row = cuda.shared.array(MAX_HEAD_DIM, float32)  # [D] the query, times the softmax scale
    acc = cuda.shared.array(MAX_HEAD_DIM, float32)  # [D] sum of exp(score - max) * value; thread t owns t, t+T, ..
    tile = cuda.shared.array((ATTENTION_THREADS, TILE_ROW_WORDS), float32)  # [T, D+] keys, then values
    weights = cuda.shared.array(ATTENTION_THREADS, float32)  # [T] the tile's scores, then exp(score - max)
    thread, num_threads = cuda.threadIdx.x, cuda.blockDim.x
    num_tokens, num_heads, head_dim = q.shape  # [N, Hq, D]
    num_kv_heads = k_cache.shape[2]  # [num_blocks, block_size, Hkv, D]
    group = num_heads // num_kv_heads  # query heads sharing one kv head (GQA)
    num_parts = part_out.shape[1] // num_heads  # [N, Hq * P, D]

    for item in range(cuda.blockIdx.x, num_tokens * num_heads * num_parts, cuda.gridDim.x):
        token, head, part = item // (num_heads * num_parts), item // num_parts % num_heads, item % num_parts
        kv_head = head // group
        seq = seq_of_token[token]
        first = part * partition_size
        end = min(first + partition_size, _visible_keys(token, seq_of_token, query_start_loc, context_lens))
        if first >= end:  # the same for every thread of the block, so no barrier is skipped by some only
            continue
        running_max, running_sum = _start_query(q, token, head, scale, q_row, acc, thread, num_threads, head_dim)
        for tile_start in range(first, end, num_threads):
            tile_len = min(num_threads, end - tile_start)
            _stage_tile(k_cache, k_scale, quantized, block_tables, seq, kv_head, tile_start, tile_len, tile,
                        thread, num_threads, head_dim)
            cuda.syncthreads()
            _score_tile(q_row, tile, weights, tile_len, thread, head_dim)
            running_max, correction = _exponentiate_tile(weights, tile_len, running_max, thread)
            _stage_tile(v_cache, v_scale, quantized, block_tables, seq, kv_head, tile_start, tile_len, tile,
                        thread, num_threads, head_dim)
            cuda.syncthreads()
            running_sum = _accumulate_tile(weights, tile, acc, tile_len, correction, running_sum, thread,
                                           num_threads, head_dim)
        _write_partition(acc, running_max, running_sum, part_max, part_sum, part_out, token,
                         head * num_parts + part, thread, num_threads, head_dim)


@cuda.jit
def _merge_partitions_kernel(part_max, part_sum, part_out, seq_of_token, query_start_loc, context_lens,
                             partition_size, out):
    """One thread per output element ``out[token, head, d]``: the partitions' outputs,
    each weighted by its sum of exponentials rescaled from its own max to the largest
    (the rescaling a block applies from tile to tile, one level up). Reads only the partitions that
    hold some of the query's keys."""
    num_tokens, num_heads, head_dim = out.shape  # [N, Hq, D]
    num_parts = part_max.shape[1] // num_heads  # part_max, part_sum: [N, Hq * P]; part_out: [N, Hq * P, D]
    for item in range(cuda.grid(1), num_tokens * num_heads * head_dim, cuda.gridsize(1)):
        token, head, d = item // (num_heads * head_dim), item // head_dim % num_heads, item % head_dim
        visible = _visible_keys(token, seq_of_token, query_start_loc, context_lens)
        first, used = head * num_parts, (visible + partition_size - 1) // partition_size
        largest = float32(-math.inf)
        for slot in range(first, first + used):
            largest = max(largest, part_max[token, slot])
        total = float32(0)
        weighted_values = float32(0)
        for slot in range(first, first + used):
            weight = part_sum[token, slot] * math.exp(part_max[token, slot] - largest)
            total += weight
            weighted_values += weight * part_out[token, slot, d]
        out[token, head, d] = weighted_values / total


@cuda.jit
def _copy_blocks_kernel(k_cache, v_cache, block_copies):
    """One thread per element of a block to copy: ``cache[dst] = cache[src]`` for K and V."""
    block_size, num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    per_block = block_size * num_kv_heads * head_dim
    for item in range(cuda.grid(1), block_copies.shape[0] * per_block, cuda.gridsize(1)):
        pair, within = item // per_block, item % per_block
        source, target = block_copies[pair, 0], block_copies[pair, 1]
        offset = within // (num_kv_heads * head_dim)
        head = (within // head_dim) % num_kv_heads
        d = within % head_dim
        k_cache[target, offset, head, d] = k_cache[source, offset, head, d]
        v_cache[target, offset, head, d] = v_cache[source, offset, head, d]


# ------------------------------------------------------------------------ functions


def _check_pools(function: str, k_cache: Any, v_cache: Any, k_scale: Any, v_scale: Any) -> bool:
    """Check the pools are writable in place; return whether the cache is int8."""
    quantized = k_scale is not None
    dtype = np.int8 if quantized else np.float32
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_array(name, cache, ndim=4, kind="integer" if quantized else "float")
        if cache.dtype != dtype or not cache.flags.c_contiguous:
            raise ValueError(f"{function}: {name} must be a C-contiguous {np.dtype(dtype).name} array to be written "
                             f"in place, got dtype {cache.dtype}; allocate it with KVStorage.allocate")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{function}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if quantized:
        for name, scales in (("k_scale", k_scale), ("v_scale", v_scale)):
            check_array(name, scales, ndim=3)
            if tuple(scales.shape) != tuple(k_cache.shape[:3]) or scales.dtype != np.float32:
                raise ValueError(f"{function}: {name} must be float32 {tuple(k_cache.shape[:3])}, "
                                 f"got {scales.dtype} {tuple(scales.shape)}")
    return quantized


def write_kv(k_cache: Any, v_cache: Any, k: Any, v: Any, slot_mapping: Any, k_scale: Any = None,
             v_scale: Any = None) -> None:
    """Store new tokens' keys and values in their cache slots, in place.

    ``k_cache``/``v_cache``: ``[num_blocks, block_size, Hkv, D]``, C-contiguous arrays of
    this backend (float32, or int8 with ``k_scale``/``v_scale`` ``[num_blocks, block_size,
    Hkv]`` — each token is then quantized on the way in); ``k``/``v``: ``[N, Hkv, D]``;
    ``slot_mapping``: ``[N]`` flat slot of each token (negative = skip). Slots must be
    below ``num_blocks * block_size`` (not checked: that would need a device sync).
    Twin of ``minibatch.attention.write_kv``.
    """
    quantized = _check_pools("write_kv", k_cache, v_cache, k_scale, v_scale)
    check_array("k", k, ndim=3)
    check_array("v", v, ndim=3)
    check_array("slot_mapping", slot_mapping, ndim=1, kind="integer")
    if k.shape != v.shape or k.shape[1:] != k_cache.shape[2:] or slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"write_kv: expected k, v [N, Hkv, D] = [N, {k_cache.shape[2]}, {k_cache.shape[3]}] and "
                         f"slot_mapping [N], got k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"slot_mapping {tuple(slot_mapping.shape)}")
    if k.size == 0:
        return
    threads = threads_per_block(WRITE_KV_THREADS)
    if quantized:
        heads = k.shape[0] * k.shape[1]
        _write_kv_int8_kernel[blocks_for(-(-heads // threads)), threads, launch_stream()](
            k_cache, v_cache, k_scale, v_scale, as_float32(k), as_float32(v), as_index(slot_mapping))
        return
    _write_kv_kernel[blocks_for(-(-k.size // threads)), threads, launch_stream()](
        k_cache, v_cache, as_float32(k), as_float32(v), as_index(slot_mapping))


def copy_blocks(k_cache: Any, v_cache: Any, block_copies: Any, k_scale: Any = None, v_scale: Any = None) -> None:
    """Copy whole blocks, in place: ``block_copies`` is ``[P, 2]`` rows of ``(src, dst)``
    (with their scales, for an int8 cache).

    Copy-on-write uses it before a sequence writes into a block it shares. Destinations
    must be distinct and never a source in the same call. Twin of
    ``minibatch.attention.copy_blocks``.
    """
    check_array("block_copies", block_copies, ndim=2, kind="integer")
    quantized = _check_pools("copy_blocks", k_cache, v_cache, k_scale, v_scale)
    if block_copies.shape[0] == 0:
        return
    if block_copies.shape[1] != 2:
        raise ValueError(f"copy_blocks: block_copies must be [P, 2] (src, dst) rows, got {tuple(block_copies.shape)}")
    threads = threads_per_block(WRITE_KV_THREADS)
    pairs = [(k_cache, v_cache)] + ([(k_scale[..., None], v_scale[..., None])] if quantized else [])
    for keys, values in pairs:  # the scales copy as pools with a head dim of 1
        elements = block_copies.shape[0] * int(np.prod(keys.shape[1:]))
        _copy_blocks_kernel[blocks_for(-(-elements // threads)), threads, launch_stream()](
            keys, values, as_index(block_copies))


def cached_attention(q: Any, k_cache: Any, v_cache: Any, block_tables: Any, query_start_loc: np.ndarray,
                     context_lens: np.ndarray, scale: float, k_scale: Any = None, v_scale: Any = None,
                     partition_size: int | None = None) -> Any:
    """Attention of a flat, ragged batch of queries against the cache.

    Sequence ``s`` owns queries ``q[query_start_loc[s]:query_start_loc[s+1]]``, which are
    the last tokens of its ``context_lens[s]`` cached tokens (their K/V already written).
    The same call serves prefill (many queries), chunked prefill (queries after earlier
    chunks) and decode (one query). ``[N, Hq, D] -> [N, Hq, D]``.

    ``block_tables`` ``[S, max_blocks]`` may live on the host or the device;
    ``query_start_loc`` ``[S+1]`` and ``context_lens`` ``[S]`` are host integer arrays.
    An int8 cache passes ``k_scale``/``v_scale`` and is dequantized inside the kernel.

    ``partition_size`` keys per block (default: :func:`partition_size_for` picks it): one
    kernel launch when every context fits one partition, two (attend, merge) otherwise.
    The result does not depend on it beyond float32 rounding.
    Twin of ``minibatch.attention.cached_attention``.
    """
    check_array("q", q, ndim=3)
    quantized = k_scale is not None
    check_array("k_cache", k_cache, ndim=4, kind="integer" if quantized else "float")
    check_array("v_cache", v_cache, ndim=4, kind="integer" if quantized else "float")
    check_array("block_tables", block_tables, ndim=2, kind="integer")
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"cached_attention: k_cache {tuple(k_cache.shape)} and v_cache "
                         f"{tuple(v_cache.shape)} differ")
    if head_dim != cache_head_dim or num_heads % num_kv_heads:
        raise ValueError(f"cached_attention: q [N, Hq, D] = {tuple(q.shape)} does not fit a cache of "
                         f"{num_kv_heads} kv heads of dim {cache_head_dim} (Hq must be a multiple of Hkv)")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"cached_attention: head dim {head_dim} is over the kernel's bound {MAX_HEAD_DIM}")
    layout = batch_layout(query_start_loc, context_lens, num_tokens, block_size, block_tables.shape)
    out = xp.empty((num_tokens, num_heads, head_dim), dtype=xp.float32)  # [N, Hq, D]
    if out.size == 0:
        return out
    parts = Partitions.of(out, layout, partition_size)
    if quantized:
        pools = (k_cache, v_cache, as_float32(k_scale), as_float32(v_scale))
    else:
        no_scale = xp.ones((1, 1, 1), dtype=xp.float32)  # never read: the kernel checks `quantized`
        pools = (as_float32(k_cache), as_float32(v_cache), no_scale, no_scale)
    threads = threads_per_block(ATTENTION_THREADS)
    _cached_attention_kernel[blocks_for(num_tokens * num_heads * parts.count), threads, launch_stream()](
        as_float32(q), *pools, quantized, as_index(block_tables), *layout.on_device, float32(scale),
        *parts.kernel_arguments)
    parts.merge_into(out, layout)
    return out


@dataclass(frozen=True)
class Partitions:
    """How an attention launch splits its queries' contexts: ``count`` partitions of
    ``size`` keys, whose blocks write their outputs to ``part_out`` ``[N, Hq * P, D]`` and
    their max scores and sums to ``part_max``/``part_sum`` ``[N, Hq * P]``. With one
    partition, ``part_out`` is the output itself, ``part_max``/``part_sum`` are empty and
    there is nothing to merge."""

    size: int
    count: int
    part_max: Any
    part_sum: Any
    part_out: Any

    @classmethod
    def of(cls, out: Any, layout: BatchLayout, partition_size: int | None = None,
           caller: str = "cached_attention") -> Partitions:
        """The partitions of a launch writing ``out`` ``[N, Hq, D]`` for the batch ``layout``:
        ``partition_size`` keys each, or :func:`partition_size_for`'s choice when None.
        Errors name ``caller``."""
        if partition_size is not None and partition_size < 1:
            raise ValueError(f"{caller}: partition_size must be at least 1 key, got {partition_size}")
        num_tokens, num_heads, head_dim = out.shape
        longest = int(layout.context_lens.max())
        size = partition_size or partition_size_for(num_tokens * num_heads, longest)
        count = -(-longest // size)
        if count == 1:
            nothing = xp.empty((0, 0), dtype=xp.float32)
            return cls(size, count, nothing, nothing, out)
        sums_shape = (num_tokens, num_heads * count)  # [N, Hq * P]
        return cls(size, count, xp.empty(sums_shape, dtype=xp.float32), xp.empty(sums_shape, dtype=xp.float32),
                   xp.empty((*sums_shape, head_dim), dtype=xp.float32))  # part_out: [N, Hq * P, D]

    @property
    def kernel_arguments(self) -> tuple[int, Any, Any, Any]:
        """The attention kernels' last four arguments."""
        return self.size, self.part_max, self.part_sum, self.part_out

    def merge_into(self, out: Any, layout: BatchLayout) -> None:
        """Merge the partitions' results into ``out`` (a second launch; none for one partition)."""
        if self.count > 1:
            threads = threads_per_block(WRITE_KV_THREADS)
            _merge_partitions_kernel[blocks_for(-(-out.size // threads)), threads, launch_stream()](
                self.part_max, self.part_sum, self.part_out, *layout.on_device, self.size, out)


def partition_size_for(num_pairs: int, longest_context: int) -> int:
    """Keys per partition for a launch over ``num_pairs`` (query token, head) pairs whose
    longest context is ``longest_context`` keys.

    The whole context when the pairs alone give every multiprocessor
    ``TARGET_BLOCKS_PER_MULTIPROCESSOR`` blocks (prefill, large decode batches);
    otherwise short enough that partitions make up the difference, but never under
    ``MIN_PARTITION_KEYS``, and a multiple of the block's threads so that every tile but
    a context's last is full.
    """
    wanted_blocks = TARGET_BLOCKS_PER_MULTIPROCESSOR * multiprocessor_count()
    if num_pairs >= wanted_blocks:
        return max(1, longest_context)
    parts = -(-wanted_blocks // num_pairs)
    size = max(MIN_PARTITION_KEYS, -(-longest_context // parts))
    return -(-size // ATTENTION_THREADS) * ATTENTION_THREADS


@dataclass(frozen=True)
class BatchLayout:
    """Where a flat batch's queries belong, checked: ``query_start_loc`` ``[S+1]`` and
    ``context_lens`` ``[S]`` on the host, and ``on_device`` = (sequence of each query
    token ``[N]``, ``query_start_loc``, ``context_lens``) as the kernels take them."""

    query_start_loc: np.ndarray
    context_lens: np.ndarray
    on_device: tuple[Any, Any, Any]


_last_layout: dict[tuple, BatchLayout] = {}  # at most one entry: the layout of the step being run


def batch_layout(query_start_loc: Any, context_lens: Any, num_tokens: int, block_size: int,
                 block_tables_shape: tuple[int, ...], caller: str = "cached_attention") -> BatchLayout:
    """The checked :class:`BatchLayout` of a batch (errors name ``caller``).

    Every layer of a step passes the same layout, so the last one is kept: a step checks
    and uploads it once, not once per layer (a host-to-device copy costs about as much
    as a small kernel).
    """
    query_start_loc = to_host(query_start_loc).astype(np.int64)  # [S+1]
    context_lens = to_host(context_lens).astype(np.int64)  # [S]
    key = (query_start_loc.tobytes(), context_lens.tobytes(), num_tokens, block_size, tuple(block_tables_shape))
    if key not in _last_layout:
        seq_of_token = _sequence_of_each_token(query_start_loc, context_lens, num_tokens, block_size,
                                               block_tables_shape, caller)  # [N]
        _last_layout.clear()
        _last_layout[key] = BatchLayout(query_start_loc, context_lens, (
            as_index(seq_of_token), as_index(query_start_loc), as_index(context_lens)))
    return _last_layout[key]


def _sequence_of_each_token(query_start_loc: np.ndarray, context_lens: np.ndarray, num_tokens: int,
                            block_size: int, block_tables_shape: tuple[int, ...],
                            caller: str = "cached_attention") -> np.ndarray:
    """Check the batch layout on the host and return which sequence each query token
    belongs to, ``[N]`` int64 (the kernel's blocks each need it for one token). Errors
    name ``caller``."""
    if query_start_loc.ndim != 1 or context_lens.ndim != 1 or len(query_start_loc) != len(context_lens) + 1:
        raise ValueError(f"{caller}: query_start_loc must be [S+1] and context_lens [S], got "
                         f"{query_start_loc.shape} and {context_lens.shape}")
    queries_per_seq = np.diff(query_start_loc)  # [S]
    if len(query_start_loc) and (query_start_loc[0] != 0 or query_start_loc[-1] != num_tokens):
        raise ValueError(f"{caller}: query_start_loc must run from 0 to N={num_tokens}, "
                         f"got {query_start_loc.tolist()}")
    if np.any(queries_per_seq < 0) or np.any(context_lens < queries_per_seq):
        raise ValueError(f"{caller}: each sequence needs 0 <= queries <= context_len, got queries "
                         f"{queries_per_seq.tolist()} and context_lens {context_lens.tolist()}")
    blocks_needed = -(-context_lens // block_size)  # [S] ceil
    if block_tables_shape[0] < len(context_lens) or np.any(blocks_needed > block_tables_shape[1]):
        raise ValueError(f"{caller}: block_tables {block_tables_shape} is too small for "
                         f"{len(context_lens)} sequences of context_lens {context_lens.tolist()} "
                         f"with block size {block_size}")
    return np.repeat(np.arange(len(context_lens), dtype=np.int64), queries_per_seq)  # [N]
