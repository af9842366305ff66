"""The user API: prompts in every form, per-prompt params, streaming, stops, errors."""

from __future__ import annotations

import numpy as np
import pytest

from minibatch import LLM, SamplingParams
from tests.helpers import FIXTURES

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(FIXTURES / "llama_gqa")


def test_prompt_forms_agree(llm):
    ids = llm.tokenizer.encode("def f(x):")
    by_text, by_ids, by_dict = llm.generate(["def f(x):", ids, {"prompt_token_ids": ids}], GREEDY)
    assert by_text.token_ids == by_ids.token_ids == by_dict.token_ids
    assert by_text.prompt == "def f(x):" and by_ids.prompt is None
    assert len(by_text.token_ids) == 8 and by_text.finish_reason == "length"


def test_a_request_does_not_depend_on_its_batch_mates(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=10, ignore_eos=True)
    alone = llm.generate("import os", params)[0]
    others = [SamplingParams(temperature=1.0, seed=s, max_tokens=3 + s, ignore_eos=True) for s in range(3)]
    batched = llm.generate(["x = 1", "import os", "class A:", "y"], [others[0], params, others[1], others[2]])
    assert batched[1].token_ids == alone.token_ids
    assert [len(o.token_ids) for o in batched] == [3, 10, 4, 5]


def test_more_prompts_than_max_num_seqs(llm):
    small = LLM(FIXTURES / "llama_gqa", max_num_seqs=2)
    prompts = ["a", "bb", "ccc", "dddd", "e"]
    assert [o.token_ids for o in small.generate(prompts, GREEDY)] == \
           [o.token_ids for o in llm.generate(prompts, GREEDY)]


def test_stream_yields_the_same_text_as_generate(llm):
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=20, ignore_eos=True)
    assert "".join(llm.stream("abc", params)) == llm.generate("abc", params)[0].text


def test_stop_token_ids_and_eos(llm):
    first = llm.generate("abc", GREEDY)[0].token_ids
    stopped = llm.generate("abc", SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first[2]]))[0]
    assert stopped.token_ids == first[:3] and stopped.finish_reason == "stop"


def test_stop_string_is_cut_out_of_the_text(llm):
    full = llm.generate("abc", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].text
    stop = full[5:7]
    assume_text = full[:full.find(stop)]
    out = llm.generate("abc", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))[0]
    assert out.text == assume_text and out.finish_reason == "stop" and stop not in out.text


def test_detokenize_false_gives_the_same_tokens_and_no_text(llm):
    first = llm.generate("abc", GREEDY)[0].token_ids
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False),
              SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first[2]], detokenize=False)]
    full, stopped = llm.generate(["abc", "abc"], params)
    assert full.token_ids == first and full.text == "" and full.finish_reason == "length"
    assert stopped.token_ids == first[:3] and stopped.text == "" and stopped.finish_reason == "stop"
    assert "".join(llm.stream("abc", params[0])) == ""


def test_logprobs_are_returned_per_token(llm):
    out = llm.generate("abc", SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))[0]
    assert len(out.logprobs) == 4
    for token, logprobs in zip(out.token_ids, out.logprobs, strict=True):
        assert token in logprobs and len(logprobs) == 3  # greedy: the chosen token is the top one
        assert max(logprobs.values()) == logprobs[token] <= 0


def test_logits_are_next_token_scores_at_every_position(llm):
    ids = llm.tokenizer.encode("hello")
    logits = llm.logits(ids)
    assert logits.shape == (len(ids), llm.config.vocab_size) and logits.dtype == np.float32
    greedy = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    assert greedy[0].token_ids == [int(np.argmax(logits[-1]))]


def test_metrics_are_recorded(llm):
    out = llm.generate("abc", GREEDY)[0]
    assert out.metrics.ttft > 0 and out.metrics.finished_time >= out.metrics.first_token_time


def test_generation_stops_at_the_context_limit(llm):
    limit = llm.config.max_model_len
    out = llm.generate({"prompt_token_ids": [3] * (limit - 4)},
                       SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


@pytest.mark.parametrize(("prompt", "message"), [
    ({"prompt_token_ids": []}, "empty"),
    ([5, 10_000], "outside the vocabulary"),
    ({"prompt_token_ids": [3] * 100_000}, "shorten it"),
    (3.5, "must be a string"),
])
def test_bad_prompts_are_rejected_clearly(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt, GREEDY)


def test_params_count_must_match_prompts(llm):
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(["a", "b"], [GREEDY])


def test_a_later_invalid_prompt_leaves_no_trace_of_the_earlier_ones(llm):
    engine = llm.engine
    before = (engine.cache.num_free_blocks, dict(engine.log.requests), len(engine.scheduler.waiting))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate(["a", "bb", [5, 10_000]], GREEDY)
    assert not engine.requests and not engine.has_unfinished_requests()
    assert (engine.cache.num_free_blocks, dict(engine.log.requests), len(engine.scheduler.waiting)) == before


def test_sampling_params_of_the_wrong_type_are_rejected(llm):
    with pytest.raises(ValueError, match="must be a SamplingParams, got dict"):
        llm.generate("abc", {"max_tokens": 3})
    assert not llm.engine.requests


def test_numpy_token_ids_are_one_prompt(llm):
    ids = llm.tokenizer.encode("abc")
    by_numpy = llm.generate(list(np.array(ids)), GREEDY)
    assert len(by_numpy) == 1 and by_numpy[0].token_ids == llm.generate(ids, GREEDY)[0].token_ids


def test_interrupted_generate_aborts_its_requests(llm, monkeypatch):
    step = llm.engine.step

    def interrupted_step():
        step()
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.engine, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["abc", "de"], GREEDY)
    monkeypatch.undo()
    assert not llm.engine.requests and not llm.engine.has_unfinished_requests()
    assert llm.engine.cache.num_used_blocks == 0


def test_model_path_that_is_a_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        LLM(tmp_path / "model.safetensors")


def test_missing_model_directory():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM("/nonexistent/model")


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        LLM(FIXTURES / "llama_gqa", backend="tpu")


def test_prompt_token_ids_are_not_extended_by_generation(llm):
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, GREEDY)[0]
    assert out.prompt_token_ids == [5, 6, 7] and len(out.token_ids) == 8
