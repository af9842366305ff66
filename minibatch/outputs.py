"""What a request returns, and the text bookkeeping that produces it.

:class:`RequestOutput` and :class:`CompletionOutput` mirror vLLM's. :class:`TextTracker`
turns each new token into text for streaming: it stops on EOS, stop token ids and stop
strings, and it never lets a stop string into the output, even one that spans several
tokens, by holding back the last few characters until they cannot start one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minibatch.sampling import SamplingParams
from minibatch.tokenizer import IncrementalDecoder, Tokenizer


@dataclass(slots=True)
class RequestMetrics:
    """Timings of one request, in seconds on ``time.perf_counter``'s clock."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    logprobs: list[dict[int, float]] | None = None  # per token: {token_id: logprob}


@dataclass(slots=True)
class RequestOutput:
    """The result for one prompt. ``outputs[0]`` is the completion; ``text``,
    ``token_ids`` and ``finish_reason`` are shortcuts to it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: RequestMetrics | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs


@dataclass(slots=True)
class TextTracker:
    """Accumulates a completion's text token by token and decides when it stops (with
    ``detokenize=False`` it decodes nothing and the text stays empty)."""

    tokenizer: Tokenizer
    params: SamplingParams
    prompt_token_ids: list[int]
    text: str = ""  # emitted so far: never contains a stop string
    held: str = ""  # decoded but not yet emitted: might be the start of a stop string
    decoder: IncrementalDecoder | None = field(init=False)  # None with ``detokenize=False``

    def __post_init__(self) -> None:
        self.decoder = IncrementalDecoder(self.tokenizer, self.prompt_token_ids, self.params.skip_special_tokens) \
            if self.params.detokenize else None

    def stops_on_token(self, token_id: int) -> bool:
        """Whether ``token_id`` ends the completion (EOS unless ignored, or a stop id)."""
        if token_id in self.params.stop_token_ids:
            return True
        return not self.params.ignore_eos and token_id in self.tokenizer.eos_token_ids

    def append(self, token_id: int) -> tuple[str, bool]:
        """Decode one more token. Returns ``(delta, hit_stop_string)``.

        The last ``len(longest stop) - 1`` characters are always held back, so a stop
        string that completes now lies wholly in ``held`` and none of it was emitted.
        """
        if self.decoder is None:  # token ids only: no text, so no stop string either
            return "", False
        self.held += self.decoder.push(token_id)
        found = [at for at in (self.held.find(stop) for stop in self.params.stop) if at >= 0]
        if found:  # emit up to the earliest stop string; drop it and what follows
            delta = self._emit_until(min(found))
            self.held = ""
            return delta, True
        keep = max((len(s) for s in self.params.stop), default=1) - 1
        return self._emit_until(max(len(self.held) - keep, 0)), False

    def finish(self) -> str:
        """Emit everything held back (the completion ended for another reason)."""
        self.held += self.decoder.flush() if self.decoder is not None else ""
        return self._emit_until(len(self.held))

    def _emit_until(self, end: int) -> str:
        delta, self.held = self.held[:end], self.held[end:]
        self.text += delta
        return delta
