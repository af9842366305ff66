"""The GPU backend as a :class:`~minibatch.backend.Backend`: what ``get_backend("gpu")`` returns."""

from __future__ import annotations

from minibatch.backend import Backend


def gpu_backend() -> Backend:
    """CuPy arrays and Numba CUDA kernels (NumPy and the CUDA simulator when
    ``NUMBA_ENABLE_CUDASIM=1``); the twin of :func:`minibatch.backend.numpy_backend`.

    Raises ``ImportError`` with the install command when CuPy is missing in device mode.
    """
    from minibatch_gpu import attention, kivi, layers
    from minibatch_gpu.device import array_module

    return Backend(name="gpu", xp=array_module(), embedding=layers.embedding, rms_norm=layers.rms_norm,
                   linear=layers.linear, swiglu=layers.swiglu, rope_cos_sin=layers.rope_cos_sin,
                   apply_rope=layers.apply_rope, write_kv=attention.write_kv,
                   cached_attention=attention.cached_attention, copy_blocks=attention.copy_blocks,
                   kivi_attention=kivi.kivi_attention)
