"""Why continuous batching and paged KV matter, measured side by side in one run.

Three ways to serve the same synthetic workload (``benchmarks/workload.py``: varied
prompt lengths, long-tailed output lengths, greedy, ``ignore_eos``), side by side:

* **static batching**, the way Hugging Face ``generate`` serves: take the next
  ``max_num_seqs`` requests, left-pad their prompts to the longest and prefill them,
  decode *all* of them every step until the longest is done (finished rows keep computing
  padding), only then start the next batch. It runs on a contiguous KV cache of
  max-length rows (``ContiguousKVCache`` and the engine's ``ModelRunner``, no engine);
* **continuous batching** (Orca): ``LLMEngine`` with ``policy="prefill_first"``: a finished
  sequence's slot is refilled at the next step, but whole prompts run alone and stall the
  decodes;
* **continuous batching with chunked prefill** (Sarathi-Serve): ``LLMEngine`` with
  ``policy="fcfs"``: decodes first, prompt chunks fill the rest of the token budget.

The paged engines get exactly the KV memory the static batcher's contiguous cache has,
and all three the same ``max_num_seqs``. Then, at that same memory, how many sequences
fit and how much of the allocated KV holds no token (contiguous max-length rows vs paged
blocks). The three systems run again on the same prompts with heavy-tailed answer
lengths (the ``chat`` preset), and a table gives the continuous/static ratio on both
workloads beside the most a continuous batcher could gain on each. Last, how decode
throughput scales with batch size on a SmolLM2-135M-shaped checkpoint (at batch 1 decode
is memory-bound, so more sequences per step come cheap until arithmetic takes over),
and where a step's time goes at each batch size.

    python benchmarks/serving.py [--model DIR] [--num-requests 32] [--arrival offline|poisson]
        [--rate R] [--max-num-seqs 32] [--max-num-batched-tokens 256] [--block-size 16]
        [--chat-output MEDIAN CAP] [--quick] [--skip-chat] [--skip-135m] [--backend numpy|gpu]

It prints tables, writes ``benchmarks/results/serving.json`` and ``serving_*.png``.
Latencies come from the engine's ``EventLog`` (TTFT, TPOT as in DistServe). The machine
is noisy, so read the ratios; on a busy CPU ``OMP_NUM_THREADS=1`` gives steadier numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from decode import measure_gemv_bandwidth, weight_bytes_per_step, write_smollm2_shaped
from workload import PRESETS, LengthDistribution, Request, Workload, chat_output_len, describe

from minibatch.backend import get_backend
from minibatch.checkpoint import load_weights
from minibatch.config import ModelConfig
from minibatch.engine import LLMEngine
from minibatch.kv_cache import ContiguousKVCache, PagedKVCache, kv_bytes_per_token
from minibatch.llm import DEFAULT_MODEL
from minibatch.metrics import EventLog, RequestRecord, StepRecord
from minibatch.model import ForwardBatch, ModelRunner
from minibatch.sampling import SamplingParams

RESULTS = Path(__file__).parent / "results"
STATIC, PREFILL_FIRST, CHUNKED = "static", "continuous", "continuous_chunked"
PAD_TOKEN = 0  # what static batching left-pads prompts with (computed, never attended to)
LABELS = {STATIC: "static batching", PREFILL_FIRST: "continuous (prefill-first)",
          CHUNKED: "continuous + chunked prefill"}
POLICIES = {PREFILL_FIRST: "prefill_first", CHUNKED: "fcfs"}


# ----------------------------------------------------------------------------- results


@dataclass(slots=True)
class KVSample:
    """The KV cache after one step: sequences holding KV, the slots holding their tokens,
    the slots reserved for them, and the padding tokens the step computed (static only)."""

    num_seqs: int
    live_slots: int
    allocated_slots: int
    padding_tokens: int = 0


@dataclass(slots=True)
class RunResult:
    """One system's run: the event log (steps and per-request timings), the generated
    tokens, and a KV sample per logged step."""

    name: str
    log: EventLog
    start: float  # perf_counter at the start of the run
    outputs: dict[str, list[int]]
    kv_samples: list[KVSample]
    kv_slots: int  # slots of the whole KV memory
    cpu_seconds: float  # process CPU time of the run: less sensitive than wall time to a busy machine
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ServingSetup:
    """How the systems are configured; all three share ``max_num_seqs`` and the KV memory."""

    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    row_len: int  # a contiguous row: the longest prompt + the longest output of the workload

    @property
    def kv_slots(self) -> int:
        """Token slots of KV memory: what the static batcher's ``max_num_seqs`` rows hold."""
        return self.max_num_seqs * self.row_len

    @property
    def num_blocks(self) -> int:
        """Paged blocks in the same memory."""
        return self.kv_slots // self.block_size


def greedy(max_tokens: int) -> SamplingParams:
    """Exactly ``max_tokens`` greedy tokens, whatever the model says."""
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def setup_for(requests: list[Request], max_num_seqs: int, max_num_batched_tokens: int,
              block_size: int) -> ServingSetup:
    """The shared configuration; contiguous rows fit the longest prompt plus the longest
    output actually drawn (the most favourable row length for the contiguous cache)."""
    row_len = max(len(r.prompt_token_ids) for r in requests) + max(r.max_tokens for r in requests)
    return ServingSetup(max_num_seqs, max_num_batched_tokens, block_size, row_len)


# ------------------------------------------------------------------ continuous batching


def paged_sample(cache: PagedKVCache) -> KVSample:
    """Slots the running sequences hold vs slots their block tables reserve (per sequence:
    a block shared through the prefix cache counts once for each sequence using it)."""
    allocated = sum(len(table) for table in cache.tables.values()) * cache.block_size
    return KVSample(len(cache.tables), sum(cache.num_tokens.values()), allocated)


def admit_arrived(engine: LLMEngine, pending: deque[Request], start: float) -> None:
    """Add every pending request whose arrival time has passed, stamped with that time."""
    now = time.perf_counter() - start
    while pending and pending[0].arrival_time <= now:
        request = pending.popleft()
        engine.add_request(request.request_id, {"prompt_token_ids": request.prompt_token_ids},
                           greedy(request.max_tokens), arrival_time=start + request.arrival_time)


def replay(engine: LLMEngine, requests: list[Request], name: str) -> RunResult:
    """Replay a workload on an engine in real time: before each step, add the requests
    that have arrived; when idle, sleep until the next arrival."""
    pending = deque(sorted(requests, key=lambda r: r.arrival_time))
    outputs: dict[str, list[int]] = {}
    samples: list[KVSample] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    while pending or engine.has_unfinished_requests():
        admit_arrived(engine, pending, start)
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, start + pending[0].arrival_time - time.perf_counter()))
            continue
        steps_before = len(engine.log.steps)
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = output.token_ids
        if len(engine.log.steps) == steps_before:
            raise RuntimeError(f"{name}: the engine scheduled nothing with requests waiting; "
                               "give it more KV memory or a larger token budget")
        samples.append(paged_sample(engine.cache))
    cfg = engine.engine_config
    settings = {"policy": cfg.policy, "max_num_seqs": cfg.max_num_seqs,
                "max_num_batched_tokens": cfg.max_num_batched_tokens, "block_size": cfg.block_size,
                "num_blocks": engine.cache.num_blocks}
    return RunResult(name, engine.log, start, outputs, samples, engine.cache.num_blocks * cfg.block_size,
                     time.process_time() - cpu_start, settings)


def run_engine(model: Path, backend: str, requests: list[Request], setup: ServingSetup, policy: str,
               name: str, max_num_seqs: int | None = None) -> RunResult:
    """A fresh engine with the setup's KV memory, replaying ``requests``.

    Without chunked prefill a whole sequence (prompt + output, recomputed after a
    preemption) must fit one step's token budget, so ``prefill_first`` gets a budget of
    at least the longest sequence.
    """
    budget = setup.max_num_batched_tokens
    if policy == "prefill_first":
        budget = max(budget, max(len(r.prompt_token_ids) + r.max_tokens for r in requests))
    engine = LLMEngine(model, backend, policy=policy, block_size=setup.block_size, num_blocks=setup.num_blocks,
                       max_num_seqs=max_num_seqs or setup.max_num_seqs, max_num_batched_tokens=budget)
    return replay(engine, requests, name)


# ---------------------------------------------------------------------- static batching


@dataclass(slots=True)
class StaticBatch:
    """One static batch in flight: its requests and the tokens sampled for them."""

    requests: list[Request]
    tokens: dict[str, list[int]]  # request id -> every token sampled (padding ones too)

    @property
    def longest(self) -> int:
        return max(r.max_tokens for r in self.requests)

    @property
    def prompt_padding(self) -> int:
        """Pad tokens that left-padding every prompt to the longest adds to the prefill."""
        lengths = [len(r.prompt_token_ids) for r in self.requests]
        return len(lengths) * max(lengths) - sum(lengths)

    def live_slots(self, step: int) -> int:
        """Slots holding a real token after decode step ``step`` (0 = the prefill): a row
        holds its prompt and ``step`` generated tokens, of which ``max_tokens - 1`` are real
        (the last sampled token is never fed back)."""
        return sum(len(r.prompt_token_ids) + min(step, r.max_tokens - 1) for r in self.requests)


def run_static(runner: ModelRunner, requests: list[Request], setup: ServingSetup) -> RunResult:
    """Static batching on a contiguous cache of ``max_num_seqs`` rows of ``row_len`` slots.

    Batches are the next ``max_num_seqs`` requests that have arrived when the previous
    batch is done (offline: fixed batches in order). Token times are taken when a token is
    sampled, as the engine does; a request finishes when its batch does (``generate``
    returns then).
    """
    cache = ContiguousKVCache(setup.max_num_seqs, setup.row_len)
    kv = runner.new_kv(cache.num_blocks, cache.block_size)
    log, samples, outputs = EventLog(), [], {}
    pending = deque(sorted(requests, key=lambda r: r.arrival_time))
    start, cpu_start = time.perf_counter(), time.process_time()
    for request in requests:
        log.requests[request.request_id] = RequestRecord(request.request_id, start + request.arrival_time,
                                                         len(request.prompt_token_ids))
    while pending:
        time.sleep(max(0.0, start + pending[0].arrival_time - time.perf_counter()))
        now = time.perf_counter() - start
        batch = StaticBatch([], {})
        while pending and pending[0].arrival_time <= now and len(batch.requests) < setup.max_num_seqs:
            batch.requests.append(pending.popleft())
        run_static_batch(runner, cache, kv, batch, log, samples, num_waiting=len(pending))
        for request in batch.requests:
            outputs[request.request_id] = batch.tokens[request.request_id][:request.max_tokens]
    settings = {"max_num_seqs": setup.max_num_seqs, "row_len": setup.row_len}
    return RunResult(STATIC, log, start, outputs, samples, setup.kv_slots, time.process_time() - cpu_start, settings)


def run_static_batch(runner: ModelRunner, cache: ContiguousKVCache, kv: Any, batch: StaticBatch,
                     log: EventLog, samples: list[KVSample], num_waiting: int) -> None:
    """Prefill every prompt of the batch in one forward (left-padded to the longest), then
    decode every row each step until the longest output is done; free the rows."""
    for request in batch.requests:
        cache.allocate(request.request_id)
        batch.tokens[request.request_id] = []
    for step in range(batch.longest):
        step_start = time.perf_counter()
        entries = [static_entry(cache, request, batch.tokens[request.request_id], step)
                   for request in batch.requests]
        if step == 0:
            forward_batch = ForwardBatch.build(entries + prompt_padding(cache, batch.requests))
            forward_batch.logits_indices = forward_batch.logits_indices[:len(entries)]  # no logits for padding
        else:
            forward_batch = ForwardBatch.build(entries)
        logits = runner.run(forward_batch, kv)
        now = time.perf_counter()
        real = 0
        for row, request in enumerate(batch.requests):
            batch.tokens[request.request_id].append(int(np.argmax(logits[row])))
            if step < request.max_tokens:  # a wanted token; later ones are padding
                log.requests[request.request_id].token_times.append(now)
                real += 1
        log_static_step(log, step_start, batch, step, real, num_waiting, cache)
        padding = batch.prompt_padding if step == 0 else len(batch.requests) - real
        samples.append(KVSample(len(batch.requests), batch.live_slots(step), len(batch.requests) * cache.max_len,
                                padding_tokens=padding))
    end = time.perf_counter()
    for request in batch.requests:
        log.requests[request.request_id].finished_time = end
        cache.free(request.request_id)


def static_entry(cache: ContiguousKVCache, request: Request, generated: list[int],
                 step: int) -> tuple[list[int], int, list[int], np.ndarray]:
    """One row of a static step: the whole prompt at step 0, then the last token."""
    prompt = request.prompt_token_ids
    new, position = (prompt, 0) if step == 0 else ([generated[-1]], len(prompt) + step - 1)
    slots = cache.slot_mapping(request.request_id, np.arange(position, position + len(new)))
    return new, position, cache.block_table(request.request_id), slots


def prompt_padding(cache: ContiguousKVCache, requests: list[Request]) -> list[tuple[list[int], int, list[int],
                                                                                  np.ndarray]]:
    """The left-padding of a static prefill, as extra rows of pad tokens to compute.

    ``generate`` pads every prompt to the batch's longest and runs the padded ``[B, T]``
    block, masking the pads out of attention: the pads cost a full token's work each
    (projections, MLP, attention) and change no real token. Here a row's pads run as a
    separate sequence placed right after its prompt, so they attend over ``T`` slots as a
    padded row's last queries would, and write their K/V into slots the row's own decode
    overwrites before it ever reads them; no logits are taken for them. (Decode attention
    over the pads, which ``generate`` also pays, is not reproduced: a small favour to
    static batching.)
    """
    longest = max(len(r.prompt_token_ids) for r in requests)
    return [([PAD_TOKEN] * (longest - len(r.prompt_token_ids)), len(r.prompt_token_ids),
             cache.block_table(r.request_id),
             cache.slot_mapping(r.request_id, np.arange(len(r.prompt_token_ids), longest)))
            for r in requests if len(r.prompt_token_ids) < longest]


def log_static_step(log: EventLog, start: float, batch: StaticBatch, step: int, real: int, num_waiting: int,
                    cache: ContiguousKVCache) -> None:
    """A ``StepRecord`` for a static step: rows count as blocks; padding is not a decode."""
    prefill = sum(len(r.prompt_token_ids) for r in batch.requests) if step == 0 else 0
    log.steps.append(StepRecord(
        step=len(log.steps), start_time=start, duration=time.perf_counter() - start, num_prefill_tokens=prefill,
        num_decode_seqs=real if step else 0, num_prefill_seqs=len(batch.requests) if step == 0 else 0,
        num_preemptions=0, num_running=len(batch.requests), num_waiting=num_waiting,
        blocks_used=len(batch.requests), blocks_cached_free=0, blocks_free=cache.num_free_rows))


# ---------------------------------------------------------------------------- summaries


def summarize(result: RunResult, requests: list[Request]) -> dict[str, Any]:
    """Throughput, latency percentiles (from the ``EventLog``), preemptions and KV use."""
    log, samples = result.log, result.kv_samples
    records = [log.requests[r.request_id] for r in requests]
    makespan = max(r.finished_time for r in records) - result.start
    output_tokens = sum(len(tokens) for tokens in result.outputs.values())
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    latency = log.summary()
    return {
        "label": LABELS.get(result.name, result.name), "settings": result.settings,
        "completed": all(len(result.outputs.get(r.request_id, [])) == r.max_tokens for r in requests),
        "makespan_s": makespan, "cpu_s": result.cpu_seconds, "num_steps": len(log.steps),
        "output_tokens": output_tokens, "output_tokens_per_s": output_tokens / makespan,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / makespan,
        "requests_per_s": len(requests) / makespan,
        "output_tokens_per_cpu_s": output_tokens / result.cpu_seconds,
        **{f"{key}_s": latency[key] for key in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "e2e_p50",
                                                 "e2e_p99") if key in latency},
        "preemptions": int(latency["preemptions"]),
        "prefill_tokens_computed": sum(s.num_prefill_tokens for s in log.steps),
        "padding_tokens_computed": sum(s.padding_tokens for s in samples),
        "prompt_padding_tokens_computed": sum(sample.padding_tokens for sample, step in zip(samples, log.steps,
                                                                                           strict=True)
                                              if step.num_prefill_seqs),
        "row_steps_per_output_token": sum(s.num_running for s in log.steps) / output_tokens,
        "peak_running": max(s.num_running for s in log.steps),
        "mean_running": statistics.fmean(s.num_running for s in log.steps),
        "kv_utilisation_mean": statistics.fmean(s.blocks_used / (s.blocks_used + s.blocks_free) for s in log.steps),
        "kv_live_fraction_mean": statistics.fmean(s.live_slots / result.kv_slots for s in samples),
        "kv_waste_mean": mean_waste(samples),
        "ttft_s": [r.ttft for r in records], "tpot_s": [r.tpot for r in records],
    }


def mean_waste(samples: list[KVSample], row_len: int | None = None) -> float:
    """Mean over steps of (allocated slots not holding a token) / (allocated slots). With
    ``row_len``, as if every sequence had reserved a contiguous row of that length."""
    fractions = []
    for s in samples:
        allocated = s.num_seqs * row_len if row_len else s.allocated_slots
        if allocated:
            fractions.append(1 - s.live_slots / allocated)
    return statistics.fmean(fractions) if fractions else 0.0


RATIO_HEADERS = {"output_tokens_per_s": "out tok/s", "total_tokens_per_s": "tok/s", "requests_per_s": "req/s",
                 "output_tokens_per_cpu_s": "tok/CPU-s",
                 "ttft_p50_s": "TTFT p50", "ttft_p99_s": "TTFT p99", "tpot_p50_s": "TPOT p50",
                 "tpot_p99_s": "TPOT p99", "num_steps": "steps"}
RATIO_KEYS = tuple(RATIO_HEADERS)


def ratios_to(baseline: dict[str, Any], summary: dict[str, Any]) -> dict[str, float | None]:
    """``summary / baseline`` for every comparable number (None where one is missing)."""
    return {key: summary[key] / baseline[key] if baseline.get(key) and summary.get(key) is not None else None
            for key in RATIO_KEYS}


# ------------------------------------------------------------------------------ memory


def memory_report(setup: ServingSetup, config: ModelConfig, static: RunResult, chunked: RunResult,
                  bound: RunResult, requests: list[Request]) -> dict[str, Any]:
    """At equal KV memory: sequences that fit, and the fraction of allocated KV that holds
    no token, for contiguous max-length rows and for paged blocks."""
    block = setup.block_size
    mean_blocks = statistics.fmean(-(-(len(r.prompt_token_ids) + r.max_tokens) // block) for r in requests)
    return {
        "kv_slots": setup.kv_slots, "kv_bytes": setup.kv_slots * kv_bytes_per_token(config),
        "row_len": setup.row_len, "max_model_len": config.max_model_len, "block_size": block,
        "num_blocks": setup.num_blocks,
        "contiguous_seqs_fit": setup.kv_slots // setup.row_len,
        "contiguous_seqs_fit_max_model_len_rows": setup.kv_slots // config.max_model_len,
        "paged_seqs_fit_peak_measured": max(s.num_running for s in bound.log.steps),
        "paged_seqs_fit_mean_measured": statistics.fmean(s.num_running for s in bound.log.steps),
        "paged_seqs_fit_computed": setup.num_blocks / mean_blocks,
        "paged_memory_bound_preemptions": sum(s.num_preemptions for s in bound.log.steps),
        "contiguous_waste_static_run": mean_waste(static.kv_samples),
        "contiguous_waste_same_schedule": mean_waste(chunked.kv_samples, row_len=setup.row_len),
        "paged_waste": mean_waste(chunked.kv_samples),
        "paged_waste_memory_bound": mean_waste(bound.kv_samples),
        "paged_waste_goal": 0.04,
    }


# ------------------------------------------------------------------------ decode scaling


def decode_scaling(model_dir: Path, backend: str, batch_sizes: list[int], prompt_len: int, steps: int,
                   rounds: int = 3, gemv_size: int = 8192) -> dict[str, Any]:
    """Tokens/s of pure decode steps at each batch size (prefill excluded), beside the
    memory roofline ``batch * bandwidth / weight bytes per step``, and where a step's time
    goes.

    All sequences are prefilled once; each batch size then decodes its first ``batch``
    sequences from the end of the prompt, overwriting the same cache positions. The batch
    sizes take turns, ``rounds`` times (1, 2, ..., 32, 1, 2, ...), so that load from
    elsewhere on the machine falls on all of them alike; each turn starts with one untimed
    warm-up step, and a batch size's time is the median of its ``rounds * steps`` steps.
    A last turn per batch size times each backend function (:func:`time_phases`).
    """
    config = ModelConfig.from_dir(model_dir)
    runner = ModelRunner(config, load_weights(model_dir, config), get_backend(backend))
    size = max(batch_sizes)
    cache = ContiguousKVCache(size, prompt_len + steps + 1)
    kv = runner.new_kv(cache.num_blocks, cache.block_size)
    prompts = np.random.default_rng(1).integers(3, min(config.vocab_size, 256), (size, prompt_len)).tolist()
    for seq in range(size):
        cache.allocate(seq)
    entries = [(prompts[s], 0, cache.block_table(s), cache.slot_mapping(s, np.arange(prompt_len))) for s in range(size)]
    first = np.argmax(runner.run(ForwardBatch.build(entries), kv), axis=-1).tolist()
    times: dict[int, list[float]] = {batch: [] for batch in batch_sizes}
    for _ in range(rounds):
        for batch in batch_sizes:
            times[batch] += time_decode_steps(runner, cache, kv, first[:batch], prompt_len, steps + 1)[1:]
    rows = [{"batch_size": batch, "step_s": statistics.median(times[batch]),
             "tokens_per_s": batch / statistics.median(times[batch]),
             "phases_s": time_phases(runner, cache, kv, first[:batch], prompt_len, steps)} for batch in batch_sizes]
    bandwidth = measure_gemv_bandwidth(backend, gemv_size, gemv_size)
    step_bytes = weight_bytes_per_step(runner.weights, config.tie_word_embeddings)
    for row in rows:
        row["speedup_vs_batch_1"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        row["roofline_tokens_per_s"] = row["batch_size"] * bandwidth / step_bytes
        # every float32 weight read is one multiply-add per sequence: 2 FLOPs per 4 bytes
        gemm = row["phases_s"]["projections"] + row["phases_s"]["lm_head"]
        row["gemm_flops_per_s"] = row["batch_size"] * step_bytes / 2 / gemm if gemm else None
    return {"model": str(model_dir.name), "parameters": config.num_parameters, "prompt_len": prompt_len,
            "decode_steps": steps, "rounds": rounds, "gemv_bandwidth_bytes_per_s": bandwidth,
            "weight_bytes_per_step": step_bytes,
            "rows": rows, "ratio_largest_vs_1": rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"]}


def time_decode_steps(runner: ModelRunner, cache: ContiguousKVCache, kv: Any, tokens: list[int], prompt_len: int,
                      steps: int) -> list[float]:
    """Seconds of each of ``steps`` greedy decode steps of sequences ``0..len(tokens)-1``."""
    times = []
    for step in range(steps):
        batch = decode_batch(cache, tokens, prompt_len + step)
        start = time.perf_counter()
        logits = runner.run(batch, kv)  # host logits: a whole step
        times.append(time.perf_counter() - start)
        tokens = np.argmax(logits, axis=-1).tolist()
    return times


def decode_batch(cache: ContiguousKVCache, tokens: list[int], position: int) -> ForwardBatch:
    """One decode step of sequences ``0..len(tokens)-1``, all at ``position``."""
    return ForwardBatch.build([([token], position, cache.block_table(s), cache.slot_mapping(s, np.array([position])))
                               for s, token in enumerate(tokens)])


PHASES = ("projections", "lm_head", "attention", "elementwise", "python", "batch_and_sampling")
PHASE_LABELS = dict(zip(PHASES, ("projections", "LM head", "attention", "elementwise", "python", "batch+argmax"),
                        strict=True))


def time_phases(runner: ModelRunner, cache: ContiguousKVCache, kv: Any, tokens: list[int], prompt_len: int,
                steps: int) -> dict[str, float]:
    """Median seconds per decode step in each phase, from ``steps`` steps (after a warm-up)
    with every backend function timed:

    * ``projections``: the linear layers of the decoder blocks (GEMMs);
    * ``lm_head``: the final linear layer to vocabulary logits;
    * ``attention``: writing K/V into the cache and attending over it;
    * ``elementwise``: everything else the backend does (norms, RoPE, SwiGLU, embedding);
    * ``python``: the rest of ``ModelRunner.run`` (the layer loop, host/device copies);
    * ``batch_and_sampling``: building the ``ForwardBatch`` and the greedy argmax.
    """
    ops = runner.backend
    spent: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    def timed(name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            ops.synchronize()
            phase = ("lm_head" if args[1] is runner.weights.lm_head else "projections") if name == "linear" \
                else "attention" if "attention" in name or name in ("write_kv", "copy_blocks") else "elementwise"
            spent[phase] += time.perf_counter() - start
            return result
        return call

    functions = {f.name: timed(f.name, getattr(ops, f.name)) for f in fields(ops)
                 if callable(getattr(ops, f.name)) and f.name not in ("xp", "name")}
    runner.backend = replace(ops, **functions)
    per_step: dict[str, list[float]] = {phase: [] for phase in PHASES}
    try:
        for step in range(steps + 1):
            spent.update(dict.fromkeys(PHASES, 0.0))
            start = time.perf_counter()
            batch = decode_batch(cache, tokens, prompt_len + step)
            built = time.perf_counter()
            logits = runner.run(batch, kv)
            ran = time.perf_counter()
            tokens = np.argmax(logits, axis=-1).tolist()
            spent["python"] = (ran - built) - sum(spent[p] for p in PHASES[:4])
            spent["batch_and_sampling"] = (built - start) + (time.perf_counter() - ran)
            if step:  # the first is a warm-up
                for phase in PHASES:
                    per_step[phase].append(spent[phase])
    finally:
        runner.backend = ops
    return {phase: statistics.median(values) for phase, values in per_step.items()}


# ---------------------------------------------------------------------------- printing


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def print_systems(summaries: dict[str, dict[str, Any]]) -> None:
    header = (f"{'system':<30}{'out tok/s':>10}{'tok/s':>9}{'req/s':>7}{'tok/CPU-s':>10}{'TTFT p50':>10}{'p99':>8}"
              f"{'TPOT p50':>10}{'p99':>7}{'steps':>7}{'preempt':>8}{'KV used':>8}{'KV live':>8}")
    print("\n" + header + "\n" + "-" * len(header))
    for s in summaries.values():
        print(f"{s['label']:<30}{s['output_tokens_per_s']:>10.1f}{s['total_tokens_per_s']:>9.1f}"
              f"{s['requests_per_s']:>7.2f}{s['output_tokens_per_cpu_s']:>10.1f}"
              f"{ms(s.get('ttft_p50_s')):>10}{ms(s.get('ttft_p99_s')):>8}"
              f"{ms(s.get('tpot_p50_s')):>10}{ms(s.get('tpot_p99_s')):>7}{s['num_steps']:>7}"
              f"{s['preemptions']:>8}{s['kv_utilisation_mean']:>8.0%}{s['kv_live_fraction_mean']:>8.0%}")
    print("(tok/CPU-s = output tokens per second of this process's CPU time, steadier than wall time on a busy "
          "machine;\n TTFT/TPOT in ms; KV used = allocated blocks/rows of the pool, KV live = slots holding a token)")


def print_ratios(ratios: dict[str, dict[str, float | None]], summaries: dict[str, dict[str, Any]]) -> None:
    header = f"{'ratio to static batching':<30}" + "".join(f"{RATIO_HEADERS[k]:>10}" for k in RATIO_KEYS)
    print("\n" + header + "\n" + "-" * len(header))
    for name, row in ratios.items():
        cells = "".join(f"{'-' if v is None else f'{v:.2f}x':>10}" for v in row.values())
        print(f"{summaries[name]['label']:<30}{cells}")
    print("(throughput: higher is better; latencies and steps: lower is better)")


def print_by_workload(by_workload: dict[str, dict[str, Any]], max_num_seqs: int) -> None:
    print(f"\ncontinuous vs static batching by output-length distribution (same run, same prompts, max_num_seqs "
          f"{max_num_seqs}); goal: continuous >= 3x static")
    header = (f"{'workload':<10}{'output length':<30}{'p50':>5}{'mean':>6}{'p90':>5}{'max':>5}{'static rows':>12}"
              f"{'prefill-first':>15}{'chunked':>9}{'(CPU time)':>17}")
    print(header + "\n" + "-" * len(header))
    for name, w in by_workload.items():
        dist = w["output_len"]
        shape = (f"{dist['kind']} {dist['low']}..{dist['high']}" if dist["median"] is None
                 else f"lognormal p50 {dist['median']:g} s {dist['sigma']:g} cap {dist['high']}")
        wall, cpu = w["ratio_to_static"], w["cpu_ratio_to_static"]
        print(f"{name:<10}{shape:<30}{w['output_len_p50']:>5.0f}{w['output_len_mean']:>6.0f}{w['output_len_p90']:>5.0f}"
              f"{w['output_len_max']:>5}{w['static_rows_per_output_token']:>11.2f}x{wall[PREFILL_FIRST]:>14.2f}x"
              f"{wall[CHUNKED]:>8.2f}x{cpu[PREFILL_FIRST]:>8.2f}x /{cpu[CHUNKED]:>6.2f}x")
    print("(output tokens per second, and per CPU-second, over static batching's; static rows = the rows static "
          "batching computed\n per wanted token, about E[max of B outputs] / E[output]: the gain of a continuous "
          "batcher that wasted no step)")


def print_memory(memory: dict[str, Any], bound: dict[str, Any], static: dict[str, Any]) -> None:
    print(f"\nKV memory {memory['kv_bytes'] / 2**20:.1f} MiB = {memory['kv_slots']} token slots "
          f"= {memory['num_blocks']} blocks of {memory['block_size']}")
    print(f"  sequences that fit: contiguous rows of {memory['row_len']} (longest prompt + longest output) "
          f"{memory['contiguous_seqs_fit']}, rows of max_model_len {memory['max_model_len']} "
          f"{memory['contiguous_seqs_fit_max_model_len_rows']}; paged: peak {memory['paged_seqs_fit_peak_measured']} "
          f"running (mean {memory['paged_seqs_fit_mean_measured']:.1f}, "
          f"{memory['paged_memory_bound_preemptions']} preemptions), "
          f"computed {memory['paged_seqs_fit_computed']:.1f} average sequences")
    print(f"  wasted KV (allocated, holding no token): contiguous {memory['contiguous_waste_static_run']:.1%} "
          f"(static run), {memory['contiguous_waste_same_schedule']:.1%} (continuous schedule); "
          f"paged {memory['paged_waste']:.1%} (memory-bound run {memory['paged_waste_memory_bound']:.1%}); "
          f"goal < {memory['paged_waste_goal']:.0%}")
    print(f"  the memory-bound paged run (chunked prefill, max_num_seqs={bound['settings']['max_num_seqs']}): "
          f"{bound['output_tokens_per_s']:.1f} output tokens/s "
          f"({bound['output_tokens_per_s'] / static['output_tokens_per_s']:.2f}x static batching), "
          f"TTFT p50 {ms(bound.get('ttft_p50_s'))} ms, TPOT p50 {ms(bound.get('tpot_p50_s'))} ms")


def print_scaling(scaling: dict[str, Any]) -> None:
    print(f"\ndecode scaling, {scaling['model']} ({scaling['parameters'] / 1e6:.1f}M parameters), medians of "
          f"{scaling['rounds']} x {scaling['decode_steps']} steps after a {scaling['prompt_len']}-token prompt")
    header = f"{'batch':>6}{'ms/step':>10}{'tok/s':>10}{'vs 1':>7}{'roofline':>10}{'GEMM GFLOP/s':>14}"
    print(header + "\n" + "-" * len(header))
    for row in scaling["rows"]:
        flops = row["gemm_flops_per_s"]
        print(f"{row['batch_size']:>6}{row['step_s'] * 1e3:>10.1f}{row['tokens_per_s']:>10.1f}"
              f"{row['speedup_vs_batch_1']:>6.1f}x{row['roofline_tokens_per_s']:>10.0f}"
              f"{'-' if flops is None else f'{flops / 1e9:.1f}':>14}")
    print(f"(roofline = batch x {scaling['gemv_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s measured GEMV bandwidth "
          f"/ {scaling['weight_bytes_per_step'] / 1e6:.1f} MB of weights per step: the memory bound, which a CPU "
          "leaves for the compute bound as the batch grows; GEMM GFLOP/s = the rate the linear layers ran at)")
    header = f"{'where a step goes (ms)':<24}" + "".join(f"{PHASE_LABELS[p]:>13}" for p in PHASES) + f"{'total':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for row in scaling["rows"]:
        phases = row["phases_s"]
        print(f"{'batch ' + str(row['batch_size']):<24}" + "".join(f"{phases[p] * 1e3:>13.1f}" for p in PHASES)
              + f"{sum(phases.values()) * 1e3:>9.1f}")


# ------------------------------------------------------------------------------- plots


def plot_all(results: dict[str, RunResult], summaries: dict[str, dict[str, Any]], memory: dict[str, Any],
             scaling: dict[str, Any] | None, out_dir: Path) -> list[Path]:
    """Write the ``serving_*.png`` figures; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [plot_throughput(plt, summaries, out_dir / "serving_throughput.png"),
             plot_latency(plt, summaries, out_dir / "serving_latency.png"),
             plot_timeline(plt, results, summaries, out_dir / "serving_timeline.png"),
             plot_memory(plt, memory, out_dir / "serving_memory.png")]
    if scaling is not None:
        paths.append(plot_scaling(plt, scaling, out_dir / "serving_decode_scaling.png"))
    return paths


def plot_throughput(plt: Any, summaries: dict[str, dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [s["label"] for s in summaries.values()]
    values = [s["output_tokens_per_s"] for s in summaries.values()]
    bars = ax.bar(labels, values, color=["#999999", "#4c72b0", "#55a868"])
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(f"{value / values[0]:.2f}x", (bar.get_x() + bar.get_width() / 2, value), ha="center",
                    va="bottom")
    ax.margins(y=0.12)
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput on the same workload (ratio to static batching)")
    return save(plt, fig, path)


def plot_latency(plt: Any, summaries: dict[str, dict[str, Any]], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "ttft_s", "time to first token"), (axes[1], "tpot_s", "time per output token")):
        for s in summaries.values():
            values = np.sort([v * 1e3 for v in s[key] if v is not None])
            ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=s["label"])
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title.capitalize()} CDF")
    axes[1].legend()
    return save(plt, fig, path)


def plot_timeline(plt: Any, results: dict[str, RunResult], summaries: dict[str, dict[str, Any]], path: Path) -> Path:
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.4 * len(results)), sharex=True, sharey=True)
    for ax, (name, result) in zip(np.atleast_1d(axes), results.items(), strict=True):
        steps = np.arange(len(result.log.steps))
        prefill = np.array([s.num_prefill_tokens for s in result.log.steps])
        decode = np.array([s.num_decode_seqs for s in result.log.steps])
        padding = np.array([s.padding_tokens for s in result.kv_samples])
        ax.bar(steps, prefill, width=1.0, color="#dd8452", label="prefill tokens")
        ax.bar(steps, decode, width=1.0, bottom=prefill, color="#4c72b0", label="decode tokens")
        ax.bar(steps, padding, width=1.0, bottom=prefill + decode, color="#bbbbbb", label="padding (wasted)")
        ax.set_yscale("symlog", linthresh=16)
        ax.set_ylabel("tokens / step")
        ax.set_title(summaries[name]["label"], fontsize=10)
    np.atleast_1d(axes)[0].legend(loc="upper right", fontsize=8)
    np.atleast_1d(axes)[-1].set_xlabel("step")
    return save(plt, fig, path)


def plot_memory(plt: Any, memory: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    fit = {"contiguous\n(max_model_len rows)": memory["contiguous_seqs_fit_max_model_len_rows"],
           "contiguous\n(workload max rows)": memory["contiguous_seqs_fit"],
           "paged\n(measured peak)": memory["paged_seqs_fit_peak_measured"]}
    axes[0].bar(list(fit), list(fit.values()), color=["#999999", "#999999", "#55a868"])
    axes[0].set_ylabel("sequences running at once")
    axes[0].set_title("Sequences that fit in equal KV memory")
    waste = {"contiguous\n(static run)": memory["contiguous_waste_static_run"],
             "contiguous\n(same schedule)": memory["contiguous_waste_same_schedule"],
             "paged": memory["paged_waste"]}
    axes[1].bar(list(waste), [100 * v for v in waste.values()], color=["#999999", "#999999", "#55a868"])
    axes[1].axhline(100 * memory["paged_waste_goal"], color="red", linestyle="--", label="goal")
    axes[1].set_ylabel("% of allocated KV holding no token")
    axes[1].set_title("Wasted KV memory (mean over steps)")
    axes[1].legend()
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    return save(plt, fig, path)


def plot_scaling(plt: Any, scaling: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    batch = [r["batch_size"] for r in scaling["rows"]]
    measured = [r["tokens_per_s"] for r in scaling["rows"]]
    ax.plot(batch, measured, "o-", label="measured")
    ax.plot(batch, [measured[0] * b for b in batch], "--", color="gray", label="linear (batch x batch-1)")
    ax.plot(batch, [r["roofline_tokens_per_s"] for r in scaling["rows"]], ":", color="red",
            label="memory roofline")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequences decoding together")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"Decode throughput vs batch size ({scaling['model']})")
    ax.legend()
    return save(plt, fig, path)


def save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------- main


VARIED, CHAT = PRESETS["varied"], PRESETS["chat"]
FULL = {"num_requests": 128, "input_len": (VARIED.input_len.low, VARIED.input_len.high),
        "output_len": (VARIED.output_len.low, VARIED.output_len.high),
        "chat_output": (int(CHAT.output_len.median), CHAT.output_len.high),
        "scaling_steps": 8, "scaling_rounds": 3, "scaling_batches": [1, 2, 4, 8, 16, 32]}
QUICK = {"num_requests": 12, "input_len": (8, 48), "output_len": (4, 96), "chat_output": (25, 96),
         "scaling_steps": 3, "scaling_rounds": 1, "scaling_batches": [1, 2, 4, 8]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint directory (default: embedded)")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "gpu"])
    parser.add_argument("--num-requests", type=int, help=f"default {FULL['num_requests']} ({QUICK['num_requests']} "
                        "with --quick)")
    parser.add_argument("--arrival", default="offline", choices=["offline", "poisson"])
    parser.add_argument("--rate", type=float, default=4.0, help="requests/s for --arrival poisson")
    parser.add_argument("--input-len", type=int, nargs=2, metavar=("MIN", "MAX"), help="own prompt tokens")
    parser.add_argument("--input-dist", default="uniform", choices=["fixed", "uniform", "lognormal"])
    parser.add_argument("--output-len", type=int, nargs=2, metavar=("MIN", "MAX"), help="max_tokens")
    parser.add_argument("--output-dist", default="lognormal", choices=["fixed", "uniform", "lognormal"])
    parser.add_argument("--chat-output", type=int, nargs=2, metavar=("MEDIAN", "CAP"),
                        help="answer lengths of the second, heavy-tailed workload: a lognormal (sigma 1) with this "
                        f"median, cut at CAP (default {FULL['chat_output'][0]} {FULL['chat_output'][1]}, "
                        f"{QUICK['chat_output'][0]} {QUICK['chat_output'][1]} with --quick)")
    parser.add_argument("--skip-chat", action="store_true", help="compare on the first workload only")
    parser.add_argument("--shared-prefix-fraction", type=float, default=0.0)
    parser.add_argument("--shared-prefix-len", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="a smoke run in seconds: a small workload, and "
                        "decode scaling on the served model instead of the 135M-shaped one")
    parser.add_argument("--skip-135m", action="store_true", help="skip decode scaling on the 135M-shaped model")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for serving.json and the plots")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key in ("num_requests", "input_len", "output_len", "chat_output"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    return args


def workload_from(args: argparse.Namespace) -> Workload:
    return Workload(num_requests=args.num_requests, arrival=args.arrival, rate=args.rate,
                    input_len=LengthDistribution(args.input_dist, *args.input_len),
                    output_len=LengthDistribution(args.output_dist, *args.output_len),
                    shared_prefix_fraction=args.shared_prefix_fraction, shared_prefix_len=args.shared_prefix_len,
                    seed=args.seed)


def chat_workload_from(args: argparse.Namespace, workload: Workload) -> Workload:
    """The first workload with heavy-tailed answers: the same prompts and arrivals (each
    aspect draws from its own stream of the seed), only the output lengths differ."""
    return replace(workload, output_len=chat_output_len(*args.chat_output))


def check_model(model: Path, workload: Workload, fix: str = "lower --input-len / --output-len / "
                "--shared-prefix-len") -> ModelConfig:
    """The model's config; fails with what to do when it is missing or too short."""
    if not (model / "config.json").is_file():
        raise SystemExit(f"no checkpoint at {model} (the embedded model may not be trained yet): "
                         "pass --model DIR, e.g. --model tests/fixtures/hf/llama_gqa --quick")
    config = ModelConfig.from_dir(model)
    if workload.max_seq_len > config.max_model_len:
        raise SystemExit(f"the workload's longest prompt + output ({workload.max_seq_len} tokens) exceeds the model's "
                         f"context ({config.max_model_len}): {fix}")
    return config


def compare_systems(model: Path, backend: str, requests: list[Request], setup: ServingSetup,
                    verbose: bool = False) -> dict[str, RunResult]:
    """Static batching, continuous batching and continuous batching with chunked prefill,
    one after another on the same requests and the same KV memory."""
    results = {}
    for name in (STATIC, PREFILL_FIRST, CHUNKED):
        if verbose:
            print(f"running {LABELS[name]} ...", flush=True)
        if name == STATIC:
            engine = LLMEngine(model, backend, block_size=setup.block_size, num_blocks=1)  # for its runner
            results[name] = run_static(engine.runner, requests, setup)
        else:
            results[name] = run_engine(model, backend, requests, setup, POLICIES[name], name)
    return results


def run_memory_bound(model: Path, backend: str, requests: list[Request], setup: ServingSetup) -> RunResult:
    """Chunked continuous batching in the same KV memory with no sequence limit: how many
    sequences the paged cache actually holds at once."""
    return run_engine(model, backend, requests, setup, "fcfs", "paged_memory_bound", max_num_seqs=len(requests))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    workload = workload_from(args)
    config = check_model(args.model, workload)
    chat = None if args.skip_chat else chat_workload_from(args, workload)
    if chat is not None:
        check_model(args.model, chat, fix="lower --chat-output CAP or --input-len, or pass --skip-chat")
    requests = workload.generate()
    setup = setup_for(requests, args.max_num_seqs, args.max_num_batched_tokens, args.block_size)
    print(f"model {args.model} ({config.num_parameters / 1e6:.1f}M parameters), backend {args.backend}")
    print(f"workload 'varied': {json.dumps(describe(requests))}")

    results = compare_systems(args.model, args.backend, requests, setup, verbose=True)
    summaries = {name: summarize(result, requests) for name, result in results.items()}
    print(f"\nsetup: max_num_seqs {setup.max_num_seqs}; KV memory = {setup.max_num_seqs} contiguous rows of "
          f"{setup.row_len} = {setup.num_blocks} blocks of {setup.block_size}; token budget per step: chunked "
          f"{setup.max_num_batched_tokens}, prefill-first "
          f"{summaries[PREFILL_FIRST]['settings']['max_num_batched_tokens']} (a whole sequence must fit one step)")
    ratios = {name: ratios_to(summaries[STATIC], s) for name, s in summaries.items()}
    print("running the paged engine memory-bound (no max_num_seqs limit) ...", flush=True)
    bound = run_memory_bound(args.model, args.backend, requests, setup)
    bound_summary = summarize(bound, requests)
    memory = memory_report(setup, config, results[STATIC], results[CHUNKED], bound, requests)
    print_systems(summaries)
    print_ratios(ratios, summaries)
    print_memory(memory, bound_summary, summaries[STATIC])

    by_workload = {"varied": output_length_report(workload, requests, summaries)}
    if chat is not None:
        by_workload["chat"] = compare_on(chat, args, "chat")
    print_by_workload(by_workload, setup.max_num_seqs)

    scaling = run_scaling(args)
    if scaling is not None:
        print_scaling(scaling)

    report = {"benchmark": "serving", "backend": args.backend, "model": str(args.model),
              "machine": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
              "threads": {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "workload": describe(requests), "setup": {**vars_of(setup), "kv_slots": setup.kv_slots,
                                                        "num_blocks": setup.num_blocks},
              "systems": summaries, "ratios_to_static": ratios, "by_output_lengths": by_workload,
              "paged_memory_bound": bound_summary, "memory": memory, "decode_scaling": scaling}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "serving.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    if not args.no_plots:
        for path in plot_all(results, summaries, memory, scaling, args.out):
            print(f"wrote {path}")
    return report


def compare_on(workload: Workload, args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The three systems on a second workload, with the same settings (its own KV memory:
    contiguous rows as long as its own longest prompt + output)."""
    requests = workload.generate()
    print(f"\nworkload '{name}': {json.dumps(describe(requests))}")
    setup = setup_for(requests, args.max_num_seqs, args.max_num_batched_tokens, args.block_size)
    results = compare_systems(args.model, args.backend, requests, setup, verbose=True)
    return output_length_report(workload, requests, {n: summarize(r, requests) for n, r in results.items()})


def output_length_report(workload: Workload, requests: list[Request],
                         summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One workload's output lengths and each system's throughput against static batching.

    ``static_rows_per_output_token`` is the rows static batching computed per token that
    was asked for: each batch runs ``B`` rows for as many steps as its longest output, so
    this is ``sum(B * longest) / sum(outputs)``, about ``E[max of B outputs] / E[output]``,
    the gain a continuous batcher that wasted no row and no step would have.
    """
    outputs = np.array([r.max_tokens for r in requests])
    return {"output_len": {name: getattr(workload.output_len, name) for name in workload.output_len.__slots__},
            "output_len_p50": float(np.median(outputs)), "output_len_mean": float(outputs.mean()),
            "output_len_p90": float(np.percentile(outputs, 90)), "output_len_max": int(outputs.max()),
            "static_rows_per_output_token": summaries[STATIC]["row_steps_per_output_token"],
            "output_tokens_per_s": {name: s["output_tokens_per_s"] for name, s in summaries.items()},
            "ratio_to_static": {name: s["output_tokens_per_s"] / summaries[STATIC]["output_tokens_per_s"]
                                for name, s in summaries.items()},
            "cpu_ratio_to_static": {name: s["output_tokens_per_cpu_s"] / summaries[STATIC]["output_tokens_per_cpu_s"]
                                    for name, s in summaries.items()},
            "completed": all(s["completed"] for s in summaries.values())}


def run_scaling(args: argparse.Namespace) -> dict[str, Any] | None:
    """Decode scaling on a SmolLM2-135M-shaped random checkpoint (with ``--quick``: on the
    served model, a few steps, as a smoke test of the code path)."""
    preset = QUICK if args.quick else FULL
    if args.skip_135m:
        return None
    if args.quick:
        print("decode scaling (quick: on the served model) ...", flush=True)
        return decode_scaling(args.model, args.backend, preset["scaling_batches"], 16, preset["scaling_steps"],
                              preset["scaling_rounds"], gemv_size=2048)
    print("decode scaling on a SmolLM2-135M-shaped checkpoint (writing it first) ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_smollm2_shaped(Path(tmp) / "smollm2-135m-shaped")
        return decode_scaling(model_dir, args.backend, preset["scaling_batches"], 16, preset["scaling_steps"],
                              preset["scaling_rounds"])


def vars_of(obj: Any) -> dict[str, Any]:
    """A slotted dataclass's fields as a dict."""
    return {name: getattr(obj, name) for name in obj.__slots__}


if __name__ == "__main__":
    main()
