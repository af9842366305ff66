"""The layers of a Llama-family decoder, as pure NumPy functions.

One function per equation, a shape comment on each line of math. Shapes use
``N`` = tokens in the flat batch, ``H`` = hidden size, ``D`` = head dim,
``V`` = vocabulary, ``I`` = MLP intermediate size.

Each function here has a GPU twin of the same name and signature in
``minibatch_gpu/layers.py``; ``tests/gpu/`` holds the two equal.
"""

from __future__ import annotations

import numpy as np

from minibatch.config import ModelConfig
from minibatch.quant import QuantizedWeight, quantized_matmul


def embedding(table: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """Look up token embeddings: ``[V, H], [N] -> [N, H]``."""
    return table[token_ids]  # [N, H]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Root-mean-square norm (Zhang & Sennrich, 2019): ``[N, H], [H] -> [N, H]``.

    Computed in float32; no mean is subtracted, unlike LayerNorm.
    """
    variance = (x * x).sum(axis=-1, keepdims=True) / x.shape[-1]  # [N, 1] the mean square
    return x / np.sqrt(variance + eps) * weight  # [N, H]


def linear(x: np.ndarray, weight: np.ndarray | QuantizedWeight, bias: np.ndarray | None = None) -> np.ndarray:
    """``x @ weight.T + bias`` with the weight shaped as Hugging Face stores it, ``[out, in]``.

    ``[N, in], [out, in], [out] -> [N, out]``, whatever the weight's memory order (a
    model runner keeps each matrix in :func:`~minibatch.model.decode_order`). A row-major
    weight is multiplied as ``(weight @ x.T).T``: the same product, which OpenBLAS runs
    faster that way round once ``N > 1`` (down_proj of a 32-row step: about 0.7 times the
    time of ``x @ weight.T``). A quantized weight is multiplied by
    :func:`~minibatch.quant.quantized_matmul`, which dequantizes it group by group.
    """
    if isinstance(weight, QuantizedWeight):
        y = quantized_matmul(x, weight)  # [N, out]
    elif weight.flags.c_contiguous and x.ndim == 2:  # row-major
        y = (weight @ x.T).T  # [out, in] @ [in, N] -> [N, out]
    else:
        y = x @ weight.T  # [N, out]
    return y if bias is None else y + bias


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU (swish): ``x * sigmoid(x) = x / (1 + exp(-x))``. Below ``x = -88``, ``exp(-x)``
    overflows float32 to infinity and the quotient is ``-0.0``: the right limit, so the
    overflow is expected and not reported."""
    with np.errstate(over="ignore"):
        return x / (1 + np.exp(-x))


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """The SwiGLU gate (Shazeer, 2020): ``silu(gate) * up``, ``[N, I], [N, I] -> [N, I]``."""
    return silu(gate) * up  # [N, I]


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """RoPE's per-pair rotation speeds, with the config's scaling: ``-> [D/2]`` float32.

    Pair ``i`` of a head rotates by ``position * inv_freq[i]`` radians. ``linear``
    scaling slows every pair by ``factor``; ``llama3`` slows only the low frequencies
    (long wavelengths) and blends smoothly between the two regimes.
    """
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)  # [D/2]
    scaling = config.rope_scaling
    if scaling.rope_type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.rope_type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling.factor, scaling.low_freq_factor,
                                  scaling.high_freq_factor, scaling.original_max_position_embeddings)
    return inv_freq.astype(np.float32)


def _llama3_scaled(inv_freq: np.ndarray, factor: float, low_freq_factor: float,
                   high_freq_factor: float, original_max_positions: int) -> np.ndarray:
    wavelength = 2 * np.pi / inv_freq  # [D/2]
    low_freq_wavelength = original_max_positions / low_freq_factor
    high_freq_wavelength = original_max_positions / high_freq_factor
    smooth = (original_max_positions / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq  # [D/2]
    return np.where(wavelength > low_freq_wavelength, inv_freq / factor,  # slow: scaled
                    np.where(wavelength < high_freq_wavelength, inv_freq, blended))  # fast: kept


def rope_cos_sin(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cosines and sines of RoPE's angles, ``positions * inv_freq``:
    ``[N], [D/2] -> [N, D/2], [N, D/2]`` float32.

    They depend on the positions only, so a forward pass computes them once and every
    layer's :func:`apply_rope` reuses them (as Hugging Face's rotary embedding module does).
    """
    angles = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # [N, D/2]
    return np.cos(angles), np.sin(angles)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary position embedding (Su et al., 2021), Hugging Face's half-split layout.

    Dimension ``i`` is paired with ``i + D/2`` and the pair is rotated by the angle whose
    cosine and sine :func:`rope_cos_sin` gives. ``[N, heads, D], [N, D/2], [N, D/2] -> [N, heads, D]``.
    """
    cos, sin = cos[:, None, :], sin[:, None, :]  # [N, 1, D/2]: the same angle for every head
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # [N, heads, D/2] each
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [N, heads, D]
