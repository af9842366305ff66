"""Where the GPU backend runs: on a CUDA device, or in Numba's CUDA simulator on the CPU.

This module is the one place the mode is chosen. ``SIMULATOR`` is read from the
environment once; everything else in :mod:`minibatch_gpu` asks this module for

* ``xp``, the array module: CuPy on a device, NumPy in the simulator;
* where to launch a kernel (:func:`launch_stream`) and how big to make it
  (:func:`threads_per_block`, :func:`blocks_for`).

Kernels take CuPy arrays directly (they implement ``__cuda_array_interface__``); in the
simulator they take NumPy arrays directly.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Any

import numpy as np

# Numba reads this variable when it is first imported; set it before anything imports numba.
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

# The simulator runs one Python thread per CUDA thread and every block one after another,
# so a launch there uses a few small blocks; kernels loop (grid-stride) over the rest.
SIMULATOR_THREADS_PER_BLOCK = 8
SIMULATOR_MAX_BLOCKS = 4

INSTALL_HINT = ("the GPU backend needs CuPy and a CUDA GPU: pip install 'minibatch[gpu]' "
                "(or set NUMBA_ENABLE_CUDASIM=1 before starting Python to run its kernels "
                "in Numba's CUDA simulator on the CPU)")


def _check_numba_agrees() -> None:
    """Fail loudly if numba was imported before the mode variable was set."""
    from numba import config

    if bool(config.ENABLE_CUDASIM) != SIMULATOR:
        numba_mode = "simulator" if config.ENABLE_CUDASIM else "device"
        raise RuntimeError(f"numba was imported in {numba_mode} mode before NUMBA_ENABLE_CUDASIM was "
                           "changed: set NUMBA_ENABLE_CUDASIM before anything imports numba")


_check_numba_agrees()


def _import_cupy() -> ModuleType | None:
    try:
        import cupy
    except ImportError:
        return None
    return cupy


_cupy = None if SIMULATOR else _import_cupy()


class _MissingCuPy:
    """Stands in for CuPy where it is not installed, so that the backend's modules still
    import (for docs, for gpu_available()); any use raises ImportError saying what to do."""

    def __getattr__(self, name: str) -> Any:
        raise ImportError(INSTALL_HINT)


# the array module: NumPy in the simulator, CuPy on a device
xp: Any = np if SIMULATOR else (_cupy if _cupy is not None else _MissingCuPy())


def array_module() -> ModuleType:
    """The array module of this mode (``xp``); raises ImportError when CuPy is missing."""
    if isinstance(xp, _MissingCuPy):
        raise ImportError(INSTALL_HINT)
    return xp


def gpu_available() -> bool:
    """True when kernels would run on a real CUDA GPU: device mode, CuPy present, a GPU found."""
    if SIMULATOR or _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver, no device, or a broken CUDA install: not available either way
        return False


# ------------------------------------------------------------------------- arrays


def to_device(array: Any) -> Any:
    """Host (or device) array -> this mode's array; a no-op when it is already there."""
    return xp.asarray(array)


def to_host(array: Any) -> np.ndarray:
    """This mode's array (or a host array) -> host NumPy array."""
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return array.get()
    return np.asarray(array)


def as_float32(array: Any) -> Any:
    """A C-contiguous float32 array on this mode's device, which is what kernels read."""
    return _kernel_argument(array, "float32")


def as_index(array: Any) -> Any:
    """A C-contiguous int64 array on this mode's device (indices travel as int64, so each
    kernel compiles once)."""
    return _kernel_argument(array, "int64")


def _kernel_argument(array: Any, dtype: str) -> Any:
    array = xp.ascontiguousarray(xp.asarray(array, dtype=dtype))
    if SIMULATOR and not array.flags.writeable:
        # the simulator copies every array argument back after a launch, inputs included;
        # a read-only one (weights memory-mapped from a checkpoint) needs a writable copy
        array = array.copy()
    return array


# ------------------------------------------------------------------------ launches


def launch_stream() -> Any:
    """The stream kernels go on: CuPy's current stream on a device, so that kernels and
    CuPy operations run in order; the default stream (0) in the simulator."""
    if SIMULATOR:
        return 0
    from numba import cuda

    pointer = xp.cuda.get_current_stream().ptr
    return cuda.default_stream() if pointer == 0 else cuda.external_stream(pointer)


@functools.cache
def multiprocessor_count() -> int:
    """Streaming multiprocessors of the current GPU (132 on an H100 SXM), asked once; in the
    simulator, ``SIMULATOR_MAX_BLOCKS``, the most blocks a launch there runs."""
    if SIMULATOR:
        return SIMULATOR_MAX_BLOCKS
    from numba import cuda

    return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)


def threads_per_block(on_device: int) -> int:
    """Threads per block: ``on_device`` on a GPU, a small power of two in the simulator."""
    return min(on_device, SIMULATOR_THREADS_PER_BLOCK) if SIMULATOR else on_device


def blocks_for(num_blocks: int) -> int:
    """Grid size for ``num_blocks`` blocks' worth of work: all of them on a GPU, a few in the
    simulator. Kernels loop over their work with a grid stride, so any grid is correct."""
    return max(1, min(num_blocks, SIMULATOR_MAX_BLOCKS) if SIMULATOR else num_blocks)


# ---------------------------------------------------------------------- validation


def check_array(name: str, array: Any, ndim: int | None = None, kind: str = "float") -> None:
    """Raise ``ValueError`` unless ``array`` is an array of ``kind`` ("float" or "integer")
    with ``ndim`` dimensions (any number when None)."""
    dtype = getattr(array, "dtype", None)
    if dtype is None:
        raise ValueError(f"{name} must be a NumPy or CuPy array, got {type(array).__name__}")
    kinds = "f" if kind == "float" else "iu"
    if dtype.kind not in kinds:
        raise ValueError(f"{name} must hold {kind} values, got dtype {dtype}")
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(array.shape)}")
