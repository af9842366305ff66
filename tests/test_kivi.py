"""The KIVI 2-bit KV cache: the error bound of its quantizer, attention that follows the
spec and stays within a provable bound of float attention, outputs that do not depend on
how a sequence was split into steps, and the engine running on it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minibatch import SamplingParams
from minibatch.attention import causal_attention
from minibatch.engine import EngineConfig, LLMEngine
from minibatch.kivi import (
    dequantize_keys,
    dequantize_values,
    kivi_attention,
    pack_2bit,
    quantize_2bit,
    quantize_key_block,
    quantize_values,
    unpack_2bit,
    value_group_size,
)
from minibatch.kv_cache import KVStorage, PagedKVCache, kivi_residual_bytes, kv_bytes_per_block
from tests.helpers import FIXTURES

MODEL = FIXTURES / "llama_gqa"


@given(st.integers(1, 16), st.integers(1, 3), st.sampled_from([4, 8, 32]), st.floats(1e-3, 1e3),
       st.integers(0, 2), st.integers(0, 2**31))
def test_2bit_error_is_at_most_half_a_scale(n, heads, dim, magnitude, axis, seed):
    x = (np.random.default_rng(seed).standard_normal((n, heads, dim)) * magnitude).astype(np.float32)
    codes, scale, zero = quantize_2bit(x, axis)
    assert codes.max() <= 3 and codes.dtype == np.uint8
    approx = np.expand_dims(zero, axis) + codes * np.expand_dims(scale, axis)
    bound = np.expand_dims(scale, axis) / 2
    assert np.all(np.abs(approx - x) <= bound * (1 + 1e-5) + 1e-6 * magnitude)
    spread = np.ptp(x, axis=axis)
    assert np.allclose(scale, np.where(spread == 0, 1, spread / 3), rtol=1e-6)  # the promised scale


def test_constant_groups_and_extremes_are_exact():
    codes, scale, zero = quantize_2bit(np.full((4, 1, 8), 2.5, np.float32), axis=0)
    assert not codes.any() and np.all(scale == 1) and np.all(zero == 2.5)
    x = np.array([[-1.0], [2.0]], np.float32)  # min and max of a group are stored exactly
    codes, scale, zero = quantize_2bit(x, axis=0)
    assert codes.ravel().tolist() == [0, 3] and zero[0] == -1.0 and scale[0] == 1.0


@given(st.lists(st.integers(0, 3), min_size=4, max_size=64).filter(lambda c: len(c) % 4 == 0))
def test_packing_round_trips_with_the_documented_bit_order(codes):
    codes = np.array(codes, np.uint8)
    packed = pack_2bit(codes)
    assert packed.shape == (len(codes) // 4,)
    assert int(packed[0]) == codes[0] | codes[1] << 2 | codes[2] << 4 | codes[3] << 6
    assert np.array_equal(unpack_2bit(packed), codes)


def test_keys_are_grouped_per_channel_and_values_per_token():
    rng = np.random.default_rng(0)
    block = rng.standard_normal((8, 2, 64)).astype(np.float32)
    block[:, :, 5] *= 100  # an outlier channel (KIVI's observation about keys)
    _, k_scale, _ = quantize_key_block(block)
    assert k_scale.shape == (2, 64)
    assert np.allclose(k_scale[:, 5], np.ptp(block[:, :, 5], axis=0) / 3)
    assert np.all(k_scale[:, 4] < k_scale[:, 5] / 10)  # the outlier does not blow up its neighbours
    _, v_scale, _ = quantize_values(block)
    assert v_scale.shape == (8, 2, 64 // value_group_size(64)) == (8, 2, 2)
    assert np.allclose(v_scale[:, :, 1], np.ptp(block[:, :, 32:], axis=-1) / 3)


# ------------------------------------------------------------------ attention


def new_pools(num_blocks: int, block_size: int, heads: int, dim: int, rows: int) -> dict[str, np.ndarray]:
    """One layer's KIVI pools, shaped as the module docstring of minibatch/kivi.py says."""
    groups = dim // value_group_size(dim)
    return {"k_cache": np.zeros((num_blocks, block_size, heads, dim // 4), np.uint8),
            "v_cache": np.zeros((num_blocks, block_size, heads, dim // 4), np.uint8),
            "k_scale": np.zeros((num_blocks, heads, dim), np.float32),
            "k_zero": np.zeros((num_blocks, heads, dim), np.float32),
            "v_scale": np.zeros((num_blocks, block_size, heads, groups), np.float32),
            "v_zero": np.zeros((num_blocks, block_size, heads, groups), np.float32),
            "k_residual": np.zeros((rows, block_size, heads, dim), np.float32),
            "v_residual": np.zeros((rows, block_size, heads, dim), np.float32)}


def run_in_chunks(q, k, v, pools, table, row, cuts, scale):
    """Feed one sequence to ``kivi_attention`` in chunks ending at ``cuts``; outputs concatenated."""
    outs, start = [], 0
    for end in cuts:
        outs.append(kivi_attention(q[start:end], k[start:end], v[start:end], **pools,
                                   block_tables=table[None, :], residual_rows=np.array([row]),
                                   query_start_loc=np.array([0, end - start]), context_lens=np.array([end]),
                                   scale=scale))
        start = end
    return np.concatenate(outs)


def spec_attention(q, k, v, block_size, scale):
    """KIVI's rule written out directly: the query at position p reads every block before
    its own quantized (each block quantized on its own) and its own block in float."""
    out = np.empty_like(q)
    k_deq = np.concatenate([dequantize_keys(*(a[None] for a in quantize_key_block(k[i:i + block_size])))
                            for i in range(0, len(k) - block_size + 1, block_size)] or [k[:0]])
    v_deq = np.concatenate([dequantize_values(*(a[None] for a in quantize_values(v[i:i + block_size])))
                            for i in range(0, len(v) - block_size + 1, block_size)] or [v[:0]])
    for p in range(len(q)):
        own = p // block_size * block_size
        keys = np.concatenate([k_deq[:own], k[own:p + 1]])
        values = np.concatenate([v_deq[:own], v[own:p + 1]])
        out[p] = causal_attention(q[p:p + 1], keys, values, scale)[0]
    return out


sizes = st.tuples(st.sampled_from([1, 2, 4, 8]), st.integers(1, 40), st.sampled_from([8, 32]), st.integers(0, 2**31))


@settings(max_examples=30, deadline=None)
@given(sizes, st.data())
def test_attention_follows_the_spec_whatever_the_chunking(size, data):
    block_size, length, dim, seed = size
    rng = np.random.default_rng(seed)
    heads, q_heads = 2, 4
    q = rng.standard_normal((length, q_heads, dim)).astype(np.float32)
    k, v = rng.standard_normal((2, length, heads, dim)).astype(np.float32)
    num_blocks = -(-length // block_size)
    table = rng.permutation(num_blocks + 3)[:num_blocks].astype(np.int32)  # shuffled, with unused blocks
    cuts = sorted(set(data.draw(st.lists(st.integers(1, length), max_size=6))) | {length})
    pools = new_pools(num_blocks + 3, block_size, heads, dim, rows=3)
    got = run_in_chunks(q, k, v, pools, table, 2, cuts, dim**-0.5)
    np.testing.assert_allclose(got, spec_attention(q, k, v, block_size, dim**-0.5), rtol=1e-5, atol=1e-5)
    tail = length % block_size
    np.testing.assert_array_equal(pools["k_residual"][2, :tail], k[length - tail:])  # unfinished block in float


@settings(max_examples=30, deadline=None)
@given(sizes)
def test_attention_stays_within_its_error_bound_of_float(size):
    """|out - exact| <= max value error + (exp(2 delta) - 1) max|v|, where delta bounds
    how far quantized keys move any score: weights are a softmax, so each moves by at most
    a factor exp(+-2 delta), and the output is their mix of values."""
    block_size, length, dim, seed = size
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((length, 2, dim)).astype(np.float32)
    k, v = rng.standard_normal((2, length, 2, dim)).astype(np.float32)
    scale = dim**-0.5
    got = run_in_chunks(q, k, v, new_pools(-(-length // block_size), block_size, 2, dim, 1),
                        np.arange(-(-length // block_size), dtype=np.int32), 0, [length], scale)
    full = length // block_size * block_size
    k_hat = np.concatenate([dequantize_keys(*(a[None] for a in quantize_key_block(k[i:i + block_size])))
                            for i in range(0, full, block_size)] + [k[full:]])
    v_hat = np.concatenate([dequantize_values(*(a[None] for a in quantize_values(v[i:i + block_size])))
                            for i in range(0, full, block_size)] + [v[full:]])
    delta = scale * np.max((np.abs(q)[:, None] * np.abs(k_hat - k)[None]).sum(-1))  # [T, S, H] -> max score error
    bound = np.max(np.abs(v_hat - v)) + (np.exp(2 * delta) - 1) * np.max(np.abs(v))
    exact = causal_attention(q, k, v, scale)
    assert np.max(np.abs(got - exact)) <= bound * (1 + 1e-4) + 1e-5


# ------------------------------------------------------------------ cache and engine


def test_a_kivi_block_takes_far_fewer_bytes_and_each_sequence_one_residual_row():
    from minibatch.config import ModelConfig

    config = ModelConfig.from_dir(MODEL)
    d, layers, heads = config.head_dim, config.num_layers, config.num_kv_heads
    per_head = 16 * 2 * d // 4 + 2 * 4 * d + 16 * 2 * 4 * (d // value_group_size(d))
    assert kv_bytes_per_block(config, "kivi2", 16) == layers * heads * per_head
    assert kivi_residual_bytes(config, 16) == kv_bytes_per_block(config, "float32", 16)  # a float block
    storage = KVStorage.allocate(config, 10, 16, kv_cache_dtype="kivi2", num_residual_rows=3)
    assert storage.num_bytes == 10 * kv_bytes_per_block(config, "kivi2", 16) + 3 * kivi_residual_bytes(config, 16)


def test_engine_budget_pays_for_the_residual_rows_first():
    from minibatch.config import ModelConfig

    config = ModelConfig.from_dir(MODEL)
    cfg = EngineConfig(kv_cache_memory=2**20, max_num_seqs=4, kv_cache_dtype="kivi2")
    left = 2**20 - 4 * kivi_residual_bytes(config, 16)
    assert cfg.resolve_num_blocks(config) == min(left // kv_bytes_per_block(config, "kivi2", 16),
                                                 4 * -(-config.max_model_len // 16) + 1)
    with pytest.raises(ValueError, match="residual rows"):
        EngineConfig(kv_cache_memory=1000, kv_cache_dtype="kivi2").resolve_num_blocks(config)
    with pytest.raises(ValueError, match="choose one of"):
        LLMEngine(MODEL, kv_cache_dtype="int3")


def finished_tokens(engine: LLMEngine) -> dict[str, list[list[int]]]:
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: [c.token_ids for c in o.outputs] for o in engine.step() if o.finished})
    return done


def test_engine_output_does_not_depend_on_batch_mates_chunking_or_preemption():
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = [list(range(5, 5 + n)) for n in (3, 11, 6, 17)]
    alone = {}
    for i, prompt in enumerate(prompts):
        engine = LLMEngine(MODEL, block_size=4, num_blocks=64, kv_cache_dtype="kivi2")
        engine.add_request(str(i), prompt, params)
        alone.update(finished_tokens(engine))
    tight = LLMEngine(MODEL, block_size=4, num_blocks=10, max_num_seqs=3, max_num_batched_tokens=5,
                      kv_cache_dtype="kivi2", enable_prefix_caching=False)
    for i, prompt in enumerate(prompts):
        tight.add_request(str(i), prompt, params)
    assert finished_tokens(tight) == alone
    assert sum(step.num_preemptions for step in tight.log.steps) > 0
    assert sorted(tight.cache.free_rows) == [0, 1, 2]  # every residual row came back


def test_prefix_hits_and_forks_match_cold_runs():
    prompt = list(range(20, 34))  # 14 tokens: the fork happens with two of them in the residual row
    engine = LLMEngine(MODEL, block_size=4, num_blocks=64, max_num_seqs=4, kv_cache_dtype="kivi2")
    engine.add_request("cold", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    cold = finished_tokens(engine)["cold"][0]
    engine.add_request("warm", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, n=3))
    warm = finished_tokens(engine)["warm"]
    assert engine.cache.counters.prefix_hit_blocks == 3
    assert engine.cache.counters.copy_on_writes >= 1
    assert warm == [cold] * 3  # greedy: every fork continues from an exact copy of the parent's residual


def test_n_larger_than_max_num_seqs_is_rejected_and_allocates_nothing():
    engine = LLMEngine(MODEL, block_size=4, num_blocks=64, max_num_seqs=2, kv_cache_dtype="kivi2")
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine.add_request("x", [5, 6, 7], SamplingParams(n=3))
    assert not engine.requests and engine.cache.num_free_blocks == 64 and len(engine.cache.free_rows) == 2


def test_rewind_refuses_to_reopen_a_quantized_block():
    cache = PagedKVCache(num_blocks=8, block_size=4, num_residual_rows=2)
    cache.allocate("s", list(range(10)))
    cache.rewind("s", 1)  # within the unfinished block: fine
    cache.rewind("s", 1)  # back to the block boundary at 8: fine
    with pytest.raises(ValueError, match="block boundary"):
        cache.rewind("s", 2)  # would reopen the full block 4..7
    assert cache.num_tokens["s"] == 8
