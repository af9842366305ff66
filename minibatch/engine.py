"""The serving engine: requests in, one batched forward per step, tokens out.

``LLMEngine`` ties the pieces together the way vLLM's does. Each :meth:`~LLMEngine.step`
asks the :class:`~minibatch.scheduler.Scheduler` for a batch, turns it into one flat
:class:`~minibatch.model.ForwardBatch` over the paged KV cache, runs the model, samples
the sequences whose chunk reached their end, and records what happened in the
:class:`~minibatch.metrics.EventLog`. ``LLM.generate`` and streaming run on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from minibatch.backend import get_backend
from minibatch.checkpoint import load_weights
from minibatch.config import ModelConfig
from minibatch.kv_cache import PagedKVCache, check_kv_cache_dtype, kivi_residual_bytes, kv_bytes_per_block
from minibatch.metrics import EventLog, RequestRecord, StepRecord
from minibatch.model import ForwardBatch, ModelRunner, ModelWeights
from minibatch.outputs import CompletionOutput, RequestMetrics, RequestOutput, TextTracker
from minibatch.quant import check_scheme, quantization_of, quantize_model
from minibatch.sampling import (
    RequestOutputKind,
    SamplingParams,
    is_int,
    is_number,
    make_generator,
    sample_token,
    top_logprobs,
)
from minibatch.scheduler import Scheduler, SchedulerOutput, Sequence, SequenceStatus, get_policy
from minibatch.tokenizer import Tokenizer, load_tokenizer

PromptType = str | dict[str, Any] | list[int]


@dataclass(slots=True)
class EngineConfig:
    """How the engine batches and how big its KV cache is.

    Raises ``ValueError`` naming the field and the allowed values on a bad setting.
    """

    block_size: int = 16
    num_blocks: int | None = None  # default: derived from kv_cache_memory
    kv_cache_memory: int = 256 * 2**20  # bytes for K and V of all layers (in kv_cache_dtype)
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    long_prefill_token_threshold: int = 0  # most prompt tokens of one sequence per step; 0: no cap
    policy: str = "fcfs"  # "fcfs" | "priority" | "prefill_first"
    enable_prefix_caching: bool = True
    watermark: float = 0.01  # fraction of blocks kept free when admitting
    kv_cache_dtype: str = "float32"  # "float32" | "int8" (per token and head) | "kivi2" (2-bit KIVI)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every setting; ``ValueError`` names the first bad one and what it may be."""
        _setting(is_int(self.block_size) and self.block_size >= 1, "block_size", self.block_size, "an integer >= 1")
        _setting(self.num_blocks is None or (is_int(self.num_blocks) and self.num_blocks >= 1), "num_blocks",
                 self.num_blocks, "None (derive it from kv_cache_memory) or an integer >= 1")
        _setting(is_int(self.kv_cache_memory) and self.kv_cache_memory >= 1, "kv_cache_memory",
                 self.kv_cache_memory, "an integer number of bytes >= 1, e.g. 2 * 2**30 for 2 GiB")
        _setting(is_int(self.max_num_seqs) and self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs,
                 "an integer >= 1")
        _setting(is_int(self.max_num_batched_tokens) and self.max_num_batched_tokens >= 1, "max_num_batched_tokens",
                 self.max_num_batched_tokens, "an integer >= 1 (tokens one step may compute)")
        _setting(is_int(self.long_prefill_token_threshold) and self.long_prefill_token_threshold >= 0,
                 "long_prefill_token_threshold", self.long_prefill_token_threshold,
                 "an integer >= 0 (most prompt tokens one sequence computes per step; 0 for no cap)")
        policy = get_policy(self.policy)
        _setting(policy.chunked_prefill or self.long_prefill_token_threshold == 0, "long_prefill_token_threshold",
                 self.long_prefill_token_threshold, f"0 with policy '{self.policy}', which never splits a prompt "
                 "(or choose policy 'fcfs' or 'priority' to cap prompt chunks)")
        _setting(isinstance(self.enable_prefix_caching, bool), "enable_prefix_caching", self.enable_prefix_caching,
                 "True or False")
        _setting(is_number(self.watermark) and 0 <= self.watermark < 1, "watermark", self.watermark,
                 "a fraction in [0, 1)")
        check_kv_cache_dtype(self.kv_cache_dtype)

    @property
    def num_residual_rows(self) -> int:
        """Float residual rows a KIVI cache keeps: one per sequence that can run at once."""
        return self.max_num_seqs if self.kv_cache_dtype == "kivi2" else 0

    def resolve_num_blocks(self, config: ModelConfig) -> int:
        """Blocks in the pool: as configured, or as many as the memory budget holds (after
        a KIVI cache's residual rows), but no more than ``max_num_seqs`` full-context
        sequences need."""
        if self.num_blocks is not None:
            return self.num_blocks
        residual = self.num_residual_rows * kivi_residual_bytes(config, self.block_size)
        if residual >= self.kv_cache_memory:
            raise ValueError(f"kv_cache_memory={self.kv_cache_memory:,} bytes does not even hold the KIVI residual "
                             f"rows of {self.max_num_seqs} sequences ({residual:,} bytes): raise it or lower "
                             "max_num_seqs")
        per_block = kv_bytes_per_block(config, self.kv_cache_dtype, self.block_size)
        by_memory = (self.kv_cache_memory - residual) // per_block
        enough = self.max_num_seqs * -(-config.max_model_len // self.block_size) + 1
        return max(1, min(by_memory, enough))


def _setting(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"EngineConfig.{name}={value!r} is invalid: allowed values are {allowed}")


@dataclass(slots=True)
class RequestState:
    """A request in flight: its sequences (``n`` samples) and their text."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[Sequence]
    texts: list[TextTracker]
    logprobs: list[list[dict[int, float]] | None]
    record: RequestRecord
    forked: bool = False
    sent: dict[int, tuple[int, int]] = field(default_factory=dict)  # sample -> (tokens, characters) sent (DELTA)

    @property
    def finished(self) -> bool:
        return len(self.sequences) == self.params.n and all(s.status.finished for s in self.sequences)

    def output(self) -> RequestOutput | None:
        """This step's output, as ``params.output_kind`` asks: everything so far, what is
        new since the last output, or (``FINAL_ONLY``) None until the request finishes."""
        kind = self.params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not self.finished:
            return None
        completions = []
        for s, text, logprobs in zip(self.sequences, self.texts, self.logprobs, strict=True):
            tokens, chars = s.output_token_ids, text.text
            if kind == RequestOutputKind.DELTA:
                num_tokens, num_chars = self.sent.get(s.sample_index, (0, 0))
                self.sent[s.sample_index] = (len(tokens), len(chars))
                tokens, chars = tokens[num_tokens:], chars[num_chars:]
                logprobs = None if logprobs is None else logprobs[num_tokens:]
            elif logprobs is not None:
                logprobs = list(logprobs)
            completions.append(CompletionOutput(s.sample_index, chars, tokens, s.status.finish_reason, logprobs))
        record = self.record
        metrics = RequestMetrics(record.arrival_time, record.token_times[0] if record.token_times else None,
                                 record.finished_time)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, completions,
                             finished=self.finished, metrics=metrics)


class LLMEngine:
    """Continuous batching over a paged KV cache.

    ``add_request`` validates and queues, ``step`` runs one batched forward and returns
    the outputs of the requests that advanced, ``abort_request`` ends a request and frees
    its blocks at once. ``log`` holds per-step and per-request metrics.

    ``quantization`` (one of :data:`minibatch.quant.SCHEMES`) quantizes the float
    checkpoint's projections at load; a checkpoint saved quantized loads as it is, and
    ``quantization`` must then be left out. ``self.quantization`` says which scheme runs.
    """

    def __init__(self, model: str | Path | None = None, backend: str = "numpy",
                 engine_config: EngineConfig | None = None, quantization: str | None = None, **overrides: Any):
        from minibatch.llm import resolve_model_dir

        if engine_config is not None and overrides:
            raise ValueError(f"engine settings came both as engine_config and as keywords ({', '.join(overrides)}): "
                             "pass them one way")
        self.engine_config = engine_config or EngineConfig(**overrides)
        self.engine_config.validate()  # (again, if the config was changed after it was built)
        if quantization is not None:
            check_scheme(quantization)  # fail before reading any weights
        self.model_dir = resolve_model_dir(model)
        self.config = ModelConfig.from_dir(self.model_dir)
        self.tokenizer: Tokenizer = load_tokenizer(self.model_dir, self.config.bos_token_id,
                                                   self.config.eos_token_ids, self.config.vocab_size)
        weights = self._load_weights(quantization)
        self.quantization = quantization_of(weights)
        self.runner = ModelRunner(self.config, weights, get_backend(backend), self.engine_config.kv_cache_dtype)
        self.reset()

    def _load_weights(self, quantization: str | None) -> ModelWeights:
        """The checkpoint's weights, quantized with ``quantization`` if one is asked for."""
        weights = load_weights(self.model_dir, self.config)
        if quantization is None:
            return weights
        stored = quantization_of(weights)
        if stored is not None:
            raise ValueError(f"{self.model_dir} is already quantized ({stored}): load it without quantization=, "
                             "or quantize its float checkpoint instead")
        return quantize_model(weights, quantization)

    def reset(self) -> None:
        """A fresh, empty KV cache, scheduler and event log (the weights stay loaded)."""
        cfg = self.engine_config
        self.cache = PagedKVCache(cfg.resolve_num_blocks(self.config), cfg.block_size, cfg.enable_prefix_caching,
                                  cfg.num_residual_rows)
        self.runner.allocate_kv(self.cache.num_blocks, cfg.block_size, max(1, cfg.num_residual_rows))
        self.scheduler = Scheduler(self.cache, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.policy,
                                   cfg.watermark, cfg.long_prefill_token_threshold)
        self.requests: dict[str, RequestState] = {}
        self.log = EventLog()
        self._next_seq_id = 0

    # -------------------------------------------------------------- requests

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    priority: int = 0, arrival_time: float | None = None) -> None:
        """Validate and queue a request. Raises ``ValueError`` (and changes nothing) for a
        duplicate id, a ``priority`` that is not an integer, an ``arrival_time`` that is not
        a number, or anything :meth:`check_request` rejects."""
        if request_id in self.requests:
            raise ValueError(f"request id '{request_id}' is already in use: give each unfinished request its own")
        if not is_int(priority):
            raise ValueError(f"priority={priority!r} is invalid: it must be an integer (lower runs first)")
        if arrival_time is not None and not is_number(arrival_time):
            raise ValueError(f"arrival_time={arrival_time!r} is invalid: it must be a time.perf_counter() value "
                             "or None (now)")
        params = SamplingParams() if params is None else params
        text, ids = self.check_request(prompt, params)
        now = time.perf_counter() if arrival_time is None else arrival_time
        sequence = self._new_sequence(request_id, list(ids), len(ids), params, now, 0, priority)
        record = RequestRecord(request_id, now, len(ids))
        self.requests[request_id] = RequestState(request_id, text, ids, params, [sequence],
                                                 [TextTracker(self.tokenizer, params, ids)],
                                                 [[] if params.logprobs is not None else None], record)
        self.log.requests[request_id] = record
        self.scheduler.add(sequence)

    def check_request(self, prompt: PromptType,
                      params: SamplingParams | None = None) -> tuple[str | None, list[int]]:
        """Validate a request without queuing it; returns the prompt's ``(text, token ids)``.

        Raises ``ValueError`` saying what is wrong and what to do for a bad prompt (see
        :meth:`encode_prompt`), ``params`` that are not a :class:`SamplingParams` or whose
        ``stop_token_ids`` lie outside the vocabulary, ``n`` above ``max_num_seqs``, or a
        request that could never fit the KV cache (or, for a policy without chunked
        prefill, one step's token budget).
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__} {params!r}: "
                             "build them with SamplingParams(...)")
        text, ids = self.encode_prompt(prompt)
        outside = [t for t in params.stop_token_ids if t >= self.config.vocab_size]
        if outside:
            raise ValueError(f"SamplingParams.stop_token_ids has {outside[0]}, outside the vocabulary "
                             f"[0, {self.config.vocab_size}): the model can never produce it")
        self._check_fits(len(ids), params)
        if params.n > self.scheduler.max_num_seqs:
            raise ValueError(f"n={params.n} samples run as {params.n} sequences at once, but max_num_seqs is "
                             f"{self.scheduler.max_num_seqs}: lower n or raise max_num_seqs")
        return text, ids

    def abort_request(self, request_id: str) -> bool:
        """End a request now and free its blocks; False if it is unknown or already done."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        for sequence in state.sequences:
            if not sequence.status.finished:
                self.scheduler.finish(sequence, SequenceStatus.FINISHED_ABORTED)
        state.record.finished_time = time.perf_counter()
        state.record.aborted = True
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ step

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns the outputs of requests that produced tokens or finished
        (with ``output_kind=FINAL_ONLY``: finished only), in the form their ``output_kind`` asks."""
        start = time.perf_counter()
        scheduled = self.scheduler.schedule()
        for sequence in scheduled.preempted:
            self.requests[sequence.request_id].record.num_preemptions += 1
        for item in scheduled.scheduled:
            if item.sequence.sample_index == 0 and item.sequence.num_cached_tokens:
                self.requests[item.sequence.request_id].record.num_cached_tokens = item.sequence.num_cached_tokens
        if scheduled.is_empty:
            return []
        logits = self.runner.run(self._build_batch(scheduled))
        advanced: dict[str, RequestState] = {}
        for row, item in enumerate(scheduled.scheduled):
            sequence = item.sequence
            samples = item.samples
            sequence.num_computed_tokens += item.num_tokens
            self.cache.commit(sequence.seq_id, sequence.token_ids[:sequence.num_computed_tokens])
            if samples:
                state = self.requests[sequence.request_id]
                self._sample(state, sequence, logits[row])
                advanced[state.request_id] = state
        self._log_step(start, scheduled)
        now = time.perf_counter()
        for state in advanced.values():
            if state.finished:
                state.record.finished_time = now
                del self.requests[state.request_id]
        return [output for state in advanced.values() if (output := state.output()) is not None]

    def _build_batch(self, scheduled: SchedulerOutput) -> ForwardBatch:
        entries = []
        for item in scheduled.scheduled:
            sequence, start = item.sequence, item.sequence.num_computed_tokens
            end = start + item.num_tokens
            entries.append((sequence.token_ids[start:end], start, self.cache.block_table(sequence.seq_id),
                            self.cache.slots(sequence.seq_id, start, end)))
        batch = ForwardBatch.build(entries)
        batch.block_copies = np.array(self.cache.pending_copies, dtype=np.int64).reshape(-1, 2)
        self.cache.pending_copies.clear()
        if self.cache.num_residual_rows:
            batch.residual_rows = np.array([self.cache.residual_row[item.sequence.seq_id]
                                            for item in scheduled.scheduled], dtype=np.int64)
            batch.row_copies = np.array(self.cache.pending_row_copies, dtype=np.int64).reshape(-1, 2)
            self.cache.pending_row_copies.clear()
        return batch

    # -------------------------------------------------------------- sampling

    def _sample(self, state: RequestState, sequence: Sequence, logits: np.ndarray) -> None:
        """Sample the sequence's next token; the first sample of an ``n > 1`` request
        forks the other samples from it, sharing the prompt's blocks."""
        if state.params.n > 1 and not state.forked:
            state.forked = True
            for index in range(1, state.params.n):
                child = self._new_sequence(state.request_id, list(sequence.token_ids), sequence.num_prompt_tokens,
                                           state.params, sequence.arrival_time, index, sequence.priority)
                child.num_computed_tokens = sequence.num_computed_tokens
                self.cache.fork(sequence.seq_id, child.seq_id)
                self.scheduler.add_running(child)
                state.sequences.append(child)
                state.texts.append(TextTracker(self.tokenizer, state.params, state.prompt_token_ids))
                state.logprobs.append([] if state.params.logprobs is not None else None)
                self._append_token(state, child, logits)
        self._append_token(state, sequence, logits)

    def _append_token(self, state: RequestState, sequence: Sequence, logits: np.ndarray) -> None:
        params, index = state.params, sequence.sample_index
        seen = np.asarray(sequence.token_ids) if params.repetition_penalty != 1 else None
        token = sample_token(logits, params, sequence.rng, seen)
        sequence.token_ids.append(token)
        if index == 0:
            state.record.token_times.append(time.perf_counter())
        if state.logprobs[index] is not None:
            state.logprobs[index].append(top_logprobs(logits, token, params.logprobs))
        status = self._stop_status(state.texts[index], sequence, token)
        if status is not None:
            self.scheduler.finish(sequence, status)

    def _stop_status(self, text: TextTracker, sequence: Sequence, token: int) -> SequenceStatus | None:
        if text.stops_on_token(token):
            text.finish()
            return SequenceStatus.FINISHED_STOPPED
        _, hit_stop_string = text.append(token)
        if hit_stop_string:
            return SequenceStatus.FINISHED_STOPPED
        max_tokens = sequence.params.max_tokens
        if (max_tokens is not None and len(sequence.output_token_ids) >= max_tokens) or \
                sequence.num_tokens >= self.config.max_model_len:
            text.finish()
            return SequenceStatus.FINISHED_LENGTH
        return None

    # --------------------------------------------------------------- helpers

    def encode_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """``(text, token ids)`` of a prompt given as text, ids, or ``{"prompt_token_ids"}``.

        Raises ``ValueError`` for any other type, an empty prompt, an id that is not an
        integer in ``[0, vocab_size)``, or a prompt that leaves no room in the model's context.
        """
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
        elif isinstance(prompt, list):
            text, ids = None, prompt
        else:
            raise ValueError(f"a prompt must be a string, a list of token ids or "
                             f"{{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")
        if not isinstance(ids, (list, tuple, np.ndarray)):
            raise ValueError(f"prompt_token_ids must be a list of token ids, got {type(ids).__name__}")
        ids = list(ids)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        not_ints = [t for t in ids if not is_int(t)]
        if not_ints:
            raise ValueError(f"prompt token id {not_ints[0]!r} is not an integer: token ids are integers in "
                             f"[0, {self.config.vocab_size})")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        if len(ids) >= self.config.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but the model's context is "
                             f"{self.config.max_model_len}: shorten it to at most {self.config.max_model_len - 1}")
        return text, [int(t) for t in ids]

    def _check_fits(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Reject a request that could never run, before anything is allocated."""
        limit = self.config.max_model_len
        total = min(limit, num_prompt_tokens + (params.max_tokens or limit))
        usable_blocks = self.cache.num_blocks - self.scheduler.watermark_blocks
        if self.cache.blocks_needed(total) > usable_blocks:
            raise ValueError(f"this request may need {total} tokens of KV cache "
                             f"({self.cache.blocks_needed(total)} blocks) but the cache has {usable_blocks} "
                             "usable blocks: lower max_tokens or give the engine more KV memory")
        if not self.scheduler.policy.chunked_prefill and total > self.scheduler.max_num_batched_tokens:
            raise ValueError(f"policy '{self.scheduler.policy.name}' runs whole prompts (and recomputes whole "
                             f"sequences after preemption), but this request may reach {total} tokens, more than "
                             f"max_num_batched_tokens={self.scheduler.max_num_batched_tokens}: raise it or lower "
                             "max_tokens")

    def _new_sequence(self, request_id: str, token_ids: list[int], num_prompt_tokens: int,
                      params: SamplingParams, arrival_time: float, index: int, priority: int) -> Sequence:
        seed = params.seed if index == 0 or params.seed is None else [params.seed, index]
        self._next_seq_id += 1
        return Sequence(self._next_seq_id - 1, request_id, token_ids, num_prompt_tokens, params, arrival_time,
                        sample_index=index, priority=priority, rng=make_generator(seed))

    def _log_step(self, start: float, scheduled: SchedulerOutput) -> None:
        decodes, prefills = [], []  # a decode: one token of a sequence past its prompt
        for s in scheduled.scheduled:
            is_decode = s.num_tokens == 1 and s.sequence.num_computed_tokens > s.sequence.num_prompt_tokens
            (decodes if is_decode else prefills).append(s)
        self.log.steps.append(StepRecord(
            step=len(self.log.steps), start_time=start, duration=time.perf_counter() - start,
            num_prefill_tokens=sum(s.num_tokens for s in prefills), num_decode_seqs=len(decodes),
            num_prefill_seqs=len(prefills), num_preemptions=len(scheduled.preempted),
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            blocks_used=self.cache.num_used_blocks, blocks_cached_free=self.cache.num_cached_free_blocks,
            blocks_free=self.cache.num_free_blocks,
            scheduled=[(s.sequence.request_id, s.sequence.sample_index, s.num_tokens) for s in scheduled.scheduled]))
