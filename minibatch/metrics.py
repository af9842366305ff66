"""The engine's event log: what every step ran and how every request fared.

Plain dataclasses in plain lists, so a lesson can plot them, a benchmark can summarise
them and a dashboard can stream them. Latency vocabulary follows DistServe: TTFT (time
to first token), TPOT (time per output token after the first), inter-token latencies,
end-to-end latency.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(slots=True)
class StepRecord:
    """One engine step: the batch it ran and the KV cache after it."""

    step: int
    start_time: float
    duration: float
    num_prefill_tokens: int  # tokens of prompt chunks
    num_decode_seqs: int  # sequences computing one generated token
    num_prefill_seqs: int
    num_preemptions: int
    num_running: int
    num_waiting: int
    blocks_used: int
    blocks_cached_free: int  # free but still holding a reusable prefix
    blocks_free: int
    scheduled: list[tuple[str, int, int]] = field(default_factory=list)  # (request, sample, tokens)

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_seqs


@dataclass(slots=True)
class RequestRecord:
    """Timings of one request (its first sample when ``n > 1``), ``perf_counter`` seconds."""

    request_id: str
    arrival_time: float
    num_prompt_tokens: int
    token_times: list[float] = field(default_factory=list)  # when each output token appeared
    finished_time: float | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    aborted: bool = False

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival_time if self.token_times else None

    @property
    def inter_token_latencies(self) -> list[float]:
        return np.diff(self.token_times).tolist()

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass(slots=True)
class EventLog:
    steps: list[StepRecord] = field(default_factory=list)
    requests: dict[str, RequestRecord] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Percentiles a serving engineer reads first (seconds), over requests that finished
        (aborted ones are left out)."""
        done = [r for r in self.requests.values() if r.finished_time is not None and not r.aborted]
        out: dict[str, float] = {"num_requests": len(done), "num_steps": len(self.steps),
                                 "preemptions": sum(s.num_preemptions for s in self.steps)}
        for name, values in (("ttft", [r.ttft for r in done]), ("tpot", [r.tpot for r in done]),
                             ("e2e", [r.e2e_latency for r in done])):
            values = [v for v in values if v is not None]
            if values:
                out[f"{name}_p50"] = float(np.percentile(values, 50))
                out[f"{name}_p99"] = float(np.percentile(values, 99))
        return out

    def to_dict(self) -> dict:
        return {"steps": [asdict(s) for s in self.steps],
                "requests": {k: {**asdict(r), "ttft": r.ttft, "tpot": r.tpot, "e2e_latency": r.e2e_latency}
                             for k, r in self.requests.items()}}
