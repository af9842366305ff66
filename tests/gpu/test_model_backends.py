"""The whole model on the GPU backend equals the NumPy backend: logits and greedy tokens.

Runs in Numba's CUDA simulator unless ``MINIBATCH_GPU_TESTS=device`` (see tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from minibatch.backend import get_backend
from minibatch.llm import LLM
from minibatch.sampling import SamplingParams
from tests.helpers import relative_error, write_tiny_model

pytestmark = pytest.mark.gpu

TOLERANCE = 1e-5
NEAR_TIE = 1e-3  # a greedy step whose top-2 logits are closer than this may flip on another backend

MODELS = {
    # grouped-query attention (4 query heads on 2 kv heads), llama3 RoPE scaling, untied lm_head
    "llama": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
    # q/k/v biases, tied embeddings, a large RoPE theta
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True, "rope_theta": 1e6},
}
PROMPTS = [[1, 17, 5, 33, 9], [1, 40, 2, 8, 61, 12, 7, 30, 3]]


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp(request.param), seed=7, **MODELS[request.param])


@pytest.fixture(scope="module")
def llms(model_dir: Path) -> dict[str, LLM]:
    return {backend: LLM(model_dir, backend=backend) for backend in ("numpy", "gpu")}


def test_gpu_backend_is_found_by_name():
    assert get_backend("gpu").name == "gpu"


def test_logits_match(llms):
    token_ids = PROMPTS[1] + PROMPTS[0]
    expected = llms["numpy"].logits(token_ids)  # [T, V]
    got = llms["gpu"].logits(token_ids)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert relative_error(got, expected) < TOLERANCE


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "q4_0"])
def test_quantized_logits_match(tmp_path, scheme):
    """Quantized q/k/v (with Qwen2's biases) and gate/up, each stacked into one matrix,
    through the GPU's dequantizing kernels: the tiled one (9 tokens) and the GEMV (3 tokens)."""
    model = write_tiny_model(tmp_path, seed=7, intermediate_size=64, **MODELS["qwen2"])  # inputs of 32 and 64
    numpy_llm, gpu_llm = LLM(model, quantization=scheme), LLM(model, backend="gpu", quantization=scheme)
    for token_ids in (PROMPTS[1], PROMPTS[0][:3]):
        assert relative_error(gpu_llm.logits(token_ids), numpy_llm.logits(token_ids)) < TOLERANCE


def test_greedy_generation_gives_the_same_tokens(llms):
    """Two prompts decoded together in one ragged batch: prefill, then decode steps."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = [out.outputs[0].token_ids for out in llms["numpy"].generate(PROMPTS, params)]
    got = [out.outputs[0].token_ids for out in llms["gpu"].generate(PROMPTS, params)]
    for prompt, want, have in zip(PROMPTS, expected, got, strict=True):
        checked = steps_before_a_near_tie(llms["numpy"], prompt, want)
        assert checked > 0, "the test model's greedy path starts at a near tie: pick another seed"
        assert have[:checked] == want[:checked]


def steps_before_a_near_tie(llm: LLM, prompt: list[int], generated: list[int]) -> int:
    """How many greedy steps have a clear winner (top-2 margin >= NEAR_TIE) in a row."""
    logits = llm.logits(prompt + generated[:-1])[len(prompt) - 1:]  # [steps, V] the logits each step saw
    top_two = np.sort(logits, axis=-1)[:, -2:]  # [steps, 2]
    near_ties = np.flatnonzero(top_two[:, 1] - top_two[:, 0] < NEAR_TIE)
    return int(near_ties[0]) if len(near_ties) else len(generated)


def run_engine(engine, requests) -> dict[str, list[list[int]]]:
    """Queue ``(id, prompt, params)`` requests and step the engine until all finish."""
    for request_id, prompt, params in requests:
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    done = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = [completion.token_ids for completion in output.outputs]
    return done


@pytest.mark.parametrize("kv_cache_dtype", ["float32", "int8", "kivi2"])
def test_engine_mixed_workload_matches_numpy(model_dir, kv_cache_dtype):
    """The engine unchanged on the GPU backend: chunked prefill beside decodes, a shared
    prefix (prefix-cache hits), n=2 samples (fork and copy-on-write) and a pool small
    enough to preempt give the same tokens as the NumPy engine."""
    from minibatch.engine import LLMEngine

    shared = [1, 9, 14, 3, 22, 5, 11]
    requests = [
        ("a", shared + [4, 2], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)),
        ("b", shared + [30], SamplingParams(temperature=0.8, seed=3, max_tokens=4, ignore_eos=True)),
        ("c", [1, 50, 6], SamplingParams(n=2, temperature=1.0, seed=9, max_tokens=4, ignore_eos=True)),
        ("d", list(range(2, 15)), SamplingParams(temperature=0.5, seed=1, max_tokens=3, ignore_eos=True)),
    ]
    settings = {"block_size": 2, "num_blocks": 12, "max_num_seqs": 4, "max_num_batched_tokens": 6,
                "kv_cache_dtype": kv_cache_dtype}
    engines = {backend: LLMEngine(model_dir, backend, **settings) for backend in ("numpy", "gpu")}
    results = {backend: run_engine(engine, requests) for backend, engine in engines.items()}
    assert results["gpu"] == results["numpy"]
    for engine in engines.values():  # the workload really exercised each mechanism
        assert sum(step.num_preemptions for step in engine.log.steps) > 0
        counters = engine.cache.counters
        assert counters.copy_on_writes > 0 and counters.prefix_hit_blocks > 0 and counters.evictions > 0
