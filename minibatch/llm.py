"""The user-facing API, shaped like vLLM's: ``LLM(model).generate(prompts, params)``.

``LLM`` is a thin synchronous wrapper around :class:`~minibatch.engine.LLMEngine`:
``generate`` queues every prompt and steps the engine until all are done, so requests
are batched continuously over the paged KV cache; ``stream`` steps it for one request
and yields text as it becomes final.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from minibatch.engine import LLMEngine, PromptType
from minibatch.kv_cache import ContiguousKVCache
from minibatch.model import ForwardBatch
from minibatch.outputs import RequestOutput
from minibatch.sampling import RequestOutputKind, SamplingParams, is_int

MODELS_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL = MODELS_DIR / "tiny-target"
DRAFT_MODEL = MODELS_DIR / "tiny-draft"


def resolve_model_dir(model: str | Path | None) -> Path:
    """The checkpoint directory for ``model`` (None: the embedded tiny target model)."""
    if model is None:
        return DEFAULT_MODEL
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"model '{model}' is a file, not a directory: give the checkpoint directory "
                                 "(the one holding config.json)")
    hint = " (to fetch it by repo id: minibatch download REPO_ID DIR)" if "/" in str(model) else ""
    raise FileNotFoundError(f"model directory '{model}' does not exist{hint}")


class LLM:
    """Load a model and generate from it.

    ``model`` is a Hugging Face checkpoint directory (Llama, Mistral, Qwen2, SmolLM) or
    None for the embedded tiny model; ``backend`` is ``"numpy"`` or ``"gpu"``;
    ``quantization`` quantizes the weights at load (``"int8"``, ``"int4-g32"``,
    ``"int4-g64"``, ``"int4-g128"``, ``"q8_0"``, ``"q4_0"``; see :mod:`minibatch.quant`).
    A checkpoint saved quantized (``minibatch quantize``) loads as it is. Other
    keyword arguments configure the engine (see :class:`~minibatch.engine.EngineConfig`:
    ``max_num_seqs``, ``max_num_batched_tokens``, ``long_prefill_token_threshold``,
    ``block_size``, ``kv_cache_memory``, ``num_blocks``, ``policy``,
    ``enable_prefix_caching``, ``watermark``, ``kv_cache_dtype``).
    """

    def __init__(self, model: str | Path | None = None, backend: str = "numpy", quantization: str | None = None,
                 **engine_args: Any):
        self.engine = LLMEngine(model, backend, quantization=quantization, **engine_args)
        self.config = self.engine.config
        self.tokenizer = self.engine.tokenizer
        self.runner = self.engine.runner
        self._next_id = 0

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Complete every prompt; returns one :class:`RequestOutput` per prompt, in order.

        A prompt is a string, a list of token ids, or ``{"prompt_token_ids": [...]}``.
        ``sampling_params`` is one :class:`SamplingParams` for all prompts or one per prompt.
        If any prompt is invalid, nothing is queued and ``ValueError`` says which. If
        generation is interrupted (an exception, Ctrl-C), the unfinished requests are aborted.
        """
        request_ids = self._add_requests(prompts, sampling_params, RequestOutputKind.FINAL_ONLY)
        finished: dict[str, RequestOutput] = {}
        try:
            while len(finished) < len(request_ids):
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
        except BaseException:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        return [finished[request_id] for request_id in request_ids]

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Generate for one prompt, yielding text deltas as they become final."""
        for delta, _ in self.stream_outputs(prompt, sampling_params):
            if delta:
                yield delta

    def stream_outputs(self, prompt: PromptType,
                       sampling_params: SamplingParams | None = None) -> Iterator[tuple[str, RequestOutput]]:
        """Like :meth:`stream`, also yielding the request's latest output (with timings).
        Leaving the loop early aborts the request and frees its blocks."""
        (request_id,) = self._add_requests([prompt], sampling_params, RequestOutputKind.CUMULATIVE)
        emitted, done = 0, False
        try:
            while not done:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        text, done = output.text, output.finished
                        yield text[emitted:], output
                        emitted = len(text)
        finally:
            if not done:
                self.engine.abort_request(request_id)

    def chat(self, messages: list[dict[str, str]], sampling_params: SamplingParams | None = None) -> RequestOutput:
        """Generate a reply to a conversation, rendered with the model's chat template."""
        apply = getattr(self.tokenizer, "apply_chat_template", None)
        if apply is None:
            raise ValueError("this model's tokenizer has no chat template; use generate() with a plain prompt")
        prompt_ids = self.tokenizer.encode(apply(messages), add_special_tokens=False)
        return self.generate({"prompt_token_ids": prompt_ids}, sampling_params)[0]

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position of ``token_ids``: ``[T] -> [T, V]`` float32.

        One prefill over a private contiguous cache; the engine's paged cache is untouched.
        """
        _, ids = self.engine.encode_prompt(list(token_ids))
        cache = ContiguousKVCache(max_seqs=1, max_len=len(ids))
        cache.allocate(0)
        batch = ForwardBatch.build([(ids, 0, cache.block_table(0), cache.slot_mapping(0, np.arange(len(ids))))],
                                   logits="all")
        return self.runner.run(batch, self.runner.new_kv(cache.num_blocks, cache.block_size))

    def _add_requests(self, prompts: PromptType | Sequence[PromptType],
                      sampling_params: SamplingParams | Sequence[SamplingParams] | None,
                      output_kind: RequestOutputKind) -> list[str]:
        """Queue every prompt, or none of them if one is rejected: all are checked first.
        Each request gets a copy of its parameters with the ``output_kind`` the caller reads."""
        if not isinstance(prompts, (list, tuple)) or (prompts and is_int(prompts[0])):
            prompts = [prompts]  # a single prompt
        if isinstance(sampling_params, (list, tuple)):
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts: "
                                 "pass one for all prompts or exactly one per prompt")
        else:
            params_list = [SamplingParams() if sampling_params is None else sampling_params] * len(prompts)
        params_list = [replace(params, output_kind=output_kind) if isinstance(params, SamplingParams) else params
                       for params in params_list]
        checked = [self.engine.check_request(prompt, params) for prompt, params in zip(prompts, params_list,
                                                                                          strict=True)]
        added: list[str] = []
        try:
            for (text, ids), params in zip(checked, params_list, strict=True):
                while str(self._next_id) in self.engine.requests:  # taken by a request added to the engine directly
                    self._next_id += 1
                request_id = str(self._next_id)
                self._next_id += 1
                self.engine.add_request(request_id, {"prompt": text, "prompt_token_ids": ids}, params)
                added.append(request_id)
        except Exception:
            for request_id in added:
                self.engine.abort_request(request_id)
            raise
        return added
