"""The int8 KV cache: per-token, per-head scales; bounded error; batch-independent."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from minibatch import SamplingParams
from minibatch.attention import cached_attention, quantize_kv_int8, write_kv
from minibatch.engine import LLMEngine
from tests.helpers import FIXTURES, relative_error


@given(st.integers(1, 8), st.integers(1, 3), st.sampled_from([4, 16, 64]), st.floats(1e-3, 1e3), st.integers(0, 2**31))
def test_int8_error_is_at_most_half_a_scale(n, heads, head_dim, magnitude, seed):
    x = (np.random.default_rng(seed).standard_normal((n, heads, head_dim)) * magnitude).astype(np.float32)
    q, scale = quantize_kv_int8(x)
    assert q.dtype == np.int8 and scale.shape == (n, heads)
    error = np.abs(q * scale[..., None] - x)
    assert np.all(error <= scale[..., None] / 2 * (1 + 1e-5))


def test_zero_vectors_quantize_exactly():
    q, scale = quantize_kv_int8(np.zeros((2, 1, 4), np.float32))
    assert not q.any() and np.all(scale == 1)


@given(st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**31))
def test_attention_over_an_int8_cache_is_close_to_float(num_tokens, block_size, seed):
    rng = np.random.default_rng(seed)
    hkv, d = 2, 16
    num_blocks = -(-num_tokens // block_size)
    k, v = rng.standard_normal((2, num_tokens, hkv, d)).astype(np.float32)
    q = rng.standard_normal((num_tokens, 4, d)).astype(np.float32)
    slots = np.arange(num_tokens)
    table = np.arange(num_blocks)[None, :]
    float_k, float_v = np.zeros((2, num_blocks, block_size, hkv, d), np.float32)
    write_kv(float_k, float_v, k, v, slots)
    int8_k, int8_v = np.zeros((2, num_blocks, block_size, hkv, d), np.int8)
    k_scale, v_scale = np.zeros((2, num_blocks, block_size, hkv), np.float32)
    write_kv(int8_k, int8_v, k, v, slots, k_scale, v_scale)
    loc, lens = np.array([0, num_tokens]), np.array([num_tokens])
    exact = cached_attention(q, float_k, float_v, table, loc, lens, d**-0.5)
    approx = cached_attention(q, int8_k, int8_v, table, loc, lens, d**-0.5, k_scale, v_scale)
    assert relative_error(approx, exact) < 0.02  # stated tolerance for int8 KV


def test_int8_engine_output_does_not_depend_on_batch_mates():
    engine = LLMEngine(FIXTURES / "llama_gqa", block_size=4, num_blocks=64, kv_cache_dtype="int8")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request("alone", {"prompt_token_ids": [5, 6, 7, 8]}, params)
    alone = None
    while engine.has_unfinished_requests():
        alone = [o for o in engine.step() if o.finished] or alone
    engine.reset()
    for i, prompt in enumerate([[9, 9, 9], [5, 6, 7, 8], [40, 41]]):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    together = {}
    while engine.has_unfinished_requests():
        together.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert together["1"] == alone[0].token_ids
    assert engine.runner.kv.k[0].dtype == np.int8


def test_int8_cache_holds_more_tokens_in_the_same_memory():
    from minibatch.config import ModelConfig
    from minibatch.kv_cache import kv_bytes_per_token

    config = ModelConfig.from_dir(FIXTURES / "llama_gqa")
    ratio = kv_bytes_per_token(config, "float32") / kv_bytes_per_token(config, "int8")
    assert ratio == 4 * config.head_dim / (config.head_dim + 4)
