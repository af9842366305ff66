"""Shared test helpers: fixture locations and small random checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from minibatch.checkpoint import save_model
from minibatch.config import ModelConfig
from minibatch.model import LayerWeights, ModelWeights

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
HF_FIXTURES = sorted(p.name for p in FIXTURES.iterdir() if (p / "golden.npz").is_file()) if FIXTURES.is_dir() else []


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """‖actual − expected‖ / ‖expected‖."""
    return float(np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected))


def tiny_raw_config(**overrides) -> dict:
    """A config.json dict for a tiny Llama; keyword arguments override fields."""
    raw = {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2,
    }
    raw.update(overrides)
    return raw


def random_weights(config: ModelConfig, seed: int = 0, scale: float = 0.3) -> ModelWeights:
    """Random float32 weights with clear logit margins (scale ~0.3, norms near 1)."""
    rng = np.random.default_rng(seed)
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_heads * d, config.num_kv_heads * d

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def norm() -> np.ndarray:
        return rng.uniform(0.5, 1.5, h).astype(np.float32)

    def bias(n: int) -> np.ndarray | None:
        return (rng.standard_normal(n) * 0.1).astype(np.float32) if config.attention_bias else None

    layers = [LayerWeights(norm(), matrix(q, h), matrix(kv, h), matrix(kv, h), matrix(h, q), norm(),
                           matrix(i, h), matrix(i, h), matrix(h, i), bias(q), bias(kv), bias(kv))
              for _ in range(config.num_layers)]
    embed = matrix(config.vocab_size, h) * 3
    lm_head = embed if config.tie_word_embeddings else matrix(config.vocab_size, h)
    return ModelWeights(embed, layers, norm(), lm_head)


def write_tiny_model(directory: Path, seed: int = 0, **overrides) -> Path:
    """Write a random tiny checkpoint (config.json + model.safetensors) and return its path."""
    raw = tiny_raw_config(**overrides)
    config = ModelConfig.from_hf(raw)
    save_model(directory, raw, random_weights(config, seed))
    return directory


def read_config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())
