"""Reading config.json: every supported option, and a named error for the rest."""

from __future__ import annotations

import numpy as np
import pytest

from minibatch.checkpoint import load_weights
from minibatch.config import ConfigError, ModelConfig
from minibatch.layers import rope_inverse_frequencies
from tests.helpers import FIXTURES, HF_FIXTURES, tiny_raw_config


@pytest.mark.parametrize("name", HF_FIXTURES)
def test_parameter_count_matches_the_checkpoint(name):
    config = ModelConfig.from_dir(FIXTURES / name)
    weights = load_weights(FIXTURES / name, config)
    counted = {}
    weights.map(lambda t: counted.setdefault(id(t), t.size))
    assert config.num_parameters == sum(counted.values())


def test_gqa_and_head_dim_defaults():
    config = ModelConfig.from_hf(tiny_raw_config(num_key_value_heads=None))
    assert config.num_kv_heads == config.num_heads
    assert config.head_dim == 32 // 4


@pytest.mark.parametrize(("field", "value", "message"), [
    ("architectures", ["GPT2LMHeadModel"], "architectures"),
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "yarn"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("mlp_bias", True, "mlp_bias"),
])
def test_unsupported_options_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(tiny_raw_config(**{field: value}))


def test_missing_required_field_is_named():
    raw = tiny_raw_config()
    del raw["intermediate_size"]
    with pytest.raises(ConfigError, match="intermediate_size"):
        ModelConfig.from_hf(raw)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"vocab_size": None}, "vocab_size=None is invalid"),
    ({"hidden_size": "64"}, "hidden_size='64' is invalid"),
    ({"num_hidden_layers": 1.5}, "num_hidden_layers=1.5 is invalid"),
    ({"num_attention_heads": 0}, "num_attention_heads=0 is invalid"),
    ({"num_key_value_heads": -2}, "num_key_value_heads=-2 is invalid"),
    ({"max_position_embeddings": True}, "max_position_embeddings=True is invalid"),
    ({"rope_scaling": "linear"}, "rope_scaling='linear' is invalid"),
])
def test_malformed_fields_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(tiny_raw_config(**overrides))


def test_config_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_dir(tmp_path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_dir(tmp_path)


def test_sliding_window_caps_the_context():
    mistral = ModelConfig.from_hf(tiny_raw_config(architectures=["MistralForCausalLM"], sliding_window=64))
    assert mistral.max_model_len == 64
    qwen = ModelConfig.from_hf(tiny_raw_config(architectures=["Qwen2ForCausalLM"], sliding_window=64,
                                               use_sliding_window=False))
    assert qwen.max_model_len == 128 and qwen.attention_bias


def test_linear_rope_scaling_slows_every_frequency():
    plain = rope_inverse_frequencies(ModelConfig.from_hf(tiny_raw_config()))
    scaled = rope_inverse_frequencies(ModelConfig.from_hf(
        tiny_raw_config(rope_scaling={"type": "linear", "factor": 4.0})))
    np.testing.assert_allclose(scaled, plain / 4, rtol=1e-6)


def test_llama3_rope_scaling_keeps_high_and_slows_low_frequencies():
    raw = tiny_raw_config(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})
    plain = rope_inverse_frequencies(ModelConfig.from_hf({**raw, "rope_scaling": None}))
    scaled = rope_inverse_frequencies(ModelConfig.from_hf(raw))
    wavelength = 2 * np.pi / plain
    np.testing.assert_allclose(scaled[wavelength < 32 / 4], plain[wavelength < 32 / 4])
    np.testing.assert_allclose(scaled[wavelength > 32], plain[wavelength > 32] / 8, rtol=1e-6)
    assert np.all(scaled <= plain + 1e-12)
