"""InferTask: one sequence being generated — its tokens, its own KV cache and sampling settings, and
whether it is finished. Plain data: the runner (engine/runner.py) feeds it and appends to it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.kv_cache import KVCache
from .sampler import SamplingParams, make_generator


@dataclass
class InferTask:
    tokens: list[int]  # prompt + generated so far; the cache holds the first cache.length of them
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()  # a generated token in here finishes the task (it is kept)
    max_new_tokens: int | None = None  # finish after this many generated tokens (None: only stop / context)
    cache: KVCache | None = None  # made on the first round, sized for prompt + max_new_tokens
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "context"
    generator: torch.Generator | None = field(default=None, repr=False)  # made from sampling.seed on first use
    num_prompt: int = field(init=False)

    def __post_init__(self):
        self.tokens = list(self.tokens)  # ids are checked (and converted) when fed
        self.stop_ids = frozenset(int(t) for t in self.stop_ids)
        self.num_prompt = len(self.tokens)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    def rng(self, device: torch.device) -> torch.Generator | None:
        """This task's random generator (None when greedy), on the device the logits live on."""
        if self.sampling.greedy:
            return None
        if self.generator is None:
            self.generator = make_generator(self.sampling.seed, device)
        return self.generator

    def finish(self, reason: str) -> None:
        self.finished, self.finish_reason = True, reason
