"""Model configuration, read from a Hugging Face ``config.json``.

One dataclass, :class:`ModelConfig`, holds every number the forward pass needs. It is
built from the ``config.json`` of a Llama-family checkpoint (Llama, Mistral, Qwen2,
SmolLM/SmolLM2). Anything minibatch does not implement fails loudly, naming the field,
instead of silently computing something else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# architecture name in config.json -> whether q/k/v projections carry a bias
SUPPORTED_ARCHITECTURES: dict[str, bool] = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A config.json asks for something minibatch cannot run."""


@dataclass(slots=True, frozen=True)
class RopeScaling:
    """RoPE frequency scaling (``rope_scaling`` in config.json)."""

    rope_type: str = "default"  # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass(slots=True, frozen=True)
class ModelConfig:
    """The shape and numerics of a Llama-family decoder.

    Build one with :meth:`from_hf` (a parsed config.json) or :meth:`from_dir`.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    @property
    def max_model_len(self) -> int:
        """Longest sequence (prompt + generated) this engine will run.

        A sliding-window model is capped at its window: inside the window, sliding and
        full attention are the same computation, so no mask change is needed.
        """
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @property
    def num_parameters(self) -> int:
        """Parameter count, embedding counted once when tied."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attention += q + 2 * kv
        mlp = 3 * h * self.intermediate_size
        per_layer = attention + mlp + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        """Read ``config.json`` from a checkpoint directory; :class:`ConfigError` says what
        is wrong with a missing, unreadable or unsupported one."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: a model directory needs a config.json")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path} is not valid JSON: {error}") from None
        return cls.from_hf(raw, source=str(path))

    @classmethod
    def from_hf(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build a config from a parsed Hugging Face config.json dictionary.

        Raises :class:`ConfigError` naming the field for anything missing, malformed or
        unsupported.
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object of model settings, got {type(raw).__name__}")
        architecture = _architecture(raw, source)

        def need(key: str) -> Any:
            if key not in raw:
                raise ConfigError(f"{source}: required field '{key}' is missing")
            return raw[key]

        def size(key: str, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (isinstance(value, float) and not value.is_integer()) or value < 1:
                raise ConfigError(f"{source}: {key}={value!r} is invalid: it must be a positive integer")
            return int(value)

        num_heads = size("num_attention_heads", need("num_attention_heads"))
        hidden_size = size("hidden_size", need("hidden_size"))
        num_kv_heads = size("num_key_value_heads", raw.get("num_key_value_heads") or num_heads)
        head_dim = size("head_dim", raw.get("head_dim") or hidden_size // num_heads)
        if num_heads % num_kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads={num_heads} is not a multiple of "
                f"num_key_value_heads={num_kv_heads}"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act='{raw['hidden_act']}' is not supported (only 'silu')")
        if raw.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=architecture,
            vocab_size=size("vocab_size", need("vocab_size")),
            hidden_size=hidden_size,
            intermediate_size=size("intermediate_size", need("intermediate_size")),
            num_layers=size("num_hidden_layers", need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=size("max_position_embeddings", raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(raw),
            rope_scaling=_rope_scaling(raw.get("rope_scaling") or raw.get("rope_parameters"), source),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=SUPPORTED_ARCHITECTURES[architecture] or bool(raw.get("attention_bias", False)),
            sliding_window=_sliding_window(raw),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(int(i) for i in eos_ids),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        )


def _architecture(raw: dict[str, Any], source: str) -> str:
    architectures = raw.get("architectures") or []
    for name in architectures:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    raise ConfigError(
        f"{source}: architectures={architectures} is not supported; minibatch runs {supported} "
        "(SmolLM/SmolLM2 are LlamaForCausalLM)"
    )


def _rope_theta(raw: dict[str, Any]) -> float:
    """``rope_theta`` at the top level (transformers 4) or in ``rope_parameters`` (5)."""
    parameters = raw.get("rope_parameters") or {}
    return float(raw.get("rope_theta") or parameters.get("rope_theta") or 10000.0)


def _rope_scaling(raw: dict[str, Any] | None, source: str) -> RopeScaling:
    """``rope_scaling`` (transformers 4) or ``rope_parameters`` (transformers 5)."""
    if not raw:
        return RopeScaling()
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: rope_scaling={raw!r} is invalid: it must be an object such as "
                          '{"rope_type": "linear", "factor": 4.0}, or null')
    if float(raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(f"{source}: partial_rotary_factor={raw['partial_rotary_factor']} is not supported")
    rope_type = raw.get("rope_type", raw.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope_scaling type '{rope_type}' is not supported; "
            f"use one of {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return RopeScaling(
        rope_type=rope_type,
        factor=float(raw.get("factor", 1.0)),
        low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
        high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
    )


def _sliding_window(raw: dict[str, Any]) -> int | None:
    window = raw.get("sliding_window")
    if window is None or raw.get("use_sliding_window") is False:
        return None
    return int(window)
