"""SamplingParams validation and the sampler's distributions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minibatch.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    make_generator,
    sample_token,
    softmax,
    top_logprobs,
)

logit_vectors = hnp.arrays(np.float64, st.integers(2, 40), elements=st.floats(-10, 10))


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -0.1), ("top_k", -2), ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1), ("min_p", 2.0),
    ("repetition_penalty", 0.0), ("max_tokens", 0), ("logprobs", -1), ("stop", [""]), ("stop_token_ids", [-3]),
])
def test_invalid_values_name_the_field_and_range(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}=.*allowed"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(("field", "value"), [
    ("n", True), ("n", 2.0), ("temperature", float("inf")), ("temperature", float("nan")), ("temperature", "0.5"),
    ("top_k", 2.5), ("top_k", True), ("top_p", float("nan")), ("repetition_penalty", float("inf")),
    ("seed", -1), ("seed", "42"), ("seed", 1.5), ("max_tokens", 2.5), ("max_tokens", True), ("logprobs", 1.5),
    ("stop", 5), ("stop_token_ids", ["a"]), ("stop_token_ids", [1.5]), ("stop_token_ids", 7),
    ("ignore_eos", "no"), ("skip_special_tokens", None), ("detokenize", 0), ("output_kind", 2),
    ("output_kind", "final_only"),
])
def test_wrong_types_and_non_finite_values_name_the_field_and_range(field, value):
    """A value of the wrong type is refused up front, not accepted to fail (or be silently
    truncated) later, in the middle of an engine step."""
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}=.*allowed"):
        SamplingParams(**{field: value})


def test_stop_strings_need_detokenize():
    with pytest.raises(ValueError, match=r"SamplingParams\.stop=.*detokenize=False.*stop_token_ids"):
        SamplingParams(detokenize=False, stop=["\n"])
    assert SamplingParams(detokenize=False, stop_token_ids=[10]).stop_token_ids == [10]


def test_numpy_numbers_are_accepted():
    params = SamplingParams(n=np.int64(2), temperature=np.float32(0.5), top_k=np.int32(3), seed=np.int64(7),
                            max_tokens=np.int64(4), stop_token_ids=np.array([3, 4]))
    assert params.stop_token_ids == [3, 4]


def test_a_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]


@given(logit_vectors)
def test_greedy_is_argmax_and_draws_nothing(logits):
    rng = make_generator(0)
    state = rng.bit_generator.state
    assert sample_token(logits, SamplingParams(temperature=0), rng) == int(np.argmax(logits))
    assert rng.bit_generator.state == state


@given(logit_vectors, st.integers(0, 2**32 - 1))
def test_top_k_one_is_greedy(logits, seed):
    assume(np.sum(logits == logits.max()) == 1)  # with a tie, top-1 keeps every tied token
    params = SamplingParams(temperature=1.0, top_k=1)
    assert sample_token(logits, params, make_generator(seed)) == int(np.argmax(logits))


@given(logit_vectors, st.floats(0.05, 1.0))
def test_top_p_keeps_the_smallest_set_reaching_p(logits, top_p):
    kept = np.isfinite(filter_logits(logits, 0, top_p, 0.0))
    probs = softmax(logits)
    assert probs[kept].sum() >= top_p - 1e-9
    # dropping the least likely kept token would fall short of top_p
    if kept.sum() > 1:
        assert probs[kept].sum() - probs[kept].min() < top_p + 1e-9


@given(logit_vectors, st.floats(0.0, 1.0))
def test_min_p_drops_only_tokens_below_the_threshold(logits, min_p):
    kept = np.isfinite(filter_logits(logits, 0, 1.0, min_p))
    probs = softmax(logits)
    np.testing.assert_array_equal(kept, probs >= min_p * probs.max())


@given(logit_vectors, st.integers(1, 50))
def test_top_k_keeps_k_tokens_unless_tied(logits, top_k):
    kept = np.isfinite(filter_logits(logits, top_k, 1.0, 0.0))
    assert kept.sum() >= min(top_k, logits.size)
    assert logits[kept].min() >= np.sort(logits)[-min(top_k, logits.size)]


def test_samples_follow_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = make_generator(1234)
    counts = np.bincount([sample_token(logits, SamplingParams(), rng) for _ in range(20000)], minlength=4)
    np.testing.assert_allclose(counts / 20000, [0.5, 0.3, 0.15, 0.05], atol=0.015)


def test_temperature_sharpens():
    logits = np.log(np.array([0.6, 0.4]))
    rng = make_generator(0)
    cold = np.mean([sample_token(logits, SamplingParams(temperature=0.25), rng) == 0 for _ in range(4000)])
    expected = 0.6**4 / (0.6**4 + 0.4**4)  # p^(1/T), renormalised
    assert abs(cold - expected) < 0.03


@given(logit_vectors, st.integers(0, 2**32 - 1))
def test_same_seed_same_token(logits, seed):
    params = SamplingParams(temperature=0.9, top_p=0.9)
    assert sample_token(logits, params, make_generator(seed)) == sample_token(logits, params, make_generator(seed))


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = np.array([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, np.array([0, 1, 1]), 2.0)
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0])


def test_logprobs_include_top_n_and_the_chosen_token():
    logits = np.array([3.0, 1.0, 2.0, 0.0])
    out = top_logprobs(logits, token_id=3, n=2)
    assert list(out)[:2] == [0, 2] and 3 in out
    np.testing.assert_allclose(sum(np.exp(v) for k, v in out.items() if k != 3), softmax(logits)[[0, 2]].sum())
