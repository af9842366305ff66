"""The forward pass over flat ragged batches: no padding, same results as one at a time."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minibatch.checkpoint import load_weights
from minibatch.config import ModelConfig
from minibatch.kv_cache import ContiguousKVCache
from minibatch.model import ForwardBatch, FusedLayerWeights, LayerWeights, ModelRunner
from minibatch.quant import quantize_model
from tests.helpers import FIXTURES

MODEL = FIXTURES / "llama_gqa"
CONFIG = ModelConfig.from_dir(MODEL)
WEIGHTS = load_weights(MODEL, CONFIG)


def run_alone(runner: ModelRunner, tokens: list[int]) -> np.ndarray:
    cache = ContiguousKVCache(1, len(tokens))
    runner.allocate_kv(cache.num_blocks, cache.block_size)
    cache.allocate(0)
    slots = cache.slot_mapping(0, np.arange(len(tokens)))
    return runner.run(ForwardBatch.build([(tokens, 0, cache.block_table(0), slots)], logits="all"))


@settings(max_examples=15, deadline=None)
@given(st.lists(st.lists(st.integers(0, CONFIG.vocab_size - 1), min_size=1, max_size=10), min_size=1, max_size=4),
       st.integers(1, 5))
def test_packed_chunked_batch_equals_each_sequence_alone(prompts, chunk):
    """Prepacking's property: packing sequences into one flat batch (and splitting each
    prompt into chunks over several steps) changes nothing."""
    runner = ModelRunner(CONFIG, WEIGHTS)
    expected = [run_alone(runner, p) for p in prompts]
    cache = ContiguousKVCache(len(prompts), max(len(p) for p in prompts))
    runner.allocate_kv(cache.num_blocks, cache.block_size)
    got = [[] for _ in prompts]
    for s in range(len(prompts)):
        cache.allocate(s)
    for start in range(0, max(len(p) for p in prompts), chunk):
        entries, owners = [], []
        for s, p in enumerate(prompts):
            piece = p[start:start + chunk]
            if piece:
                slots = cache.slot_mapping(s, np.arange(start, start + len(piece)))
                entries.append((piece, start, cache.block_table(s), slots))
                owners += [s] * len(piece)
        logits = runner.run(ForwardBatch.build(entries, logits="all"))
        for row, s in enumerate(owners):
            got[s].append(logits[row])
    for s in range(len(prompts)):
        np.testing.assert_allclose(np.array(got[s]), expected[s], rtol=1e-4, atol=1e-4)


def test_forward_batch_layout():
    batch = ForwardBatch.build([([5, 6, 7], 0, [0], np.array([0, 1, 2])), ([9], 4, [1], np.array([12]))])
    assert batch.query_start_loc.tolist() == [0, 3, 4]
    assert batch.positions.tolist() == [0, 1, 2, 4]
    assert batch.context_lens.tolist() == [3, 5]
    assert batch.logits_indices.tolist() == [2, 3]


@pytest.mark.parametrize(("fixture", "scheme"), [("llama_gqa", None), ("qwen2_bias", None), ("llama_gqa", "int4-g32"),
                                                 ("llama_gqa", "q8_0")])
def test_fused_projections_in_decode_order_give_the_same_logits(fixture, scheme):
    """A runner stacks q/k/v (and their biases) and gate/up into one matrix each, and
    stores each float matrix in decode_order; the logits are those of the checkpoint's
    separate projections, and the checkpoint's own weights keep Hugging Face's layout
    (what save_model writes)."""
    config = ModelConfig.from_dir(FIXTURES / fixture)
    weights = load_weights(FIXTURES / fixture, config)
    weights = weights if scheme is None else quantize_model(weights, scheme)
    fused, unfused = ModelRunner(config, weights), ModelRunner(config, weights, checkpoint_layout=True)
    layer, d = fused.weights.layers[0], config.head_dim
    assert isinstance(layer, FusedLayerWeights) and isinstance(weights.layers[0], LayerWeights)
    assert layer.qkv_proj.shape == ((config.num_heads + 2 * config.num_kv_heads) * d, config.hidden_size)
    assert layer.gate_up_proj.shape == (2 * config.intermediate_size, config.hidden_size)
    assert (layer.qkv_bias is not None) == config.attention_bias
    if scheme is None:  # float matrices: column-major with at least as many outputs as inputs, else row-major
        assert all(w.flags.f_contiguous for w in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj))
        assert config.intermediate_size > config.hidden_size  # so down_proj [H, I] is the row-major one
        assert layer.down_proj.flags.c_contiguous and not layer.down_proj.flags.f_contiguous
    assert fused.weights.lm_head.flags.f_contiguous and weights.lm_head.flags.c_contiguous
    assert (fused.weights.embed_tokens is fused.weights.lm_head) == config.tie_word_embeddings
    assert fused.weights.num_bytes == unfused.weights.num_bytes == weights.num_bytes
    tokens = [3, 17, 5, 9, 30, 2, 11]
    fused_logits, unfused_logits = run_alone(fused, tokens), run_alone(unfused, tokens)
    # float32 sums in another order: compare against the logits' scale, as the golden tests do
    assert np.abs(fused_logits - unfused_logits).max() <= 1e-5 * np.abs(unfused_logits).max()
