"""The backend seam: the tensor math a model needs, chosen once by name.

A :class:`Backend` bundles an array module and the math functions of one
implementation. ``"numpy"`` is the readable specification in this package;
``"gpu"`` is :mod:`minibatch_gpu` (CuPy + Numba CUDA, or NumPy + the Numba CUDA
simulator when ``NUMBA_ENABLE_CUDASIM=1``). Everything above the model — the
generation loop, the CLI — only ever sees a backend's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

BACKENDS = ("numpy", "gpu")


@dataclass(frozen=True, slots=True)
class Backend:
    """One implementation of the model's math. Every function keeps the NumPy signature."""

    name: str
    xp: ModuleType  # numpy or cupy
    embedding: Callable
    rms_norm: Callable
    linear: Callable
    swiglu: Callable
    rope_cos_sin: Callable
    apply_rope: Callable
    write_kv: Callable
    cached_attention: Callable
    copy_blocks: Callable
    kivi_attention: Callable

    def asarray(self, array: Any, dtype: Any = None) -> Any:
        """Host array -> this backend's array (a no-op for numpy)."""
        return self.xp.asarray(array, dtype=dtype)

    def to_numpy(self, array: Any) -> np.ndarray:
        """This backend's array -> host NumPy array."""
        return array.get() if hasattr(array, "get") and not isinstance(array, np.ndarray) else np.asarray(array)

    def synchronize(self) -> None:
        """Wait for queued device work (timings need it); nothing to wait for on the CPU."""
        sync = getattr(getattr(self.xp, "cuda", None), "get_current_stream", None)
        if sync is not None:
            sync().synchronize()


def numpy_backend() -> Backend:
    """The NumPy reference implementation."""
    from minibatch import attention, kivi, layers

    return Backend(name="numpy", xp=np, embedding=layers.embedding, rms_norm=layers.rms_norm,
                   linear=layers.linear, swiglu=layers.swiglu, rope_cos_sin=layers.rope_cos_sin,
                   apply_rope=layers.apply_rope, write_kv=attention.write_kv,
                   cached_attention=attention.cached_attention, copy_blocks=attention.copy_blocks,
                   kivi_attention=kivi.kivi_attention)


def get_backend(name: str) -> Backend:
    """The backend called ``name`` ("numpy" or "gpu")."""
    if name == "numpy":
        return numpy_backend()
    if name == "gpu":
        from minibatch_gpu.backend import gpu_backend

        return gpu_backend()
    raise ValueError(f"unknown backend '{name}': choose one of {', '.join(BACKENDS)}")
