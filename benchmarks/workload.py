"""Synthetic serving workloads: who arrives when, with how long a prompt, wanting how much.

A :class:`Workload` describes a request stream; :meth:`Workload.generate` turns it into a
list of :class:`Request` s, the same list for the same seed. Token ids are drawn from the
byte range ``3..255``, so every model in this repository (byte-level or not) accepts them;
a benchmark runs them with greedy sampling and ``ignore_eos=True``, so each request
produces exactly ``max_tokens`` tokens and the output lengths are the workload's, not the
model's.

Varied output lengths are the point: they are what makes a static batch wait for its
longest member, and what a continuous batcher exploits.

    Workload(num_requests=32, arrival="poisson", rate=4.0,
             input_len=LengthDistribution("uniform", 64, 256),
             output_len=LengthDistribution("lognormal", 16, 512)).generate()

Two named presets (:data:`PRESETS`, :func:`preset`) fix the length distributions the
serving benchmark compares on: ``varied`` (the default above) and ``chat``, whose answer
lengths have the heavy right tail of real chat traces (see :func:`chat_output_len`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

TOKEN_LOW, TOKEN_HIGH = 3, 255  # inclusive: byte ids, above the usual special tokens 0..2
ARRIVALS = ("offline", "poisson")
LENGTH_KINDS = ("fixed", "uniform", "lognormal", "capped_lognormal")


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a workload. ``arrival_time`` is seconds after the run starts."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    arrival_time: float = 0.0


@dataclass(frozen=True, slots=True)
class LengthDistribution:
    """Integer lengths in ``[low, high]``.

    * ``fixed``: always ``high``;
    * ``uniform``: every length in ``[low, high]`` equally likely;
    * ``lognormal``: long-tailed, as real prompt and answer lengths are: ``exp(N(mu, sigma))``
      with the median at the geometric mean ``sqrt(low * high)`` and ``sigma`` chosen so
      that ``[low, high]`` spans ``±2 sigma``; the ~5% of draws outside it are redrawn;
    * ``capped_lognormal``: ``exp(N(log(median), sigma))`` with the given ``median`` and
      ``sigma``, clipped (not redrawn) to ``[low, high]``: ``high`` is a ``max_tokens``
      cap, and an answer that would run longer is cut there, so the cap holds the tail's
      mass as a spike, as it does in a real server.
    """

    kind: str
    low: int
    high: int
    median: float | None = None  # capped_lognormal only
    sigma: float | None = None  # capped_lognormal only

    def __post_init__(self) -> None:
        if self.kind not in LENGTH_KINDS:
            raise ValueError(f"unknown length distribution '{self.kind}': choose one of {', '.join(LENGTH_KINDS)}")
        if not 1 <= self.low <= self.high:
            raise ValueError(f"lengths need 1 <= low <= high, got low={self.low}, high={self.high}")
        if self.kind == "capped_lognormal":
            if self.median is None or self.sigma is None or not self.median > 0 or not self.sigma > 0:
                raise ValueError(f"capped_lognormal needs median > 0 and sigma > 0, got median={self.median}, "
                                 f"sigma={self.sigma}")
        elif self.median is not None or self.sigma is not None:
            raise ValueError(f"median and sigma are for capped_lognormal only, not '{self.kind}'")

    @property
    def lognormal_params(self) -> tuple[float, float]:
        """``(mu, sigma)`` of the underlying normal."""
        if self.kind == "capped_lognormal":
            return math.log(self.median), self.sigma
        mu = (math.log(self.low) + math.log(self.high)) / 2
        return mu, max((math.log(self.high) - math.log(self.low)) / 4, 1e-9)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """``size`` lengths as an int64 array."""
        if self.kind == "fixed":
            return np.full(size, self.high, dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(self.low, self.high, size, endpoint=True)
        mu, sigma = self.lognormal_params
        if self.kind == "capped_lognormal":
            return np.clip(np.rint(rng.lognormal(mu, sigma, size)), self.low, self.high).astype(np.int64)
        out = np.empty(size, dtype=np.int64)
        filled = 0
        while filled < size:  # truncate by redrawing: no pile-up at the bounds
            draws = np.rint(rng.lognormal(mu, sigma, size)).astype(np.int64)
            draws = draws[(draws >= self.low) & (draws <= self.high)][: size - filled]
            out[filled:filled + len(draws)] = draws
            filled += len(draws)
        return out


@dataclass(frozen=True, slots=True)
class Workload:
    """A synthetic request stream; :meth:`generate` is deterministic given ``seed``.

    * ``arrival``: ``"offline"`` (everything at time 0, a batch job) or ``"poisson"``
      (exponential gaps with mean ``1 / rate`` seconds; the first request at time 0);
    * ``input_len``: length of each request's own prompt tokens;
    * ``shared_prefix_fraction`` of the requests (chosen at random) start with one common
      prefix of ``shared_prefix_len`` tokens, prepended to their own tokens (a system
      prompt; what prefix caching reuses);
    * ``output_len``: ``max_tokens`` of each request.
    """

    num_requests: int = 32
    arrival: str = "offline"
    rate: float = 4.0  # requests per second, for "poisson"
    input_len: LengthDistribution = field(default_factory=lambda: LengthDistribution("uniform", 64, 256))
    output_len: LengthDistribution = field(default_factory=lambda: LengthDistribution("lognormal", 16, 512))
    shared_prefix_fraction: float = 0.0
    shared_prefix_len: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"unknown arrival process '{self.arrival}': choose one of {', '.join(ARRIVALS)}")
        if self.arrival == "poisson" and not self.rate > 0:
            raise ValueError(f"a poisson workload needs rate > 0 requests/s, got {self.rate}")
        if not 0 <= self.shared_prefix_fraction <= 1:
            raise ValueError(f"shared_prefix_fraction must be in [0, 1], got {self.shared_prefix_fraction}")
        if self.shared_prefix_len < 0:
            raise ValueError(f"shared_prefix_len must be >= 0, got {self.shared_prefix_len}")

    @property
    def max_prompt_len(self) -> int:
        """The longest prompt this workload can produce."""
        prefix = self.shared_prefix_len if self.shared_prefix_fraction > 0 else 0
        return self.input_len.high + prefix

    @property
    def max_seq_len(self) -> int:
        """The longest prompt plus the longest output: a contiguous cache's row length."""
        return self.max_prompt_len + self.output_len.high

    def arrival_times(self, rng: np.random.Generator) -> np.ndarray:
        """Seconds after the start at which each request arrives, non-decreasing."""
        if self.arrival == "offline":
            return np.zeros(self.num_requests)
        gaps = rng.exponential(1 / self.rate, self.num_requests)
        gaps[0] = 0.0
        return np.cumsum(gaps)

    def generate(self) -> list[Request]:
        """The requests, in arrival order.

        Each aspect draws from its own stream of the seed, so changing one knob (say, the
        arrival process) leaves the others' draws (the prompts, the lengths) unchanged.
        """
        arrival_rng, input_rng, output_rng, token_rng, prefix_rng = (
            np.random.default_rng(s) for s in np.random.SeedSequence(self.seed).spawn(5))
        arrivals = self.arrival_times(arrival_rng)
        input_lens = self.input_len.sample(input_rng, self.num_requests)
        output_lens = self.output_len.sample(output_rng, self.num_requests)
        prefix = random_tokens(prefix_rng, self.shared_prefix_len)
        num_shared = round(self.shared_prefix_fraction * self.num_requests)
        shared = set(prefix_rng.choice(self.num_requests, size=num_shared, replace=False).tolist())
        return [Request(request_id=f"req-{i:04d}",
                        prompt_token_ids=(prefix if i in shared else []) + random_tokens(token_rng, int(input_lens[i])),
                        max_tokens=int(output_lens[i]), arrival_time=float(arrivals[i]))
                for i in range(self.num_requests)]


# ------------------------------------------------------------------------------ presets


CHAT_SIGMA = 1.0  # log-space spread of chat answer lengths


def chat_output_len(median: int = 200, cap: int = 768) -> LengthDistribution:
    """Answer lengths shaped like a chat trace's: lognormal with ``sigma = 1``, cut at ``cap``.

    Real chat answers are heavy-tailed: most are short, a few run on for many times the
    median. On ShareGPT (conversations users shared from ChatGPT) answers average ~338
    tokens against Alpaca's ~58, "with higher variance", and their histogram has a long
    right tail (Kwon et al., 2023, *Efficient Memory Management for Large Language Model
    Serving with PagedAttention*, section 6.1 and figure 11). A lognormal with
    ``sigma = 1`` is a plain model of that shape: mean / median = ``e^(1/2) ≈ 1.65``, and
    one answer in ten runs past 3.6x the median. The default median of 200 tokens puts the
    uncapped mean at ~330 tokens, ShareGPT's average; the cap is a ``max_tokens``, and 768
    is what a 1024-token context leaves after a 256-token prompt (~9% of answers reach it).
    The benchmark's quick run scales median and cap down together, keeping the shape.
    """
    return LengthDistribution("capped_lognormal", 1, cap, median=median, sigma=CHAT_SIGMA)


PRESETS: dict[str, Workload] = {
    # prompts of 64..256 tokens (mean ~160, ShareGPT's mean prompt); answers 16..512 tokens,
    # lognormal with the far tail redrawn: varied, but with no answer past 32x the shortest
    "varied": Workload(input_len=LengthDistribution("uniform", 64, 256),
                       output_len=LengthDistribution("lognormal", 16, 512)),
    # the same prompts; answers heavy-tailed as in chat traces
    "chat": Workload(input_len=LengthDistribution("uniform", 64, 256), output_len=chat_output_len()),
    # short prompts (16..64 tokens: a one-line question, a function signature) and the
    # answers of "varied": generation dominates the work, as in code completion or stories
    "short": Workload(input_len=LengthDistribution("uniform", 16, 64),
                      output_len=LengthDistribution("lognormal", 16, 512)),
}


def preset(name: str, **overrides: Any) -> Workload:
    """The named workload of :data:`PRESETS`, with ``overrides`` (e.g. ``num_requests``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown workload preset '{name}': choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# -------------------------------------------------------------------------------- tokens


def random_tokens(rng: np.random.Generator, n: int) -> list[int]:
    """``n`` token ids uniform in the byte range ``TOKEN_LOW..TOKEN_HIGH``."""
    return rng.integers(TOKEN_LOW, TOKEN_HIGH, n, endpoint=True).tolist()


def describe(requests: list[Request]) -> dict[str, float]:
    """Length statistics of a request list (for reports)."""
    prompts = np.array([len(r.prompt_token_ids) for r in requests])
    outputs = np.array([r.max_tokens for r in requests])
    return {"num_requests": len(requests),
            "prompt_len_mean": float(prompts.mean()), "prompt_len_min": int(prompts.min()),
            "prompt_len_max": int(prompts.max()),
            "output_len_mean": float(outputs.mean()), "output_len_min": int(outputs.min()),
            "output_len_max": int(outputs.max()), "output_len_p50": float(np.median(outputs)),
            "total_prompt_tokens": int(prompts.sum()), "total_output_tokens": int(outputs.sum()),
            "last_arrival_s": float(max(r.arrival_time for r in requests))}
