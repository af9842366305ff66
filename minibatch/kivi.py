"""KIVI: a 2-bit KV cache (keys per channel, values per token), in NumPy.

KIVI (Liu et al., 2024) observes that keys have a few *channels* with large values
while values have no such structure, so it quantizes

* **keys per channel**: one ``(scale, zero)`` per channel for a group of tokens, here a
  whole block of ``block_size`` tokens;
* **values per token**: one ``(scale, zero)`` per token for each group of
  :func:`value_group_size` channels;

both asymmetrically to 2 bits (codes 0..3, ``x ~ zero + code * scale``). A key group can
only be quantized once all its tokens exist, so each sequence keeps the tokens of its
unfinished last block in float32, in a *residual row* of its own. When a block fills, it
is quantized as a whole and the residual row starts over.

Storage, per layer (``Hkv`` KV heads, ``D`` head dim, four 2-bit codes per byte, channel
``d`` in bits ``2 * (d % 4)`` of byte ``d // 4``):

* ``k_cache``, ``v_cache``: uint8 ``[num_blocks, block_size, Hkv, D // 4]``
* ``k_scale``, ``k_zero``: float32 ``[num_blocks, Hkv, D]`` (per block and channel)
* ``v_scale``, ``v_zero``: float32 ``[num_blocks, block_size, Hkv, D // G]`` (per token and group)
* ``k_residual``, ``v_residual``: float32 ``[num_rows, block_size, Hkv, D]``

Which values a query reads does not depend on how its sequence was split into steps: the
query at position ``p`` reads every block before its own quantized and its own block's
tokens in float, exactly as if the sequence had been decoded one token at a time. (The
paper's reference code instead lets a prompt attend to itself in float, so a prompt's
output would change with how chunked prefill cuts it, that is, with its batch-mates.)
The K/V values themselves come out of matmuls whose last bit may depend on the batch's
shape, as with any cache; a 2-bit code sitting exactly at a rounding boundary can then
flip, so invariance is exact in the rule and holds to float rounding in the numbers.

:func:`kivi_attention` has a GPU twin of the same name in ``minibatch_gpu/kivi.py``.
"""

from __future__ import annotations

import numpy as np

from minibatch.attention import causal_attention

LEVELS = 3  # the largest 2-bit code
SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)  # channel d sits at bits 2 * (d % 4)


def value_group_size(head_dim: int) -> int:
    """Channels sharing one value scale: 32, as in KIVI, or the whole head if it is smaller."""
    return 32 if head_dim % 32 == 0 else head_dim


def quantize_2bit(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric 2-bit codes with one ``(scale, zero)`` per group, the group running
    along ``axis``: ``-> (uint8 codes shaped like x, scale, zero)``, ``scale``/``zero``
    shaped like ``x`` without ``axis``. ``zero`` is the group's minimum and
    ``scale = (max - min) / 3``, so every element is within ``scale / 2`` of
    ``zero + code * scale`` (:func:`dequantize_2bit`)."""
    x = x.astype(np.float32, copy=False)
    zero = np.min(x, axis=axis, keepdims=True)
    scale = (np.max(x, axis=axis, keepdims=True) - zero) / np.float32(LEVELS)
    scale = np.where(scale == 0, np.float32(1), scale)  # a constant group: every code is 0
    codes = np.clip(np.floor((x - zero) / scale + np.float32(0.5)), 0, LEVELS).astype(np.uint8)
    return codes, np.squeeze(scale, axis), np.squeeze(zero, axis)


def dequantize_2bit(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """``zero + code * scale`` in float32 (scale and zero already broadcast to ``codes``)."""
    return zero + codes.astype(np.float32) * scale


def pack_2bit(codes: np.ndarray) -> np.ndarray:
    """Four codes per byte along the last axis: ``[..., D] -> uint8 [..., D // 4]``."""
    groups = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 4, 4).astype(np.uint8)  # [..., D/4, 4]
    return np.bitwise_or.reduce(groups << SHIFTS, axis=-1).astype(np.uint8)


def unpack_2bit(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_2bit`: ``uint8 [..., D // 4] -> uint8 [..., D]``."""
    codes = (packed[..., None] >> SHIFTS) & np.uint8(LEVELS)  # [..., D/4, 4]
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * 4)


def quantize_key_block(k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One full block of keys, per channel: ``[B, Hkv, D] -> (uint8 [B, Hkv, D/4],
    scale [Hkv, D], zero [Hkv, D])``."""
    codes, scale, zero = quantize_2bit(k, axis=0)
    return pack_2bit(codes), scale, zero


def quantize_values(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Values, per token and channel group: ``[T, Hkv, D] -> (uint8 [T, Hkv, D/4],
    scale [T, Hkv, D/G], zero [T, Hkv, D/G])``."""
    num_tokens, num_kv_heads, head_dim = v.shape
    group = value_group_size(head_dim)
    codes, scale, zero = quantize_2bit(v.reshape(num_tokens, num_kv_heads, head_dim // group, group), axis=-1)
    return pack_2bit(codes.reshape(v.shape)), scale, zero


def dequantize_keys(packed: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Blocks of keys back to float: ``[n, B, Hkv, D/4], [n, Hkv, D], [n, Hkv, D] -> [n * B, Hkv, D]``."""
    keys = dequantize_2bit(unpack_2bit(packed), scale[:, None], zero[:, None])  # [n, B, Hkv, D]
    return keys.reshape(-1, *keys.shape[2:])


def dequantize_values(packed: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Blocks of values back to float: ``[n, B, Hkv, D/4], [n, B, Hkv, D/G] x2 -> [n * B, Hkv, D]``."""
    codes = unpack_2bit(packed)  # [n, B, Hkv, D]
    grouped = codes.reshape(*scale.shape, codes.shape[-1] // scale.shape[-1])  # [n, B, Hkv, D/G, G]
    values = dequantize_2bit(grouped, scale[..., None], zero[..., None]).reshape(codes.shape)
    return values.reshape(-1, *values.shape[2:])


def kivi_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
                   k_scale: np.ndarray, k_zero: np.ndarray, v_scale: np.ndarray, v_zero: np.ndarray,
                   k_residual: np.ndarray, v_residual: np.ndarray, block_tables: np.ndarray,
                   residual_rows: np.ndarray, query_start_loc: np.ndarray, context_lens: np.ndarray,
                   scale: float) -> np.ndarray:
    """Store a flat, ragged batch's new keys and values in a KIVI cache and attend over it.

    This one call does what ``write_kv`` and ``cached_attention`` do for a float cache,
    because with a residual the order matters. For each sequence ``s``, whose new tokens
    ``k``/``v`` ``[N, Hkv, D]`` (rows ``query_start_loc[s]:query_start_loc[s+1]``) end at
    position ``context_lens[s]``, and whose unfinished block sits in residual row
    ``residual_rows[s]``:

    1. every block the new tokens complete is quantized into its block of the pools;
    2. each query attends to the blocks before its own, dequantized, and to its own
       block's tokens up to itself in float;
    3. the tokens of a still unfinished last block go (in float) to the residual row.

    ``q`` ``[N, Hq, D] -> [N, Hq, D]``. Pools as in the module docstring, updated in place.
    """
    block_size = k_cache.shape[1]
    out = np.empty(q.shape, dtype=np.float32)  # [N, Hq, D]
    for s in range(len(context_lens)):
        start, end, context = int(query_start_loc[s]), int(query_start_loc[s + 1]), int(context_lens[s])
        first = context - (end - start)  # position of the first new token
        base = first // block_size * block_size  # the first position of its block
        table, row = block_tables[s], int(residual_rows[s])
        # float K/V of positions base .. context-1: the residual, then the new tokens
        k_tail = np.concatenate([k_residual[row, :first - base], k[start:end]])  # [context-base, Hkv, D]
        v_tail = np.concatenate([v_residual[row, :first - base], v[start:end]])  # [context-base, Hkv, D]

        # 1. quantize the blocks these tokens complete
        for index in range(base // block_size, context // block_size):
            block, lo = table[index], index * block_size - base
            k_cache[block], k_scale[block], k_zero[block] = quantize_key_block(k_tail[lo:lo + block_size])
            v_cache[block], v_scale[block], v_zero[block] = quantize_values(v_tail[lo:lo + block_size])

        # 2. attend: earlier blocks quantized, the query's own block in float
        full_blocks = table[:context // block_size]
        k_old = dequantize_keys(k_cache[full_blocks], k_scale[full_blocks], k_zero[full_blocks])  # [F*B, Hkv, D]
        v_old = dequantize_values(v_cache[full_blocks], v_scale[full_blocks], v_zero[full_blocks])  # [F*B, Hkv, D]
        for index in range(first // block_size, (context - 1) // block_size + 1):  # blocks holding queries
            own = index * block_size  # the block's first position
            q_lo, q_hi = max(first, own), min(context, own + block_size)  # its query positions
            keys = np.concatenate([k_old[:own], k_tail[own - base:q_hi - base]])  # [q_hi, Hkv, D]
            values = np.concatenate([v_old[:own], v_tail[own - base:q_hi - base]])  # [q_hi, Hkv, D]
            rows = slice(start + q_lo - first, start + q_hi - first)
            out[rows] = causal_attention(q[rows], keys, values, scale)  # [T, Hq, D]

        # 3. keep the unfinished block in float
        done = context // block_size * block_size
        k_residual[row, :context - done] = k_tail[done - base:]
        v_residual[row, :context - done] = v_tail[done - base:]
    return out
