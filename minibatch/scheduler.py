"""Iteration-level scheduling (Orca) with chunked prefill (Sarathi-Serve).

Every engine step the scheduler decides which sequences run and how many of their
tokens: a decode computes one token, a prefill chunk computes several. It packs them
into one batch under two limits, ``max_num_seqs`` and a token budget
``max_num_batched_tokens``, and keeps the paged KV cache from overflowing by
preempting (and later recomputing) the newest sequence.

The default policy runs the way Sarathi-Serve describes: running decodes first, so
they never stall; the rest of the budget goes to prefill chunks; new requests join
without pausing anyone. With ``long_prefill_token_threshold`` (vLLM's option of that
name) a prompt gets at most that many tokens a step, so several prompts share the
leftover budget instead of the oldest taking all of it. Policies differ only in a few
small decisions, collected in :class:`SchedulingPolicy`.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from minibatch.kv_cache import PagedKVCache
from minibatch.sampling import SamplingParams

# ------------------------------------------------------------------------- sequences


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks freed; waits to be recomputed
    FINISHED_STOPPED = "finished_stopped"  # EOS, a stop token or a stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens or the model's context
    FINISHED_ABORTED = "finished_aborted"

    @property
    def finished(self) -> bool:
        return self.value.startswith("finished")

    @property
    def finish_reason(self) -> str | None:
        return {"finished_stopped": "stop", "finished_length": "length",
                "finished_aborted": "abort"}.get(self.value)


@dataclass(slots=True, eq=False)
class Sequence:
    """One token stream: a prompt and what has been generated after it.

    ``num_computed_tokens`` tokens have their K/V in the cache; the rest (the whole
    prompt at first, the newest sampled token in decode) are what a step computes.
    """

    seq_id: int
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival_time: float
    sample_index: int = 0  # which of a request's n samples
    priority: int = 0  # lower runs first under the priority policy
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit at the last admission
    rng: np.random.Generator | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """One token to compute and it is a generated one: a decode step."""
        return self.num_uncomputed_tokens == 1 and self.num_tokens > self.num_prompt_tokens


@dataclass(slots=True)
class ScheduledSequence:
    sequence: Sequence
    num_tokens: int  # tokens of this sequence computed this step

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so its logits are sampled."""
        return self.sequence.num_computed_tokens + self.num_tokens == self.sequence.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


# -------------------------------------------------------------------------- policies


@dataclass(frozen=True, slots=True)
class SchedulingPolicy:
    """The decisions a scheduling policy makes; everything else is shared.

    * ``chunked_prefill``: may a prompt be split across steps?
    * ``prefill_first``: run waiting prompts alone before any decode (early vLLM; Orca
      put whole prompts in the same steps as decodes)
      instead of decodes first with prefill chunks in the leftover budget;
    * ``by_priority``: order the queue (and choose victims) by ``Sequence.priority``.
    """

    name: str
    chunked_prefill: bool = True
    prefill_first: bool = False
    by_priority: bool = False

    def queue_order(self, sequence: Sequence) -> tuple:
        """Sort key for waiting sequences: earlier key, earlier admission."""
        resumed_first = sequence.status is not SequenceStatus.PREEMPTED
        if self.by_priority:
            return (sequence.priority, resumed_first, sequence.arrival_time, sequence.seq_id)
        return (resumed_first, sequence.arrival_time, sequence.seq_id)

    def victim(self, candidates: list[Sequence]) -> Sequence:
        """The running sequence to preempt: the newest (of the lowest priority)."""
        if self.by_priority:
            return max(candidates, key=lambda s: (s.priority, s.arrival_time, s.seq_id))
        return max(candidates, key=lambda s: (s.arrival_time, s.seq_id))


POLICIES = {
    "fcfs": SchedulingPolicy("fcfs"),
    "priority": SchedulingPolicy("priority", by_priority=True),
    "prefill_first": SchedulingPolicy("prefill_first", chunked_prefill=False, prefill_first=True),
}


def get_policy(name: str) -> SchedulingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling policy '{name}': choose one of {', '.join(POLICIES)}")
    return POLICIES[name]


# ------------------------------------------------------------------------- scheduler


class Scheduler:
    """Builds each step's batch; owns the waiting and running queues and the KV blocks."""

    def __init__(self, cache: PagedKVCache, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: SchedulingPolicy | str = "fcfs", watermark: float = 0.01,
                 long_prefill_token_threshold: int = 0):
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # with chunked prefill, the most prompt tokens one sequence gets per step (0: no cap)
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.policy = get_policy(policy) if isinstance(policy, str) else policy
        self.watermark_blocks = int(watermark * cache.num_blocks)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []

    # ------------------------------------------------------------------ queues

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def add_running(self, sequence: Sequence) -> None:
        """A sequence forked from a running one (``n > 1``) runs from now on."""
        sequence.status = SequenceStatus.RUNNING
        self.running.append(sequence)

    def finish(self, sequence: Sequence, status: SequenceStatus) -> None:
        """End a sequence and free its blocks at once."""
        if sequence in self.running:
            self.running.remove(sequence)
        if sequence in self.waiting:
            self.waiting.remove(sequence)
        if sequence.seq_id in self.cache.tables:
            self.cache.free(sequence.seq_id)
        sequence.status = status

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @staticmethod
    def seats(sequence: Sequence) -> int:
        """Places in the batch a sequence will take: all ``n`` of its samples if it is the
        first of an ``n > 1`` request that has not forked yet (it forks at its first token)."""
        will_fork = sequence.sample_index == 0 and sequence.params.n > 1 and not sequence.output_token_ids
        return sequence.params.n if will_fork else 1

    def num_seats(self) -> int:
        """Places the running sequences take, counting forks still to come."""
        return sum(self.seats(sequence) for sequence in self.running)

    # ---------------------------------------------------------------- schedule

    def schedule(self) -> SchedulerOutput:
        """Choose this step's sequences and token counts; claim their KV slots."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        if self.policy.prefill_first:
            budget = self._admit_waiting(out, budget)
            if out.scheduled:
                return out  # a prefill-only step: decodes wait (the stall chunking removes)
        budget = self._schedule_running(out, budget)
        if not out.preempted and not self.policy.prefill_first:
            self._admit_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        """Decodes first, then chunks of prompts already admitted; preempt when out of blocks."""
        queue = deque(sorted(self.running, key=lambda s: (not s.is_decoding, s.arrival_time, s.seq_id)))
        while queue and budget > 0:
            sequence = queue.popleft()
            num_tokens = self._chunk(sequence, budget)
            if num_tokens < sequence.num_uncomputed_tokens and not self.policy.chunked_prefill:
                continue
            if not self._claim_slots(sequence, num_tokens, queue, out):
                continue  # the sequence preempted itself
            out.scheduled.append(ScheduledSequence(sequence, num_tokens))
            budget -= num_tokens
        return budget

    def _chunk(self, sequence: Sequence, budget: int) -> int:
        """Tokens of ``sequence`` to compute this step: all it has left, within the budget
        and, for a prompt (or a recomputation) under a chunking policy, within
        ``long_prefill_token_threshold`` when that is set."""
        num_tokens = min(sequence.num_uncomputed_tokens, budget)
        cap = self.long_prefill_token_threshold
        if cap and self.policy.chunked_prefill and not sequence.is_decoding:
            num_tokens = min(num_tokens, cap)
        return num_tokens

    def _claim_slots(self, sequence: Sequence, num_tokens: int, queue: deque, out: SchedulerOutput) -> bool:
        """Make room for ``num_tokens`` more slots, preempting the newest sequences not yet
        scheduled. Returns False when ``sequence`` itself was the one preempted."""
        needed = sequence.num_computed_tokens + num_tokens - self.cache.num_tokens[sequence.seq_id]
        while needed > 0 and not self.cache.can_append(sequence.seq_id, needed):
            victim = self.policy.victim([*queue, sequence])
            self._preempt(victim, out)
            if victim is sequence:
                return False
            queue.remove(victim)
        if needed > 0:
            self.cache.append_slots(sequence.seq_id, needed)
        return True

    def _preempt(self, sequence: Sequence, out: SchedulerOutput) -> None:
        """Recompute-style preemption: free the blocks, keep the tokens, wait again."""
        self.running.remove(sequence)
        self.cache.free(sequence.seq_id)
        sequence.num_computed_tokens = 0
        sequence.status = SequenceStatus.PREEMPTED
        self.waiting.append(sequence)
        out.preempted.append(sequence)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        """Admit waiting sequences in policy order while they fit; stop at the first that
        does not (no overtaking, so a long prompt cannot starve)."""
        seats_taken = self.num_seats()
        for sequence in sorted(self.waiting, key=self.policy.queue_order):
            if budget <= 0 or seats_taken + self.seats(sequence) > self.max_num_seqs:
                break
            hits = self.cache.cached_prefix(sequence.token_ids)  # hashed once per admission
            if not self.cache.can_allocate(sequence.token_ids, self.watermark_blocks, hits):
                break
            uncached = sequence.num_tokens - len(hits) * self.cache.block_size
            if not self.policy.chunked_prefill and uncached > budget:
                break
            sequence.num_computed_tokens = sequence.num_cached_tokens = \
                self.cache.allocate(sequence.seq_id, sequence.token_ids, hits)
            self.waiting.remove(sequence)
            self.running.append(sequence)
            seats_taken += self.seats(sequence)
            sequence.status = SequenceStatus.RUNNING
            num_tokens = self._chunk(sequence, budget)
            out.scheduled.append(ScheduledSequence(sequence, num_tokens))
            budget -= num_tokens
        return budget
