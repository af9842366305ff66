"""Tests of the GPU backend against its NumPy twin (in the CUDA simulator unless MINIBATCH_GPU_TESTS=device)."""
