"""Continuous batching end to end: batch invariance, preemption, prefix caching, n > 1,
aborts and rejections that leave nothing behind."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minibatch import SamplingParams
from minibatch.engine import EngineConfig, LLMEngine
from minibatch.sampling import RequestOutputKind
from tests.helpers import FIXTURES

MODEL = FIXTURES / "llama_gqa"
VOCAB = 320
MARGIN = 1e-3  # tokens after a near-tie may legitimately differ in float32


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(MODEL, block_size=4, num_blocks=64)


def run_all(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams],
            arrivals: list[int] | None = None) -> dict[str, list[int]]:
    """Add request i once ``arrivals[i]`` steps have run; step until all finish."""
    arrivals = arrivals or [0] * len(prompts)
    outputs: dict[str, list[int]] = {}
    step = 0
    while len(outputs) < len(prompts):
        for i, arrival in enumerate(arrivals):
            if arrival == step:
                engine.add_request(str(i), {"prompt_token_ids": prompts[i]}, params[i])
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = output.token_ids
        step += 1
    return outputs


def reference_tokens(engine: LLMEngine, prompt: list[int], max_tokens: int) -> tuple[list[int], int]:
    """Greedy tokens of the prompt run alone, and how many precede the first near-tie."""
    engine.reset()
    engine.add_request("alone", {"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2))
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                result = output
    margins = [sorted(lp.values())[-1] - sorted(lp.values())[-2] for lp in result.logprobs]
    trusted = next((i + 1 for i, m in enumerate(margins) if m < MARGIN), len(margins))
    return result.token_ids, trusted


workloads = st.lists(st.tuples(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=20),
                               st.integers(1, 8), st.integers(0, 6)), min_size=1, max_size=6)


@settings(max_examples=12, deadline=None)
@given(workloads, st.sampled_from([1, 2, 4, 8]), st.integers(1, 24), st.sampled_from([0, 1, 3, 8]),
       st.integers(2, 6), st.sampled_from(["fcfs", "priority", "prefill_first"]), st.booleans())
def test_batch_invariance(requests, block_size, budget, chunk_cap, max_num_seqs, policy, prefix_caching):
    """Whatever the arrival order, block size, token budget, prompt chunk cap
    (``long_prefill_token_threshold``), pool size (small enough to force preemption) and
    policy, each request's greedy tokens are its tokens alone."""
    alone = LLMEngine(MODEL, block_size=block_size, num_blocks=64)
    expected = [reference_tokens(alone, prompt, max_tokens) for prompt, max_tokens, _ in requests]
    longest = max(len(prompt) + max_tokens for prompt, max_tokens, _ in requests)
    if policy == "prefill_first":
        budget = max(budget, longest)  # whole sequences must fit one step
        chunk_cap = 0  # and are never cut
    blocks_for_longest = -(-longest // block_size)
    engine = LLMEngine(MODEL, block_size=block_size, num_blocks=blocks_for_longest + 1, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=budget, long_prefill_token_threshold=chunk_cap, policy=policy,
                       enable_prefix_caching=prefix_caching)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m, _ in requests]
    got = run_all(engine, [p for p, _, _ in requests], params, [a for _, _, a in requests])
    for i, (tokens, trusted) in enumerate(expected):
        assert got[str(i)][:trusted] == tokens[:trusted]
    assert engine.cache.num_free_blocks == engine.cache.num_blocks  # everything freed or merely cached


def test_preemption_happens_and_output_is_unchanged():
    prompts = [[5 + i] * 9 for i in range(4)]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 4
    roomy = run_all(LLMEngine(MODEL, block_size=4, num_blocks=64), prompts, params)
    tight = LLMEngine(MODEL, block_size=4, num_blocks=8, enable_prefix_caching=False)
    assert run_all(tight, prompts, params) == roomy
    assert sum(step.num_preemptions for step in tight.log.steps) > 0


def test_prefix_cache_hit_gives_the_cold_output(engine):
    engine.reset()
    prompt = list(range(10, 40))
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=10, ignore_eos=True)
    cold = run_all(engine, [prompt], [params])["0"]
    assert engine.cache.counters.prefix_hit_blocks == 0
    warm = run_all(engine, [prompt], [params])["0"]
    assert engine.cache.counters.prefix_hit_blocks == 7  # 30 tokens: 7 full blocks of 4
    assert engine.log.requests["0"].num_cached_tokens == 28
    assert warm == cold


def test_fully_cached_prompt_still_yields_logits(engine):
    engine.reset()
    prompt = list(range(10, 26))  # exactly four blocks of four
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    first = run_all(engine, [prompt], [params])["0"]
    second = run_all(engine, [prompt], [params])["0"]
    assert first == second
    assert engine.cache.counters.prefix_hit_blocks == 3  # the last block is recomputed for its logits


def test_parallel_samples_share_the_prompt_and_match_single_runs(engine):
    engine.reset()
    prompt = list(range(50, 63))
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
    engine.add_request("r", {"prompt_token_ids": prompt}, params)
    final = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            final = output
    assert final.finished and [c.index for c in final.outputs] == [0, 1, 2]
    assert engine.cache.counters.copy_on_writes >= 1
    # sample 0 is the request's own seeded stream: the same tokens as an n=1 request
    single = run_all(engine, [prompt], [SamplingParams(temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)])
    assert final.outputs[0].token_ids == single["0"]
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def outputs_of_each_step(engine: LLMEngine, kind: RequestOutputKind) -> list[list]:
    """Every step's outputs for one seeded n=2 request with logprobs, in ``kind``."""
    engine.reset()
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=9, ignore_eos=True, logprobs=1,
                            output_kind=kind)
    engine.add_request("r", {"prompt_token_ids": list(range(40, 52))}, params)
    steps = []
    while engine.has_unfinished_requests():
        steps.append(engine.step())
    return steps


def test_output_kinds_deliver_the_same_completions(engine):
    cumulative = outputs_of_each_step(engine, RequestOutputKind.CUMULATIVE)
    delta = outputs_of_each_step(engine, RequestOutputKind.DELTA)
    final_only = outputs_of_each_step(engine, RequestOutputKind.FINAL_ONLY)
    final = cumulative[-1][0]
    assert final.finished and len(final.outputs) == 2 and all(len(c.token_ids) == 9 for c in final.outputs)
    assert all(len(step) == 1 for step in cumulative)  # one output every step, the last one finished
    # FINAL_ONLY: nothing until the end, then the same output
    assert [len(step) for step in final_only] == [0] * (len(final_only) - 1) + [1]
    assert final_only[-1][0].outputs == final.outputs
    # DELTA: each output holds only what is new; joined up, they are the final completions
    for completion in final.outputs:
        pieces = [c for step in delta for c in step[0].outputs if c.index == completion.index]
        assert sum((c.token_ids for c in pieces), []) == completion.token_ids
        assert "".join(c.text for c in pieces) == completion.text
        assert sum((c.logprobs for c in pieces), []) == completion.logprobs
        assert pieces[-1].finish_reason == completion.finish_reason == "length"
        assert all(len(c.token_ids) <= 1 for c in pieces)  # one new token per step


def test_llm_generate_returns_the_final_output_whatever_kind_was_asked():
    from minibatch import LLM
    llm = LLM(MODEL, block_size=4, num_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    (output,) = llm.generate([list(range(40, 52))], params)
    assert output.finished and len(output.token_ids) == 5
    assert params.output_kind == RequestOutputKind.DELTA  # the caller's parameters are not changed


def test_abort_frees_blocks_at_once(engine):
    engine.reset()
    engine.add_request("a", {"prompt_token_ids": list(range(3, 30))},
                       SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.cache.num_used_blocks > 0
    assert engine.abort_request("a")
    assert engine.cache.num_used_blocks == 0 and not engine.has_unfinished_requests()
    assert not engine.abort_request("a")
    assert engine.log.requests["a"].aborted and engine.log.summary()["num_requests"] == 0


def test_requests_that_can_never_fit_are_rejected_and_allocate_nothing():
    engine = LLMEngine(MODEL, block_size=4, num_blocks=5)
    with pytest.raises(ValueError, match="usable blocks"):
        engine.add_request("big", {"prompt_token_ids": [3] * 10}, SamplingParams(max_tokens=40))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("bad", {"prompt_token_ids": [3, 99999]})
    assert engine.cache.num_free_blocks == 5 and not engine.has_unfinished_requests() and not engine.requests
    engine.add_request("ok", {"prompt_token_ids": [3] * 4}, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok", {"prompt_token_ids": [3]})


def engine_state(engine: LLMEngine) -> tuple:
    return (engine.cache.num_free_blocks, dict(engine.cache.tables), dict(engine.requests),
            list(engine.scheduler.waiting), list(engine.scheduler.running), dict(engine.log.requests))


@pytest.mark.parametrize(("prompt", "params", "options", "message"), [
    ({"prompt_token_ids": [3, 4.7]}, None, {}, "not an integer"),
    ({"prompt_token_ids": [3, "4"]}, None, {}, "not an integer"),
    ({"prompt_token_ids": [True, 4]}, None, {}, "not an integer"),
    ({"prompt_token_ids": 5}, None, {}, "list of token ids"),
    ([3, 4], SamplingParams(stop_token_ids=[VOCAB + 5]), {}, "stop_token_ids.*outside the vocabulary"),
    ([3, 4], {"max_tokens": 3}, {}, "must be a SamplingParams"),
    ([3, 4], None, {"priority": None}, "priority"),
    ([3, 4], None, {"arrival_time": "now"}, "arrival_time"),
])
def test_rejected_requests_leave_the_engine_unchanged(prompt, params, options, message):
    """Each bad request raises a ValueError saying what is wrong, registers nothing, claims
    no block, and a valid request afterwards runs as on a fresh engine."""
    engine = LLMEngine(MODEL, block_size=4, num_blocks=16, policy="priority")
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    fresh = run_all(engine, [[5, 6, 7]], [greedy])
    engine.reset()
    before = engine_state(engine)
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, params, **options)
    assert engine_state(engine) == before
    assert run_all(engine, [[5, 6, 7]], [greedy]) == fresh


@pytest.mark.parametrize(("field", "value", "message"), [
    ("block_size", 0, None), ("block_size", 2.5, None), ("num_blocks", 0, None), ("kv_cache_memory", 0, None),
    ("max_num_seqs", 0, None), ("max_num_batched_tokens", 0, None), ("watermark", 1.0, None),
    ("watermark", -0.1, None), ("watermark", float("nan"), None), ("enable_prefix_caching", "yes", None),
    ("long_prefill_token_threshold", -1, None), ("long_prefill_token_threshold", 4.0, None),
    ("policy", "lifo", "unknown scheduling policy 'lifo': choose one of"),
    ("kv_cache_dtype", "fp8", "kv_cache_dtype 'fp8' is not supported: choose one of"),
])
def test_bad_engine_settings_name_the_field_and_range(field, value, message):
    """Refused when the config is built, before any weights load: not a ZeroDivisionError
    (block_size=0), an engine that never schedules anything (max_num_batched_tokens=0), or
    a watermark that lets admission overcommit the pool."""
    message = message or rf"EngineConfig\.{field}=.*allowed values"
    with pytest.raises(ValueError, match=message):
        EngineConfig(**{field: value})
    with pytest.raises(ValueError, match=message):
        LLMEngine(MODEL, **{field: value})


def test_a_chunk_cap_with_a_policy_that_never_chunks_is_refused():
    with pytest.raises(ValueError, match=r"long_prefill_token_threshold=8.*0 with policy 'prefill_first'"):
        EngineConfig(policy="prefill_first", long_prefill_token_threshold=8)


def test_long_prefill_token_threshold_lets_a_short_prompt_past_a_long_one():
    """Uncapped, a long prompt takes the whole budget and the short one behind it waits
    for the leftovers; capped at 16 tokens a step, the short prompt is computed beside the
    long one's first chunk (its first token two steps sooner, the long one's two steps
    later). Decodes are never capped, and the tokens are the same either way."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompts = [list(range(3, 63)), list(range(70, 78))]  # 60 tokens, then 8
    steps, outputs = {}, {}
    for cap in (0, 16):
        engine = LLMEngine(MODEL, block_size=4, num_blocks=64, max_num_batched_tokens=32,
                           long_prefill_token_threshold=cap)
        outputs[cap] = run_all(engine, prompts, [params] * 2)
        steps[cap] = [{request: tokens for request, _, tokens in step.scheduled} for step in engine.log.steps]
    assert steps[0][:3] == [{"0": 32}, {"0": 28, "1": 4}, {"0": 1, "1": 4}]
    assert steps[16][:4] == [{"0": 16, "1": 8}, {"0": 16, "1": 1}, {"0": 16, "1": 1}, {"0": 12, "1": 1}]
    assert outputs[16] == outputs[0]


def test_engine_config_and_keyword_settings_together_are_refused():
    with pytest.raises(ValueError, match="block_size.*one way"):
        LLMEngine(MODEL, engine_config=EngineConfig(block_size=8), block_size=4)


def test_decodes_are_never_stalled_by_a_long_prefill():
    """Sarathi-Serve: a running decode keeps producing a token every step while a long
    prompt is prefilled in chunks beside it."""
    engine = LLMEngine(MODEL, block_size=4, num_blocks=64, max_num_batched_tokens=8)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    engine.add_request("short", {"prompt_token_ids": [7, 8, 9]}, params)
    engine.step()  # short is decoding now
    engine.add_request("long", {"prompt_token_ids": list(range(3, 60))}, params)
    for _ in range(7):
        engine.step()
        step = engine.log.steps[-1]
        assert step.num_decode_seqs == 1 and 0 < step.num_prefill_tokens <= 7


def test_prefill_first_stalls_decodes():
    engine = LLMEngine(MODEL, block_size=4, num_blocks=64, max_num_batched_tokens=128, policy="prefill_first")
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    engine.add_request("short", {"prompt_token_ids": [7, 8, 9]}, params)
    engine.step()
    engine.add_request("long", {"prompt_token_ids": list(range(3, 60))}, params)
    engine.step()
    assert engine.log.steps[-1].num_decode_seqs == 0 and engine.log.steps[-1].num_prefill_tokens == 57


def test_priority_policy_admits_the_most_urgent_first():
    engine = LLMEngine(MODEL, block_size=4, num_blocks=64, max_num_seqs=1, policy="priority")
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    engine.add_request("later", {"prompt_token_ids": [5, 6]}, params, priority=5)
    engine.add_request("urgent", {"prompt_token_ids": [5, 7]}, params, priority=0)
    engine.step()
    assert engine.log.steps[0].scheduled[0][0] == "urgent"


def test_metrics_are_logged(engine):
    engine.reset()
    run_all(engine, [[4, 5, 6], [7, 8]], [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)] * 2)
    summary = engine.log.summary()
    assert summary["num_requests"] == 2 and summary["ttft_p50"] > 0 and summary["tpot_p50"] > 0
    record = engine.log.requests["0"]
    assert len(record.token_times) == 5 and len(record.inter_token_latencies) == 4
    assert all(step.blocks_used + step.blocks_free == engine.cache.num_blocks for step in engine.log.steps)
    assert np.isclose(record.tpot, np.mean(record.inter_token_latencies))
