"""Each GPU function equals its NumPy twin over random shapes, lengths and block tables.

Runs in Numba's CUDA simulator unless ``MINIBATCH_GPU_TESTS=device`` (see tests/conftest.py);
the simulator runs one Python thread per CUDA thread, so shapes stay tiny.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minibatch import attention as numpy_attention
from minibatch import layers as numpy_layers
from minibatch.config import ModelConfig
from minibatch_gpu import attention as gpu_attention
from minibatch_gpu import layers as gpu_layers
from minibatch_gpu.device import gpu_available, multiprocessor_count, to_device, to_host
from tests.helpers import relative_error, tiny_raw_config

pytestmark = pytest.mark.gpu

TOLERANCE = 1e-5  # float32 on both sides: only the order of the additions differs
needs_device = pytest.mark.skipif(not gpu_available(), reason="needs a real CUDA GPU (MINIBATCH_GPU_TESTS=device)")

seeds = st.integers(0, 2**32 - 1)
head_dims = st.sampled_from([4, 8, 16])
# keys per block of the attention kernel: None lets it choose (one partition at these
# lengths); small sizes split even short contexts, and 1 leaves each key on its own
partition_sizes = st.sampled_from([None, 1, 2, 3, 5, 8])


def normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def assert_close(gpu_result, numpy_result) -> None:
    gpu_result = to_host(gpu_result)
    assert gpu_result.shape == numpy_result.shape and gpu_result.dtype == np.float32
    if not np.any(numpy_result):
        np.testing.assert_array_equal(gpu_result, numpy_result)
    else:
        assert relative_error(gpu_result, numpy_result) < TOLERANCE


# --------------------------------------------------------------------------- layers


@given(st.integers(1, 12), st.integers(1, 40), st.floats(1e-8, 1e-2), st.floats(0.01, 100), seeds)
def test_rms_norm_matches_numpy(num_tokens, hidden, eps, scale, seed):
    rng = np.random.default_rng(seed)
    x, weight = normal(rng, (num_tokens, hidden), scale), normal(rng, (hidden,))
    assert_close(gpu_layers.rms_norm(to_device(x), to_device(weight), eps), numpy_layers.rms_norm(x, weight, eps))


@st.composite
def inverse_frequencies(draw, head_dim: int) -> np.ndarray:
    """RoPE speeds from a config (default, linear or llama3 scaling) or plain random ones."""
    kind = draw(st.sampled_from(["default", "linear", "llama3", "random"]))
    if kind == "random":
        return np.random.default_rng(draw(seeds)).uniform(0, 1, head_dim // 2).astype(np.float32)
    scaling = {"default": None, "linear": {"rope_type": "linear", "factor": 4.0},
               "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64}}[kind]
    raw = tiny_raw_config(head_dim=head_dim, rope_theta=draw(st.sampled_from([100.0, 10000.0, 1e6])),
                          rope_scaling=scaling)
    return numpy_layers.rope_inverse_frequencies(ModelConfig.from_hf(raw))


@given(st.integers(0, 12), st.sampled_from([2, 4, 8, 16]), st.data(), seeds)
def test_rope_cos_sin_matches_numpy(num_tokens, head_dim, data, seed):
    positions = np.random.default_rng(seed).integers(0, 4097, num_tokens)  # [N] int64, as a ForwardBatch holds them
    inv_freq = data.draw(inverse_frequencies(head_dim))
    expected = numpy_layers.rope_cos_sin(positions, inv_freq)
    got = gpu_layers.rope_cos_sin(to_device(positions), to_device(inv_freq))
    for gpu_result, numpy_result in zip(got, expected, strict=True):
        assert_close(gpu_result, numpy_result)


@given(st.integers(1, 12), st.integers(1, 4), st.sampled_from([2, 4, 8, 16]), st.data(), seeds)
def test_apply_rope_matches_numpy(num_tokens, num_heads, head_dim, data, seed):
    rng = np.random.default_rng(seed)
    x = normal(rng, (num_tokens, num_heads, head_dim))
    cos, sin = numpy_layers.rope_cos_sin(rng.integers(0, 4097, num_tokens), data.draw(inverse_frequencies(head_dim)))
    expected = numpy_layers.apply_rope(x, cos, sin)
    assert_close(gpu_layers.apply_rope(to_device(x), to_device(cos), to_device(sin)), expected)


@given(st.integers(1, 12), st.integers(1, 40), st.floats(0.1, 30), seeds)
def test_swiglu_matches_numpy(num_tokens, intermediate, scale, seed):
    rng = np.random.default_rng(seed)
    gate, up = normal(rng, (num_tokens, intermediate), scale), normal(rng, (num_tokens, intermediate))
    expected = numpy_layers.swiglu(gate, up)
    assert_close(gpu_layers.swiglu(to_device(gate), to_device(up)), expected)


def test_swiglu_does_not_overflow_for_very_negative_gates():
    gate = np.array([[-1000.0, -100.0, 0.0, 100.0]], np.float32)
    up = np.ones_like(gate)
    out = to_host(gpu_layers.swiglu(to_device(gate), to_device(up)))
    assert np.all(np.isfinite(out))
    expected = numpy_layers.swiglu(gate, up)
    np.testing.assert_allclose(out, expected, atol=1e-30)


@given(st.integers(1, 12), st.integers(1, 24), st.integers(1, 24), st.booleans(), seeds)
def test_linear_matches_numpy(num_tokens, in_features, out_features, with_bias, seed):
    rng = np.random.default_rng(seed)
    x, weight = normal(rng, (num_tokens, in_features)), normal(rng, (out_features, in_features))
    bias = normal(rng, (out_features,)) if with_bias else None
    gpu_bias = None if bias is None else to_device(bias)
    assert_close(gpu_layers.linear(to_device(x), to_device(weight), gpu_bias), numpy_layers.linear(x, weight, bias))


@given(st.integers(1, 30), st.integers(1, 16), st.integers(1, 12), seeds)
def test_embedding_matches_numpy(vocab_size, hidden, num_tokens, seed):
    rng = np.random.default_rng(seed)
    table, token_ids = normal(rng, (vocab_size, hidden)), rng.integers(0, vocab_size, num_tokens)
    result = to_host(gpu_layers.embedding(to_device(table), to_device(token_ids)))
    np.testing.assert_array_equal(result, numpy_layers.embedding(table, token_ids))


# ------------------------------------------------------------------------ attention


@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 3), head_dims, st.integers(0, 12), seeds)
def test_write_kv_matches_numpy(num_blocks, block_size, num_kv_heads, head_dim, num_tokens, seed):
    rng = np.random.default_rng(seed)
    num_slots = num_blocks * block_size
    k, v = normal(rng, (num_tokens, num_kv_heads, head_dim)), normal(rng, (num_tokens, num_kv_heads, head_dim))
    # distinct slots (two tokens never share one), some tokens skipped with -1
    slot_mapping = np.full(num_tokens, -1, np.int64)  # [N]
    stored = rng.permutation(num_tokens)[: min(num_tokens, num_slots, int(rng.integers(0, num_tokens + 1)))]
    slot_mapping[stored] = rng.permutation(num_slots)[: len(stored)]
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = normal(rng, cache_shape), normal(rng, cache_shape)
    gpu_k_cache, gpu_v_cache = to_device(k_cache.copy()), to_device(v_cache.copy())
    numpy_attention.write_kv(k_cache, v_cache, k, v, slot_mapping)
    gpu_attention.write_kv(gpu_k_cache, gpu_v_cache, to_device(k), to_device(v), to_device(slot_mapping))
    np.testing.assert_array_equal(to_host(gpu_k_cache), k_cache)
    np.testing.assert_array_equal(to_host(gpu_v_cache), v_cache)


@st.composite
def sequence_shapes(draw) -> tuple[int, int]:
    """``(cached tokens before this step, queries this step)`` of one sequence in a batch."""
    kind = draw(st.sampled_from(["prefill", "chunked_prefill", "decode"]))
    if kind == "prefill":
        return 0, draw(st.integers(1, 4))
    if kind == "chunked_prefill":
        return draw(st.integers(1, 18)), draw(st.integers(2, 4))
    return draw(st.integers(1, 23)), 1


@given(st.lists(sequence_shapes(), min_size=1, max_size=3), st.integers(1, 6), st.integers(1, 3),
       st.integers(1, 3), head_dims, st.integers(0, 3), partition_sizes, seeds)
def test_cached_attention_matches_numpy(sequences, block_size, num_kv_heads, group, head_dim, spare_blocks,
                                        partition_size, seed):
    """A mixed batch (prefill, chunked prefill, decode) over a paged cache whose blocks are
    handed out in shuffled order, with grouped-query heads, its contexts whole or split
    into partitions (then some queries see fewer keys than others have partitions)."""
    rng = np.random.default_rng(seed)
    num_heads = num_kv_heads * group
    queries_per_seq = np.array([queries for _, queries in sequences])  # [S]
    context_lens = np.array([cached + queries for cached, queries in sequences])  # [S]
    query_start_loc = np.concatenate([[0], np.cumsum(queries_per_seq)])  # [S+1]
    blocks_per_seq = -(-context_lens // block_size)  # [S]
    num_blocks = int(blocks_per_seq.sum()) + spare_blocks
    shuffled = rng.permutation(num_blocks)  # any block can belong to any sequence, in any order
    block_tables = np.full((len(sequences), int(blocks_per_seq.max()) + 1), -1, np.int32)  # [S, max_blocks]
    for s, start in enumerate(np.concatenate([[0], np.cumsum(blocks_per_seq)[:-1]])):
        block_tables[s, : blocks_per_seq[s]] = shuffled[start : start + blocks_per_seq[s]]
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = normal(rng, cache_shape), normal(rng, cache_shape)
    q = normal(rng, (int(query_start_loc[-1]), num_heads, head_dim), scale=float(rng.uniform(0.1, 3)))
    scale = head_dim**-0.5
    expected = numpy_attention.cached_attention(q, k_cache, v_cache, block_tables, query_start_loc,
                                                context_lens, scale)
    result = gpu_attention.cached_attention(to_device(q), to_device(k_cache), to_device(v_cache),
                                            to_device(block_tables), query_start_loc, context_lens, scale,
                                            partition_size=partition_size)
    assert_close(result, expected)


@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 8), st.integers(2, 3), st.integers(1, 2), head_dims,
       partition_sizes, seeds)
def test_cached_attention_over_shared_prefix_blocks_matches_numpy(block_size, shared_blocks, tail, num_seqs,
                                                                  num_kv_heads, head_dim, partition_size, seed):
    """Several sequences whose tables point at the same prefix blocks (a prefix-cache hit
    or a fork), each with its own partially filled tail, decoding together."""
    rng = np.random.default_rng(seed)
    tail_blocks = -(-tail // block_size)
    num_blocks = shared_blocks + num_seqs * tail_blocks
    order = rng.permutation(num_blocks)
    prefix, tails = order[:shared_blocks], order[shared_blocks:].reshape(num_seqs, tail_blocks)
    block_tables = np.array([np.concatenate([prefix, tails[s]]) for s in range(num_seqs)],
                            dtype=np.int32)  # [S, shared + tail]
    context_lens = np.full(num_seqs, shared_blocks * block_size + tail)  # [S]
    query_start_loc = np.arange(num_seqs + 1)  # one decode query each
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = normal(rng, cache_shape), normal(rng, cache_shape)
    q = normal(rng, (num_seqs, num_kv_heads * 2, head_dim))
    expected = numpy_attention.cached_attention(q, k_cache, v_cache, block_tables, query_start_loc,
                                                context_lens, 0.5)
    result = gpu_attention.cached_attention(to_device(q), to_device(k_cache), to_device(v_cache),
                                            to_device(block_tables), query_start_loc, context_lens, 0.5,
                                            partition_size=partition_size)
    assert_close(result, expected)


@pytest.mark.parametrize("num_seqs", [1, 2])
def test_long_decode_contexts_split_by_default_match_numpy(num_seqs):
    """Decode of a few long contexts: too few (query, head) pairs for the multiprocessors,
    so the kernel picks several partitions on its own, and the merge still gives NumPy's
    result (the contexts differ, so the shorter one leaves a partition empty)."""
    rng = np.random.default_rng(num_seqs)
    block_size, num_kv_heads, num_heads, head_dim = 16, 1, 2, 8
    context_lens = np.array([300, 170][:num_seqs])  # [S]
    longest = int(context_lens.max())
    assert -(-longest // gpu_attention.partition_size_for(num_seqs * num_heads, longest)) > 1  # it does split
    blocks_per_seq = -(-longest // block_size)
    block_tables = rng.permutation(num_seqs * blocks_per_seq).reshape(num_seqs, blocks_per_seq).astype(np.int32)
    cache_shape = (num_seqs * blocks_per_seq, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = normal(rng, cache_shape), normal(rng, cache_shape)
    q = normal(rng, (num_seqs, num_heads, head_dim), scale=2.0)
    query_start_loc = np.arange(num_seqs + 1)
    expected = numpy_attention.cached_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, 0.3)
    result = gpu_attention.cached_attention(to_device(q), to_device(k_cache), to_device(v_cache),
                                            to_device(block_tables), query_start_loc, context_lens, 0.3)
    assert_close(result, expected)


@given(st.integers(1, 5000), st.integers(1, 100_000))
def test_partition_size_splits_only_what_the_queries_leave_idle(num_pairs, longest_context):
    """A context is split only when the (query, head) pairs alone give too few blocks, and
    then into no more partitions than make up the difference; each partition is a
    multiple of the block's threads, no shorter than the minimum, and no longer than one
    such step beyond what reaches the target."""
    size = gpu_attention.partition_size_for(num_pairs, longest_context)
    threads = gpu_attention.ATTENTION_THREADS
    wanted_blocks = gpu_attention.TARGET_BLOCKS_PER_MULTIPROCESSOR * multiprocessor_count()
    if num_pairs >= wanted_blocks:
        assert size == longest_context
        return
    assert size % threads == 0 and size >= gpu_attention.MIN_PARTITION_KEYS
    num_parts = -(-longest_context // size)
    assert num_pairs * (num_parts - 1) < wanted_blocks  # one partition fewer would not reach the target
    if size - threads >= gpu_attention.MIN_PARTITION_KEYS:  # a shorter allowed partition would reach it
        assert num_pairs * -(-longest_context // (size - threads)) >= wanted_blocks


@given(st.integers(2, 8), st.integers(1, 4), st.integers(1, 2), head_dims, st.integers(0, 3), seeds)
def test_copy_blocks_matches_numpy(num_blocks, block_size, num_kv_heads, head_dim, num_copies, seed):
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(num_blocks)
    num_copies = min(num_copies, num_blocks // 2)
    block_copies = np.stack([chosen[:num_copies], chosen[num_copies:2 * num_copies]], axis=1).astype(np.int64)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = normal(rng, cache_shape), normal(rng, cache_shape)
    gpu_k_cache, gpu_v_cache = to_device(k_cache.copy()), to_device(v_cache.copy())
    numpy_attention.copy_blocks(k_cache, v_cache, block_copies)
    gpu_attention.copy_blocks(gpu_k_cache, gpu_v_cache, to_device(block_copies))
    np.testing.assert_array_equal(to_host(gpu_k_cache), k_cache)
    np.testing.assert_array_equal(to_host(gpu_v_cache), v_cache)


# ----------------------------------------------------------------- boundary checks


def test_bad_shapes_raise_value_errors():
    x = to_device(np.zeros((2, 3, 5), np.float32))
    with pytest.raises(ValueError, match="even"):
        gpu_layers.apply_rope(x, *[to_device(np.zeros((2, 2), np.float32))] * 2)
    with pytest.raises(ValueError, match="cos, sin of shape"):
        three_tokens = to_device(np.zeros((3, 2), np.float32))  # for two tokens
        gpu_layers.apply_rope(to_device(np.zeros((2, 3, 4), np.float32)), three_tokens, three_tokens)
    with pytest.raises(ValueError, match="last dimension"):
        gpu_layers.linear(to_device(np.zeros((2, 3), np.float32)), to_device(np.zeros((4, 5), np.float32)))
    with pytest.raises(ValueError, match="integer"):
        gpu_layers.embedding(to_device(np.zeros((4, 3), np.float32)), to_device(np.zeros(2, np.float32)))
    cache = to_device(np.zeros((2, 4, 2, 8), np.float32))
    with pytest.raises(ValueError, match="multiple"):
        gpu_attention.cached_attention(to_device(np.zeros((1, 3, 8), np.float32)), cache, cache,
                                       np.zeros((1, 1), np.int32), np.array([0, 1]), np.array([1]), 1.0)
    with pytest.raises(ValueError, match="too small"):
        gpu_attention.cached_attention(to_device(np.zeros((1, 2, 8), np.float32)), cache, cache,
                                       np.zeros((1, 1), np.int32), np.array([0, 1]), np.array([5]), 1.0)
    with pytest.raises(ValueError, match="partition_size must be at least 1"):
        gpu_attention.cached_attention(to_device(np.zeros((1, 2, 8), np.float32)), cache, cache,
                                       np.zeros((1, 1), np.int32), np.array([0, 1]), np.array([1]), 1.0,
                                       partition_size=0)
    with pytest.raises(ValueError, match="in place"):
        gpu_attention.write_kv(cache.astype(np.float64), cache, to_device(np.zeros((1, 2, 8), np.float32)),
                               to_device(np.zeros((1, 2, 8), np.float32)), to_device(np.zeros(1, np.int64)))


@needs_device
def test_results_stay_on_the_device():
    import cupy

    x = cupy.ones((3, 8), dtype=cupy.float32)
    assert isinstance(gpu_layers.rms_norm(x, cupy.ones(8, dtype=cupy.float32), 1e-6), cupy.ndarray)
    assert isinstance(gpu_layers.linear(x, cupy.ones((4, 8), dtype=cupy.float32)), cupy.ndarray)


# ------------------------------------------------------------------- int8 KV cache


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 2), head_dims, st.integers(1, 8), seeds)
def test_int8_write_kv_and_attention_match_numpy(num_blocks, block_size, num_kv_heads, head_dim, num_tokens, seed):
    rng = np.random.default_rng(seed)
    num_tokens = min(num_tokens, num_blocks * block_size)
    k, v = normal(rng, (num_tokens, num_kv_heads, head_dim)), normal(rng, (num_tokens, num_kv_heads, head_dim))
    slot_mapping = rng.permutation(num_blocks * block_size)[:num_tokens].astype(np.int64)  # [N]
    pools = [np.zeros((num_blocks, block_size, num_kv_heads, head_dim), np.int8) for _ in range(2)]
    scales = [np.ones((num_blocks, block_size, num_kv_heads), np.float32) for _ in range(2)]
    gpu_pools, gpu_scales = [to_device(p.copy()) for p in pools], [to_device(s.copy()) for s in scales]
    numpy_attention.write_kv(*pools, k, v, slot_mapping, *scales)
    gpu_attention.write_kv(*gpu_pools, to_device(k), to_device(v), to_device(slot_mapping), *gpu_scales)
    for gpu_array, numpy_array in zip(gpu_pools + gpu_scales, pools + scales, strict=True):
        np.testing.assert_array_equal(to_host(gpu_array), numpy_array)
    # one sequence reading back everything that was written, through a shuffled table
    table = rng.permutation(num_blocks)[None, :].astype(np.int32)
    context = num_blocks * block_size
    num_queries = min(2, context)
    q = normal(rng, (num_queries, num_kv_heads * 2, head_dim))
    loc, lens = np.array([0, num_queries]), np.array([context])
    expected = numpy_attention.cached_attention(q, *pools, table, loc, lens, 0.5, *scales)
    result = gpu_attention.cached_attention(to_device(q), *gpu_pools, to_device(table), loc, lens, 0.5, *gpu_scales)
    assert_close(result, expected)
    split = gpu_attention.cached_attention(to_device(q), *gpu_pools, to_device(table), loc, lens, 0.5, *gpu_scales,
                                           partition_size=block_size)
    assert_close(split, expected)
    # copy-on-write copies the scales with the values
    copies = np.array([[table[0, 0], table[0, -1]]], np.int64) if num_blocks > 1 else np.zeros((0, 2), np.int64)
    numpy_attention.copy_blocks(*pools, copies, *scales)
    gpu_attention.copy_blocks(*gpu_pools, to_device(copies), *gpu_scales)
    for gpu_array, numpy_array in zip(gpu_pools + gpu_scales, pools + scales, strict=True):
        np.testing.assert_array_equal(to_host(gpu_array), numpy_array)


def test_batch_layout_is_checked_and_uploaded_once_per_step():
    """The layers of a step pass the same layout: the second call returns the same device
    arrays; a different layout (the next step) is checked and uploaded afresh."""
    query_start_loc, context_lens = np.array([0, 3, 4]), np.array([5, 9])
    first = gpu_attention.batch_layout(query_start_loc, context_lens, 4, 4, (2, 3))
    assert gpu_attention.batch_layout(query_start_loc.copy(), context_lens.copy(), 4, 4, (2, 3)) is first
    assert to_host(first.on_device[0]).tolist() == [0, 0, 0, 1]  # the sequence of each query token
    following = gpu_attention.batch_layout(query_start_loc, context_lens + 1, 4, 4, (2, 3))
    assert following is not first and to_host(following.on_device[2]).tolist() == [6, 10]
    with pytest.raises(ValueError, match="kivi_attention: each sequence needs 0 <= queries <= context_len"):
        gpu_attention.batch_layout(query_start_loc, np.array([2, 9]), 4, 4, (2, 3), "kivi_attention")
