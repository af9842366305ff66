"""Weight-only quantized matmul on the GPU: fused dequantize-and-multiply Numba CUDA kernels.

Twin of ``quantized_matmul`` in ``minibatch/quant.py``, with the same formats (see
:class:`minibatch.quant.QuantizedWeight`; weights are Hugging Face ``[out, in]``, and
groups and blocks run along ``in``):

* ``int8``: one scale per output channel, ``w = q * scale``;
* ``int4-g32|g64|g128``: two inputs per byte (even input in the low nibble), a scale and a
  zero point per group of ``g`` inputs, ``w = (q - zero) * scale``;
* ``q8_0`` and ``q4_0``: llama.cpp's GGUF blocks of 32 inputs, each a float16 scale ``d``
  followed by 32 int8 values (``w = d * q``) or by 16 bytes of nibbles (``w = d * (q - 8)``).

Why fuse: decoding a token reads every weight once and does two flops with it, so its
speed is the speed of reading weights from memory. A kernel that reads the *packed*
bytes and dequantizes them in registers moves 4x (int8) or 6-7x (int4, scales included) fewer bytes than
one that reads float32 weights, and that is the whole speed-up (MARLIN, Frantar et al.,
2024). Writing the dequantized float32 matrix out first and calling cuBLAS would give the
saving straight back.

Two kernels per format, chosen by the number of tokens ``N``:

* **GEMV** (``N <= GEMV_MAX_TOKENS``, decode): one block per output channel; its threads
  stride along the input, dequantize each weight as they read it and use it for all ``N``
  tokens, then a shared-memory tree adds up their partial sums.
* **tiled** (larger ``N``, prefill): one block per ``TILE_OUT x TILE_TOKENS`` tile of the
  output. For each chunk of ``TILE_IN`` inputs the block dequantizes the weight tile once
  into shared memory and every token of the tile reuses it; as ``N`` grows this reuse is
  what keeps the dequantization cost small next to the multiply-adds.

The two kernels are written once, as templates (:func:`_gemv_kernel`, :func:`_tiled_kernel`);
each format supplies one small device function, "the float32 weight at ``[row, col]``",
and gets its own compiled pair. Every weight is dequantized exactly as the NumPy twin
does, in float32, so the two backends differ only in the order of the additions.
"""

from __future__ import annotations

import math
from typing import Any

from numba import cuda, float32, int32

from minibatch.quant import GGML_BLOCK_SIZE, QuantizedWeight
from minibatch_gpu.device import (
    _kernel_argument,
    as_float32,
    blocks_for,
    check_array,
    launch_stream,
    threads_per_block,
    xp,
)

GEMV_MAX_TOKENS = 4  # N up to this runs the GEMV kernel (decode); above it, the tiled kernel (prefill)
GEMV_THREADS = 128  # threads per output channel on a device; a power of two for the tree sum
TILE_OUT = 16  # output channels per tile
TILE_TOKENS = 16  # tokens per tile: each dequantized weight in shared memory is used this many times
TILE_IN = 32  # inputs per chunk staged in shared memory
TILED_THREADS = TILE_OUT * TILE_TOKENS  # one output cell per thread on a device

# ------------------------------------------------------------ dequantizing one weight


@cuda.jit(device=True)
def _half_to_float(low, high):
    """An IEEE float16 stored as two little-endian bytes -> float32, exactly.

    A kernel cannot reinterpret two bytes as a float16, so the value is rebuilt from its
    fields: 1 sign bit, 5 exponent bits ``e``, 10 mantissa bits ``m``.

    * ``e`` in 1..30 (normal): ``1.m * 2^(e-15)`` = ``(1024 + m) * 2^(e-25)``;
    * ``e`` = 0 (zero and subnormals): ``0.m * 2^-14`` = ``m * 2^-24``;
    * ``e`` = 31: infinity (``m`` = 0) or NaN.

    The significand is an integer below 2048 and the power of two lies between 2^-24 and
    2^5, so ``float32(significand)`` times or divided by ``float32(2^k)`` is exact: every
    float16 is a float32, and scaling by a power of two only moves the exponent.
    """
    bits = int32(low) | (int32(high) << 8)
    sign = float32(-1) if bits >> 15 else float32(1)
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    if exponent == 0x1F:
        return sign * float32(math.inf) if mantissa == 0 else float32(math.nan)
    if exponent == 0:
        significand, power = mantissa, -24
    else:
        significand, power = mantissa | 0x400, exponent - 25
    if power >= 0:
        return sign * float32(significand << power)
    return sign * (float32(significand) / float32(1 << -power))


# Each format's weight at [row, col] (row = output channel, col = input) as a float32.
# All four take the same arguments, (qweight, scales, zeros, row, col), so that one
# kernel template serves them all; a format ignores the arrays it does not have.


@cuda.jit(device=True)
def _int8_weight(qweight, scales, zeros, row, col):
    """int8: ``q * scales[row]``; qweight ``[out, in]`` int8, scales ``[out]``."""
    return float32(qweight[row, col]) * scales[row]


@cuda.jit(device=True)
def _int4_weight(qweight, scales, zeros, row, col):
    """int4 in groups: ``(q - zero) * scale``; qweight ``[out, in/2]`` uint8 with input
    ``2j`` in byte ``j``'s low nibble and ``2j+1`` in its high nibble; scales, zeros
    ``[out, in/g]``."""
    byte = qweight[row, col // 2]
    q = int32(byte >> 4) if col % 2 else int32(byte & 0xF)
    group = col // (2 * qweight.shape[1] // scales.shape[1])  # g = in / (in/g)
    # widened to int32 before subtracting: in uint8, q - zero would wrap around below zero
    return float32(q - int32(zeros[row, group])) * scales[row, group]


@cuda.jit(device=True)
def _q8_0_weight(qweight, scales, zeros, row, col):
    """GGUF Q8_0: ``d * q``; each 34-byte block of qweight's row is f16 ``d`` then 32 int8."""
    start = (col // GGML_BLOCK_SIZE) * (2 + GGML_BLOCK_SIZE)
    d = _half_to_float(qweight[row, start], qweight[row, start + 1])
    q = int32(qweight[row, start + 2 + col % GGML_BLOCK_SIZE])
    if q >= 128:  # the byte is an int8 in two's complement
        q -= 256
    return d * float32(q)


@cuda.jit(device=True)
def _q4_0_weight(qweight, scales, zeros, row, col):
    """GGUF Q4_0: ``d * (q - 8)``; each 18-byte block of qweight's row is f16 ``d`` then
    16 bytes, byte ``j`` holding element ``j`` (low nibble) and element ``j + 16`` (high)."""
    start = (col // GGML_BLOCK_SIZE) * (2 + GGML_BLOCK_SIZE // 2)
    d = _half_to_float(qweight[row, start], qweight[row, start + 1])
    element = col % GGML_BLOCK_SIZE
    byte = qweight[row, start + 2 + element % (GGML_BLOCK_SIZE // 2)]
    q = int32(byte >> 4) if element >= GGML_BLOCK_SIZE // 2 else int32(byte & 0xF)
    return d * float32(q - 8)


# ------------------------------------------------------------------ kernel templates


def _gemv_kernel(weight_at):
    """The decode kernel for one format, ``weight_at`` being its dequantizing device function."""

    @cuda.jit
    def gemv(x, qweight, scales, zeros, out):
        """One block per output channel (grid-stride over channels). Each thread walks the
        inputs ``thread, thread + T, ...``, dequantizes each weight once, in a register, and
        multiplies it into all ``N`` tokens' sums; a shared-memory tree then adds the
        threads' sums. Adjacent threads read adjacent packed bytes (coalesced)."""
        partial = cuda.shared.array((GEMV_THREADS, GEMV_MAX_TOKENS), float32)  # [T, N] one sum per thread, token
        # [N] this thread's running sums. The token loops below run to the constant
        # GEMV_MAX_TOKENS (skipping tokens past N) so that the compiler can unroll them and
        # keep the sums in registers; a loop to N would leave them in (slower) local memory.
        sums = cuda.local.array(GEMV_MAX_TOKENS, float32)
        thread, num_threads = cuda.threadIdx.x, cuda.blockDim.x
        num_tokens, num_inputs = x.shape  # [N, in]
        num_outputs = out.shape[1]  # out: [N, out]
        for row in range(cuda.blockIdx.x, num_outputs, cuda.gridDim.x):
            for n in range(GEMV_MAX_TOKENS):
                sums[n] = 0
            for col in range(thread, num_inputs, num_threads):
                weight = weight_at(qweight, scales, zeros, row, col)
                for n in range(GEMV_MAX_TOKENS):
                    if n < num_tokens:
                        sums[n] += x[n, col] * weight
            for n in range(GEMV_MAX_TOKENS):
                partial[thread, n] = sums[n]
            cuda.syncthreads()
            stride = num_threads // 2
            while stride > 0:  # log2(T) steps; each adds the upper half of the threads onto the lower
                if thread < stride:
                    for n in range(num_tokens):
                        partial[thread, n] += partial[thread + stride, n]
                cuda.syncthreads()
                stride //= 2
            for n in range(thread, num_tokens, num_threads):
                out[n, row] = partial[0, n]
            cuda.syncthreads()  # all threads have read partial[0] before the next channel overwrites it

    return gemv


def _tiled_kernel(weight_at):
    """The prefill kernel for one format, ``weight_at`` being its dequantizing device function."""

    @cuda.jit
    def tiled(x, qweight, scales, zeros, out):
        """One block per ``[TILE_OUT, TILE_TOKENS]`` tile of the output (grid-stride over tiles).
        For each chunk of ``TILE_IN`` inputs the block stages the weight tile, dequantized
        once, and the tokens' inputs in shared memory; then the thread owning output cell
        ``(r, t)`` adds ``weights[r, :] . inputs[:, t]`` to it. On a device each thread owns
        one cell; with fewer threads (the simulator) each owns cells ``thread, thread + T, ...``."""
        weights = cuda.shared.array((TILE_OUT, TILE_IN), float32)  # [out tile, in chunk] dequantized
        # [in chunk, token tile]: transposed, so that threads of neighbouring tokens read
        # neighbouring shared-memory banks in the inner loop
        inputs = cuda.shared.array((TILE_IN, TILE_TOKENS), float32)
        sums = cuda.shared.array((TILE_OUT, TILE_TOKENS), float32)  # [out tile, token tile]
        thread, num_threads = cuda.threadIdx.x, cuda.blockDim.x
        num_tokens, num_inputs = x.shape  # [N, in]
        num_outputs = out.shape[1]  # out: [N, out]
        token_tiles = (num_tokens + TILE_TOKENS - 1) // TILE_TOKENS
        num_tiles = (num_outputs + TILE_OUT - 1) // TILE_OUT * token_tiles
        for tile in range(cuda.blockIdx.x, num_tiles, cuda.gridDim.x):
            first_row = (tile // token_tiles) * TILE_OUT
            first_token = (tile % token_tiles) * TILE_TOKENS
            # a cell is always owned by the same thread, so zeroing needs no barrier
            for cell in range(thread, TILE_OUT * TILE_TOKENS, num_threads):
                sums[cell // TILE_TOKENS, cell % TILE_TOKENS] = 0
            for chunk in range(0, num_inputs, TILE_IN):
                # stage: each weight of the tile is read packed and dequantized by one thread;
                # cells past the matrix's edge hold zeros and add nothing
                for cell in range(thread, TILE_OUT * TILE_IN, num_threads):
                    r, c = cell // TILE_IN, cell % TILE_IN
                    row, col = first_row + r, chunk + c
                    inside = row < num_outputs and col < num_inputs
                    weights[r, c] = weight_at(qweight, scales, zeros, row, col) if inside else float32(0)
                for cell in range(thread, TILE_TOKENS * TILE_IN, num_threads):
                    t, c = cell // TILE_IN, cell % TILE_IN
                    token, col = first_token + t, chunk + c
                    inputs[c, t] = x[token, col] if token < num_tokens and col < num_inputs else float32(0)
                cuda.syncthreads()
                # multiply: every staged weight is used by all TILE_TOKENS tokens
                for cell in range(thread, TILE_OUT * TILE_TOKENS, num_threads):
                    r, t = cell // TILE_TOKENS, cell % TILE_TOKENS
                    if first_row + r < num_outputs and first_token + t < num_tokens:
                        chunk_sum = float32(0)
                        for c in range(TILE_IN):
                            chunk_sum += weights[r, c] * inputs[c, t]
                        sums[r, t] += chunk_sum
                cuda.syncthreads()  # everyone is done with this chunk before the next is staged
            for cell in range(thread, TILE_OUT * TILE_TOKENS, num_threads):
                r, t = cell // TILE_TOKENS, cell % TILE_TOKENS
                if first_row + r < num_outputs and first_token + t < num_tokens:
                    out[first_token + t, first_row + r] = sums[r, t]

    return tiled


# one (GEMV, tiled) pair per format family
_KERNELS = {
    "int8": (_gemv_kernel(_int8_weight), _tiled_kernel(_int8_weight)),
    "int4": (_gemv_kernel(_int4_weight), _tiled_kernel(_int4_weight)),
    "q8_0": (_gemv_kernel(_q8_0_weight), _tiled_kernel(_q8_0_weight)),
    "q4_0": (_gemv_kernel(_q4_0_weight), _tiled_kernel(_q4_0_weight)),
}

# ------------------------------------------------------------------------ functions


def quantized_matmul(x: Any, q: QuantizedWeight) -> Any:
    """``x @ dequantize(q).T`` without ever writing the dequantized weight out:
    ``[N, in], QuantizedWeight [out, in] -> [N, out]`` float32, on this backend's device
    (``x`` may have more leading dimensions, as in the twin).

    Twin of ``minibatch.quant.quantized_matmul``. Decode-sized ``N`` (up to
    ``GEMV_MAX_TOKENS``) runs the GEMV kernel, larger ``N`` the tiled one. ``q``'s arrays
    may live on the host or the device (``q.map_arrays(to_device)`` moves them once);
    their layout was checked when ``q`` was made. Raises ``ValueError`` when ``x`` does
    not fit ``q``.
    """
    if not isinstance(q, QuantizedWeight):
        raise ValueError(f"quantized_matmul: q must be a minibatch.quant.QuantizedWeight, got {type(q).__name__}")
    check_array("x", x)
    num_outputs, num_inputs = q.shape
    if x.ndim < 1 or x.shape[-1] != num_inputs:
        raise ValueError(f"quantized_matmul: x's last dimension must equal the weight's input dimension "
                         f"{num_inputs} (weight [out, in] = {list(q.shape)}), got x {tuple(x.shape)}")
    rows = as_float32(x).reshape(-1, num_inputs)  # [N, in]
    out = xp.empty((rows.shape[0], num_outputs), dtype=xp.float32)  # [N, out]
    if out.size:
        _launch(rows, q, out)
    return out.reshape(*x.shape[:-1], num_outputs)


def _launch(x: Any, q: QuantizedWeight, out: Any) -> None:
    """Run the scheme's GEMV or tiled kernel: ``x`` ``[N, in]`` -> ``out`` ``[N, out]``."""
    family = "int4" if q.scheme.startswith("int4") else q.scheme
    gemv, tiled = _KERNELS[family]
    unused = xp.zeros(1, dtype=xp.uint8)  # stands in for an array the scheme does not store
    qweight = _kernel_argument(q.qweight, q.qweight.dtype)  # packed, as stored
    scales = unused if q.scales is None else as_float32(q.scales)
    zeros = unused if q.zeros is None else _kernel_argument(q.zeros, q.zeros.dtype)
    num_tokens, num_outputs = out.shape
    if num_tokens <= GEMV_MAX_TOKENS:
        threads = threads_per_block(GEMV_THREADS)
        gemv[blocks_for(num_outputs), threads, launch_stream()](x, qweight, scales, zeros, out)
    else:
        threads = threads_per_block(TILED_THREADS)
        num_tiles = -(-num_outputs // TILE_OUT) * -(-num_tokens // TILE_TOKENS)
        tiled[blocks_for(num_tiles), threads, launch_stream()](x, qweight, scales, zeros, out)
