"""The GPU quantized matmul equals its NumPy twin, ``minibatch.quant.quantized_matmul``,
for every scheme and for both of its kernels (GEMV for decode-sized N, tiled above).

Runs in Numba's CUDA simulator unless ``MINIBATCH_GPU_TESTS=device`` (see tests/conftest.py);
the simulator runs one Python thread per CUDA thread, so shapes stay tiny.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda

from minibatch import quant as numpy_quant
from minibatch_gpu import layers as gpu_layers
from minibatch_gpu import quant as gpu_quant
from minibatch_gpu.device import blocks_for, gpu_available, threads_per_block, to_device, to_host

pytestmark = pytest.mark.gpu

TOLERANCE = 1e-5  # the same float32 weights on both sides: only the order of the additions differs
needs_device = pytest.mark.skipif(not gpu_available(), reason="needs a real CUDA GPU (MINIBATCH_GPU_TESTS=device)")

# half the profile's examples for each of the 12 (scheme, kernel) cases: ~0.1 s each in the simulator
EXAMPLES_PER_CASE = max(2, settings.default.max_examples // 2)
seeds = st.integers(0, 2**32 - 1)
tokens_for_kernel = {"gemv": st.integers(1, gpu_quant.GEMV_MAX_TOKENS),
                     "tiled": st.integers(gpu_quant.GEMV_MAX_TOKENS + 1, gpu_quant.GEMV_MAX_TOKENS + 2)}


def random_weight(rng: np.random.Generator, out_features: int, in_features: int, magnitude: float,
                  zero_row_fraction: float) -> np.ndarray:
    """Normal weights of a given magnitude with some all-zero output channels; 1e-6 gives
    ggml scales that are float16 subnormals (or round to 0)."""
    weight = (rng.standard_normal((out_features, in_features)) * magnitude).astype(np.float32)
    weight[rng.random(out_features) < zero_row_fraction] = 0
    return weight


def assert_close(gpu_result, numpy_result: np.ndarray, x: np.ndarray, q: numpy_quant.QuantizedWeight) -> None:
    """Equal up to float32 rounding in a different order of additions.

    The error is measured against the size of the products being added, ``|x| @ |w|.T``,
    rather than against the result: where a dot product cancels to nearly zero, a
    reordered sum differs from it by far more than 1e-5 of itself, yet not of its terms.
    Without cancellation the two yardsticks are the same size.
    """
    gpu_result = to_host(gpu_result)
    assert gpu_result.shape == numpy_result.shape and gpu_result.dtype == np.float32
    magnitude = np.abs(x) @ np.abs(numpy_quant.dequantize(q)).T  # [..., out]
    if not np.any(magnitude):
        np.testing.assert_array_equal(gpu_result, numpy_result)
    else:
        error = np.linalg.norm(gpu_result.astype(np.float64) - numpy_result) / np.linalg.norm(magnitude)
        assert error < TOLERANCE


# ------------------------------------------------------------------ the twin test


@pytest.mark.parametrize("kernel", ["gemv", "tiled"])
@pytest.mark.parametrize("scheme", numpy_quant.SCHEMES)
@settings(max_examples=EXAMPLES_PER_CASE)
@given(st.data(), st.integers(1, 12), st.sampled_from([1e-6, 1e-2, 1.0, 300.0]), st.sampled_from([0, 0.3, 1]),
       st.booleans(), seeds)
def test_quantized_matmul_matches_numpy(scheme, kernel, data, out_features, magnitude, zero_row_fraction,
                                        weights_on_device, seed):
    sizes = [n for n in (64, 128) if n % numpy_quant.group_size_of(scheme, n) == 0]
    in_features = data.draw(st.sampled_from(sizes), label="in_features")
    num_tokens = data.draw(tokens_for_kernel[kernel], label="num_tokens")
    rng = np.random.default_rng(seed)
    q = numpy_quant.quantize(random_weight(rng, out_features, in_features, magnitude, zero_row_fraction), scheme)
    x = rng.standard_normal((num_tokens, in_features)).astype(np.float32)
    expected = numpy_quant.quantized_matmul(x, q)
    gpu_q = q.map_arrays(to_device) if weights_on_device else q
    assert_close(gpu_quant.quantized_matmul(to_device(x), gpu_q), expected, x, q)


@pytest.mark.parametrize("scheme", ["int8", "q4_0"])
def test_tiled_kernel_over_several_tiles(scheme):
    """More outputs and tokens than one tile holds, and (int8) an input size that leaves a
    partial chunk, so tiles at the edges are masked."""
    rng = np.random.default_rng(0)
    out_features, num_tokens = gpu_quant.TILE_OUT + 3, gpu_quant.TILE_TOKENS + 2
    in_features = gpu_quant.TILE_IN + 8 if scheme == "int8" else 2 * gpu_quant.TILE_IN
    q = numpy_quant.quantize(random_weight(rng, out_features, in_features, 1.0, 0.2), scheme)
    x = rng.standard_normal((num_tokens, in_features)).astype(np.float32)
    assert_close(gpu_quant.quantized_matmul(to_device(x), q), numpy_quant.quantized_matmul(x, q), x, q)


@pytest.mark.parametrize("num_tokens", [1, gpu_quant.GEMV_MAX_TOKENS + 1])
def test_int8_with_an_input_size_that_is_not_a_multiple_of_32(num_tokens):
    rng = np.random.default_rng(1)
    q = numpy_quant.quantize(random_weight(rng, 5, 41, 1.0, 0), "int8")
    x = rng.standard_normal((num_tokens, 41)).astype(np.float32)
    assert_close(gpu_quant.quantized_matmul(to_device(x), q), numpy_quant.quantized_matmul(x, q), x, q)


# --------------------------------------------------------------------- the formats


def test_ggml_blocks_written_by_hand():
    """One Q4_0 and one Q8_0 block built byte by byte: f16 scale 0.5 (0x3800, little-endian),
    Q4_0 byte j = j | (15 - j) << 4, so element j is j - 8 and element j + 16 is 7 - j."""
    x = np.zeros((1, 32), np.float32)
    x[0, [0, 15, 16, 31]] = [1, 10, 100, 1000]  # picks out elements 0, 15, 16 and 31
    nibbles = np.arange(16, dtype=np.uint8) | ((15 - np.arange(16, dtype=np.uint8)) << 4)
    scale = np.array([0x00, 0x38], np.uint8)
    q4_0 = numpy_quant.QuantizedWeight("q4_0", (1, 32), np.concatenate([scale, nibbles])[None], group_size=32)
    expected = 0.5 * (1 * -8 + 10 * 7 + 100 * 7 + 1000 * -8)
    assert to_host(gpu_quant.quantized_matmul(to_device(x), q4_0))[0, 0] == expected
    values = np.arange(-16, 16, dtype=np.int8)  # element j is j - 16
    q8_0 = numpy_quant.QuantizedWeight("q8_0", (1, 32), np.concatenate([scale, values.view(np.uint8)])[None],
                                       group_size=32)
    expected = 0.5 * (1 * -16 + 10 * -1 + 100 * 0 + 1000 * 15)
    assert to_host(gpu_quant.quantized_matmul(to_device(x), q8_0))[0, 0] == expected


@cuda.jit
def _decode_halves(halves, out):
    """``[M, 2]`` little-endian byte pairs -> ``[M]`` float32 through the kernels' decoder."""
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = gpu_quant._half_to_float(halves[i, 0], halves[i, 1])


def test_half_to_float_decodes_every_float16():
    """All 65536 bit patterns: zeros, subnormals, normals, infinities and NaNs."""
    halves = np.arange(2**16, dtype="<u2")  # [M]
    expected = halves.view("<f2").astype(np.float32)  # [M]
    out = to_device(np.empty(2**16, np.float32))
    threads = threads_per_block(256)
    _decode_halves[blocks_for(2**16 // threads), threads](to_device(halves.view(np.uint8).reshape(-1, 2)), out)
    out = to_host(out)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out[~nan].view(np.uint32), expected[~nan].view(np.uint32))  # -0.0 included


# ---------------------------------------------------------- linear and boundaries


@given(st.sampled_from(numpy_quant.SCHEMES), st.integers(1, 6), st.booleans(), seeds)
@settings(max_examples=EXAMPLES_PER_CASE)
def test_linear_dispatches_quantized_weights(scheme, num_tokens, with_bias, seed):
    """``linear`` with a QuantizedWeight is the quantized matmul plus the bias; x may have
    leading dimensions, as with a float weight."""
    rng = np.random.default_rng(seed)
    q = numpy_quant.quantize(random_weight(rng, 6, 128, 1.0, 0), scheme)
    x = rng.standard_normal((1, num_tokens, 128)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32) if with_bias else None
    expected = numpy_quant.quantized_matmul(x, q) + (0 if bias is None else bias)  # [1, N, out]
    result = gpu_layers.linear(to_device(x), q.map_arrays(to_device), None if bias is None else to_device(bias))
    assert_close(result, expected, x, q)


@pytest.mark.parametrize("scheme", numpy_quant.SCHEMES)
def test_stacked_rows_multiply_as_the_separate_weights(scheme):
    """q/k/v (and gate/up) stacked into one weight, as a model runner fuses them: one kernel
    call gives the separate products side by side, for the GEMV and the tiled kernel."""
    rng = np.random.default_rng(1)
    parts = [numpy_quant.quantize(random_weight(rng, rows, 128, 1.0, 0), scheme) for rows in (6, 2, 2)]
    stacked = numpy_quant.concatenate_rows(parts)
    for num_tokens in (1, gpu_quant.GEMV_MAX_TOKENS + 1):
        x = rng.standard_normal((num_tokens, 128)).astype(np.float32)
        expected = np.concatenate([numpy_quant.quantized_matmul(x, q) for q in parts], axis=1)  # [N, 10]
        assert_close(gpu_quant.quantized_matmul(to_device(x), stacked.map_arrays(to_device)), expected, x, stacked)


def test_bad_inputs_raise_value_errors():
    q = numpy_quant.quantize(np.ones((4, 64), np.float32), "int4-g32")
    with pytest.raises(ValueError, match="input dimension 64"):
        gpu_quant.quantized_matmul(to_device(np.zeros((2, 32), np.float32)), q)
    with pytest.raises(ValueError, match="float"):
        gpu_quant.quantized_matmul(to_device(np.zeros((2, 64), np.int64)), q)
    with pytest.raises(ValueError, match="QuantizedWeight"):
        gpu_quant.quantized_matmul(to_device(np.zeros((2, 64), np.float32)), np.ones((4, 64), np.float32))
    with pytest.raises(ValueError, match="one value per output"):
        gpu_layers.linear(to_device(np.zeros((2, 64), np.float32)), q, to_device(np.zeros(3, np.float32)))


@needs_device
def test_results_stay_on_the_device():
    import cupy

    q = numpy_quant.quantize(np.ones((4, 64), np.float32), "q4_0").map_arrays(cupy.asarray)
    for num_tokens in (1, gpu_quant.GEMV_MAX_TOKENS + 1):
        assert isinstance(gpu_quant.quantized_matmul(cupy.ones((num_tokens, 64), dtype=cupy.float32), q),
                          cupy.ndarray)
