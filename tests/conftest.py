"""Test-session set-up: where GPU-backend tests run, and hypothesis profiles.

GPU-backend tests (marker ``gpu``, everything under ``tests/gpu/``) run in Numba's CUDA
simulator by default, so they pass on any CPU. On a machine with a CUDA GPU and CuPy,
run them on the device instead::

    MINIBATCH_GPU_TESTS=device pytest -m gpu

Hypothesis profiles: ``ci`` (the default: few examples, no deadline) and ``deep``
(500 examples), chosen with ``HYPOTHESIS_PROFILE=deep`` or ``--hypothesis-profile=deep``.
"""

from __future__ import annotations

import os
import sys

# The test suite's matrices are tiny: one BLAS thread is fastest for them, and on a busy
# 2-core machine a multithreaded BLAS can be ten times slower. Must precede numpy's import.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import pytest  # noqa: E402  (after the BLAS settings above)
from hypothesis import HealthCheck, settings  # noqa: E402

# ------------------------------------------------------- GPU backend: simulator or device

GPU_TEST_MODES = ("simulator", "device")
GPU_TEST_MODE = os.environ.get("MINIBATCH_GPU_TESTS", "simulator")
if GPU_TEST_MODE not in GPU_TEST_MODES:
    raise pytest.UsageError(f"MINIBATCH_GPU_TESTS={GPU_TEST_MODE!r}: choose one of {', '.join(GPU_TEST_MODES)}")
if GPU_TEST_MODE == "device" and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    raise pytest.UsageError("MINIBATCH_GPU_TESTS=device asks for the GPU but NUMBA_ENABLE_CUDASIM=1 asks for "
                            "the simulator: unset NUMBA_ENABLE_CUDASIM")
if GPU_TEST_MODE == "simulator":
    # Numba reads this once, when it is first imported: it must be set before that.
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# The simulator's block manager busy-waits on its threads, so every syncthreads() costs one
# interpreter switch interval (5 ms by default); a shorter one makes GPU tests ~10x faster.
SIMULATOR_SWITCH_INTERVAL_S = 1e-4


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests only when they can run nowhere: device mode without a GPU."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or not gpu_items:
        return
    from minibatch_gpu.device import gpu_available

    if gpu_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU with CuPy here; unset MINIBATCH_GPU_TESTS to use the simulator")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="module", autouse=True)
def _fast_simulator_barriers(request: pytest.FixtureRequest):
    """In the simulator, shorten the switch interval while a ``gpu`` test module runs."""
    simulated = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" and request.node.get_closest_marker("gpu")
    previous = sys.getswitchinterval()
    if simulated:
        sys.setswitchinterval(SIMULATOR_SWITCH_INTERVAL_S)
    yield
    sys.setswitchinterval(previous)


# -------------------------------------------------------------------- hypothesis profiles

settings.register_profile("ci", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", deadline=None, max_examples=500, suppress_health_check=[HealthCheck.too_slow])
# --hypothesis-profile, when given, is loaded after this by hypothesis's pytest plugin and wins.
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def _serialised_simulator_shared_arrays():
    """Work around a race in Numba's CUDA simulator for the whole session.

    ``FakeCUDAShared.array`` gives a block's threads one array per kernel line with an
    unlocked check-then-insert, so now and then two threads get different arrays and a
    kernel reads uninitialised memory (about one launch in 400 on two loaded cores). The
    same lookup, under a lock; nothing changes on a real GPU.
    """
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        yield
        return
    import threading

    import numpy as np
    from numba.cuda.simulator.kernelapi import FakeCUDAShared, numpy_support, types

    original, lock = FakeCUDAShared.array, threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory (one buffer, no lookup), or an error
            return original(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)  # the kernel line, as the original keys it
        with lock:
            if key not in self._allocations:
                numpy_dtype = numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else dtype
                self._allocations[key] = np.empty(shape, numpy_dtype)
            return self._allocations[key]

    FakeCUDAShared.array = array
    yield
    FakeCUDAShared.array = original
