"""The three serving systems the serving benchmark compares, on one shared setup.

* static batching on a contiguous KV cache of max-length rows (``run_static``), the way
  Hugging Face ``generate`` serves;
* continuous batching on ``LLMEngine``'s paged cache (``run_engine``), with the policy
  ``prefill_first`` (early vLLM) or ``fcfs`` (chunked prefill, Sarathi-Serve).

Each run returns a ``RunResult``: the engine's ``EventLog``, the generated tokens and a
sample of the KV cache after every step. ``benchmarks/serving.py`` runs them.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from workload import Request

from minibatch.engine import LLMEngine
from minibatch.kv_cache import ContiguousKVCache, PagedKVCache
from minibatch.metrics import EventLog, RequestRecord, StepRecord
from minibatch.model import ForwardBatch, ModelRunner
from minibatch.sampling import RequestOutputKind, SamplingParams

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
    block_pairs: int = 0  # consecutive entries of the block tables (paged only)
    adjacent_pairs: int = 0  # ... of which the second block is the first's neighbour in the pool


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
    """Exactly ``max_tokens`` greedy tokens, whatever the model says, as token ids and at
    the end: no text is decoded (``detokenize=False``) and no output is built before the
    request finishes (``FINAL_ONLY``), as static batching returns, like ``generate``."""
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                          output_kind=RequestOutputKind.FINAL_ONLY)


def setup_for(requests: list[Request], max_num_seqs: int, max_num_batched_tokens: int,
              block_size: int) -> ServingSetup:
    """The shared configuration; contiguous rows fit the longest prompt plus the longest
    output actually drawn (the most favourable row length for the contiguous cache)."""
    row_len = max(len(r.prompt_token_ids) for r in requests) + max(r.max_tokens for r in requests)
    return ServingSetup(max_num_seqs, max_num_batched_tokens, block_size, row_len)


# ------------------------------------------------------------------ continuous batching


def paged_sample(cache: PagedKVCache) -> KVSample:
    """Slots the running sequences hold vs slots their block tables reserve (per sequence:
    a block shared through the prefix cache counts once for each sequence using it), and
    how many consecutive table entries are neighbouring blocks (reads that stream)."""
    tables = cache.tables.values()
    allocated = sum(len(table) for table in tables) * cache.block_size
    pairs = sum(len(table) - 1 for table in tables if table)
    adjacent = sum(b == a + 1 for table in tables for a, b in zip(table, table[1:], strict=False))
    return KVSample(len(cache.tables), sum(cache.num_tokens.values()), allocated, block_pairs=pairs,
                    adjacent_pairs=adjacent)


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

