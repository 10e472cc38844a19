"""A stand-in with LLMEngine's interface over today's `batch_infer_one_round`, until engine/llm_engine.py lands.

Continuous batching at sequence granularity: every step takes waiting requests into the running batch (up to
max_num_seqs) and runs one round for all of them (prefill for new ones, decode for the rest) in one forward.
Each sequence has its own contiguous KV cache (no paging, no prefix sharing); `kv_blocks_used` counts live
caches so the server's accounting and tests read the same key the paged engine reports. No logprobs.
Delete this file when the real LLMEngine is merged (serve/app.py picks that one when it exists).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..engine.runner import batch_infer_one_round, check_prompt
from ..engine.sampler import SamplingParams
from ..engine.task import InferTask
from ..errors import InputError


@dataclass
class StepOutput:
    request_id: str
    token_id: int
    logprob: float | None = None
    top_logprobs: list | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" (the context's end counts as length)


class StandInEngine:
    def __init__(self, model, max_num_seqs: int = 256, **_ignored):
        self.model = model  # a Qwen3LMHeadModel
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[tuple[str, InferTask]] = deque()
        self.running: dict[str, InferTask] = {}
        self.counts = dict(prompt_tokens=0, generated_tokens=0)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_tokens: int | None,
                    stop_ids: frozenset[int] | None = None, logprobs: int | None = None) -> None:
        check_prompt(prompt_ids, self.model.cfg)
        ctx = self.model.cfg.max_position_embeddings
        room = ctx - len(prompt_ids)
        if max_tokens is not None and max_tokens > room:
            raise InputError(f"{len(prompt_ids)} prompt tokens + max_tokens {max_tokens} is past the context "
                             f"length {ctx}")
        task = InferTask(list(prompt_ids), params, stop_ids=stop_ids or frozenset(),
                         max_new_tokens=room if max_tokens is None else max_tokens)
        # cache room for at most 256 new tokens up front (it grows past that), not the whole context
        task.cache = self.model.new_cache(len(prompt_ids) + min(task.max_new_tokens, 256))
        self.waiting.append((request_id, task))
        self.counts["prompt_tokens"] += len(prompt_ids)

    def abort(self, request_id: str) -> None:
        self.running.pop(request_id, None)
        self.waiting = deque((r, t) for r, t in self.waiting if r != request_id)

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def step(self) -> list[StepOutput]:
        while self.waiting and len(self.running) < self.max_num_seqs:
            rid, task = self.waiting.popleft()
            self.running[rid] = task
        ids, tasks = list(self.running), list(self.running.values())
        if not tasks:
            return []
        toks = batch_infer_one_round(self.model, tasks)
        outs = []
        for rid, task, tok in zip(ids, tasks, toks, strict=True):
            reason = {"context": "length"}.get(task.finish_reason, task.finish_reason)
            outs.append(StepOutput(rid, tok, finished=task.finished, finish_reason=reason))
            if task.finished:
                del self.running[rid]
        self.counts["generated_tokens"] += len(toks)
        return outs

    def stats(self) -> dict:
        return dict(running=len(self.running), waiting=len(self.waiting), kv_blocks_total=self.max_num_seqs,
                    kv_blocks_used=len(self.running), prefix_hits=0, prefix_queries=0, cached_prompt_tokens=0,
                    preemptions=0, **self.counts)
