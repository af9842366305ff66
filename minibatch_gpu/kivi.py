"""KIVI: a 2-bit KV cache (keys per channel, values per token), as Numba CUDA kernels.

Twin of ``kivi_attention`` in ``minibatch/kivi.py``, with the same signature, the same
pools and the same bytes in them (see that module's docstring for the layout). One call
is three kernels, launched in this order on one stream, because each needs the one
before it:

1. **quantize**: the blocks this step completes become 2-bit codes, keys per channel
   over the block's tokens, values per token in groups of channels;
2. **attend**: each query reads the blocks before its own through the block table,
   dequantizing as it reads, and its own block's tokens in float (from the residual row
   or from the new keys and values), a tile of keys at a time with the online softmax and
   the partitions of ``minibatch_gpu/attention.py`` (a short step's contexts split over
   more blocks, and a further launch merges them);
3. **keep the residual**: the tokens of a still unfinished last block go to the
   sequence's residual row, after kernel 2 has read the old one.

The rounding is NumPy's, step for step (``floor((x - zero) / scale + 0.5)`` in float32,
``scale = (max - min) / 3``), so both backends store the same codes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda, float32

from minibatch.kivi import LEVELS, value_group_size
from minibatch_gpu.attention import (
    ATTENTION_THREADS,
    MAX_HEAD_DIM,
    TILE_ROW_WORDS,
    Partitions,
    _accumulate_tile,
    _exponentiate_tile,
    _score_tile,
    _start_query,
    _write_partition,
    batch_layout,
)
from minibatch_gpu.device import (
    as_float32,
    as_index,
    blocks_for,
    check_array,
    launch_stream,
    threads_per_block,
    xp,
)

QUANTIZE_THREADS = 256
RESIDUAL_THREADS = 256

# ------------------------------------------------------------------ device helpers


@cuda.jit(device=True)
def _sequence_bounds(seq, query_start_loc, context_lens):
    """``(row of its first new token in k/v, position of that token, context length)``."""
    start, context = query_start_loc[seq], context_lens[seq]
    return start, context - (query_start_loc[seq + 1] - start), context


@cuda.jit(device=True)
def _float_entry(new, residual, row, start, first, position, head, d):
    """Element ``d`` of the key (or value) at ``position`` of an unquantized block: from
    the residual row before the step's first new token, from the new ones after."""
    if position < first:
        return residual[row, position % residual.shape[1], head, d]
    return new[start + position - first, head, d]


@cuda.jit(device=True)
def _scale_of(lowest, highest):
    scale = (highest - lowest) / float32(LEVELS)
    return scale if scale != 0 else float32(1)  # a constant group: every code is 0


@cuda.jit(device=True)
def _code_of(x, zero, scale):
    # int(): math.floor of a float32 is a float32 in CUDA kernels (an int in the simulator)
    return max(0, min(LEVELS, int(math.floor((x - zero) / scale + float32(0.5)))))


@cuda.jit(device=True)
def _code_at(packed, block, offset, head, d):
    """The 2-bit code of channel ``d``: bits ``2 * (d % 4)`` of byte ``d // 4``."""
    return float32((packed[block, offset, head, d // 4] >> (2 * (d % 4))) & LEVELS)


@cuda.jit(device=True)
def _dequantized_key(k_cache, k_scale, k_zero, block, offset, head, d):
    """``zero + code * scale`` with the block's scale for channel ``d``."""
    return k_zero[block, head, d] + _code_at(k_cache, block, offset, head, d) * k_scale[block, head, d]


@cuda.jit(device=True)
def _dequantized_value(v_cache, v_scale, v_zero, block, offset, head, d):
    """``zero + code * scale`` with the token's scale for the group holding channel ``d``."""
    g = d // (v_cache.shape[3] * 4 // v_scale.shape[3])
    return v_zero[block, offset, head, g] + _code_at(v_cache, block, offset, head, d) * v_scale[block, offset, head, g]


# ------------------------------------------------------------------------- kernels


@cuda.jit
def _quantize_blocks_kernel(k_cache, v_cache, k_scale, k_zero, v_scale, v_zero, k_residual, v_residual, k, v,
                            completed, block_tables, residual_rows, query_start_loc, context_lens):
    """Quantize the blocks of ``completed`` ``[W, 2]`` rows of ``(sequence, block index)``.

    Keys: one thread per (block, kv head, byte of four channels) finds each channel's
    min and max over the block's tokens, then packs the codes of all its tokens. Values:
    one thread per (token, kv head, channel group) does the same along the group.
    Twins of ``quantize_key_block`` and ``quantize_values``.
    """
    block_size, num_kv_heads, num_bytes = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    num_groups = v_scale.shape[3]
    group = num_bytes * 4 // num_groups  # channels per value scale
    num_work = completed.shape[0]

    for item in range(cuda.grid(1), num_work * num_kv_heads * num_bytes, cuda.gridsize(1)):
        work, head, byte = item // (num_kv_heads * num_bytes), (item // num_bytes) % num_kv_heads, item % num_bytes
        seq, index = completed[work, 0], completed[work, 1]
        start, first, _ = _sequence_bounds(seq, query_start_loc, context_lens)
        block, row, base = block_tables[seq, index], residual_rows[seq], index * block_size
        for d in range(4 * byte, 4 * byte + 4):
            lowest = highest = _float_entry(k, k_residual, row, start, first, base, head, d)
            for offset in range(1, block_size):
                x = _float_entry(k, k_residual, row, start, first, base + offset, head, d)
                lowest, highest = min(lowest, x), max(highest, x)
            k_scale[block, head, d] = _scale_of(lowest, highest)
            k_zero[block, head, d] = lowest
        for offset in range(block_size):
            packed = 0
            for d in range(4 * byte, 4 * byte + 4):
                x = _float_entry(k, k_residual, row, start, first, base + offset, head, d)
                packed |= _code_of(x, k_zero[block, head, d], k_scale[block, head, d]) << (2 * (d % 4))
            k_cache[block, offset, head, byte] = packed

    per_token = num_kv_heads * num_groups
    for item in range(cuda.grid(1), num_work * block_size * per_token, cuda.gridsize(1)):
        work, offset = item // (block_size * per_token), (item // per_token) % block_size
        head, g = (item // num_groups) % num_kv_heads, item % num_groups
        seq, index = completed[work, 0], completed[work, 1]
        start, first, _ = _sequence_bounds(seq, query_start_loc, context_lens)
        block, row, position = block_tables[seq, index], residual_rows[seq], index * block_size + offset
        lowest = highest = _float_entry(v, v_residual, row, start, first, position, head, g * group)
        for d in range(g * group + 1, (g + 1) * group):
            x = _float_entry(v, v_residual, row, start, first, position, head, d)
            lowest, highest = min(lowest, x), max(highest, x)
        scale = _scale_of(lowest, highest)
        v_scale[block, offset, head, g], v_zero[block, offset, head, g] = scale, lowest
        for byte in range(g * group // 4, (g + 1) * group // 4):
            packed = 0
            for d in range(4 * byte, 4 * byte + 4):
                x = _float_entry(v, v_residual, row, start, first, position, head, d)
                packed |= _code_of(x, lowest, scale) << (2 * (d % 4))
            v_cache[block, offset, head, byte] = packed


def _tile_stager(dequantized):
    """The device function that fills an attention tile with keys (``dequantized`` =
    :func:`_dequantized_key`) or values (:func:`_dequantized_value`): the two differ only
    in how a stored entry is unpacked (a key's scale is per block and channel, a value's
    per token and group of channels)."""

    @cuda.jit(device=True)
    def stage(x, cache, scale, zero, residual, block_tables, seq, row, start, first, own, kv_head,
              tile_start, tile_len, tile, thread, num_threads, head_dim):
        """Copy entries ``tile_start ..`` of sequence ``seq`` into ``tile``: unpacked and
        dequantized before position ``own`` (the query's own block), in float from there on."""
        block_size = cache.shape[1]
        for i in range(tile_len):
            j = tile_start + i
            block, offset = block_tables[seq, j // block_size], j % block_size
            for d in range(thread, head_dim, num_threads):
                if j < own:
                    tile[i, d] = dequantized(cache, scale, zero, block, offset, kv_head, d)
                else:
                    tile[i, d] = _float_entry(x, residual, row, start, first, j, kv_head, d)

    return stage


_stage_kivi_keys = _tile_stager(_dequantized_key)
_stage_kivi_values = _tile_stager(_dequantized_value)


@cuda.jit
def _kivi_attention_kernel(q, k, v, k_cache, v_cache, k_scale, k_zero, v_scale, v_zero, k_residual, v_residual,
                           block_tables, residual_rows, seq_of_token, query_start_loc, context_lens, scale,
                           partition_size, part_max, part_sum, part_out):
    """One block per (query token, query head, partition of its keys).

    The same tiles, online softmax, partitions and merge as ``_cached_attention_kernel``
    in ``minibatch_gpu/attention.py`` (its docstring says where partitions write); only
    where a key or value comes from differs: a key before the query's own block is
    unpacked and dequantized (``zero + code * scale``) as the tile is filled, a key of the
    own block is read in float.
    """
    q_row = cuda.shared.array(MAX_HEAD_DIM, float32)  # [D] the query, times the softmax scale
    acc = cuda.shared.array(MAX_HEAD_DIM, float32)  # [D] sum of exp(score - max) * value; thread t owns t, t+T, ..
    tile = cuda.shared.array((ATTENTION_THREADS, TILE_ROW_WORDS), float32)  # [T, D+] keys, then values
    weights = cuda.shared.array(ATTENTION_THREADS, float32)  # [T] the tile's scores, then exp(score - max)
    thread, num_threads = cuda.threadIdx.x, cuda.blockDim.x
    num_tokens, num_heads, head_dim = q.shape  # [N, Hq, D]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]  # [num_blocks, block_size, Hkv, D/4]
    group = num_heads // num_kv_heads  # query heads sharing one kv head (GQA)
    num_parts = part_out.shape[1] // num_heads  # [N, Hq * P, D]

    for item in range(cuda.blockIdx.x, num_tokens * num_heads * num_parts, cuda.gridDim.x):
        token, head, part = item // (num_heads * num_parts), item // num_parts % num_heads, item % num_parts
        kv_head = head // group
        seq = seq_of_token[token]
        start, first, _ = _sequence_bounds(seq, query_start_loc, context_lens)
        row = residual_rows[seq]
        position = first + token - start  # the query sees keys 0 .. position
        own = position // block_size * block_size  # its block's first position: float from here on
        first_key = part * partition_size
        end = min(first_key + partition_size, position + 1)
        if first_key >= end:  # the same for every thread of the block, so no barrier is skipped by some only
            continue
        running_max, running_sum = _start_query(q, token, head, scale, q_row, acc, thread, num_threads, head_dim)
        for tile_start in range(first_key, end, num_threads):
            tile_len = min(num_threads, end - tile_start)
            _stage_kivi_keys(k, k_cache, k_scale, k_zero, k_residual, block_tables, seq, row, start, first, own,
                             kv_head, tile_start, tile_len, tile, thread, num_threads, head_dim)
            cuda.syncthreads()
            _score_tile(q_row, tile, weights, tile_len, thread, head_dim)
            running_max, correction = _exponentiate_tile(weights, tile_len, running_max, thread)
            _stage_kivi_values(v, v_cache, v_scale, v_zero, v_residual, block_tables, seq, row, start, first, own,
                               kv_head, tile_start, tile_len, tile, thread, num_threads, head_dim)
            cuda.syncthreads()
            running_sum = _accumulate_tile(weights, tile, acc, tile_len, correction, running_sum, thread,
                                           num_threads, head_dim)
        _write_partition(acc, running_max, running_sum, part_max, part_sum, part_out, token,
                         head * num_parts + part, thread, num_threads, head_dim)


@cuda.jit
def _write_residual_kernel(k_residual, v_residual, k, v, residual_rows, seq_of_token, query_start_loc, context_lens):
    """One thread per (new token, kv head, dim) element: a token whose block is still
    unfinished goes to slot ``position % block_size`` of its sequence's residual row."""
    num_tokens, num_kv_heads, head_dim = k.shape  # [N, Hkv, D]
    block_size = k_residual.shape[1]  # [num_rows, block_size, Hkv, D]
    for item in range(cuda.grid(1), num_tokens * num_kv_heads * head_dim, cuda.gridsize(1)):
        token, head, d = item // (num_kv_heads * head_dim), (item // head_dim) % num_kv_heads, item % head_dim
        seq = seq_of_token[token]
        start, first, context = _sequence_bounds(seq, query_start_loc, context_lens)
        position = first + token - start
        if position < context // block_size * block_size:  # its block was quantized in kernel 1
            continue
        row = residual_rows[seq]
        k_residual[row, position % block_size, head, d] = k[token, head, d]
        v_residual[row, position % block_size, head, d] = v[token, head, d]


# ------------------------------------------------------------------------ functions


def _check_pools(k_cache: Any, v_cache: Any, k_scale: Any, k_zero: Any, v_scale: Any, v_zero: Any,
                 k_residual: Any, v_residual: Any) -> None:
    """Check the pools have the module's layout and can be written in place."""
    if getattr(k_cache, "ndim", None) != 4:
        raise ValueError("kivi_attention: k_cache must be uint8 [num_blocks, block_size, Hkv, D/4], got "
                         f"{getattr(k_cache, 'shape', type(k_cache).__name__)}")
    num_blocks, block_size, num_kv_heads, num_bytes = k_cache.shape
    head_dim = num_bytes * 4
    per_token = (num_blocks, block_size, num_kv_heads, head_dim // value_group_size(head_dim))
    expected = {"k_cache": (np.uint8, k_cache.shape), "v_cache": (np.uint8, k_cache.shape),
                "k_scale": (np.float32, (num_blocks, num_kv_heads, head_dim)),
                "k_zero": (np.float32, (num_blocks, num_kv_heads, head_dim)),
                "v_scale": (np.float32, per_token), "v_zero": (np.float32, per_token),
                "k_residual": (np.float32, (None, block_size, num_kv_heads, head_dim)),
                "v_residual": (np.float32, (None, block_size, num_kv_heads, head_dim))}
    pools = (k_cache, v_cache, k_scale, k_zero, v_scale, v_zero, k_residual, v_residual)
    for (name, (dtype, shape)), pool in zip(expected.items(), pools, strict=True):
        check_array(name, pool, ndim=len(shape), kind="integer" if dtype == np.uint8 else "float")
        fits = all(want is None or want == have for want, have in zip(shape, pool.shape, strict=True))
        if pool.dtype != dtype or not fits or not pool.flags.c_contiguous:
            raise ValueError(f"kivi_attention: {name} must be a C-contiguous {np.dtype(dtype).name} array "
                             f"{tuple('rows' if n is None else n for n in shape)} to be written in place, got "
                             f"{pool.dtype} {tuple(pool.shape)}; allocate the pools with KVStorage.allocate")
    if k_residual.shape != v_residual.shape:
        raise ValueError(f"kivi_attention: k_residual {tuple(k_residual.shape)} and v_residual "
                         f"{tuple(v_residual.shape)} differ")


def _completed_blocks(query_start_loc: np.ndarray, context_lens: np.ndarray, block_size: int) -> np.ndarray:
    """``[W, 2]`` int64 rows of ``(sequence, block index)``: the blocks this step fills."""
    firsts = context_lens - np.diff(query_start_loc)  # [S] position of each sequence's first new token
    return np.array([(s, index) for s, (first, context) in enumerate(zip(firsts, context_lens, strict=True))
                     for index in range(first // block_size, context // block_size)], np.int64).reshape(-1, 2)


def kivi_attention(q: Any, k: Any, v: Any, k_cache: Any, v_cache: Any, k_scale: Any, k_zero: Any, v_scale: Any,
                   v_zero: Any, k_residual: Any, v_residual: Any, block_tables: Any, residual_rows: Any,
                   query_start_loc: np.ndarray, context_lens: np.ndarray, scale: float,
                   partition_size: int | None = None) -> Any:
    """Store a flat, ragged batch's new keys and values in a KIVI cache and attend over it.

    Sequence ``s`` owns rows ``query_start_loc[s]:query_start_loc[s+1]`` of ``q``
    ``[N, Hq, D]`` and ``k``/``v`` ``[N, Hkv, D]``, the last tokens of its
    ``context_lens[s]``; its unfinished block sits in residual row ``residual_rows[s]``.
    The blocks the new tokens complete are quantized, each query attends to the blocks
    before its own dequantized and to its own block in float, and the tokens of a still
    unfinished block go to the residual row. ``-> [N, Hq, D]``; pools updated in place.

    ``block_tables`` ``[S, max_blocks]`` and ``residual_rows`` ``[S]`` may live on the host
    or the device; ``query_start_loc`` ``[S+1]`` and ``context_lens`` ``[S]`` are host
    integer arrays. ``partition_size``: keys per attention block, as in
    :func:`minibatch_gpu.attention.cached_attention` (a fourth launch merges the
    partitions when there are several). Twin of ``minibatch.kivi.kivi_attention``.
    """
    for name, array in (("q", q), ("k", k), ("v", v)):
        check_array(name, array, ndim=3)
    check_array("block_tables", block_tables, ndim=2, kind="integer")
    check_array("residual_rows", residual_rows, ndim=1, kind="integer")
    _check_pools(k_cache, v_cache, k_scale, k_zero, v_scale, v_zero, k_residual, v_residual)
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if k.shape != v.shape or tuple(k.shape) != (num_tokens, num_kv_heads, k_cache.shape[3] * 4):
        raise ValueError(f"kivi_attention: expected k, v [N, Hkv, D] = [{num_tokens}, {num_kv_heads}, "
                         f"{k_cache.shape[3] * 4}] for the cache, got {tuple(k.shape)} and {tuple(v.shape)}")
    if head_dim != k.shape[2] or num_heads % num_kv_heads:
        raise ValueError(f"kivi_attention: q [N, Hq, D] = {tuple(q.shape)} does not fit a cache of "
                         f"{num_kv_heads} kv heads of dim {k.shape[2]} (Hq must be a multiple of Hkv)")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"kivi_attention: head dim {head_dim} is over the kernel's bound {MAX_HEAD_DIM}")
    layout = batch_layout(query_start_loc, context_lens, num_tokens, block_size, block_tables.shape,
                          "kivi_attention")
    query_start_loc, context_lens = layout.query_start_loc, layout.context_lens  # [S+1], [S] on the host
    seq_of_token, *bounds = layout.on_device  # [N], [S+1], [S]
    if residual_rows.shape[0] < len(context_lens):
        raise ValueError(f"kivi_attention: residual_rows has {residual_rows.shape[0]} entries for "
                         f"{len(context_lens)} sequences")
    out = xp.empty((num_tokens, num_heads, head_dim), dtype=xp.float32)  # [N, Hq, D]
    parts = Partitions.of(out, layout, partition_size, "kivi_attention") if out.size else None  # checked first
    q, k, v = as_float32(q), as_float32(k), as_float32(v)
    block_tables, residual_rows = as_index(block_tables), as_index(residual_rows)
    stream = launch_stream()

    completed = _completed_blocks(query_start_loc, context_lens, block_size)  # [W, 2]
    if len(completed):
        threads = threads_per_block(QUANTIZE_THREADS)
        items = len(completed) * num_kv_heads * max(head_dim // 4, block_size * head_dim // value_group_size(head_dim))
        _quantize_blocks_kernel[blocks_for(-(-items // threads)), threads, stream](
            k_cache, v_cache, k_scale, k_zero, v_scale, v_zero, k_residual, v_residual, k, v, as_index(completed),
            block_tables, residual_rows, *bounds)
    if parts is None:
        return out
    threads = threads_per_block(ATTENTION_THREADS)
    _kivi_attention_kernel[blocks_for(num_tokens * num_heads * parts.count), threads, stream](
        q, k, v, k_cache, v_cache, k_scale, k_zero, v_scale, v_zero, k_residual, v_residual, block_tables,
        residual_rows, seq_of_token, *bounds, float32(scale), *parts.kernel_arguments)
    parts.merge_into(out, layout)
    threads = threads_per_block(RESIDUAL_THREADS)
    _write_residual_kernel[blocks_for(-(-k.size // threads)), threads, stream](
        k_residual, v_residual, k, v, residual_rows, seq_of_token, *bounds)
    return out
