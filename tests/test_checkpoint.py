"""Safetensors reading/writing and checkpoint loading, including every error path."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minibatch.checkpoint import (
    CheckpointError,
    bf16_to_f32,
    f32_to_bf16,
    load_weights,
    read_safetensors,
    read_safetensors_metadata,
    write_safetensors,
)
from minibatch.config import ModelConfig
from tests.helpers import FIXTURES, write_tiny_model

DTYPES = [np.float32, np.float16, np.float64, np.int8, np.int32, np.int64, np.uint8]


@given(st.lists(st.tuples(st.sampled_from(DTYPES), hnp.array_shapes(min_dims=0, max_dims=3, max_side=5)),
                min_size=1, max_size=4), st.data())
def test_safetensors_round_trip(tmp_path_factory, specs, data):
    tensors = {f"t{i}": data.draw(hnp.arrays(dtype, shape)) for i, (dtype, shape) in enumerate(specs)}
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    write_safetensors(path, tensors, metadata={"scheme": "test"})
    back = read_safetensors(path)
    assert set(back) == set(tensors)
    for name, array in tensors.items():
        np.testing.assert_array_equal(back[name][1], array)
        assert back[name][1].dtype == array.dtype
    assert read_safetensors_metadata(path) == {"scheme": "test"}


def test_bf16_is_the_top_half_of_float32():
    values = np.array([1.0, -2.0, 0.5, 3.140625, 0.0], dtype=np.float32)
    bits = f32_to_bf16(values)
    assert bits.tolist() == [0x3F80, 0xC000, 0x3F00, 0x4049, 0x0000]
    np.testing.assert_array_equal(bf16_to_f32(bits), values)  # all exactly representable


@given(hnp.arrays(np.float32, 16, elements=st.floats(-(2.0**100), 2.0**100, width=32)))
def test_bf16_rounding_is_to_nearest(values):
    rounded = bf16_to_f32(f32_to_bf16(values))
    # bf16 keeps 8 significant bits: relative error at most 2**-9
    assert np.all(np.abs(rounded - values) <= np.abs(values) * 2.0**-8 + 1e-38)


def test_bf16_checkpoint_is_upcast_to_float32():
    config = ModelConfig.from_dir(FIXTURES / "llama_tied_bf16")
    weights = load_weights(FIXTURES / "llama_tied_bf16", config)
    assert weights.embed_tokens.dtype == np.float32
    assert weights.lm_head is weights.embed_tokens  # tied: one tensor


def test_sharded_checkpoint_loads():
    assert (FIXTURES / "qwen2_bias" / "model.safetensors.index.json").is_file()
    config = ModelConfig.from_dir(FIXTURES / "qwen2_bias")
    weights = load_weights(FIXTURES / "qwen2_bias", config)
    assert weights.layers[0].q_bias is not None


@pytest.fixture
def model_dir(tmp_path):
    return write_tiny_model(tmp_path / "model")


def rewrite(model_dir, edit):
    """Rewrite the checkpoint's tensors through ``edit(dict) -> dict``."""
    path = model_dir / "model.safetensors"
    tensors = {name: np.array(array) for name, (_, array) in read_safetensors(path).items()}
    write_safetensors(path, edit(tensors))


def test_missing_tensor_is_named(model_dir):
    rewrite(model_dir, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_weights(model_dir, ModelConfig.from_dir(model_dir))


def test_misshaped_tensor_is_named_with_its_file(model_dir):
    def shrink(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1]
        return tensors

    rewrite(model_dir, shrink)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*model\.safetensors.*shape"):
        load_weights(model_dir, ModelConfig.from_dir(model_dir))


def test_unexpected_tensor_is_named(model_dir):
    rewrite(model_dir, lambda t: {**t, "model.layers.0.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.extra.weight'"):
        load_weights(model_dir, ModelConfig.from_dir(model_dir))


def test_truncated_file_is_reported(model_dir):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_weights(model_dir, ModelConfig.from_dir(model_dir))


def test_truncated_file_says_how_much_is_there(model_dir):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"ends at byte (\d+) of the data but the file holds only \d+ bytes"):
        load_weights(model_dir, ModelConfig.from_dir(model_dir))


@pytest.mark.parametrize(("header", "message"), [
    ([1, 2, 3], "header is a JSON list"),
    ({"x": {"dtype": "F32", "shape": [2]}}, "'x' has a malformed header entry"),
    ({"x": "F32"}, "'x' has a malformed header entry"),
    ({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [8, 0]}}, "'x' claims shape"),
])
def test_malformed_header_entries_are_reported(tmp_path, header, message):
    path = tmp_path / "x.safetensors"
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(8))
    with pytest.raises(CheckpointError, match=message):
        read_safetensors(path)


def test_index_that_is_not_json_is_named(tmp_path):
    shutil.copytree(FIXTURES / "qwen2_bias", tmp_path / "q")
    (tmp_path / "q" / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json is not a valid index"):
        load_weights(tmp_path / "q", ModelConfig.from_dir(tmp_path / "q"))


def test_garbage_header_is_reported(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_weights(model_dir, ModelConfig.from_dir(model_dir))


def test_no_weights_at_all(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        load_weights(model_dir, ModelConfig.from_dir(model_dir))


def test_index_naming_a_missing_shard(tmp_path):
    shutil.copytree(FIXTURES / "qwen2_bias", tmp_path / "q")
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    first_shard = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "q" / first_shard).unlink()
    with pytest.raises(CheckpointError, match=first_shard):
        load_weights(tmp_path / "q", ModelConfig.from_dir(tmp_path / "q"))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_save_and_reload(tmp_path, model_dir, dtype):
    from minibatch.checkpoint import save_model

    config = ModelConfig.from_dir(model_dir)
    weights = load_weights(model_dir, config)
    raw = json.loads((model_dir / "config.json").read_text())
    save_model(tmp_path / dtype, raw, weights, dtype=dtype)
    again = load_weights(tmp_path / dtype, ModelConfig.from_dir(tmp_path / dtype))
    tolerance = {"float32": 0, "float16": 1e-3, "bfloat16": 1e-2}[dtype]
    np.testing.assert_allclose(again.layers[1].down_proj, weights.layers[1].down_proj, rtol=tolerance, atol=1e-6)
