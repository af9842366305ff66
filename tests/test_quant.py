"""Weight quantization: the formats and their error bounds, ggml byte-exactness (against
llama.cpp's own ``gguf`` package), the quantized model, quantized checkpoints, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minibatch import LLM, SamplingParams
from minibatch.checkpoint import (
    CheckpointError,
    load_weights,
    read_safetensors,
    read_safetensors_metadata,
    save_model,
    write_safetensors,
)
from minibatch.config import ModelConfig
from minibatch.layers import linear
from minibatch.model import ModelRunner
from minibatch.quant import (
    PROJECTIONS,
    SCHEMES,
    QuantizedWeight,
    check_quantized,
    concatenate_rows,
    dequantize,
    ggml_block_scales,
    pack_int4,
    quantization_of,
    quantize,
    quantize_model,
    quantized_matmul,
    round_half_away_from_zero,
    unpack_int4,
)
from tests.helpers import FIXTURES, relative_error
from tests.test_cli import assert_one_line_error, run_cli

try:
    from gguf import GGMLQuantizationType
    from gguf import quants as gguf_quants
except ImportError:  # the 'test' extra installs it
    gguf_quants = None
needs_gguf = pytest.mark.skipif(gguf_quants is None, reason="needs llama.cpp's gguf package: pip install gguf")

FIXTURE = FIXTURES / "llama_gqa"  # inputs of 64 and 128: every scheme but int4-g128 fits
FITTING_SCHEMES = [s for s in SCHEMES if s != "int4-g128"]

# ------------------------------------------------------------------ strategies

MAGNITUDES = [1e-6, 1e-3, 0.02, 1.0, 30.0, 6e4]  # every value stays inside float16's range
SPECIAL_ROWS = ["zeros", "constant", "negative constant", "positive only", "q8_0 ties", "int4 ties", "outlier"]


def special_row(kind: str, cols: int, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Rows that exercise the edge cases: all-zero and constant groups, one-signed groups,
    exact rounding ties (halves on a step of 1) and one outlier beside small values."""
    if kind == "zeros":
        return np.zeros(cols, np.float32)
    if kind in ("constant", "negative constant"):
        return np.full(cols, 0.37 * magnitude * (-1 if kind.startswith("negative") else 1), np.float32)
    if kind == "positive only":
        return (magnitude * (1 + rng.uniform(0, 0.5, cols))).astype(np.float32)
    if kind == "q8_0 ties":  # max |w| = 127 -> d = 1: halves are ties, which ggml rounds away from zero
        row = rng.integers(-254, 255, cols) / 2
        row[::32] = 127
        return row.astype(np.float32)
    if kind == "int4 ties":  # range [-7.5, 7.5] -> scale 1, zero 8: halves are ties, 7.5 clips q at 15
        row = rng.integers(-15, 16, cols) / 2
        row[:2] = -7.5, 7.5
        return row.astype(np.float32)
    row = (rng.standard_normal(cols) * magnitude * 1e-3).astype(np.float32)
    row[rng.integers(cols)] = min(magnitude * 1e3, 6e4)
    return row


@st.composite
def weight_matrices(draw, multiple_of: int = 32) -> np.ndarray:
    rows = draw(st.integers(1, 6))
    cols = multiple_of * draw(st.integers(1, 4))
    magnitude = draw(st.sampled_from(MAGNITUDES))
    unit = draw(hnp.arrays(np.float32, (rows, cols), elements=st.floats(-1, 1, width=32)))
    weight = unit * np.float32(magnitude)
    weight[np.abs(weight) < 2.0**-24] = 0  # below float16's smallest subnormal: float16 has no such values
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    for row, kind in draw(st.lists(st.tuples(st.integers(0, rows - 1), st.sampled_from(SPECIAL_ROWS)), max_size=3)):
        weight[row] = special_row(kind, cols, magnitude, rng)
    return weight


def assert_equal_up_to_summation_order(actual: np.ndarray, expected: np.ndarray, x: np.ndarray,
                                       weight: np.ndarray) -> None:
    """Two float32 computations of ``x @ weight.T`` that add in different orders differ by at
    most about (number of terms) * 2^-24 of the sum of the magnitudes they add."""
    magnitudes = np.abs(x).astype(np.float64) @ np.abs(weight).T.astype(np.float64)  # [N, out]
    assert actual.shape == expected.shape
    assert np.all(np.abs(actual - expected) <= (x.shape[-1] + 8) * 2.0**-23 * magnitudes + 1e-30)


def float_slack(weight: np.ndarray, step: np.ndarray) -> np.ndarray:
    """What float32 arithmetic adds to an exact bound: ``w / scale`` and ``q * scale``
    are each rounded once (and a subnormal scale rounds in absolute terms)."""
    return step * 1e-5 + np.abs(weight) * 2.0**-22 + 1e-44


# ----------------------------------------------------------------- the formats


def test_unknown_scheme_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'") as error:
        quantize(np.ones((4, 32), np.float32), "int3")
    assert all(scheme in str(error.value) for scheme in SCHEMES)


def test_a_group_size_that_does_not_divide_the_input_names_the_tensor():
    with pytest.raises(ValueError) as error:
        quantize(np.ones((4, 48), np.float32), "int4-g32", name="blk.0.down")
    message = str(error.value)
    assert "blk.0.down" in message and "[4, 48]" in message and "int8" in message


def test_non_finite_weights_are_refused():
    weight = np.ones((2, 32), np.float32)
    weight[1, 3] = np.nan
    with pytest.raises(ValueError, match="'w'.*NaN"):
        quantize(weight, "int8", name="w")


@given(hnp.arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 8).map(lambda n: 2 * n)),
                  elements=st.integers(0, 15)))
def test_int4_packing_round_trips(q):
    packed = pack_int4(q)
    assert packed.shape == (q.shape[0], q.shape[1] // 2)
    np.testing.assert_array_equal(unpack_int4(packed), q)


def test_int4_nibble_order_even_input_low():
    assert pack_int4(np.array([[1, 2, 3, 4]])).tolist() == [[0x21, 0x43]]


def test_q8_0_block_is_float16_scale_then_32_int8():
    row = np.arange(-16, 16, dtype=np.float32)
    row[0] = -127  # max |w| = 127 -> d = 1.0, q = w
    raw = quantize(row[None, :], "q8_0").qweight[0]
    assert raw.shape == (34,) and raw[:2].tolist() == [0x00, 0x3C]  # float16 1.0, little-endian
    np.testing.assert_array_equal(raw[2:].view(np.int8), row.astype(np.int8))


def test_q4_0_nibble_order_element_j_low_element_j_plus_16_high():
    first, second = np.arange(16) - 8.0, 7.0 - np.arange(16)  # q = j and q = 15 - j, with d = -8 / -8 = 1
    raw = quantize(np.concatenate([first, second])[None, :].astype(np.float32), "q4_0").qweight[0]
    assert raw[:2].tolist() == [0x00, 0x3C]
    assert raw[2:].tolist() == [j | (15 - j) << 4 for j in range(16)]


def test_round_half_away_from_zero_is_c_roundf():
    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 2.4999998], np.float32)
    assert round_half_away_from_zero(x).tolist() == [1, 2, 3, -1, -3, 0, 2]


@pytest.mark.parametrize(("scheme", "bits"), [("q4_0", 4.5), ("q8_0", 8.5), ("int4-g32", 5.25),
                                              ("int4-g64", 4.625), ("int4-g128", 4.3125), ("int8", 8.125)])
def test_bits_per_weight_as_stored(scheme, bits):
    q = quantize(np.ones((8, 256), np.float32), scheme)
    assert q.bits_per_weight == bits  # int8: 8 + 32 bits of scale per 256 inputs


def test_a_weight_checks_its_own_layout_and_moves_keeping_dtypes():
    q = quantize(np.ones((4, 64), np.float32), "int4-g32")
    with pytest.raises(ValueError, match="scales must be"):
        QuantizedWeight("int4-g32", (4, 64), q.qweight, q.scales.astype(np.float64), q.zeros, group_size=32)
    moved = q.map_arrays(np.array)
    assert moved is not q and moved.qweight is not q.qweight
    assert {name: a.dtype for name, a in moved.parts().items()} == {name: a.dtype for name, a in q.parts().items()}
    assert moved.nbytes == q.nbytes == 4 * 32 + 4 * 2 * 4 + 4 * 2


@pytest.mark.parametrize("scheme", SCHEMES)
def test_stacking_output_rows_stacks_the_dequantized_weights(scheme):
    """How q/k/v and gate/up are fused: every scale, zero point and ggml block belongs to
    one output row, so stacking the stored arrays stacks the weights they stand for."""
    rng = np.random.default_rng(0)
    weights = [quantize(rng.standard_normal((rows, 128)).astype(np.float32), scheme) for rows in (6, 2, 3)]
    stacked = concatenate_rows(weights)
    assert stacked.scheme == scheme and stacked.shape == (11, 128) and stacked.group_size == weights[0].group_size
    assert stacked.nbytes == sum(w.nbytes for w in weights)
    np.testing.assert_array_equal(dequantize(stacked), np.concatenate([dequantize(w) for w in weights]))


def test_only_weights_of_one_kind_stack():
    floats = [np.ones((2, 64), np.float32), np.zeros((3, 64), np.float32)]
    np.testing.assert_array_equal(concatenate_rows(floats), np.concatenate(floats))
    int8, q4_0 = quantize(floats[0], "int8"), quantize(floats[0], "q4_0")
    for mixed in ([int8, floats[1]], [floats[1], int8], [int8, q4_0], [int8, quantize(np.ones((2, 32)), "int8")]):
        with pytest.raises(ValueError, match="one scheme"):
            concatenate_rows(mixed)


# ------------------------------------------------------- error bounds (properties)


@given(weight_matrices(multiple_of=8))
def test_int8_is_within_half_a_step_of_every_weight(weight):
    q = quantize(weight, "int8")
    step = q.scales[:, None]  # [out, 1]
    assert np.all(np.abs(weight - dequantize(q)) <= step / 2 + float_slack(weight, step))
    zero_rows = ~weight.any(axis=1)
    np.testing.assert_array_equal(q.scales[zero_rows], 1)


@pytest.mark.parametrize("group", [32, 64, 128])
@given(data=st.data())
def test_int4_is_within_half_a_step_of_every_weight(group, data):
    """Each group's range is widened to include 0, so the zero point never clips; a value
    that lands on a tie at the top may have q clipped to 15, which costs exactly half a step."""
    weight = data.draw(weight_matrices(multiple_of=group))
    q = quantize(weight, f"int4-g{group}")
    step = np.repeat(q.scales, group, axis=1)  # [out, in]
    assert np.all(np.abs(weight - dequantize(q)) <= step / 2 + float_slack(weight, step))
    assert q.zeros.max() <= 15


def test_int4_clipping_at_the_top_costs_exactly_half_a_step():
    """Range [-7.5, 7.5]: scale 1 and zero = round(7.5) = 8 (ties to even). 7.5 would need
    q = round(7.5) + 8 = 16 and is clipped to 15, coming back as 7.0; -7.5 rounds to -8.
    Either way the error is exactly half a step, never more."""
    weight = np.tile(np.array([-7.5, 7.5, 0.5, -0.5], np.float32), 8)[None, :]
    q = quantize(weight, "int4-g32")
    assert q.scales.tolist() == [[1.0]] and q.zeros.tolist() == [[8]]
    assert dequantize(q)[0, :4].tolist() == [-8.0, 7.0, 0.0, 0.0]


def test_constant_and_all_zero_groups_come_back():
    weight = np.zeros((3, 64), np.float32)
    weight[0], weight[1, :32] = 0.0123, -4.5
    back = dequantize(quantize(weight, "int4-g32"))
    np.testing.assert_allclose(back, weight, rtol=1e-6)
    np.testing.assert_array_equal(back[2], 0)


@needs_gguf
@pytest.mark.parametrize("scheme", ["q8_0", "q4_0"])
@given(weight=weight_matrices())
def test_ggml_blocks_are_byte_exact_with_llama_cpp(scheme, weight):
    ggml_type = GGMLQuantizationType.Q8_0 if scheme == "q8_0" else GGMLQuantizationType.Q4_0
    q = quantize(weight, scheme)
    expected = gguf_quants.quantize(weight, ggml_type)
    np.testing.assert_array_equal(q.qweight, expected)
    np.testing.assert_array_equal(dequantize(q), gguf_quants.dequantize(expected, ggml_type))


@pytest.mark.parametrize("scheme", SCHEMES)
@given(data=st.data())
def test_quantized_matmul_is_x_times_the_dequantized_weight(scheme, data):
    weight = data.draw(weight_matrices(multiple_of=128))
    x = data.draw(hnp.arrays(np.float32, (data.draw(st.integers(1, 5)), weight.shape[1]),
                             elements=st.floats(-4, 4, width=32)))
    q = quantize(weight, scheme)
    actual = quantized_matmul(x, q)
    assert actual.dtype == np.float32
    assert_equal_up_to_summation_order(actual, x.astype(np.float64) @ dequantize(q).T, x, dequantize(q))
    bias = np.arange(weight.shape[0], dtype=np.float32)
    np.testing.assert_array_equal(linear(x, q, bias), actual + bias)


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "q4_0"])
def test_a_rows_product_ignores_its_batch_mates(scheme):
    """No scale comes from activations, so a huge batch-mate cannot move another row's
    result (dynamic activation quantization would: Architectural Backdoors)."""
    rng = np.random.default_rng(0)
    q = quantize(rng.standard_normal((16, 64)).astype(np.float32), scheme)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    batch = np.concatenate([x, 1e4 * rng.standard_normal((3, 64)).astype(np.float32)])
    assert_equal_up_to_summation_order(quantized_matmul(batch, q)[:1], quantized_matmul(x, q), x, dequantize(q))


@pytest.mark.parametrize("scheme", ["q8_0", "q4_0"])
def test_a_block_of_float32_dust_stores_zeros(scheme):
    """Weights so small that ``1 / d`` overflows: ggml's integer cast of ``w * inf`` is
    undefined; here the block stores ``d = 0`` and ``q`` = 0 (Q4_0: the nibble 8)."""
    weight = np.full((1, 32), 1e-40, np.float32)
    q = quantize(weight, scheme)
    assert ggml_block_scales(q).tolist() == [[0.0]]
    assert set(q.qweight[0, 2:].tolist()) == ({0} if scheme == "q8_0" else {0x88})
    np.testing.assert_array_equal(dequantize(q), 0)


def test_impossible_scales_are_reported_as_a_corrupt_checkpoint():
    q = quantize(np.ones((2, 64), np.float32), "int4-g32")
    for bad in (np.nan, np.inf, -1.0, 0.0):
        scales = q.scales.copy()
        scales[1, 0] = bad
        with pytest.raises(ValueError, match="'layer.w'.*corrupt.*re-quantize"):
            check_quantized(QuantizedWeight(q.scheme, q.shape, q.qweight, scales, q.zeros, group_size=32), "layer.w")
    blocks = quantize(np.ones((2, 64), np.float32), "q8_0").qweight.copy()
    blocks[0, 34:36] = np.array([np.inf], "<f2").view(np.uint8)  # the second block's d
    corrupt = QuantizedWeight("q8_0", (2, 64), blocks, group_size=32)
    assert np.isinf(ggml_block_scales(corrupt)[0, 1])
    with pytest.raises(ValueError, match="corrupt"):
        check_quantized(corrupt, "w")


# ------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def float_weights():
    config = ModelConfig.from_dir(FIXTURE)
    return config, load_weights(FIXTURE, config)


def test_quantize_model_quantizes_only_the_projections(float_weights):
    config, weights = float_weights
    quantized = quantize_model(weights, "q4_0")
    assert quantization_of(quantized) == "q4_0" and quantization_of(weights) is None
    for layer, original in zip(quantized.layers, weights.layers, strict=True):
        assert all(isinstance(getattr(layer, name), QuantizedWeight) for name in PROJECTIONS)
        assert layer.input_norm is original.input_norm and layer.post_attention_norm is original.post_attention_norm
    assert quantized.embed_tokens is weights.embed_tokens and quantized.lm_head is weights.lm_head
    runner = ModelRunner(config, quantized)
    assert runner.weights.layers[0].qkv_proj.qweight.dtype == np.uint8  # moved as stored, not upcast
    assert runner.weights.num_bytes == quantized.num_bytes < weights.num_bytes
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(quantized, "int8")


def test_tied_lm_head_stays_the_embedding():
    config = ModelConfig.from_dir(FIXTURES / "llama_tied_bf16")
    quantized = quantize_model(load_weights(FIXTURES / "llama_tied_bf16", config), "int8")
    assert quantized.lm_head is quantized.embed_tokens


def test_quantize_model_names_the_first_projection_that_does_not_fit(float_weights):
    _, weights = float_weights
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*\[64, 64\]"):
        quantize_model(weights, "int4-g128")


# Relative error of the logits against the float model, measured on llama_gqa (random
# weights, std 0.02): int8 0.022, q8_0 0.022, int4-g32 0.27, int4-g64 0.34, q4_0 0.33. The
# weights themselves come back within 0.6% (8-bit) and 8-9% (4-bit); the random network
# amplifies that about 4x. Bounds: about 2x the measurement.
LOGITS_RELATIVE_ERROR = {"int8": 0.05, "q8_0": 0.05, "int4-g32": 0.5, "int4-g64": 0.6, "q4_0": 0.6}


@pytest.fixture(scope="module")
def golden():
    return np.load(FIXTURE / "golden.npz")


@pytest.mark.parametrize("scheme", FITTING_SCHEMES)
def test_quantized_logits_are_close_to_float(scheme, golden):
    llm = LLM(FIXTURE, quantization=scheme)
    assert llm.engine.quantization == scheme
    offsets = np.concatenate([[0], np.cumsum(golden["seq_lens"])])
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        ids = golden["input_ids"][start:end].tolist()
        assert relative_error(llm.logits(ids), golden["logits"][start:end]) < LOGITS_RELATIVE_ERROR[scheme]


@pytest.mark.parametrize("scheme", FITTING_SCHEMES)
def test_a_quantized_request_does_not_depend_on_its_batch_mates(scheme):
    llm = LLM(FIXTURE, quantization=scheme)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = llm.generate("import os", greedy)[0]
    batched = llm.generate(["x = 1", "import os", "class A:\n    pass", "y"], greedy)
    assert batched[1].token_ids == alone.token_ids


def test_an_unknown_scheme_fails_before_loading():
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        LLM(FIXTURE, quantization="fp4")


# ------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module", params=FITTING_SCHEMES)
def saved(request, tmp_path_factory, float_weights):
    config, weights = float_weights
    quantized = quantize_model(weights, request.param)
    directory = tmp_path_factory.mktemp(request.param)
    save_model(directory, json.loads((FIXTURE / "config.json").read_text()), quantized)
    return request.param, config, quantized, directory


def test_save_then_load_is_bit_exact(saved):
    scheme, config, quantized, directory = saved
    assert read_safetensors_metadata(directory / "model.safetensors") == \
        {"format": "minibatch-quant-v1", "quantization": scheme}
    assert json.loads((directory / "config.json").read_text())["quantization_config"] == \
        {"quant_method": "minibatch", "scheme": scheme}
    assert "model.layers.0.self_attn.q_proj.qweight" in read_safetensors(directory / "model.safetensors")
    loaded = load_weights(directory, config)
    for layer, original in zip(loaded.layers, quantized.layers, strict=True):
        for name in PROJECTIONS:
            back, before = getattr(layer, name), getattr(original, name)
            assert back.scheme == scheme and back.shape == before.shape
            for part, array in before.parts().items():
                assert back.parts()[part].dtype == array.dtype
                np.testing.assert_array_equal(back.parts()[part], array)
        np.testing.assert_array_equal(layer.input_norm, original.input_norm)
    np.testing.assert_array_equal(loaded.lm_head, quantized.lm_head)


def test_a_quantized_directory_loads_as_is_and_refuses_a_second_quantization(saved):
    scheme, _, _, directory = saved
    ids = list(range(3, 15))
    np.testing.assert_array_equal(LLM(directory).logits(ids), LLM(FIXTURE, quantization=scheme).logits(ids))
    with pytest.raises(ValueError, match="already quantized"):
        LLM(directory, quantization="int8")


def rewrite_copy(source, target, edit):
    """Copy a checkpoint directory, passing its tensors through ``edit(dict) -> dict``."""
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    path = source / "model.safetensors"
    tensors = {name: np.array(array) for name, (_, array) in read_safetensors(path).items()}
    write_safetensors(target / "model.safetensors", edit(tensors), read_safetensors_metadata(path))
    return target


def test_broken_quantized_checkpoints_name_the_tensor(tmp_path, float_weights):
    config, weights = float_weights
    source = tmp_path / "int4"
    save_model(source, json.loads((FIXTURE / "config.json").read_text()), quantize_model(weights, "int4-g32"))
    name = "model.layers.1.mlp.down_proj"

    def without(tensors):
        del tensors[f"{name}.zeros"]
        return tensors

    def reshaped(tensors):
        tensors[f"{name}.scales"] = tensors[f"{name}.scales"][:, :2]
        return tensors

    def nan_scale(tensors):
        tensors[f"{name}.scales"][0, 0] = np.nan
        return tensors

    for edit, message in [(without, f"'{name}.zeros' is missing"), (reshaped, f"'{name}.scales'.*shape"),
                          (nan_scale, f"{name}.*corrupt")]:
        broken = rewrite_copy(source, tmp_path / edit.__name__, edit)
        with pytest.raises(CheckpointError, match=message):
            load_weights(broken, config)


def test_another_tools_quantization_is_refused_plainly(tmp_path):
    raw = json.loads((FIXTURE / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").write_bytes((FIXTURE / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="'gptq'"):
        load_weights(tmp_path, ModelConfig.from_dir(tmp_path))


# ------------------------------------------------------------------------ CLI


def test_cli_quantize_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "q4"
    result = run_cli("quantize", "--scheme", "q4_0", str(FIXTURE), str(out))
    assert result.returncode == 0, result.stderr
    assert "294,912 -> 41,472 bytes" in result.stdout and "32 -> 4.5 bits per weight" in result.stdout
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "generation_config.json"}
    info = run_cli("info", "--model", str(out))
    assert info.returncode == 0, info.stderr
    assert "q4_0: projections at 4.5 bits per weight" in info.stdout


@pytest.mark.parametrize(("scheme", "fragment"), [("int3", "unknown quantization scheme"),
                                                  ("int4-g128", "not a multiple of the group size 128")])
def test_cli_quantize_errors_leave_nothing_behind(tmp_path, scheme, fragment):
    result = run_cli("quantize", "--scheme", scheme, str(FIXTURE), str(tmp_path / "out"))
    assert_one_line_error(result, fragment)
    assert list(tmp_path.iterdir()) == []


def test_cli_quantize_will_not_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    assert_one_line_error(run_cli("quantize", "--scheme", "int8", str(FIXTURE), str(tmp_path)), "not an empty")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
