"""minibatch against Hugging Face transformers: logits and greedy tokens.

The golden fixtures were written by ``tools/make_golden_fixtures.py`` with transformers
(eager attention, float32), so these tests need no torch.
"""

from __future__ import annotations

import numpy as np
import pytest

from minibatch import LLM, SamplingParams
from minibatch.llm import DEFAULT_MODEL, DRAFT_MODEL
from tests.helpers import FIXTURES, HF_FIXTURES, relative_error

SHIPPED = {"tiny_target": DEFAULT_MODEL, "tiny_draft": DRAFT_MODEL}


def golden_cases():
    cases = [pytest.param((FIXTURES / name, FIXTURES / name / "golden.npz"), id=name) for name in HF_FIXTURES]
    for name, model_dir in SHIPPED.items():
        golden = FIXTURES / f"{name}_golden.npz"
        if golden.is_file():
            cases.append(pytest.param((model_dir, golden), id=name))
    return cases


@pytest.fixture(scope="module", params=golden_cases())
def model_and_golden(request):
    model_dir, golden_path = request.param
    return LLM(model_dir), np.load(golden_path)


def test_logits_match_transformers(model_and_golden):
    llm, golden = model_and_golden
    offsets = np.concatenate([[0], np.cumsum(golden["seq_lens"])])
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        logits = llm.logits(golden["input_ids"][start:end].tolist())
        assert relative_error(logits, golden["logits"][start:end]) < 1e-4


def test_greedy_tokens_match_transformers(model_and_golden):
    llm, golden = model_and_golden
    params = SamplingParams(temperature=0, max_tokens=len(golden["greedy_tokens"]), ignore_eos=True)
    output = llm.generate({"prompt_token_ids": golden["greedy_prompt"].tolist()}, params)[0]
    assert output.token_ids == golden["greedy_tokens"].tolist()


def test_every_family_has_a_fixture():
    architectures = {LLM(FIXTURES / name).config.architecture for name in HF_FIXTURES}
    assert architectures == {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"}


@pytest.mark.parametrize("name", [n for n in HF_FIXTURES if (FIXTURES / n / "config.legacy.json").is_file()])
def test_transformers_4_config_spelling_gives_the_same_config(name):
    """transformers 5 writes ``rope_parameters``; 4.x wrote ``rope_scaling``/``rope_theta``."""
    import json

    from minibatch.config import ModelConfig

    new = ModelConfig.from_dir(FIXTURES / name)
    legacy = ModelConfig.from_hf(json.loads((FIXTURES / name / "config.legacy.json").read_text()))
    assert new == legacy
