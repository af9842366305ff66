"""The quantization benchmarks' metrics and helpers, on the tiny fixture (fast; no timed assertions).

The benchmark scripts live in ``benchmarks/`` (not a package; they run as scripts), so
this module puts that directory on ``sys.path`` to import them.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from minibatch import LLM
from minibatch.checkpoint import load_weights
from minibatch.config import ModelConfig
from minibatch.model import ModelRunner
from minibatch.quant import QuantizedWeight
from tests.helpers import FIXTURES

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import quality  # noqa: E402
import quality_formats  # noqa: E402
import quant_speed  # noqa: E402

MODEL = FIXTURES / "llama_gqa"  # hidden 64, MLP 128: int4-g128 cannot store the 64-wide inputs


@pytest.fixture(scope="module")
def fixture_model():
    config = ModelConfig.from_dir(MODEL)
    return config, load_weights(MODEL, config)


# ------------------------------------------------------------------------ the metrics


def test_kl_of_identical_distributions_is_zero_and_otherwise_positive():
    logits = np.random.default_rng(0).standard_normal((20, 50)).astype(np.float32)
    assert quality.mean_kl_divergence(logits, logits) == pytest.approx(0, abs=1e-12)
    assert quality.mean_kl_divergence(logits, logits + 3.0) == pytest.approx(0, abs=1e-12)  # a shift is no change
    other = logits + np.random.default_rng(1).standard_normal(logits.shape).astype(np.float32)
    assert quality.mean_kl_divergence(logits, other) > 0


def test_kl_matches_the_closed_form_for_two_outcomes():
    p, q = 0.8, 0.5
    expected = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    reference = np.log([[p, 1 - p]])
    assert quality.mean_kl_divergence(reference, np.log([[q, 1 - q]])) == pytest.approx(expected, rel=1e-9)


def test_greedy_agreement_counts_equal_argmaxes():
    logits = np.random.default_rng(0).standard_normal((40, 30))
    assert quality.greedy_agreement(logits, logits) == 1.0
    changed = logits.copy()
    changed[:10, 0] = 100.0  # the first 10 positions now pick token 0
    expected = 1 - np.mean(np.argmax(logits[:10], axis=-1) != 0) * 10 / 40
    assert quality.greedy_agreement(logits, changed) == pytest.approx(expected)


def test_bits_per_byte_of_uniform_logits_is_log2_of_the_vocabulary():
    vocab = 258
    targets = np.random.default_rng(0).integers(0, 256, 64)
    assert quality.bits_per_byte(np.zeros((64, vocab), np.float32), targets) == pytest.approx(math.log2(vocab))


def test_bits_per_byte_of_a_certain_correct_model_is_zero():
    targets = np.array([3, 1, 4, 1, 5])
    logits = np.full((5, 10), -1e4)
    logits[np.arange(5), targets] = 0.0
    assert quality.bits_per_byte(logits, targets) == pytest.approx(0, abs=1e-9)


def test_compare_scores_only_byte_targets_at_the_shifted_positions():
    window = np.array([10, 20, 256, 30])  # position t predicts token t+1; the BOS target is skipped
    logits = np.zeros((4, 300))
    result = quality.compare([logits], [logits], [window])
    assert result["scored_positions"] == 2
    assert result["bits_per_byte"] == pytest.approx(math.log2(300))
    assert result["kl_from_f32"] == pytest.approx(0, abs=1e-12) and result["greedy_agreement"] == 1.0


# ------------------------------------------------------------------- windows, formats


def test_heldout_windows_are_evenly_spaced_and_deterministic():
    tokens = np.arange(1000)
    windows = quality.heldout_windows(tokens, 4, 100)
    assert [int(w[0]) for w in windows] == [0, 300, 600, 900]
    assert all(len(w) == 100 for w in windows)
    with pytest.raises(ValueError, match="fewer than one window"):
        quality.heldout_windows(tokens[:50], 2, 100)


def test_a_projection_the_scheme_cannot_store_falls_back_to_int8(fixture_model):
    _, weights = fixture_model
    quantized, fell_back = quality_formats.quantize_with_fallback(weights, "int4-g128", "int8")
    assert fell_back == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]  # 64 inputs
    assert quantized.layers[0].q_proj.scheme == "int8" and quantized.layers[0].down_proj.scheme == "int4-g128"
    with pytest.raises(ValueError, match="not a multiple of the group size 128"):
        quality_formats.quantize_with_fallback(weights, "int4-g128", None)


def test_storage_counts_bits_as_stored(fixture_model):
    _, weights = fixture_model
    count = sum(int(np.prod(getattr(layer, name).shape)) for layer in weights.layers for name in quality.PROJECTIONS)
    q4_0, notes = quality_formats.weights_in_format(weights, "q4_0")
    assert notes == {} and quality_formats.storage(q4_0, "q4_0", count)["bits_per_weight"] == 4.5
    assert quality_formats.storage(weights, "f32", count)["bits_per_weight"] == 32
    assert quality_formats.storage(weights, "f16", count)["model_bytes"] == weights.num_bytes // 2
    mixed, notes = quality_formats.weights_in_format(weights, "int4-g128", fit="int8")
    assert notes["fallback"]["scheme"] == "int8"
    assert quality_formats.storage(mixed, "int4-g128", count)["bits_per_weight_of_scheme_tensors"] == 4.3125


def test_padding_the_mlp_with_zero_units_keeps_the_function(fixture_model):
    config, weights = fixture_model
    padded = quality_formats.pad_mlp(weights, 96)  # 128 -> 192 units
    assert padded.layers[0].down_proj.shape == (64, 192) and padded.layers[0].gate_proj.shape == (192, 64)
    windows = [np.arange(30) % 256]
    before = quality.score_windows(ModelRunner(config, weights), windows)[0]
    after = quality.score_windows(ModelRunner(config, padded), windows)[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_a_padded_scheme_stores_every_projection_in_it(fixture_model):
    _, weights = fixture_model
    narrow = dataclasses.replace(weights, layers=[dataclasses.replace(  # 112 units: 32 does not divide it
        layer, gate_proj=layer.gate_proj[:112], up_proj=layer.up_proj[:112], down_proj=layer.down_proj[:, :112])
        for layer in weights.layers])
    padded, notes = quality_formats.weights_in_format(narrow, "q4_0", fit="pad")
    assert notes == {"padded_mlp": [112, 128]}
    assert {getattr(layer, name).scheme for layer in padded.layers for name in quality.PROJECTIONS} == {"q4_0"}
    with pytest.raises(ValueError, match="not a multiple of the group size 32"):
        quality_formats.weights_in_format(narrow, "q4_0", fit="none")


def test_float_rounding_is_exact_on_values_the_format_holds(fixture_model):
    _, weights = fixture_model
    f16 = quality_formats.round_floats(weights, "f16")
    again = quality_formats.round_floats(f16, "f16")
    assert np.array_equal(again.layers[0].q_proj, f16.layers[0].q_proj)
    bf16 = quality_formats.round_floats(weights, "bf16")
    assert not isinstance(bf16.layers[0].q_proj, QuantizedWeight)
    assert np.abs(bf16.layers[0].q_proj - weights.layers[0].q_proj).max() > 0  # bf16 keeps 8 bits of mantissa


# ---------------------------------------------------------------------- the scoring path


def test_paged_scoring_gives_the_logits_of_a_plain_prefill(fixture_model):
    config, weights = fixture_model
    windows = quality.heldout_windows(np.random.default_rng(0).integers(0, 256, 400), 3, 40)
    paged = quality.score_windows(ModelRunner(config, weights), windows, block_size=16, windows_per_batch=2)
    llm = LLM(MODEL, num_blocks=4)
    for window, logits in zip(windows, paged, strict=True):
        np.testing.assert_allclose(logits, llm.logits(window.tolist()), rtol=1e-4, atol=1e-4)


def test_the_int8_kv_cache_changes_the_logits_a_little(fixture_model):
    config, weights = fixture_model
    windows = quality.heldout_windows(np.random.default_rng(0).integers(0, 256, 200), 2, 40)
    reference = quality.score_windows(ModelRunner(config, weights), windows)
    int8 = quality.score_windows(ModelRunner(config, weights, kv_cache_dtype="int8"), windows)
    result = quality.compare(reference, int8, windows)
    assert 0 < result["kl_from_f32"] < 0.01 and result["greedy_agreement"] > 0.9


def test_kv_capacity_on_paper_matches_the_engine(fixture_model):
    config, _ = fixture_model
    budget = 2 * 2**20
    for dtype in ("float32", "int8", "kivi2"):
        paper = quality.kv_capacity(config, budget, seq_len=128, block_size=16, kv_cache_dtype=dtype)
        most = paper["max_sequences"]
        assert quality.engine_capacity(MODEL, budget, 16, dtype, most, 128) == most  # the engine holds them
        assert quality.engine_capacity(MODEL, budget, 16, dtype, most + 1, 128) == most  # and no more
    ratio = quality.kv_capacity(config, budget, 128, 16, "int8")["max_sequences"] / \
        quality.kv_capacity(config, budget, 128, 16, "float32")["max_sequences"]
    assert ratio == pytest.approx(4 * config.head_dim / (config.head_dim + 4), rel=0.02)


def test_goals_pass_fail_and_not_measured():
    rows = [{"weights": "int8", "kv_cache": "float32", "bpb_relative_change": 0.004},
            {"weights": "q8_0", "kv_cache": "float32", "bpb_relative_change": -0.006},
            {"weights": "q4_0", "kv_cache": "float32", "bpb_relative_change": 0.01, "bits_per_weight": 4.52,
             "bits_per_weight_of_scheme_tensors": 4.5}]
    passed = {g["goal"]: g["passed"] for g in quality.check_goals(rows)}
    assert passed["int8: bits per byte within 0.5% of f32"] is True
    assert passed["q8_0: bits per byte within 0.5% of f32"] is False  # a change either way counts
    assert passed["q4_0: bits per byte within 5.0% of f32"] is True
    assert passed["int4-g32: bits per byte within 5.0% of f32"] is None  # not measured
    assert passed["int8 KV cache: bits per byte within 0.5% of f32"] is None
    assert passed["q4_0 stores 4.5 bits per weight"] is True


# -------------------------------------------------------------------------- quant_speed


def test_the_roofline_is_flat_then_rises_with_the_batch():
    small = quant_speed.roofline(step_bytes=10**9, flops_per_token=10**8, batch_size=1, bandwidth=1e10,
                                 gemm_flops=1e11)
    large = quant_speed.roofline(step_bytes=10**9, flops_per_token=10**8, batch_size=1000, bandwidth=1e10,
                                 gemm_flops=1e11)
    assert small["roofline_s"] == small["memory_s"] == pytest.approx(0.1)
    assert large["roofline_s"] == large["compute_s"] == pytest.approx(2.0)


def test_decode_steps_run_for_a_batch(fixture_model):
    config, weights = fixture_model
    runner = ModelRunner(config, weights)
    times = quant_speed.time_decode(runner, batch_size=3, prompt_len=4, steps=2)
    assert len(times) == 2 and all(t > 0 for t in times)
    projections = sum(int(np.prod(getattr(layer, name).shape)) for layer in weights.layers
                      for name in quality.PROJECTIONS)
    assert quant_speed.multiply_adds_per_token(weights) == projections + config.vocab_size * config.hidden_size
