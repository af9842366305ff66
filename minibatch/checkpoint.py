"""Reading and writing safetensors checkpoints with nothing but NumPy.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each
tensor name to ``{"dtype", "shape", "data_offsets"}``, then the raw bytes. That is simple
enough to read by hand, which is what this module does: the file is memory-mapped and
each tensor is a view into it, so a checkpoint is never copied until it is upcast.

bfloat16 has no NumPy dtype, but it is just the top 16 bits of a float32, so upcasting
is a bit shift: ``(bf16_bits.astype(uint32) << 16).view(float32)``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from minibatch.config import ModelConfig
from minibatch.quant import (
    PROJECTIONS,
    SCHEMES,
    QuantizedWeight,
    check_quantized,
    group_size_of,
    quantization_of,
    stored_layout,
)

if TYPE_CHECKING:
    from minibatch.model import ModelWeights

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; upcast with bf16_to_f32
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NUMPY_TO_SAFETENSORS = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items() if name != "BF16"}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
QUANTIZED_FORMAT = "minibatch-quant-v1"  # safetensors metadata "format" of a quantized checkpoint
QUANTIZED_PARTS = ("qweight", "scales", "zeros")


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or does not match the model."""


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32: bf16 is the upper half of an f32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


def read_safetensors(path: str | Path) -> dict[str, tuple[str, np.ndarray]]:
    """Memory-map a safetensors file.

    Returns ``{name: (safetensors_dtype, array)}`` where each array is a read-only view
    of the file (bf16 tensors come back as their uint16 bits; see :func:`to_float32`).
    Raises :class:`CheckpointError` naming the file when it is truncated or malformed.
    """
    path = Path(path)
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None
    if data.size < 8:
        raise CheckpointError(f"{path} is too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    if 8 + header_len > data.size:
        raise CheckpointError(f"{path}: header length {header_len} runs past the end of the file")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is a JSON {type(header).__name__}, not an object of tensors; "
                              "the file is corrupt")
    body = data[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        array = _tensor_view(body, name, info, path)  # checks the entry first
        tensors[name] = (info["dtype"], array)
    return tensors


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The free-form ``__metadata__`` string map of a safetensors file (may be empty)."""
    with open(path, "rb") as file:
        (header_len,) = struct.unpack("<Q", file.read(8))
        return json.loads(file.read(header_len)).get("__metadata__", {}) or {}


def _tensor_view(body: np.ndarray, name: str, info: object, path: Path) -> np.ndarray:
    try:
        dtype_name = info.get("dtype")
        start, end = (int(offset) for offset in info["data_offsets"])
        shape = tuple(int(d) for d in info["shape"])
    except (AttributeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry {info!r} (it needs dtype, "
                              "shape and data_offsets); the file is corrupt") from None
    if dtype_name not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {dtype_name}")
    dtype = SAFETENSORS_DTYPES[dtype_name]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if start < 0 or end - start != expected or min(shape, default=0) < 0:
        raise CheckpointError(
            f"{path}: tensor '{name}' claims shape {list(shape)} {dtype_name} "
            f"({expected} bytes) but its data spans {end - start} bytes; the file is corrupt or truncated"
        )
    if end > body.size:
        raise CheckpointError(f"{path}: tensor '{name}' ends at byte {end} of the data but the file holds only "
                              f"{body.size} bytes of data; the file is corrupt or truncated")
    return body[start:end].view(dtype).reshape(shape)


def to_float32(dtype_name: str, array: np.ndarray) -> np.ndarray:
    """Upcast a tensor read by :func:`read_safetensors` to a float32 array."""
    if dtype_name == "BF16":
        return bf16_to_f32(array)
    return np.asarray(array, dtype=np.float32)


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    bf16: frozenset[str] = frozenset(),
) -> None:
    """Write tensors to a safetensors file (names in ``bf16`` hold uint16 bf16 bits)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        dtype_name = "BF16" if name in bf16 else _NUMPY_TO_SAFETENSORS.get(array.dtype.newbyteorder("<"))
        if dtype_name is None:
            raise CheckpointError(f"tensor '{name}' has dtype {array.dtype}, which safetensors cannot store")
        span = [offset, offset + array.nbytes]
        header[name] = {"dtype": dtype_name, "shape": list(array.shape), "data_offsets": span}
        offset += array.nbytes
        arrays.append(array)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # keep tensor data 8-byte aligned
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header_bytes)))
        file.write(header_bytes)
        for array in arrays:
            file.write(array.tobytes())


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: one file, or the shards of an index."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as error:
            raise CheckpointError(f"{index} is not a valid index (a JSON object whose weight_map maps tensor "
                                  f"names to shard files): {error}") from None
        missing = [shard for shard in shards if not (model_dir / shard).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) {missing} that are not in {model_dir}")
        return [model_dir / shard for shard in shards]
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointError(
        f"no safetensors weights in {model_dir}: expected {SINGLE_FILE} or {INDEX_FILE} "
        "(PyTorch .bin checkpoints are not supported; convert them with safetensors first)"
    )


def read_checkpoint(model_dir: str | Path) -> dict[str, tuple[str, np.ndarray, Path]]:
    """All tensors of a checkpoint directory: ``{name: (dtype_name, array, file)}``."""
    tensors: dict[str, tuple[str, np.ndarray, Path]] = {}
    for path in checkpoint_files(model_dir):
        for name, (dtype_name, array) in read_safetensors(path).items():
            tensors[name] = (dtype_name, array, path)
    return tensors


# ------------------------------------------------------- checkpoint <-> model weights

_LAYER_TENSORS = {  # LayerWeights field -> Hugging Face name inside "model.layers.{i}."
    "input_norm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "post_attention_norm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
}
_BIASES = ("q_bias", "k_bias", "v_bias")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints carry


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name a checkpoint of ``config`` must hold, with its shape."""
    h, q, kv, i = config.hidden_size, config.num_heads * config.head_dim, \
        config.num_kv_heads * config.head_dim, config.intermediate_size
    per_layer = {"input_norm": (h,), "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h),
                 "o_proj": (h, q), "post_attention_norm": (h,), "gate_proj": (i, h),
                 "up_proj": (i, h), "down_proj": (h, i), "q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,)}
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for layer in range(config.num_layers):
        for field_name, shape in per_layer.items():
            if field_name in _BIASES and not config.attention_bias:
                continue
            shapes[f"model.layers.{layer}.{_LAYER_TENSORS[field_name]}"] = shape
    return shapes


def layer_tensor_name(layer: int, field_name: str) -> str:
    """The Hugging Face name of a :class:`~minibatch.model.LayerWeights` field, e.g.
    ``model.layers.0.self_attn.q_proj.weight``."""
    return f"model.layers.{layer}.{_LAYER_TENSORS[field_name]}"


def quantized_part_name(weight_name: str, part: str) -> str:
    """Where part ``qweight``/``scales``/``zeros`` of a quantized weight is stored: under the
    module's name, as GPTQ and AWQ checkpoints do (``...q_proj.weight`` -> ``...q_proj.scales``)."""
    return f"{weight_name.removesuffix('.weight')}.{part}"


def stored_quantization(model_dir: str | Path) -> str | None:
    """The scheme a checkpoint was quantized with by minibatch, or None for a float checkpoint.

    Read from the safetensors metadata (``{"format": "minibatch-quant-v1", "quantization":
    scheme}``) and checked against config.json's ``quantization_config``. Raises
    :class:`CheckpointError` for another tool's quantization (GPTQ, AWQ, ...), an unknown
    scheme, or files that disagree.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    declared = (json.loads(config_path.read_text()) if config_path.is_file() else {}).get("quantization_config")
    method = (declared or {}).get("quant_method")
    if method not in (None, "minibatch"):
        raise CheckpointError(f"{model_dir} holds weights quantized with '{method}', which minibatch cannot load: "
                              "use the float checkpoint (and quantization=... to quantize it at load)")
    found = set()
    for path in checkpoint_files(model_dir):
        metadata = read_safetensors_metadata(path)
        found.add(metadata.get("quantization") if metadata.get("format") == QUANTIZED_FORMAT else None)
    if len(found) > 1:
        raise CheckpointError(f"the safetensors files in {model_dir} disagree on their quantization ({found})")
    scheme = found.pop() if found else None
    if scheme is not None and scheme not in SCHEMES:
        raise CheckpointError(f"{model_dir} is quantized as '{scheme}', which this minibatch does not know "
                              f"(it knows {', '.join(SCHEMES)})")
    if method == "minibatch" and declared.get("scheme") != scheme:
        raise CheckpointError(f"{config_path} declares {declared.get('scheme')} weights but the safetensors "
                              f"metadata says {scheme}: the checkpoint is corrupt; re-quantize it")
    return scheme


def load_weights(model_dir: str | Path, config: ModelConfig) -> ModelWeights:
    """Load a Hugging Face Llama-family checkpoint as float32 :class:`ModelWeights`.

    A checkpoint written by minibatch with quantized projections (see :func:`save_model`)
    loads its projections as :class:`~minibatch.quant.QuantizedWeight` and everything
    else as float32. Raises :class:`CheckpointError` naming the tensor and file when a
    tensor (or a part of a quantized one) is missing, unexpected, or has the wrong shape,
    and when quantization scales are impossible (a corrupt file).
    """
    from minibatch.model import LayerWeights, ModelWeights

    tensors = read_checkpoint(model_dir)
    scheme = stored_quantization(model_dir)
    expected = expected_shapes(config)
    quantized = {layer_tensor_name(layer, name) for layer in range(config.num_layers) for name in PROJECTIONS
                 } if scheme else set()
    expected_names = set(expected) - quantized
    for name in quantized:
        expected_names |= {quantized_part_name(name, part) for part in _layout(scheme, name, expected[name])}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints still store a copy
    for name in [n for n in tensors if n.endswith(_IGNORED_SUFFIXES)]:
        del tensors[name]
    unexpected = sorted(set(tensors) - expected_names)
    if unexpected:
        _, _, path = tensors[unexpected[0]]
        raise CheckpointError(f"unexpected tensor '{unexpected[0]}' in {path} "
                              f"({len(unexpected)} unexpected in all): does config.json match these weights?")

    def stored(name: str, shape: tuple[int, ...]) -> tuple[str, np.ndarray, Path]:
        if name not in tensors:
            raise CheckpointError(f"tensor '{name}' is missing from the checkpoint in {model_dir}")
        dtype_name, array, path = tensors[name]
        if tuple(array.shape) != shape:
            raise CheckpointError(f"tensor '{name}' in {path} has shape {list(array.shape)}, "
                                  f"config.json implies {list(shape)}")
        return dtype_name, array, path

    def get(name: str) -> np.ndarray | QuantizedWeight:
        if name in quantized:
            return _load_quantized(scheme, name, expected[name], stored)
        dtype_name, array, _ = stored(name, expected[name])
        return to_float32(dtype_name, array)

    layers = []
    for layer in range(config.num_layers):
        fields = {f: get(layer_tensor_name(layer, f)) for f in _LAYER_TENSORS
                  if f not in _BIASES or config.attention_bias}
        layers.append(LayerWeights(**fields))
    embed = get("model.embed_tokens.weight")
    lm_head = embed if config.tie_word_embeddings else get("lm_head.weight")
    return ModelWeights(embed_tokens=embed, layers=layers, final_norm=get("model.norm.weight"), lm_head=lm_head)


def _layout(scheme: str, name: str, shape: tuple[int, ...]) -> dict[str, tuple[tuple, np.dtype]]:
    try:
        return stored_layout(scheme, shape, name)
    except ValueError as error:
        raise CheckpointError(f"this {scheme} checkpoint cannot hold '{name}': {error}") from None


def _load_quantized(scheme: str, name: str, shape: tuple[int, ...],
                    stored: Callable[[str, tuple], tuple[str, np.ndarray, Path]]) -> QuantizedWeight:
    """Assemble one quantized weight from its stored parts, checking each part's shape and dtype."""
    parts = {}
    for part, (part_shape, dtype) in _layout(scheme, name, shape).items():
        dtype_name, array, path = stored(quantized_part_name(name, part), part_shape)
        if array.dtype != dtype:
            raise CheckpointError(f"tensor '{quantized_part_name(name, part)}' in {path} is {dtype_name}; "
                                  f"{scheme} stores its {part} as {dtype}: the checkpoint is corrupt; re-quantize it")
        parts[part] = array
    weight = QuantizedWeight(scheme, shape, **parts, group_size=group_size_of(scheme, shape[1]))
    try:
        check_quantized(weight, name)
    except ValueError as error:
        raise CheckpointError(f"{error} (in {path})") from None
    return weight


def weights_to_tensors(weights: ModelWeights, tie_word_embeddings: bool) -> dict[str, np.ndarray]:
    """Flatten :class:`ModelWeights` into Hugging Face tensor names; a quantized weight
    becomes its parts (see :func:`quantized_part_name`)."""
    tensors = {"model.embed_tokens.weight": weights.embed_tokens}
    for layer, w in enumerate(weights.layers):
        for field_name in _LAYER_TENSORS:
            tensor = getattr(w, field_name)
            if tensor is not None:
                tensors[layer_tensor_name(layer, field_name)] = tensor
    tensors["model.norm.weight"] = weights.final_norm
    if not tie_word_embeddings:
        tensors["lm_head.weight"] = weights.lm_head
    flat: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        if isinstance(tensor, QuantizedWeight):
            flat.update({quantized_part_name(name, part): array for part, array in tensor.parts().items()})
        else:
            flat[name] = tensor
    return flat


def save_model(model_dir: str | Path, raw_config: Mapping[str, object], weights: ModelWeights,
               dtype: str = "float32", metadata: Mapping[str, str] | None = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` (float32, float16 or bfloat16).

    Quantized projections (:func:`~minibatch.quant.quantize_model`) are stored as their
    integer and float32 parts, whatever ``dtype`` says for the float tensors; the file's
    metadata then says ``{"format": "minibatch-quant-v1", "quantization": scheme}`` and
    config.json gets ``"quantization_config": {"quant_method": "minibatch", "scheme": ...}``.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    config = dict(raw_config)
    config["torch_dtype"] = dtype
    scheme = quantization_of(weights)
    config.pop("quantization_config", None)
    file_metadata = {"format": "pt", **(metadata or {})}
    if scheme is not None:
        config["quantization_config"] = {"quant_method": "minibatch", "scheme": scheme}
        file_metadata.update(format=QUANTIZED_FORMAT, quantization=scheme)
    tensors = weights_to_tensors(weights, bool(config.get("tie_word_embeddings", False)))
    floats = {name for name in tensors if not name.endswith(QUANTIZED_PARTS)}
    if dtype == "bfloat16":
        tensors = {name: f32_to_bf16(np.asarray(t)) if name in floats else t for name, t in tensors.items()}
    elif dtype in ("float32", "float16"):
        tensors = {name: np.asarray(t, dtype=dtype) if name in floats else t for name, t in tensors.items()}
    else:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    bf16 = frozenset(floats) if dtype == "bfloat16" else frozenset()
    write_safetensors(model_dir / SINGLE_FILE, tensors, file_metadata, bf16=bf16)
