"""The weight formats ``benchmarks/quality.py`` compares, and how a scheme is made to fit.

A float model in ``f32``, ``f16``/``bf16`` (rounded and back) or a quantization scheme of
:mod:`minibatch.quant`; for a scheme whose group size does not divide the MLP width, the
MLP is padded with zero units (``fit="pad"``, an exact no-op in float32) or the
projections that do not fit are stored as int8 (``fit="int8"``, as llama.cpp falls back to
another type). ``storage`` counts the bits a format stores per real weight.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from minibatch.checkpoint import bf16_to_f32, f32_to_bf16
from minibatch.model import LayerWeights, ModelWeights
from minibatch.quant import PROJECTIONS, QuantizedWeight, group_size_of, quantize


def round_floats(weights: ModelWeights, dtype: str) -> ModelWeights:
    """Every tensor rounded to ``float16`` or ``bfloat16`` and back to float32."""
    if dtype == "f16":
        return weights.map(lambda t: np.asarray(t, np.float32).astype(np.float16).astype(np.float32))
    if dtype == "bf16":
        return weights.map(lambda t: bf16_to_f32(f32_to_bf16(np.asarray(t, np.float32))))
    raise ValueError(f"unknown float format {dtype!r}")


def pad_mlp(weights: ModelWeights, multiple: int) -> ModelWeights:
    """The same model with its MLP widened by zero units to a multiple of ``multiple``.

    The new gate/up rows are zero, so each new unit outputs ``silu(0) * 0 = 0``, and the
    new down_proj columns multiply those zeros: the float32 output does not change.
    """
    layers = []
    for layer in weights.layers:
        width = layer.down_proj.shape[1]
        extra = -width % multiple
        layers.append(dataclasses.replace(layer, gate_proj=np.pad(layer.gate_proj, ((0, extra), (0, 0))),
                                          up_proj=np.pad(layer.up_proj, ((0, extra), (0, 0))),
                                          down_proj=np.pad(layer.down_proj, ((0, 0), (0, extra)))))
    return dataclasses.replace(weights, layers=layers)


def quantize_with_fallback(weights: ModelWeights, scheme: str, fallback: str | None) -> tuple[ModelWeights, list[str]]:
    """Every projection in ``scheme``; one whose input dimension the scheme's group size does
    not divide is stored in ``fallback`` instead (None: raise ``ValueError``). Returns the
    weights and the names of the projections that fell back (``"down_proj"``, once per name)."""
    fell_back: list[str] = []
    layers = []
    for index, layer in enumerate(weights.layers):
        fields = {name: getattr(layer, name) for name in LayerWeights.__slots__}
        for name in PROJECTIONS:
            weight = fields[name]
            fits = weight.shape[1] % group_size_of(scheme, weight.shape[1]) == 0
            if not fits and fallback is not None and name not in fell_back:
                fell_back.append(name)
            fields[name] = quantize(weight, scheme if fits or fallback is None else fallback,
                                    f"model.layers.{index}.{name}")
        layers.append(LayerWeights(**fields))
    return dataclasses.replace(weights, layers=layers), fell_back


def weights_in_format(weights: ModelWeights, fmt: str, fit: str = "pad") -> tuple[ModelWeights, dict]:
    """The float32 weights in ``fmt`` (``f32``, ``bf16``, ``f16`` or a quantization scheme),
    and notes on how they were made to fit (``fit``: ``"pad"``, ``"int8"`` or ``"none"``)."""
    if fmt == "f32":
        return weights, {}
    if fmt in ("bf16", "f16"):
        return round_floats(weights, fmt), {}
    notes: dict = {}
    width = weights.layers[0].down_proj.shape[1]
    group = group_size_of(fmt, width)
    if fit == "pad" and width % group:
        weights = pad_mlp(weights, group)
        notes["padded_mlp"] = [width, weights.layers[0].down_proj.shape[1]]
    quantized, fell_back = quantize_with_fallback(weights, fmt, None if fit == "none" else "int8")
    if fell_back:
        notes["fallback"] = {"scheme": "int8", "projections": fell_back}
    return quantized, notes


def storage(weights: ModelWeights, fmt: str, num_weights: int) -> dict:
    """Bits per projection weight as stored, counted against the model's ``num_weights``
    real projection weights (zero padding costs bits too), and the whole model's bytes:
    float formats store every tensor at 32 or 16 bits; a quantized model keeps
    embeddings, norms and lm_head in float32."""
    projections = [getattr(layer, name) for layer in weights.layers for name in PROJECTIONS]
    if fmt in ("bf16", "f16"):
        return {"bits_per_weight": 16.0, "model_bytes": weights.num_bytes // 2}
    stored = sum(int(p.nbytes) for p in projections)
    result = {"bits_per_weight": 8 * stored / num_weights, "model_bytes": weights.num_bytes}
    own = [p for p in projections if isinstance(p, QuantizedWeight) and p.scheme == fmt]
    if own:  # the format's own rate: its tensors' bytes over the weights they hold, padding included
        result["bits_per_weight_of_scheme_tensors"] = 8 * sum(p.nbytes for p in own) / \
            sum(int(np.prod(p.shape)) for p in own)
    return result
