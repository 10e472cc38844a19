"""Scheduler: which sequences run in the next forward, and how many of their tokens. Plain Python.

Continuous batching: sequences join and leave the running batch at every step. Each step has a token
budget (max_num_batched_tokens): running sequences go first, in arrival order (a decode costs one token, a
sequence still prefilling gets the next chunk of its prompt that fits: chunked prefill, so a long prompt
never stalls the decodes), then waiting sequences are admitted FIFO while the budget, max_num_seqs and the
free blocks allow. An admitted sequence first takes the cached blocks of its prefix (prefix caching): those
tokens are never fed to the model.

Preemption by recompute: when a running sequence needs a block and none is free, the latest-arrived running
sequence gives its blocks back and returns to the FRONT of the waiting queue with its tokens so far (prompt
+ generated); it is prefilled again later (its own full blocks are likely still cached). If the sequence
that needs the block is itself the latest, it is the one preempted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from .block_manager import BlockManager
from .sampler import SamplingParams


@dataclass(eq=False)
class Sequence:
    """One request inside the engine: all its tokens, how many have keys/values in its blocks."""

    request_id: str
    tokens: list[int]  # prompt + generated
    num_prompt: int
    params: SamplingParams
    max_tokens: int
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None
    arrival: int = 0  # order of add_request: preemption takes the largest
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys/values are in the blocks
    num_cached: int = 0  # prompt tokens found in the prefix cache at the last admission
    finished: bool = False
    finish_reason: str | None = None
    generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: list[int]  # new tokens fed per sequence this step
    starts: list[int]  # num_computed of each before the step

    @property
    def total(self) -> int:
        return sum(self.num_tokens)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int = 256, max_num_batched_tokens: int = 512):
        assert max_num_seqs >= 1 and max_num_batched_tokens >= 1
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # arrival order
        self.preemptions = 0
        self.prompt_tokens = 0  # prompt tokens admitted (counted again after a preemption)
        self.cached_prompt_tokens = 0  # of those, found in the prefix cache

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of whichever queue holds it and free its blocks (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _fit(self, seq: Sequence, n: int) -> bool:
        """Blocks for seq's next n tokens, preempting the latest-arrived running sequences if short; False when
        seq itself was preempted."""
        while not self.blocks.can_grow(seq.block_table, seq.num_computed + n):
            victim = max(self.running, key=lambda s: s.arrival)
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq.block_table, seq.num_computed + n)
        return True

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        out = ScheduledBatch([], [], [])
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if budget == 0:
                break
            if seq not in self.running:  # preempted while fitting an earlier one
                continue
            n = min(len(seq.tokens) - seq.num_computed, budget)
            if not self._fit(seq, n):
                continue
            out.seqs.append(seq), out.num_tokens.append(n), out.starts.append(seq.num_computed)
            budget -= n
        # drop any scheduled sequence preempted by a later one's _fit (its blocks are gone)
        keep = [i for i, s in enumerate(out.seqs) if s in self.running]
        out = ScheduledBatch(*([xs[i] for i in keep] for xs in (out.seqs, out.num_tokens, out.starts)))
        budget = self.max_num_batched_tokens - out.total
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq, budget, out):
                break
            budget = self.max_num_batched_tokens - out.total
        return out

    def _admit(self, seq: Sequence, budget: int, out: ScheduledBatch) -> bool:
        """Move the head of the waiting queue to running with its cached prefix and a first chunk; False
        (nothing changed) when the free blocks do not cover that chunk."""
        cached = self.blocks.match_prefix(seq.tokens, seq.block_table)
        n = min(len(seq.tokens) - cached, budget)
        if not self.blocks.can_grow(seq.block_table, cached + n):
            self.blocks.free(seq.block_table)
            return False
        self.blocks.grow(seq.block_table, cached + n)
        self.waiting.popleft()
        seq.num_computed = seq.num_cached = cached
        self.prompt_tokens += len(seq.tokens)
        self.cached_prompt_tokens += cached
        self.running.append(seq)
        out.seqs.append(seq), out.num_tokens.append(n), out.starts.append(cached)
        return True
