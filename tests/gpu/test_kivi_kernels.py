"""The GPU ``kivi_attention`` equals its NumPy twin, ``minibatch.kivi.kivi_attention``:
the same outputs and, byte for byte, the same pools after every step.

Runs in Numba's CUDA simulator unless ``MINIBATCH_GPU_TESTS=device`` (see tests/conftest.py);
the simulator runs one Python thread per CUDA thread, so shapes stay tiny.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minibatch import kivi as numpy_kivi
from minibatch_gpu import kivi as gpu_kivi
from minibatch_gpu.device import to_device, to_host

pytestmark = pytest.mark.gpu

TOLERANCE = 1e-5  # float32 on both sides, the same dequantized keys: only the order of the additions differs
POOL_NAMES = ("k_cache", "v_cache", "k_scale", "k_zero", "v_scale", "v_zero", "k_residual", "v_residual")

seeds = st.integers(0, 2**32 - 1)


def random_pools(rng: np.random.Generator, num_blocks: int, block_size: int, num_rows: int, num_kv_heads: int,
                 head_dim: int) -> dict[str, np.ndarray]:
    """A layer's pools holding some earlier state: random codes, scales, zeros and residuals."""
    packed = (num_blocks, block_size, num_kv_heads, head_dim // 4)
    per_token = (num_blocks, block_size, num_kv_heads, head_dim // numpy_kivi.value_group_size(head_dim))
    per_channel = (num_blocks, num_kv_heads, head_dim)
    residual = (num_rows, block_size, num_kv_heads, head_dim)
    return {"k_cache": rng.integers(0, 256, packed, dtype=np.uint8),
            "v_cache": rng.integers(0, 256, packed, dtype=np.uint8),
            "k_scale": rng.uniform(0.01, 1, per_channel).astype(np.float32),
            "k_zero": rng.standard_normal(per_channel).astype(np.float32),
            "v_scale": rng.uniform(0.01, 1, per_token).astype(np.float32),
            "v_zero": rng.standard_normal(per_token).astype(np.float32),
            "k_residual": rng.standard_normal(residual).astype(np.float32),
            "v_residual": rng.standard_normal(residual).astype(np.float32)}


def new_tokens(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    """Keys or values: normal, or multiples of 1/2 (constant groups and values exactly
    halfway between two levels are then common, which tests the rounding)."""
    if kind == "halves":
        return (rng.integers(-3, 4, shape) * 0.5).astype(np.float32)
    return (rng.standard_normal(shape) * rng.uniform(0.1, 3)).astype(np.float32)


@st.composite
def sequence_steps(draw, block_size: int) -> tuple[int, int, int]:
    """``(tokens before the first step, new tokens in step 1, in step 2)`` of one sequence:
    decodes, prefill chunks over several blocks, and chunks starting mid-block."""

    def new(kind: str) -> int:
        return 1 if kind == "decode" else draw(st.integers(2, min(2 * block_size + 1, 10)))

    first, second = draw(st.sampled_from(["decode", "chunk"])), draw(st.sampled_from(["decode", "chunk"]))
    return draw(st.integers(0, 2 * block_size + 1)), new(first), new(second)


def step_inputs(rng: np.random.Generator, counts: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
                kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(q, k, v, query_start_loc)`` of a ragged batch with ``counts`` new tokens per sequence."""
    num_tokens = sum(counts)
    q = (rng.standard_normal((num_tokens, num_heads, head_dim)) * rng.uniform(0.1, 3)).astype(np.float32)
    k = new_tokens(rng, (num_tokens, num_kv_heads, head_dim), kind)
    v = new_tokens(rng, (num_tokens, num_kv_heads, head_dim), kind)
    return q, k, v, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def assert_pools_equal(gpu_pools: dict, numpy_pools: dict) -> None:
    for name in POOL_NAMES:
        np.testing.assert_array_equal(to_host(gpu_pools[name]), numpy_pools[name], err_msg=name)


def assert_close(gpu_result, numpy_result: np.ndarray) -> None:
    """Equal to float32 rounding. An output is a weighted average of values, so its
    rounding error scales with the values' size, not its own: an entry near zero that
    averages values of size 9 can be 1.5e-5 apart after a different order of additions.
    The absolute tolerance therefore scales with the largest output."""
    gpu_result = to_host(gpu_result)
    assert gpu_result.shape == numpy_result.shape and gpu_result.dtype == np.float32
    scale = max(1.0, float(np.abs(numpy_result).max(initial=0)))
    np.testing.assert_allclose(gpu_result, numpy_result, rtol=TOLERANCE, atol=TOLERANCE * scale)


def assert_step_matches(numpy_pools: dict, gpu_pools: dict, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                        block_tables: np.ndarray, residual_rows: np.ndarray, query_start_loc: np.ndarray,
                        context_lens: np.ndarray, scale: float, partition_size: int | None = None) -> None:
    """One step on each backend, each on its own pools: the outputs and the pools after agree."""
    expected = numpy_kivi.kivi_attention(q, k, v, **numpy_pools, block_tables=block_tables,
                                         residual_rows=residual_rows, query_start_loc=query_start_loc,
                                         context_lens=context_lens, scale=scale)
    result = gpu_kivi.kivi_attention(to_device(q), to_device(k), to_device(v), **gpu_pools,
                                     block_tables=to_device(block_tables), residual_rows=to_device(residual_rows),
                                     query_start_loc=query_start_loc, context_lens=context_lens, scale=scale,
                                     partition_size=partition_size)
    assert_close(result, expected)
    assert_pools_equal(gpu_pools, numpy_pools)


# ------------------------------------------------------------------ the twin test


@given(st.data(), st.sampled_from([1, 2, 4, 8, 16]), st.sampled_from([8, 16, 32, 64]), st.integers(1, 2),
       st.integers(1, 4), st.sampled_from(["normal", "halves"]), st.integers(0, 2),
       st.sampled_from([None, 1, 3, 8]), seeds)
def test_kivi_attention_matches_numpy(data, block_size, head_dim, num_kv_heads, group, kind, spare, partition_size,
                                      seed):
    """Two steps of a mixed batch, each backend on its own copy of the same pools: the
    outputs of both steps and every pool after each step agree, whether the kernel
    attends to each context whole or in partitions of keys."""
    rng = np.random.default_rng(seed)
    steps = data.draw(st.lists(sequence_steps(block_size), min_size=1, max_size=3), label="steps")
    num_seqs, num_heads = len(steps), num_kv_heads * group
    final_lens = np.array([sum(step) for step in steps])  # [S]
    blocks_per_seq = -(-final_lens // block_size)  # [S]
    num_blocks = int(blocks_per_seq.sum()) + spare
    shuffled = rng.permutation(num_blocks)  # any block can belong to any sequence, in any order
    block_tables = np.full((num_seqs, int(blocks_per_seq.max()) + 1), -1, np.int32)  # [S, max_blocks]
    for s, start in enumerate(np.concatenate([[0], np.cumsum(blocks_per_seq)[:-1]])):
        block_tables[s, : blocks_per_seq[s]] = shuffled[start : start + blocks_per_seq[s]]
    residual_rows = rng.permutation(num_seqs + spare)[:num_seqs].astype(np.int32)  # [S] distinct rows
    numpy_pools = random_pools(rng, num_blocks, block_size, num_seqs + spare, num_kv_heads, head_dim)
    gpu_pools = {name: to_device(pool.copy()) for name, pool in numpy_pools.items()}
    context_lens = np.array([before for before, _, _ in steps])  # [S]
    scale = head_dim**-0.5

    for step in (1, 2):
        counts = [seq[step] for seq in steps]
        context_lens = context_lens + counts
        q, k, v, query_start_loc = step_inputs(rng, counts, num_heads, num_kv_heads, head_dim, kind)
        assert_step_matches(numpy_pools, gpu_pools, q, k, v, block_tables, residual_rows, query_start_loc,
                            context_lens, scale, partition_size)


def test_a_long_decode_context_split_by_default_matches_numpy():
    """One decode step after 299 tokens: too few (query, head) pairs for the multiprocessors,
    so the kernel splits the context on its own, across quantized blocks and the float
    residual alike, and still gives NumPy's result."""
    from minibatch_gpu.attention import partition_size_for

    rng = np.random.default_rng(7)
    block_size, num_kv_heads, num_heads, head_dim, context = 16, 1, 2, 8, 300
    assert -(-context // partition_size_for(num_heads, context)) > 1  # it does split
    num_blocks = -(-context // block_size)
    numpy_pools = random_pools(rng, num_blocks, block_size, 1, num_kv_heads, head_dim)
    gpu_pools = {name: to_device(pool.copy()) for name, pool in numpy_pools.items()}
    table, rows = rng.permutation(num_blocks)[None, :].astype(np.int32), np.array([0], np.int32)
    q, k, v, loc = step_inputs(rng, [1], num_heads, num_kv_heads, head_dim, "normal")
    assert_step_matches(numpy_pools, gpu_pools, q, k, v, table, rows, loc, np.array([context]), 0.5)


def test_halfway_values_and_constant_groups_over_chunks():
    """One sequence prefilled in three chunks (ending mid-block, filling two blocks, one
    decode step) whose groups span 3 with points halfway between two levels, where
    ``floor(x + 0.5)`` rounds up, and whose odd tokens' values are constant (scale 1)."""
    rng = np.random.default_rng(3)
    block_size, num_kv_heads, head_dim = 4, 1, 8
    halfway = np.array([0, 0.5, 1.5, 3], np.float32)  # min 0, max 3: scale 1, codes 0, 1, 2, 3 (two ties)
    numpy_pools = random_pools(rng, 4, block_size, 1, num_kv_heads, head_dim)
    gpu_pools = {name: to_device(pool.copy()) for name, pool in numpy_pools.items()}
    table, rows = np.array([[2, 0, 3, 1]], np.int32), np.array([0], np.int32)
    context = 0
    for count in (3, 6, 1):
        positions = np.arange(context, context + count)  # [T]
        context += count
        q = rng.standard_normal((count, 2, head_dim)).astype(np.float32)
        k = np.broadcast_to(halfway[positions % 4, None, None], (count, num_kv_heads, head_dim)).copy()
        v = np.broadcast_to(halfway[np.arange(head_dim) % 4], (count, num_kv_heads, head_dim)).copy()
        v[positions % 2 == 1] = 1.0
        assert_step_matches(numpy_pools, gpu_pools, q, k, v, table, rows, np.array([0, count]), np.array([context]),
                            0.5)


# ----------------------------------------------------------------- boundary checks


def test_bad_inputs_raise_value_errors():
    rng = np.random.default_rng(0)
    pools = {name: to_device(pool) for name, pool in random_pools(rng, 2, 4, 1, 2, 8).items()}
    q, k = to_device(np.zeros((1, 4, 8), np.float32)), to_device(np.zeros((1, 2, 8), np.float32))
    table, rows = to_device(np.zeros((1, 2), np.int32)), to_device(np.zeros(1, np.int32))
    loc, lens = np.array([0, 1]), np.array([1])

    def call(**changes):
        arguments = {"q": q, "k": k, "v": k, **pools, "block_tables": table, "residual_rows": rows,
                     "query_start_loc": loc, "context_lens": lens, "scale": 1.0}
        return gpu_kivi.kivi_attention(**{**arguments, **changes})

    with pytest.raises(ValueError, match="multiple"):
        call(q=to_device(np.zeros((1, 3, 8), np.float32)))
    with pytest.raises(ValueError, match="k_cache"):
        call(k_cache=pools["k_cache"].astype(np.int8))
    with pytest.raises(ValueError, match="v_scale"):
        call(v_scale=pools["v_scale"][:, :, :, :0])
    with pytest.raises(ValueError, match="too small"):
        call(context_lens=np.array([9]))
    with pytest.raises(ValueError, match="residual_rows"):
        call(residual_rows=to_device(np.zeros(0, np.int32)))
    before = {name: to_host(pool).copy() for name, pool in pools.items()}
    with pytest.raises(ValueError, match="partition_size"):
        # a token that completes block 0 (context 4 of block size 4): the step would quantize it
        call(k=to_device(np.ones((1, 2, 8), np.float32)), context_lens=np.array([4]), partition_size=0)
    for name, pool in pools.items():  # refused before anything was quantized or stored
        np.testing.assert_array_equal(to_host(pool), before[name])
