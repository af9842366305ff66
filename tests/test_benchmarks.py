"""The serving benchmark's workload generator and runner (fast; no timed assertions).

The benchmark scripts live in ``benchmarks/`` (not a package; they run as scripts), so
this module puts that directory on ``sys.path`` to import them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import FIXTURES

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import prefill_cap  # noqa: E402
import serving  # noqa: E402
import serving_scaling  # noqa: E402
from workload import (  # noqa: E402
    PRESETS,
    TOKEN_HIGH,
    TOKEN_LOW,
    LengthDistribution,
    Workload,
    chat_output_len,
    preset,
)

MODEL = FIXTURES / "llama_gqa"


# ------------------------------------------------------------------------------ workload


def test_workload_is_deterministic_given_the_seed():
    workload = Workload(num_requests=20, arrival="poisson", rate=5.0, shared_prefix_fraction=0.5)
    assert workload.generate() == workload.generate()
    other = Workload(num_requests=20, arrival="poisson", rate=5.0, shared_prefix_fraction=0.5, seed=1)
    assert other.generate() != workload.generate()


def test_the_arrival_process_does_not_change_the_prompts():
    offline = Workload(num_requests=10, arrival="offline").generate()
    poisson = Workload(num_requests=10, arrival="poisson", rate=3.0).generate()
    assert [(r.prompt_token_ids, r.max_tokens) for r in offline] == [(r.prompt_token_ids, r.max_tokens)
                                                                     for r in poisson]


@pytest.mark.parametrize("kind", ["fixed", "uniform", "lognormal", "capped_lognormal"])
def test_lengths_stay_within_their_bounds(kind):
    shape = {"median": 40, "sigma": 1.0} if kind == "capped_lognormal" else {}
    lengths = LengthDistribution(kind, 5, 300, **shape).sample(np.random.default_rng(0), 2000)
    assert lengths.min() >= 5 and lengths.max() <= 300
    if kind == "fixed":
        assert set(lengths.tolist()) == {300}
    else:
        assert len(set(lengths.tolist())) > 50  # varied lengths are the point


def test_lognormal_lengths_are_long_tailed_around_the_geometric_mean():
    lengths = LengthDistribution("lognormal", 16, 1024).sample(np.random.default_rng(0), 4000)
    assert abs(np.log(np.median(lengths)) - np.log(128)) < 0.15  # median near sqrt(16 * 1024)
    assert lengths.mean() > np.median(lengths)  # a right tail


def test_chat_answers_have_the_stated_median_a_heavy_tail_and_a_spike_at_the_cap():
    lengths = chat_output_len().sample(np.random.default_rng(0), 20_000)  # median 200, sigma 1, cap 768
    assert lengths.min() >= 1 and lengths.max() == 768
    assert abs(np.median(lengths) - 200) < 8  # the cap is above the median, so it keeps it
    at_cap = np.mean(lengths == 768)  # P(Z > ln(768 / 200)) = 8.9% of answers are cut at max_tokens
    assert 0.08 < at_cap < 0.10
    assert 1.3 < lengths.mean() / np.median(lengths) < 1.5  # e^0.5 = 1.65 uncapped; the cap trims the tail
    quartile = np.percentile(lengths, 75) / np.median(lengths)
    assert abs(quartile - math.exp(0.6745)) < 0.1  # sigma = 1: the upper quartile at e^0.6745 = 1.96x the median
    assert np.percentile(lengths, 90) > 3.4 * np.median(lengths)  # a long tail: p90 ~ 3.6x the median


def test_the_chat_preset_changes_only_the_answer_lengths():
    varied, chat = preset("varied", num_requests=24).generate(), preset("chat", num_requests=24).generate()
    assert [r.prompt_token_ids for r in varied] == [r.prompt_token_ids for r in chat]
    assert [r.max_tokens for r in varied] != [r.max_tokens for r in chat]
    assert PRESETS["chat"].max_seq_len <= 1024  # fits the embedded model's context
    short = preset("short", num_requests=24).generate()
    assert [r.max_tokens for r in short] == [r.max_tokens for r in varied]  # the same answers, after short prompts
    assert all(16 <= len(r.prompt_token_ids) <= 64 for r in short)
    with pytest.raises(ValueError, match="unknown workload preset"):
        preset("sharegpt")


def test_requests_respect_token_range_lengths_and_shared_prefix():
    workload = Workload(num_requests=40, input_len=LengthDistribution("uniform", 10, 20),
                        output_len=LengthDistribution("uniform", 3, 9), shared_prefix_fraction=0.25,
                        shared_prefix_len=12)
    requests = workload.generate()
    assert len({r.request_id for r in requests}) == 40
    for request in requests:
        assert all(TOKEN_LOW <= t <= TOKEN_HIGH for t in request.prompt_token_ids)
        assert 3 <= request.max_tokens <= 9
        assert 10 <= len(request.prompt_token_ids) <= 20 + 12
    prefix_counts = {}
    for request in requests:
        key = tuple(request.prompt_token_ids[:12])
        prefix_counts[key] = prefix_counts.get(key, 0) + 1
    assert max(prefix_counts.values()) == 10  # 25% of 40 share the prefix
    assert max(len(r.prompt_token_ids) for r in requests) <= workload.max_prompt_len


def test_arrivals_offline_at_zero_poisson_with_the_given_rate():
    assert {r.arrival_time for r in Workload(num_requests=8).generate()} == {0.0}
    arrivals = np.array([r.arrival_time for r in Workload(num_requests=3000, arrival="poisson",
                                                          rate=10.0).generate()])
    assert arrivals[0] == 0.0 and np.all(np.diff(arrivals) >= 0)
    assert math.isclose(np.diff(arrivals).mean(), 0.1, rel_tol=0.1)


@pytest.mark.parametrize("kwargs", [{"num_requests": 0}, {"arrival": "bursty"}, {"arrival": "poisson", "rate": 0},
                                    {"shared_prefix_fraction": 1.5}])
def test_bad_workloads_are_rejected(kwargs):
    with pytest.raises(ValueError):
        Workload(**kwargs)


def test_bad_length_distributions_are_rejected():
    with pytest.raises(ValueError, match="low <= high"):
        LengthDistribution("uniform", 10, 5)
    with pytest.raises(ValueError, match="unknown length distribution"):
        LengthDistribution("zipf", 1, 5)
    with pytest.raises(ValueError, match="median > 0 and sigma > 0"):
        LengthDistribution("capped_lognormal", 1, 5, median=3)
    with pytest.raises(ValueError, match="for capped_lognormal only"):
        LengthDistribution("uniform", 1, 5, sigma=1.0)


# -------------------------------------------------------------------------------- runner


def quick_workload(**overrides) -> Workload:
    settings = {"num_requests": 10, "input_len": LengthDistribution("uniform", 8, 40),
                "output_len": LengthDistribution("lognormal", 2, 64), "seed": 3, **overrides}
    return Workload(**settings)


@pytest.fixture(scope="module")
def quick_run():
    requests = quick_workload().generate()
    setup = serving.setup_for(requests, max_num_seqs=4, max_num_batched_tokens=32, block_size=8)
    results, _ = serving.compare_systems(MODEL, "numpy", requests, setup)
    bound = serving.run_memory_bound(MODEL, "numpy", requests, setup)
    return requests, setup, results, bound


def test_repeated_rounds_report_every_round_and_keep_each_systems_median_run():
    requests = quick_workload(num_requests=4).generate()
    setup = serving.setup_for(requests, max_num_seqs=2, max_num_batched_tokens=32, block_size=8)
    results, rounds = serving.compare_systems(MODEL, "numpy", requests, setup, repeats=3)
    assert len(rounds) == 3
    for name, result in results.items():
        speeds = sorted(r[name] for r in rounds)
        assert serving.summarize(result, requests)["output_tokens_per_s"] == pytest.approx(speeds[1])
    report = serving.output_length_report(quick_workload(), requests,
                                          {n: serving.summarize(r, requests) for n, r in results.items()}, rounds)
    assert report["round_ratios"][serving.CHUNKED] == [r[serving.CHUNKED] / r[serving.STATIC] for r in rounds]


def test_every_system_finishes_every_request_with_exactly_max_tokens(quick_run):
    requests, _, results, _ = quick_run
    for result in results.values():
        assert {r.request_id: len(result.outputs[r.request_id]) for r in requests} == \
            {r.request_id: r.max_tokens for r in requests}
        summary = serving.summarize(result, requests)
        assert summary["completed"]
        assert summary["output_tokens"] == sum(r.max_tokens for r in requests)
        assert summary["output_tokens_per_s"] > 0 and summary["requests_per_s"] > 0
        assert 0 < summary["ttft_p50_s"] <= summary["ttft_p99_s"]
        assert 0 < summary["kv_utilisation_mean"] <= 1 and 0 < summary["kv_live_fraction_mean"] <= 1


def test_all_systems_generate_the_same_greedy_tokens(quick_run):
    requests, _, results, _ = quick_run
    reference = results[serving.CHUNKED].outputs
    for result in results.values():
        same = sum(result.outputs[r.request_id] == reference[r.request_id] for r in requests)
        assert same >= len(requests) - 1  # a near-tie may flip one request in float32


def test_continuous_batching_needs_fewer_steps_than_static(quick_run):
    _, _, results, _ = quick_run
    static = len(results[serving.STATIC].log.steps)
    assert len(results[serving.PREFILL_FIRST].log.steps) < static
    assert len(results[serving.CHUNKED].log.steps) < static
    padding = serving.summarize(results[serving.STATIC], quick_run[0])["padding_tokens_computed"]
    assert padding > 0  # the varied output lengths made finished rows wait


def test_static_steps_are_one_prefill_then_the_longest_output_per_batch(quick_run):
    requests, setup, results, _ = quick_run
    batches = [requests[i:i + setup.max_num_seqs] for i in range(0, len(requests), setup.max_num_seqs)]
    assert len(results[serving.STATIC].log.steps) == sum(max(r.max_tokens for r in b) for b in batches)


def test_static_prefill_computes_left_padding_and_static_rows_count_the_waste(quick_run):
    requests, setup, results, _ = quick_run
    batches = [requests[i:i + setup.max_num_seqs] for i in range(0, len(requests), setup.max_num_seqs)]
    prompts = [[len(r.prompt_token_ids) for r in batch] for batch in batches]
    static = serving.summarize(results[serving.STATIC], requests)
    assert static["prompt_padding_tokens_computed"] == sum(len(p) * max(p) - sum(p) for p in prompts) > 0
    assert static["row_steps_per_output_token"] == pytest.approx(
        sum(len(b) * max(r.max_tokens for r in b) for b in batches) / sum(r.max_tokens for r in requests))
    report = serving.output_length_report(quick_workload(), requests,
                                          {n: serving.summarize(r, requests) for n, r in results.items()})
    assert report["static_rows_per_output_token"] == static["row_steps_per_output_token"] > 1
    assert report["ratio_to_static"][serving.STATIC] == 1.0 and report["completed"]
    # work: every token row computed. Static: padded prompts, then every row of every step after the first;
    # continuous batching (no preemption here): each prompt once and each output token but the last
    static_rows = sum(len(p) * max(p) + len(p) * (max(r.max_tokens for r in b) - 1)
                      for p, b in zip(prompts, batches, strict=True))
    assert static["tokens_computed"] == static_rows
    chunked = serving.summarize(results[serving.CHUNKED], requests)
    assert chunked["preemptions"] == 0
    assert chunked["tokens_computed"] == sum(len(r.prompt_token_ids) + r.max_tokens - 1 for r in requests)
    assert report["work_ratio"][serving.CHUNKED] == pytest.approx(static_rows / chunked["tokens_computed"])


def test_decode_scaling_reports_where_each_step_goes():
    scaling = serving_scaling.decode_scaling(MODEL, "numpy", [1, 3], prompt_len=4, steps=2, rounds=2, gemv_size=256,
                                             gemm_size=128)
    assert [row["batch_size"] for row in scaling["rows"]] == [1, 3]
    for row in scaling["rows"]:
        assert set(row["phases_s"]) == set(serving_scaling.PHASES)
        assert all(seconds >= 0 for seconds in row["phases_s"].values())
        assert row["phases_s"]["projections"] > 0 and row["phases_s"]["lm_head"] > 0
        assert row["gemm_flops_per_s"] > 0
        linear_seconds = row["phases_s"]["projections"] + row["phases_s"]["lm_head"]
        assert row["speedup_bound_linear_only"] == pytest.approx(
            row["batch_size"] * scaling["rows"][0]["step_s"] / linear_seconds)
        assert row["compute_roofline_tokens_per_s"] == pytest.approx(
            2 * scaling["gemm_peak_flops_per_s"] / scaling["weight_bytes_per_step"])
    memory_1, compute = scaling["rows"][0]["roofline_tokens_per_s"], scaling["rows"][0]["compute_roofline_tokens_per_s"]
    assert scaling["rows"][1]["roofline_tokens_per_s"] == pytest.approx(3 * memory_1)
    assert scaling["roofline_ratio_largest_vs_1"] == pytest.approx(min(3 * memory_1, compute) / min(memory_1, compute))


def test_paged_memory_wastes_less_and_fits_more_than_contiguous_rows(quick_run):
    requests, setup, results, bound = quick_run
    config = serving.check_model(MODEL, quick_workload())
    memory = serving.memory_report(setup, config, results[serving.STATIC], results[serving.CHUNKED], bound,
                                   requests)
    assert 0 <= memory["paged_waste"] < memory["contiguous_waste_same_schedule"] < 1
    assert memory["paged_waste"] < memory["contiguous_waste_static_run"]
    assert memory["paged_seqs_fit_peak_measured"] > memory["contiguous_seqs_fit"] == setup.max_num_seqs


def test_poisson_replay_adds_requests_when_they_arrive():
    requests = quick_workload(num_requests=5, arrival="poisson", rate=200.0).generate()
    setup = serving.setup_for(requests, max_num_seqs=4, max_num_batched_tokens=32, block_size=8)
    result = serving.run_engine(MODEL, "numpy", requests, setup, "fcfs", serving.CHUNKED)
    for request in requests:
        record = result.log.requests[request.request_id]
        assert record.arrival_time == pytest.approx(result.start + request.arrival_time)
        assert record.ttft > 0 and len(record.token_times) == request.max_tokens


def test_quick_cli_writes_a_sane_report(tmp_path):
    report = serving.main(["--model", str(MODEL), "--quick", "--skip-135m", "--no-plots", "--num-requests", "6",
                           "--max-num-seqs", "3", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "serving.json").read_text())
    assert saved["systems"].keys() == {serving.STATIC, serving.PREFILL_FIRST, serving.CHUNKED}
    assert all(s["completed"] for s in saved["systems"].values())
    assert saved["ratios_to_static"][serving.STATIC]["output_tokens_per_s"] == 1.0
    assert saved["by_output_lengths"].keys() == {"varied", "chat", "short"}
    by_workload = saved["by_output_lengths"]
    assert by_workload["short"]["prompt_len_mean"] < by_workload["varied"]["prompt_len_mean"]
    assert saved["by_output_lengths"]["chat"]["output_len"]["kind"] == "capped_lognormal"
    assert all(w["completed"] for w in saved["by_output_lengths"].values())
    assert report["decode_scaling"] is None


def test_prefill_cap_benchmark_caps_every_prompt_chunk_and_reports_against_no_cap(tmp_path):
    report = prefill_cap.main(["--model", str(MODEL), "--quick", "--long-input", "100", "150", "--short-input", "4",
                               "12", "--output-len", "2", "8", "--caps", "8", "24", "--rate", "1e6",
                               "--max-num-batched-tokens", "32", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "prefill_cap.json").read_text())
    assert [row["cap"] for row in saved["rows"]] == [0, 8, 24]  # the uncapped baseline is always run
    assert saved["num_long"] == round(0.2 * 12)
    largest = {row["cap"]: row["largest_prompt_chunk"] for row in report["rows"]}
    assert largest[0] > 24 and largest[8] == 8 and largest[24] == 24  # uncapped, a long prompt takes more
    uncapped = report["rows"][0]
    assert uncapped["short_ttft_p50_s_vs_uncapped"] == 1.0 and uncapped["long_ttft_p50_s"] > 0


def test_a_workload_too_long_for_the_model_is_refused():
    with pytest.raises(SystemExit, match="exceeds the model's context"):
        serving.check_model(MODEL, quick_workload(output_len=LengthDistribution("fixed", 1, 300)))


def test_decode_benchmark_pairs_every_step_with_a_gemv_and_takes_the_median_round():
    import decode

    probe = decode.LinearProbe("numpy", 1, 64, 64)
    steps, gemvs = decode.time_minibatch_decode(MODEL, "numpy", prompt_len=4, steps=5, probe=probe)
    assert len(steps) == len(gemvs) == 5 and min(steps + gemvs) > 0
    args = argparse.Namespace(backend="numpy", repeats=3, gemv_size=256, prompt_len=4, steps=3, no_hf=True)
    result = decode.benchmark_model("tiny", MODEL, args)
    assert len(result["rounds"]) == 3
    fractions = sorted(r["fraction_of_roofline"] for r in result["rounds"])
    assert result["fraction_of_roofline"] == pytest.approx(fractions[1])  # the median round
    for r in result["rounds"]:
        bandwidth = r["gemv_bandwidth_bytes_per_s"]
        assert r["roofline_tokens_per_s"] == pytest.approx(bandwidth / result["weight_bytes_per_step"])
    projections = result["projections"]  # each GEMV timed alone: the fused layer's four and the LM head
    assert list(projections) == [*decode.PROJECTIONS, "lm_head"]
    for p in projections.values():
        assert p["bytes"] == 4 * np.prod(p["shape"]) and p["bandwidth_bytes_per_s"] > 0


def test_attention_benchmark_cases_use_every_block_once_and_count_the_kv_bytes(tmp_path, monkeypatch):
    import attention

    monkeypatch.setattr(attention, "keep_freed_memory", lambda: False)  # leave the test process's allocator be

    from minibatch.attention import causal_attention
    from minibatch.backend import get_backend

    ops = get_backend("numpy")
    for scattered in (True, False):
        case = attention.decode_case(ops, num_seqs=3, context_len=20, block_size=8, heads=(4, 2, 8),
                                     scattered=scattered)
        tables = case["block_tables"]
        assert tables.shape == (3, 3) and sorted(tables.ravel().tolist()) == list(range(9))  # no block shared
        assert scattered or tables.ravel().tolist() == list(range(9))
        out = ops.cached_attention(**case)  # the call the benchmark times attends to each sequence's own keys
        for s in range(3):
            slots = (tables[s][:, None] * 8 + np.arange(8)).ravel()[:20]
            k = case["k_cache"].reshape(-1, 2, 8)[slots]
            v = case["v_cache"].reshape(-1, 2, 8)[slots]
            np.testing.assert_allclose(out[s], causal_attention(case["q"][s:s + 1], k, v, case["scale"])[0],
                                       rtol=1e-5, atol=1e-6)
    assert attention.kv_bytes(3, 20, 2, 8) == 3 * 20 * 2 * 8 * 2 * 4

    report = attention.main(["--quick", "--no-plot", "--out", str(tmp_path / "attention.json")])
    saved = json.loads((tmp_path / "attention.json").read_text())
    assert saved == json.loads(json.dumps(report)) and saved["freed_memory_kept"] is False
    quick = attention.QUICK
    assert [(r["num_seqs"], r["context_len"]) for r in saved["rows"]] == \
        [(s, c) for s in quick["batch_sizes"] for c in quick["context_lens"]]
    for row in saved["rows"]:
        assert row["kv_bytes"] == attention.kv_bytes(row["num_seqs"], row["context_len"], 3, 64)
        for layout in ("scattered", "in_order"):
            measured = row[layout]
            assert measured["seconds"] > 0 and measured["fraction_of_roofline"] > 0
            assert measured["bytes_per_s"] == pytest.approx(row["kv_bytes"] / measured["seconds"])


@pytest.mark.gpu
def test_attention_benchmark_times_the_gpu_kernel_also_in_one_partition(monkeypatch):
    """On the GPU backend each case is timed a third time with every context in one
    partition, and the row says how that compares with the kernel's own choice."""
    import attention

    monkeypatch.setattr(attention, "keep_freed_memory", lambda: False)
    rows = attention.measure("gpu", (1,), (24,), block_size=8, heads=(2, 1, 8), repeats=1, gemv_size=64)
    (row,) = rows
    assert set(row) >= {"scattered", "in_order", "one_partition"}
    assert row["one_partition"]["seconds"] > 0
    assert row["one_partition_over_split"] == pytest.approx(row["one_partition"]["seconds"]
                                                            / row["scattered"]["seconds"])
    assert [name for name, _, _ in attention.variants("numpy", 24)] == ["scattered", "in_order"]
