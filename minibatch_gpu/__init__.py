"""The GPU backend: the math of :mod:`minibatch` as CuPy arrays and Numba CUDA kernels.

Every public function here has a NumPy twin of the same name, signature and contract
(``minibatch_gpu/layers.py`` mirrors ``minibatch/layers.py``, ``attention.py`` mirrors
``minibatch/attention.py``, ``quant.py`` the quantized matmul of ``minibatch/quant.py``,
``kivi.py`` the 2-bit KV cache of ``minibatch/kivi.py``), and ``tests/gpu/`` holds each
pair equal.

It runs in one of two modes, chosen once, in :mod:`minibatch_gpu.device`, from the
environment variable ``NUMBA_ENABLE_CUDASIM`` (read before Numba is first imported):

* **device** (the variable unset): arrays are CuPy arrays on a CUDA GPU, matmuls go to
  cuBLAS, and the Numba CUDA kernels are compiled to PTX and launched on CuPy's current
  stream. Needs ``pip install 'minibatch[gpu]'`` and a CUDA driver.
* **simulator** (``NUMBA_ENABLE_CUDASIM=1``): NumPy stands in for CuPy and the very same
  kernel source runs in Numba's CUDA simulator, one Python thread per CUDA thread, on the
  CPU. No GPU needed, so CI can test the kernels; slow, so launches there are kept small.

Pick the backend by name, ``LLM(model, backend="gpu")``; nothing above the model asks
which mode is running.
"""
