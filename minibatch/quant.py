"""Weight-only quantization: int8 per channel, int4 per group, and ggml's Q8_0/Q4_0 blocks.

A linear weight ``[out, in]`` (Hugging Face's layout) is stored as small integers plus the
scales that turn them back into floats; groups and blocks run along ``in``. Decoding is
memory-bound, so reading 4.5 bits per weight instead of 32 is where the speed comes from
(MARLIN); "Give Me BF16 or Give Me Death" measures what the formats cost in accuracy.

Activations stay float32: no scale is ever computed from activations, so a request's
output cannot depend on its batch-mates ("Architectural Backdoors": dynamic per-batch
activation quantization leaks between batch entries).

The formats, ``w`` one float weight, ``q`` its stored integer:

- ``int8``: symmetric, one scale per output channel, ``scale = max|row| / 127``,
  ``q = clip(round(w / scale), -127, 127)``, ``w ~ q * scale``.
- ``int4-g32|g64|g128``: asymmetric, one scale and integer zero point per group of ``g``
  inputs, ``w ~ (q - zero) * scale``, two 4-bit ``q`` per byte (see :func:`pack_int4`).
- ``q8_0``, ``q4_0``: llama.cpp's GGUF blocks of 32 weights, byte for byte as ggml lays
  them out: a float16 scale ``d`` then 32 int8 (34 bytes) or 16 bytes of nibbles (18).

:func:`quantized_matmul` is the specification of the GPU kernels of the same formats in
``minibatch_gpu/quant.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from minibatch.model import ModelWeights

SCHEMES = ("int8", "int4-g32", "int4-g64", "int4-g128", "q8_0", "q4_0")
GGML_BLOCK_SIZE = 32  # weights per Q8_0/Q4_0 block
GGML_BLOCK_BYTES = {"q8_0": 2 + 32, "q4_0": 2 + 16}  # float16 d, then the quants
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# ---------------------------------------------------------------- the stored weight


def check_scheme(scheme: str) -> str:
    """Return ``scheme`` if it is one of :data:`SCHEMES`, else raise ``ValueError``."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    return scheme


def group_size_of(scheme: str, in_features: int) -> int:
    """Inputs sharing one scale: the whole row for int8, ``g`` for int4-g``g``, 32 for ggml."""
    if scheme == "int8":
        return in_features
    if scheme.startswith("int4-g"):
        return int(scheme.removeprefix("int4-g"))
    return GGML_BLOCK_SIZE


def stored_layout(scheme: str, shape: tuple[int, int], name: str = "weight") -> dict[str, tuple[tuple, np.dtype]]:
    """The arrays that store a float ``[out, in]`` weight in ``scheme``: ``{part: (shape, dtype)}``.

    Raises ``ValueError`` naming the tensor when ``in`` is not a multiple of the group size.
    """
    out_features, in_features = shape
    group = group_size_of(check_scheme(scheme), in_features)
    if in_features % group:
        fitting = [s for s in SCHEMES if s != "int8" and in_features % group_size_of(s, in_features) == 0]
        raise ValueError(f"cannot quantize '{name}' (shape [{out_features}, {in_features}]) as {scheme}: its input "
                         f"dimension {in_features} is not a multiple of the group size {group}; pick a scheme "
                         f"whose group size divides {in_features} ({', '.join(fitting + ['int8'])})")
    groups = in_features // group
    if scheme == "int8":
        return {"qweight": ((out_features, in_features), np.dtype(np.int8)),
                "scales": ((out_features,), np.dtype(np.float32))}
    if scheme.startswith("int4"):
        return {"qweight": ((out_features, in_features // 2), np.dtype(np.uint8)),
                "scales": ((out_features, groups), np.dtype(np.float32)),
                "zeros": ((out_features, groups), np.dtype(np.uint8))}
    return {"qweight": ((out_features, groups * GGML_BLOCK_BYTES[scheme]), np.dtype(np.uint8))}


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class QuantizedWeight:
    """A quantized ``[out, in]`` linear weight; its arrays may be NumPy or CuPy.

    ``qweight``, ``scales`` and ``zeros`` are laid out as :func:`stored_layout` says. The
    ggml schemes keep their float16 scales inside the blocks, so ``scales`` and ``zeros``
    are None there (:func:`ggml_block_scales` reads the scales out).
    """

    scheme: str
    shape: tuple[int, int]  # [out, in] of the float weight
    qweight: Any
    scales: Any = None
    zeros: Any = None
    group_size: int = field(kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        layout = stored_layout(self.scheme, self.shape)
        if self.group_size != group_size_of(self.scheme, self.shape[1]):
            raise ValueError(f"{self.scheme} of shape {list(self.shape)} has group size "
                             f"{group_size_of(self.scheme, self.shape[1])}, not {self.group_size}")
        for part in ("qweight", "scales", "zeros"):
            array, expected = getattr(self, part), layout.get(part)
            if expected is None and array is not None:
                raise ValueError(f"{self.scheme} stores no {part}, got one")
            if expected is not None and (array is None or (tuple(array.shape), array.dtype) != expected):
                got = None if array is None else f"{list(array.shape)} {array.dtype}"
                raise ValueError(f"{self.scheme} {part} must be {list(expected[0])} {expected[1]}, got {got}")

    def parts(self) -> dict[str, Any]:
        """The stored arrays by name (``qweight``, and ``scales``/``zeros`` where used)."""
        return {name: getattr(self, name) for name in ("qweight", "scales", "zeros")
                if getattr(self, name) is not None}

    def map_arrays(self, fn: Any) -> QuantizedWeight:
        """A copy with ``fn`` applied to each stored array (e.g. ``cupy.asarray``); dtypes must not change."""
        return dataclasses.replace(self, **{name: fn(array) for name, array in self.parts().items()})

    def dequantize(self) -> np.ndarray:
        """The float32 ``[out, in]`` weight these numbers stand for (see :func:`dequantize`)."""
        return dequantize(self)

    @property
    def nbytes(self) -> int:
        return sum(int(array.nbytes) for array in self.parts().values())

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, scales and zero points included (q4_0: exactly 4.5)."""
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.scheme}, {list(self.shape)}, {self.bits_per_weight:g} bits per weight)"


def concatenate_rows(weights: list[np.ndarray | QuantizedWeight]) -> np.ndarray | QuantizedWeight:
    """Stack ``[out_i, in]`` weights (host arrays) into one ``[sum(out_i), in]`` weight.

    Float arrays go through ``np.concatenate``. Quantized ones must share a scheme and
    ``in``; every scheme keeps a row's scales, zero points and ggml blocks in that same
    row (groups and blocks run along ``in``), so each stored array stacks along its first
    axis and the result dequantizes to exactly the stacked float weights.
    """
    if not any(isinstance(w, QuantizedWeight) for w in weights):
        return np.concatenate(weights, axis=0)  # [sum(out_i), in]
    kinds = {(w.scheme, w.shape[1]) if isinstance(w, QuantizedWeight) else ("float", w.shape[1]) for w in weights}
    if len(kinds) > 1:
        raise ValueError(f"cannot stack weights of different kinds along their output rows ({sorted(kinds)} as "
                         "(scheme, input dimension)): quantize them all with one scheme, or none")
    first = weights[0]
    parts = {name: np.concatenate([w.parts()[name] for w in weights], axis=0) for name in first.parts()}
    return QuantizedWeight(first.scheme, (sum(w.shape[0] for w in weights), first.shape[1]), **parts,
                           group_size=first.group_size)


# --------------------------------------------------------- int8: one scale per row


def quantize_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[out, in]`` float32 -> ``q`` int8 ``[out, in]``, ``scales`` float32 ``[out]``."""
    scales = np.abs(weight).max(axis=1) / np.float32(127)  # [out]
    scales = np.where(scales > 0, scales, np.float32(1))  # a zero row (or an underflowing one) gets 1
    q = np.clip(np.round(weight / scales[:, None]), -127, 127)  # [out, in], ties to even
    return q.astype(np.int8), scales.astype(np.float32)


# ------------------------------------------------------- int4: a scale per group


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte along ``in``: ``[out, in]`` (0..15) -> ``[out, in/2]`` uint8.

    Byte ``j`` holds ``q[2j]`` in its low nibble and ``q[2j+1]`` in its high nibble.
    """
    q = q.astype(np.uint8)
    return q[:, 0::2] | (q[:, 1::2] << np.uint8(4))  # [out, in/2]


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_int4`: ``[out, in/2]`` uint8 -> ``[out, in]`` uint8 in 0..15."""
    low, high = packed & np.uint8(0x0F), packed >> np.uint8(4)  # [out, in/2] each
    return np.stack([low, high], axis=-1).reshape(packed.shape[0], -1)  # [out, in]: low, high, low, ...


def quantize_int4(weight: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[out, in]`` float32 -> packed ``q`` ``[out, in/2]``, ``scales`` f32 and ``zeros`` u8 ``[out, in/g]``.

    Each group's range is widened to include 0 (as GPTQ does): ``wmin = min(group, 0)``,
    ``wmax = max(group, 0)``. The integer zero point then never clips, so every weight is
    within ``scale / 2`` of its dequantized value; without the widening an all-positive
    group would clip its zero point at 0 and lose its offset. An all-zero group gets
    scale 1 (and comes back as zeros). A constant group ``c`` spans ``[min(c, 0), max(c, 0)]``,
    so it is stored as ``q - zero = ±15`` with ``scale = |c| / 15`` and comes back as ``c``
    up to float32 rounding.
    """
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // group_size, group_size)  # [out, G, g]
    wmin = np.minimum(groups.min(axis=-1), 0)  # [out, G]
    wmax = np.maximum(groups.max(axis=-1), 0)  # [out, G]
    scales = (wmax - wmin) / np.float32(15)  # [out, G]
    scales = np.where(scales > 0, scales, np.float32(1))  # an all-zero group gets 1
    zeros = np.clip(np.round(-wmin / scales), 0, 15)  # [out, G] integer zero point
    q = np.clip(np.round(groups / scales[..., None]) + zeros[..., None], 0, 15)  # [out, G, g]
    return pack_int4(q.reshape(out_features, in_features)), scales.astype(np.float32), zeros.astype(np.uint8)


# ------------------------------------------------------ ggml's Q8_0 and Q4_0 blocks


def round_half_away_from_zero(x: np.ndarray) -> np.ndarray:
    """C's ``roundf``, which ggml uses: ties go away from zero (``np.round`` sends them to even)."""
    magnitude = np.abs(x)
    whole = np.floor(magnitude)
    return np.copysign(whole + (magnitude - whole >= 0.5), x)  # the subtraction is exact


def _reciprocal_or_zero(d: np.ndarray) -> np.ndarray:
    """``1 / d`` in float32, and 0 where ``d`` is 0 (an all-zero block) or so small that
    ``1 / d`` overflows. ggml computes ``w * inf`` there, whose integer cast is undefined;
    such a block's float16 ``d`` is 0 anyway, so it stores ``q = 0`` and dequantizes to 0."""
    with np.errstate(divide="ignore", over="ignore"):
        inverse = np.float32(1) / d
    return np.where(np.isfinite(inverse), inverse, np.float32(0))


def _join_blocks(d: np.ndarray, quants: np.ndarray) -> np.ndarray:
    """float32 scales ``[out, B, 1]`` and quant bytes ``[out, B, k]`` -> raw blocks ``[out, B*(2+k)]``."""
    d_bytes = d.astype("<f2").view(np.uint8)  # [out, B, 2] float16, little-endian, rounded to nearest even
    return np.concatenate([d_bytes, quants.view(np.uint8)], axis=-1).reshape(d.shape[0], -1)


def quantize_q8_0(weight: np.ndarray) -> np.ndarray:
    """ggml Q8_0: ``d = max|block| / 127``, ``q = roundf(w / d)``; ``[out, in]`` -> ``[out, in/32*34]`` bytes.

    As in ggml, ``q`` uses the float32 ``d`` (``w * (1/d)``); only the stored ``d`` is float16.
    """
    blocks = weight.reshape(weight.shape[0], -1, GGML_BLOCK_SIZE)  # [out, B, 32]
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)  # [out, B, 1]
    q = round_half_away_from_zero(blocks * _reciprocal_or_zero(d))  # [out, B, 32] in -127..127
    return _join_blocks(d, q.astype(np.int8))


def quantize_q4_0(weight: np.ndarray) -> np.ndarray:
    """ggml Q4_0: ``d = m / -8`` with ``m`` the block's (first) largest-magnitude weight, signed,
    ``q = min(15, trunc(w / d + 8.5))``; ``[out, in]`` -> ``[out, in/32*18]`` bytes.

    ``m`` itself lands exactly on ``q = 0``, i.e. ``(0 - 8) d = m``: of the 16 levels
    ``-8d .. 7d``, the extra one goes to ``m``'s side, so no range is wasted on the other.
    Byte ``j`` of a block holds weight ``j`` in its low nibble and weight ``j + 16`` in its
    high nibble (not the neighbour order of :func:`pack_int4`).
    """
    blocks = weight.reshape(weight.shape[0], -1, GGML_BLOCK_SIZE)  # [out, B, 32]
    largest = np.argmax(np.abs(blocks), axis=-1)[..., None]  # [out, B, 1] first one on ties
    d = np.take_along_axis(blocks, largest, axis=-1) / np.float32(-8)  # [out, B, 1]
    q = np.clip(np.trunc(blocks * _reciprocal_or_zero(d) + np.float32(8.5)), 0, 15).astype(np.uint8)
    half = GGML_BLOCK_SIZE // 2
    return _join_blocks(d, q[..., :half] | (q[..., half:] << np.uint8(4)))  # [out, B*18]


def _split_blocks(scheme: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw blocks ``[out, B*bytes]`` -> float32 ``d`` ``[out, B, 1]`` and quant bytes ``[out, B, bytes-2]``."""
    blocks = np.ascontiguousarray(raw).reshape(raw.shape[0], -1, GGML_BLOCK_BYTES[scheme])  # [out, B, bytes]
    d = np.ascontiguousarray(blocks[..., :2]).view("<f2").astype(np.float32)  # [out, B, 1]
    return d, blocks[..., 2:]


def ggml_block_scales(q: QuantizedWeight) -> np.ndarray:
    """The float16 scale ``d`` of every block of a q8_0/q4_0 weight, as float32 ``[out, in/32]``."""
    return _split_blocks(q.scheme, q.qweight)[0][..., 0]


def _dequantize_ggml(scheme: str, raw: np.ndarray) -> np.ndarray:
    """Raw blocks ``[out, B*bytes]`` -> float32 ``[out, B*32]``: ``d * q`` (Q4_0: ``d * (nibble - 8)``)."""
    d, quants = _split_blocks(scheme, raw)  # [out, B, 1], [out, B, 32 or 16]
    if scheme == "q8_0":
        values = quants.view(np.int8)  # [out, B, 32]
    else:
        values = np.concatenate([quants & np.uint8(0x0F), quants >> np.uint8(4)], axis=-1).astype(np.int8) - 8
    return (values.astype(np.float32) * d).reshape(raw.shape[0], -1)  # [out, B*32]


# ------------------------------------------------------------ quantize, dequantize


def quantize(weight: np.ndarray, scheme: str, name: str = "weight") -> QuantizedWeight:
    """Quantize a float ``[out, in]`` weight. ``name`` is used in error messages.

    Raises ``ValueError`` for an unknown scheme, a shape the scheme's group size does not
    divide, or weights that are not finite (or too large for ggml's float16 scales).
    """
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2:
        raise ValueError(f"cannot quantize '{name}': expected a [out, in] matrix, got shape {list(weight.shape)}")
    stored_layout(scheme, weight.shape, name)  # checks the scheme and the group size
    if not np.all(np.isfinite(weight)):
        raise ValueError(f"cannot quantize '{name}': it holds NaN or infinite values")
    group = group_size_of(scheme, weight.shape[1])
    if scheme == "int8":
        qweight, scales = quantize_int8(weight)
        quantized = QuantizedWeight(scheme, weight.shape, qweight, scales, group_size=group)
    elif scheme.startswith("int4"):
        qweight, scales, zeros = quantize_int4(weight, group)
        quantized = QuantizedWeight(scheme, weight.shape, qweight, scales, zeros, group_size=group)
    else:
        blocks = quantize_q8_0(weight) if scheme == "q8_0" else quantize_q4_0(weight)
        quantized = QuantizedWeight(scheme, weight.shape, blocks, group_size=group)
    check_quantized(quantized, name, on_load=False)
    return quantized


def dequantize_columns(q: QuantizedWeight, start: int, stop: int) -> np.ndarray:
    """Dequantize input columns ``[start, stop)`` (group-aligned): ``-> [out, stop-start]`` float32."""
    if start % q.group_size or stop % q.group_size:
        raise ValueError(f"columns [{start}, {stop}) do not start and end on {q.scheme} group boundaries")
    if q.scheme == "int8":
        return q.qweight[:, start:stop].astype(np.float32) * q.scales[:, None]  # [out, cols]
    if q.scheme.startswith("int4"):
        groups = slice(start // q.group_size, stop // q.group_size)
        values = unpack_int4(q.qweight[:, start // 2: stop // 2]).astype(np.float32)  # [out, cols]
        values = values.reshape(q.shape[0], -1, q.group_size)  # [out, G', g]
        zeros = q.zeros[:, groups, None].astype(np.float32)  # [out, G', 1]
        return ((values - zeros) * q.scales[:, groups, None]).reshape(q.shape[0], -1)  # [out, cols]
    first_byte, last_byte = (column // GGML_BLOCK_SIZE * GGML_BLOCK_BYTES[q.scheme] for column in (start, stop))
    return _dequantize_ggml(q.scheme, q.qweight[:, first_byte:last_byte])  # [out, cols]


def dequantize(q: QuantizedWeight) -> np.ndarray:
    """The float32 ``[out, in]`` weight a :class:`QuantizedWeight` (host arrays) stands for."""
    return dequantize_columns(q, 0, q.shape[1])


# ------------------------------------------------------------------ the matmul


def quantized_matmul(x: np.ndarray, q: QuantizedWeight) -> np.ndarray:
    """``x @ dequantize(q).T``, one group of inputs at a time: ``[N, in] -> [N, out]`` float32.

    This is the specification, not a fast kernel: on a CPU it re-expands every weight to
    float32 on every call, so it is slower than a float matmul. A GPU kernel
    (``minibatch_gpu/quant.py``) fuses the same steps: it reads the packed integers from
    memory, dequantizes them in registers and multiply-accumulates at once, so the weight
    crosses the memory bus at 4 or 8 bits and decode, which is memory-bound, gets faster.
    """
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"quantized_matmul: x's last dimension {x.shape[-1]} must equal the weight's "
                         f"input dimension {q.shape[1]} (weight [out, in] = {list(q.shape)})")
    y = np.zeros((*x.shape[:-1], q.shape[0]), dtype=np.float32)  # [N, out]
    for start in range(0, q.shape[1], q.group_size):
        cols = slice(start, start + q.group_size)
        w_group = dequantize_columns(q, cols.start, cols.stop)  # [out, g]
        y += x[..., cols] @ w_group.T  # [N, g] @ [g, out] -> [N, out]
    return y


# -------------------------------------------------------------- integrity checks


def check_quantized(q: QuantizedWeight, name: str, on_load: bool = True) -> None:
    """Raise ``ValueError`` naming ``name`` if ``q`` stores numbers its scheme never produces:
    scales that are NaN, infinite or not positive (ggml: NaN/infinite ``d``, negative for
    Q8_0), or int4 zero points above 15."""
    if q.scheme in ("q8_0", "q4_0"):
        scales = ggml_block_scales(q)
        bad = ~np.isfinite(scales) | ((scales < 0) if q.scheme == "q8_0" else False)
    else:
        scales = np.asarray(q.scales)
        bad = ~np.isfinite(scales) | (scales <= 0)
    problem = "scales that are NaN, infinite or out of range" if bad.any() else None
    if q.zeros is not None and np.any(np.asarray(q.zeros) > 15):
        problem = "zero points above 15"
    if problem is None:
        return
    if on_load:
        raise ValueError(f"tensor '{name}' ({q.scheme}) has {problem}: the checkpoint is corrupt; "
                         "re-quantize it from the float checkpoint (minibatch quantize)")
    raise ValueError(f"cannot quantize '{name}' as {q.scheme}: it gives {problem} "
                     "(are its values beyond float16's range?)")


# ------------------------------------------------------------------- the model


def quantize_model(weights: ModelWeights, scheme: str) -> ModelWeights:
    """Quantize every projection (q/k/v/o, gate/up/down) of every layer.

    Embeddings, norms, biases and ``lm_head`` stay float32: the embedding is a lookup
    table (one row read per token, so its size costs memory but not bandwidth), norms and
    biases are tiny, and the final projection is where quantization error lands directly
    on the logits; a tied ``lm_head`` *is* the embedding. Raises ``ValueError`` naming
    the first projection the scheme cannot store, before anything is returned.
    """
    from minibatch.checkpoint import layer_tensor_name
    from minibatch.model import LayerWeights, ModelWeights

    check_scheme(scheme)
    if quantization_of(weights) is not None:
        raise ValueError(f"these weights are already quantized ({quantization_of(weights)}); "
                         "quantize the float checkpoint instead")
    layers = []
    for index, layer in enumerate(weights.layers):
        fields = {name: getattr(layer, name) for name in LayerWeights.__slots__}
        for name in PROJECTIONS:
            fields[name] = quantize(fields[name], scheme, layer_tensor_name(index, name))
        layers.append(LayerWeights(**fields))
    return ModelWeights(embed_tokens=weights.embed_tokens, layers=layers, final_norm=weights.final_norm,
                        lm_head=weights.lm_head)


def quantization_of(weights: ModelWeights) -> str | None:
    """The scheme of a model's quantized projections (one for all), or None for a float model."""
    schemes = [getattr(layer, name).scheme for layer in weights.layers for name in PROJECTIONS
               if isinstance(getattr(layer, name), QuantizedWeight)]
    return schemes[0] if schemes else None


def projection_sizes(weights: ModelWeights) -> tuple[int, int]:
    """``(weights, bytes)`` of all projections: how many numbers they stand for, and the
    bytes they take as stored (4 per weight in float32)."""
    projections = [getattr(layer, name) for layer in weights.layers for name in PROJECTIONS]
    count = sum(int(np.prod(p.shape)) for p in projections)
    return count, sum(int(p.nbytes) for p in projections)
