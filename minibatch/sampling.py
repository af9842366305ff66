"""Sampling parameters and the sampler.

Sampling runs on the host, in NumPy, for every backend: the runner hands back float32
logits and each request draws its uniforms from its own ``numpy.random.Generator``
(seeded from ``SamplingParams.seed``). With equal logits both backends therefore pick the
same tokens, and a request's tokens never depend on which other requests share its batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from numbers import Integral, Real

import numpy as np


class RequestOutputKind(IntEnum):
    """What ``LLMEngine.step`` returns for a request, as in vLLM: everything generated so
    far (``CUMULATIVE``), only what is new since its last output (``DELTA``), or nothing
    until it finishes (``FINAL_ONLY``, what ``LLM.generate`` asks for)."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens, with the fields and meanings of vLLM's ``SamplingParams``.

    Raises ``ValueError`` naming the field and the allowed range on a bad value.
    """

    n: int = 1  # independent samples per prompt; they share the prompt's KV blocks
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 or -1: all tokens
    top_p: float = 1.0  # nucleus: the smallest set with this much probability
    min_p: float = 0.0  # drop tokens below min_p * the top token's probability
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output
    seed: int | None = None
    max_tokens: int | None = 16  # None: until EOS or the model's context is full
    stop: list[str] = field(default_factory=list)  # never included in the output text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # return the top-n log-probabilities per generated token
    skip_special_tokens: bool = True  # False: BOS/EOS and other special tokens appear in the text
    detokenize: bool = True  # False: token ids only, the text stays empty (no stop strings then)
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE  # what each engine step returns

    def __post_init__(self) -> None:
        self.stop = _as_list([self.stop] if isinstance(self.stop, str) else self.stop, "stop",
                             "a string or a list of non-empty strings")
        self.stop_token_ids = _as_list(self.stop_token_ids, "stop_token_ids", "a list of token ids (integers >= 0)")
        _check(is_int(self.n) and self.n >= 1, "n", self.n, "an integer >= 1")
        _check(is_number(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
               "a finite number >= 0 (0 means greedy)")
        _check(is_int(self.top_k) and self.top_k >= -1, "top_k", self.top_k, "-1, 0 (disabled) or a positive integer")
        _check(is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        _check(is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "a number in [0, 1]")
        _check(is_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
               self.repetition_penalty, "a finite number > 0 (1 disables it)")
        _check(self.seed is None or (is_int(self.seed) and self.seed >= 0), "seed", self.seed,
               "None or an integer >= 0")
        _check(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
               self.max_tokens, "an integer >= 1, or None")
        _check(self.logprobs is None or (is_int(self.logprobs) and self.logprobs >= 0), "logprobs", self.logprobs,
               "an integer >= 0, or None")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "a string or a list of non-empty strings")
        _check(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", self.stop_token_ids,
               "a list of token ids (integers >= 0)")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "True or False")
        _check(isinstance(self.skip_special_tokens, bool), "skip_special_tokens", self.skip_special_tokens,
               "True or False")
        _check(isinstance(self.detokenize, bool), "detokenize", self.detokenize, "True or False")
        _check(isinstance(self.output_kind, RequestOutputKind), "output_kind", self.output_kind,
               "RequestOutputKind.CUMULATIVE, DELTA or FINAL_ONLY")
        _check(self.detokenize or not self.stop, "stop", self.stop,
               "none with detokenize=False (a stop string is found in the text): pass stop_token_ids instead")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: allowed values are {allowed}")


def _as_list(value: object, name: str, allowed: str) -> list:
    """``value`` as a new list (None: empty); a string or a non-iterable is invalid."""
    if value is None:
        return []
    _check(isinstance(value, Iterable) and not isinstance(value, (str, bytes, dict)), name, value, allowed)
    return list(value)


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer (Python or NumPy), not a bool."""
    return type(value) is int or (isinstance(value, Integral) and not isinstance(value, bool))


def is_number(value: object) -> bool:
    """Whether ``value`` is a finite real number (Python or NumPy), not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def make_generator(seed: int | None) -> np.random.Generator:
    """The per-request random stream (fresh entropy when ``seed`` is None)."""
    return np.random.default_rng(seed)


def apply_repetition_penalty(logits: np.ndarray, seen_token_ids: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's penalty (Keskar et al., 2019): divide positive logits of seen tokens by
    ``penalty``, multiply negative ones. ``[V] -> [V]``."""
    if penalty == 1.0 or len(seen_token_ids) == 0:
        return logits
    logits = logits.copy()
    seen = np.unique(seen_token_ids)
    logits[seen] = np.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
    return logits


def filter_logits(logits: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Set logits outside top-k, top-p and min-p to ``-inf``. ``[V] -> [V]``."""
    logits = logits.copy()
    if 0 < top_k < logits.size:
        kth = np.partition(logits, -top_k)[-top_k]
        logits[logits < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-logits, kind="stable")  # most likely first
        probs = softmax(logits[order])
        before = np.cumsum(probs) - probs  # mass of strictly more likely tokens
        logits[order[before >= top_p]] = -np.inf  # keep the smallest set reaching top_p
    if min_p > 0.0:
        probs = softmax(logits)
        logits[probs < min_p * probs.max()] = -np.inf
    return logits


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - np.max(logits))
    return exp / exp.sum()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - np.max(logits)
    return shifted - np.log(np.sum(np.exp(shifted)))


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
                 seen_token_ids: np.ndarray | None = None) -> int:
    """Pick the next token from one position's logits ``[V]``.

    Greedy when ``temperature == 0`` (no random draw is made). Otherwise exactly one
    uniform is drawn from ``rng`` and inverted through the filtered distribution's CDF.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if seen_token_ids is not None:
        logits = apply_repetition_penalty(logits, seen_token_ids, params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(logits))
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p, params.min_p)
    cdf = np.cumsum(softmax(logits))
    uniform = rng.random()
    return int(min(np.searchsorted(cdf, uniform * cdf[-1], side="right"), logits.size - 1))


def top_logprobs(logits: np.ndarray, token_id: int, n: int) -> dict[int, float]:
    """Log-probabilities of the ``n`` most likely tokens and of the chosen one (the model's
    distribution, before sampling filters, as vLLM reports them)."""
    logprobs = log_softmax(np.asarray(logits, dtype=np.float64))
    best = np.argsort(-logprobs, kind="stable")[:n]
    out = {int(t): float(logprobs[t]) for t in best}
    out[int(token_id)] = float(logprobs[token_id])
    return out
