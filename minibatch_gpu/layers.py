"""The layers of a Llama-family decoder on the GPU: CuPy arrays and Numba CUDA kernels.

Each public function is the twin of the function of the same name in
``minibatch/layers.py``: same signature, same contract, same float32 results up to
rounding (``tests/gpu/test_kernels.py`` holds them equal). Shapes use ``N`` = tokens,
``H`` = hidden size, ``D`` = head dim, ``V`` = vocabulary, ``I`` = MLP intermediate size.

Matmuls and gathers go through the array module (cuBLAS on a device); the three
kernels below are the element- and row-wise steps that would otherwise be several
array-module passes over memory. Every kernel loops over its work with a grid stride,
so it is correct for any launch size (the simulator launches only a few small blocks).
"""

from __future__ import annotations

import math
from typing import Any

from numba import cuda, float32

from minibatch.quant import QuantizedWeight
from minibatch_gpu.device import (
    as_float32,
    as_index,
    blocks_for,
    check_array,
    launch_stream,
    threads_per_block,
    xp,
)
from minibatch_gpu.quant import quantized_matmul

NORM_THREADS = 256  # threads per row in rms_norm on a device; a power of two for the tree sum
ELEMENTWISE_THREADS = 256

# ------------------------------------------------------------------------- kernels


@cuda.jit
def _rms_norm_kernel(x, weight, eps, out):
    """One block per row. Threads stride over the row adding up squares, then a
    shared-memory tree halves the partial sums until one is left."""
    partial = cuda.shared.array(NORM_THREADS, float32)  # [threads] one partial sum per thread
    thread, num_threads = cuda.threadIdx.x, cuda.blockDim.x
    num_rows, hidden = x.shape  # [N, H]
    for row in range(cuda.blockIdx.x, num_rows, cuda.gridDim.x):
        sum_of_squares = float32(0)
        for h in range(thread, hidden, num_threads):
            sum_of_squares += x[row, h] * x[row, h]
        partial[thread] = sum_of_squares
        cuda.syncthreads()
        stride = num_threads // 2
        while stride > 0:  # log2(threads) steps; each adds the upper half onto the lower
            if thread < stride:
                partial[thread] += partial[thread + stride]
            cuda.syncthreads()
            stride //= 2
        rms = math.sqrt(partial[0] / float32(hidden) + eps)
        for h in range(thread, hidden, num_threads):
            out[row, h] = x[row, h] / rms * weight[h]  # the NumPy twin's order of operations
        cuda.syncthreads()  # all threads have read partial[0] before the next row overwrites it


@cuda.jit
def _swiglu_kernel(gate, up, out):
    """One thread per element of the flattened ``[N*I]`` arrays: ``silu(gate) * up``."""
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        g = gate[i]
        if g >= float32(0):
            silu = g / (float32(1) + math.exp(-g))  # the NumPy twin's formula
        else:  # the same value, written so that exp cannot overflow for very negative g
            e = math.exp(g)
            silu = g * e / (float32(1) + e)
        out[i] = silu * up[i]


@cuda.jit
def _rope_kernel(x, cos, sin, out):
    """One thread per (token, head, pair): rotate ``(x[i], x[i + D/2])`` by the angle
    whose cosine and sine are ``cos[token, i]``, ``sin[token, i]``."""
    num_tokens, num_heads, head_dim = x.shape  # [N, heads, D]
    half = head_dim // 2
    for item in range(cuda.grid(1), num_tokens * num_heads * half, cuda.gridsize(1)):
        token = item // (num_heads * half)
        head = (item // half) % num_heads
        pair = item % half
        first, second = x[token, head, pair], x[token, head, pair + half]
        out[token, head, pair] = first * cos[token, pair] - second * sin[token, pair]
        out[token, head, pair + half] = second * cos[token, pair] + first * sin[token, pair]


# ------------------------------------------------------------------------ functions


def embedding(table: Any, token_ids: Any) -> Any:
    """Look up token embeddings: ``[V, H], [N] -> [N, H]``. Twin of ``minibatch.layers.embedding``.

    Ids must lie in ``[0, V)``; that is not checked here (it would cost a device sync),
    and CuPy wraps out-of-range ids around instead of raising as NumPy does.
    """
    check_array("table", table, ndim=2)
    check_array("token_ids", token_ids, ndim=1, kind="integer")
    # the table in its stored memory order (a tied one is column-major, see ModelWeights.runtime_layout):
    # as_float32 would copy a column-major table whole on every call
    return xp.asarray(table, dtype=xp.float32)[as_index(token_ids)]  # [N, H]


def rms_norm(x: Any, weight: Any, eps: float) -> Any:
    """Root-mean-square norm: ``[N, H], [H] -> [N, H]``. Twin of ``minibatch.layers.rms_norm``.

    Computed in float32 by one kernel, one block per row; no mean is subtracted.
    """
    check_array("x", x)
    check_array("weight", weight, ndim=1)
    if x.ndim < 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: x's last dimension must match weight {tuple(weight.shape)}, "
                         f"got x {tuple(x.shape)}")
    rows = as_float32(x).reshape(-1, x.shape[-1])  # [N, H]
    out = xp.empty_like(rows)  # [N, H]
    if rows.size:
        threads = threads_per_block(NORM_THREADS)
        _rms_norm_kernel[blocks_for(rows.shape[0]), threads, launch_stream()](
            rows, as_float32(weight), float32(eps), out)
    return out.reshape(x.shape)


def linear(x: Any, weight: Any | QuantizedWeight, bias: Any | None = None) -> Any:
    """``x @ weight.T + bias`` with the weight stored as Hugging Face does, ``[out, in]``.

    ``[N, in], [out, in], [out] -> [N, out]``. Twin of ``minibatch.layers.linear``; the
    matmul is the array module's (cuBLAS on a device), or for a
    :class:`~minibatch.quant.QuantizedWeight` the fused dequantize-and-multiply kernels of
    :func:`minibatch_gpu.quant.quantized_matmul`.
    """
    check_array("x", x)
    if isinstance(weight, QuantizedWeight):
        y = quantized_matmul(x, weight)  # [N, out]
    else:
        check_array("weight", weight, ndim=2)
        if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
            raise ValueError(f"linear: x's last dimension must match weight [out, in] = {tuple(weight.shape)}, "
                             f"got x {tuple(x.shape)}")
        # the weight in its stored memory order (a model runner keeps it column-major): the
        # matmul reads either order, where as_float32 would copy a column-major one every call
        y = as_float32(x) @ xp.asarray(weight, dtype=xp.float32).T  # [N, out]
    if bias is None:
        return y
    check_array("bias", bias, ndim=1)
    if bias.shape[0] != weight.shape[0]:
        raise ValueError(f"linear: bias {tuple(bias.shape)} must have one value per output, {weight.shape[0]}")
    return y + as_float32(bias)  # [N, out]


def swiglu(gate: Any, up: Any) -> Any:
    """The SwiGLU gate: ``silu(gate) * up``, ``[N, I], [N, I] -> [N, I]``.

    Twin of ``minibatch.layers.swiglu``; one elementwise kernel.
    """
    check_array("gate", gate)
    check_array("up", up)
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    gate_flat, up_flat = as_float32(gate).reshape(-1), as_float32(up).reshape(-1)  # [N*I]
    out = xp.empty_like(gate_flat)  # [N*I]
    if out.size:
        threads = threads_per_block(ELEMENTWISE_THREADS)
        _swiglu_kernel[blocks_for(-(-out.size // threads)), threads, launch_stream()](gate_flat, up_flat, out)
    return out.reshape(gate.shape)  # [N, I]


def rope_cos_sin(positions: Any, inv_freq: Any) -> tuple[Any, Any]:
    """The cosines and sines of RoPE's angles, ``positions * inv_freq``:
    ``[N], [D/2] -> [N, D/2], [N, D/2]`` float32. Twin of ``minibatch.layers.rope_cos_sin``.

    The angle is rounded to float32 before its cosine, as NumPy does: at position 4096 a
    float64 angle would differ by about 1e-4 rad, far more than the twin test's tolerance.
    A few elementwise array-module calls over ``N * D/2`` angles, once per forward pass.
    """
    check_array("positions", positions, ndim=1, kind="integer")
    check_array("inv_freq", inv_freq, ndim=1)
    angles = positions.astype(xp.float32)[:, None] * as_float32(inv_freq)[None, :]  # [N, D/2]
    return xp.cos(angles), xp.sin(angles)


def apply_rope(x: Any, cos: Any, sin: Any) -> Any:
    """Rotary position embedding, Hugging Face's half-split layout. Twin of
    ``minibatch.layers.apply_rope``.

    Dimension ``i`` is paired with ``i + D/2`` and the pair is rotated by the angle whose
    cosine and sine :func:`rope_cos_sin` gives. ``[N, heads, D], [N, D/2], [N, D/2] -> [N, heads, D]``.
    """
    check_array("x", x, ndim=3)
    check_array("cos", cos, ndim=2)
    check_array("sin", sin, ndim=2)
    num_tokens, num_heads, head_dim = x.shape
    if head_dim % 2 or tuple(cos.shape) != (num_tokens, head_dim // 2) or tuple(sin.shape) != tuple(cos.shape):
        raise ValueError(f"apply_rope: x {tuple(x.shape)} needs an even head dim and cos, sin of shape "
                         f"[N, D/2] = [{num_tokens}, {head_dim // 2}], got cos {tuple(cos.shape)}, "
                         f"sin {tuple(sin.shape)}")
    x = as_float32(x)  # [N, heads, D]
    out = xp.empty_like(x)  # [N, heads, D]
    num_items = num_tokens * num_heads * (head_dim // 2)
    if num_items:
        threads = threads_per_block(ELEMENTWISE_THREADS)
        _rope_kernel[blocks_for(-(-num_items // threads)), threads, launch_stream()](
            x, as_float32(cos), as_float32(sin), out)
    return out
