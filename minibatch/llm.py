"""The user-facing API, shaped like vLLM's: ``LLM(model).generate(prompts, params)``.

Generation here is a simple batched loop over a contiguous KV cache: prefill every prompt
in one flat batch, then decode all unfinished sequences one token per step. It already
goes through the same seam a serving engine uses (a :class:`ForwardBatch` to a
:class:`ModelRunner`), so a smarter scheduler can replace the loop without changing
this API.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from minibatch.backend import get_backend
from minibatch.checkpoint import load_weights
from minibatch.config import ModelConfig
from minibatch.kv_cache import ContiguousKVCache
from minibatch.model import ForwardBatch, ModelRunner
from minibatch.outputs import CompletionOutput, RequestMetrics, RequestOutput, TextTracker
from minibatch.sampling import SamplingParams, make_generator, sample_token, top_logprobs
from minibatch.tokenizer import Tokenizer, load_tokenizer

MODELS_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL = MODELS_DIR / "tiny-target"
DRAFT_MODEL = MODELS_DIR / "tiny-draft"

PromptType = str | dict[str, Any] | list[int]


def resolve_model_dir(model: str | Path | None) -> Path:
    """The checkpoint directory for ``model`` (None: the embedded tiny target model)."""
    if model is None:
        return DEFAULT_MODEL
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    hint = " (to fetch it by repo id: minibatch download REPO_ID DIR)" if "/" in str(model) else ""
    raise FileNotFoundError(f"model directory '{model}' does not exist{hint}")


@dataclass(slots=True)
class _Request:
    """A request in flight inside :meth:`LLM._run`."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    text: TextTracker
    rng: np.random.Generator
    max_len: int
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.perf_counter()))

    def output(self) -> RequestOutput:
        completion = CompletionOutput(0, self.text.text, list(self.output_ids), self.finish_reason,
                                      self.logprobs)
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, [completion],
                             finished=self.finish_reason is not None, metrics=self.metrics)


class LLM:
    """Load a model and generate from it.

    ``model`` is a Hugging Face checkpoint directory (Llama, Mistral, Qwen2, SmolLM) or
    None for the embedded tiny model; ``backend`` is ``"numpy"`` or ``"gpu"``;
    ``max_num_seqs`` caps how many prompts share one batch.
    """

    def __init__(self, model: str | Path | None = None, backend: str = "numpy", max_num_seqs: int = 16):
        self.model_dir = resolve_model_dir(model)
        self.config = ModelConfig.from_dir(self.model_dir)
        self.tokenizer: Tokenizer = load_tokenizer(self.model_dir, self.config.bos_token_id,
                                                   self.config.eos_token_ids, self.config.vocab_size)
        self.runner = ModelRunner(self.config, load_weights(self.model_dir, self.config), get_backend(backend))
        self.max_num_seqs = max_num_seqs
        self._next_id = 0

    # ------------------------------------------------------------------ public API

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Complete every prompt; returns one :class:`RequestOutput` per prompt, in order.

        A prompt is a string, a list of token ids, or ``{"prompt_token_ids": [...]}``.
        ``sampling_params`` is one :class:`SamplingParams` for all prompts or one per prompt.
        """
        requests = self._make_requests(prompts, sampling_params)
        for start in range(0, len(requests), self.max_num_seqs):
            for _ in self._run(requests[start:start + self.max_num_seqs]):
                pass
        return [request.output() for request in requests]

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Generate for one prompt, yielding text deltas as they become final."""
        for delta, _ in self.stream_outputs(prompt, sampling_params):
            if delta:
                yield delta

    def stream_outputs(self, prompt: PromptType,
                       sampling_params: SamplingParams | None = None) -> Iterator[tuple[str, RequestOutput]]:
        """Like :meth:`stream`, also yielding the request's output (with timings) every step."""
        (request,) = self._make_requests([prompt], sampling_params)
        for deltas in self._run([request]):
            yield deltas[0], request.output()

    def chat(self, messages: list[dict[str, str]], sampling_params: SamplingParams | None = None) -> RequestOutput:
        """Generate a reply to a conversation, rendered with the model's chat template."""
        apply = getattr(self.tokenizer, "apply_chat_template", None)
        if apply is None:
            raise ValueError("this model's tokenizer has no chat template; use generate() with a plain prompt")
        prompt_ids = self.tokenizer.encode(apply(messages), add_special_tokens=False)
        return self.generate({"prompt_token_ids": prompt_ids}, sampling_params)[0]

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position of ``token_ids``: ``[T] -> [T, V]`` float32."""
        token_ids = self._check_prompt(list(token_ids))
        cache = ContiguousKVCache(max_seqs=1, max_len=len(token_ids))
        self.runner.allocate_kv(cache.num_blocks, cache.block_size)
        cache.allocate(0)
        slots = cache.slot_mapping(0, np.arange(len(token_ids)))
        return self.runner.run(ForwardBatch.build([(token_ids, 0, cache.block_table(0), slots)], logits="all"))

    # ------------------------------------------------------------- request set-up

    def _make_requests(self, prompts: PromptType | Sequence[PromptType],
                       sampling_params: SamplingParams | Sequence[SamplingParams] | None) -> list[_Request]:
        if not isinstance(prompts, (list, tuple)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # a single prompt
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts: "
                                 "pass one for all prompts or exactly one per prompt")
        return [self._make_request(prompt, params) for prompt, params in zip(prompts, params_list, strict=True)]

    def _make_request(self, prompt: PromptType, params: SamplingParams) -> _Request:
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), list(prompt["prompt_token_ids"])
        elif isinstance(prompt, list):
            text, ids = None, list(prompt)
        else:
            raise ValueError(f"a prompt must be a string, a list of token ids or "
                             f"{{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")
        ids = self._check_prompt(ids)
        max_new = self.config.max_model_len - len(ids)
        max_len = len(ids) + (max_new if params.max_tokens is None else min(params.max_tokens, max_new))
        self._next_id += 1
        return _Request(str(self._next_id - 1), text, ids, params, TextTracker(self.tokenizer, params, ids),
                        make_generator(params.seed), max_len,
                        logprobs=[] if params.logprobs is not None else None)

    def _check_prompt(self, ids: list[int]) -> list[int]:
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [t for t in ids if not 0 <= int(t) < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        if len(ids) >= self.config.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but the model's context is "
                             f"{self.config.max_model_len}: shorten it to at most {self.config.max_model_len - 1}")
        return [int(t) for t in ids]

    # --------------------------------------------------------------- the loop

    def _run(self, requests: list[_Request]) -> Iterator[list[str]]:
        """Prefill all requests together, then decode the unfinished ones step by step.
        Yields each request's text delta after every step."""
        cache = ContiguousKVCache(max_seqs=len(requests), max_len=max(r.max_len for r in requests))
        self.runner.allocate_kv(cache.num_blocks, cache.block_size)
        for index in range(len(requests)):
            cache.allocate(index)
        active = list(range(len(requests)))
        new_tokens = {i: requests[i].prompt_ids for i in active}
        while active:
            entries = []
            for i in active:
                start = len(requests[i].prompt_ids) + len(requests[i].output_ids) - len(new_tokens[i])
                slots = cache.slot_mapping(i, np.arange(start, start + len(new_tokens[i])))
                entries.append((new_tokens[i], start, cache.block_table(i), slots))
            logits = self.runner.run(ForwardBatch.build(entries))
            deltas = [""] * len(requests)
            for row, i in enumerate(active):
                deltas[i] = self._append_token(requests[i], logits[row])
                new_tokens[i] = requests[i].output_ids[-1:]
            active = [i for i in active if requests[i].finish_reason is None]
            yield deltas

    def _append_token(self, request: _Request, logits: np.ndarray) -> str:
        """Sample the request's next token, update its text; returns the text delta."""
        params = request.params
        seen = np.asarray(request.prompt_ids + request.output_ids) if params.repetition_penalty != 1 else None
        token = sample_token(logits, params, request.rng, seen)
        request.output_ids.append(token)
        now = time.perf_counter()
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        if request.logprobs is not None:
            request.logprobs.append(top_logprobs(logits, token, params.logprobs))
        if request.text.stops_on_token(token):
            request.finish_reason = "stop"
            delta = request.text.finish()
        else:
            delta, hit_stop = request.text.append(token)
            if hit_stop:
                request.finish_reason = "stop"
            elif len(request.prompt_ids) + len(request.output_ids) >= request.max_len:
                request.finish_reason = "length"
                delta += request.text.finish()
        if request.finish_reason is not None:
            request.metrics.finished_time = now
        return delta
