"""One request's run through the engine: token outputs -> text deltas per choice, stop strings, reasoning split.

`run_request` queues the n choices, then yields `Delta`s as tokens arrive: the text each token adds (held
back while it could begin a stop string, cut where one begins, as engine/generate.py does), split into
reasoning and content for chat, with logprobs when asked and the finish reason on a choice's last delta. A
stop string ends the choice and frees its sequence at once; so does the consumer going away (the finally).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from ..engine.generate import TextStops
from .engine_loop import EngineError, EngineLoop
from .metrics import Metrics
from .protocol import APIError, GenRequest
from .reasoning import ReasoningStream

_ids = itertools.count()


@dataclass
class Delta:
    index: int
    text: str = ""
    reasoning: str = ""
    logprobs: list = field(default_factory=list)  # [(token_id, logprob, [(id, logprob), ...])]
    finish_reason: str | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict:
        return dict(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                    total_tokens=self.prompt_tokens + self.completion_tokens)


class _Choice:
    def __init__(self, index: int, tokenizer, req: GenRequest):
        self.index = index
        self.text = TextStops(tokenizer, req.stop)
        opened = req.chat and tokenizer.decode(req.prompt_ids[-2:]).rstrip("\n").endswith("<think>")
        self.reasoning = ReasoningStream(opened) if req.chat else None
        self.done = False
        self.last_t: float | None = None

    def split(self, text: str, last: bool) -> tuple[str, str]:
        if self.reasoning is None:
            return "", text
        r, c = self.reasoning.push(text)
        if last:
            r2, c2 = self.reasoning.finish()
            r, c = r + r2, c + c2
        return r, c


def new_id(prefix: str) -> str:
    return f"{prefix}-{int(time.time() * 1000):x}{next(_ids):06x}"


def run_request(loop_: EngineLoop, tokenizer, metrics: Metrics, req: GenRequest, stop_ids: frozenset[int],
                usage: Usage, is_gone=None) -> AsyncIterator[Delta]:
    """Queue req's n choices now (a 400 / 429 is raised here, before any response starts) and return an async
    iterator of their deltas (interleaved) until each has finished. is_gone: an async callable polled while
    waiting (a non-streaming client that disconnected), None when the caller's cancellation does that
    (streaming). Close the iterator (contextlib.aclosing) so an abandoned request is aborted."""
    base = new_id("req")
    rids = [f"{base}-{i}" for i in range(req.n)]
    seeds = [req.sampling.seed if req.sampling.seed is None else (req.sampling.seed + i) % 2**64
             for i in range(req.n)]
    params = [replace(req.sampling, seed=s) for s in seeds]
    q: asyncio.Queue = asyncio.Queue()
    t0 = time.perf_counter()
    loop_.add(rids, q, req.prompt_ids, params, req.max_tokens, stop_ids, req.logprobs)
    name = metrics.name
    metrics.prompt_tokens.labels(name).inc(len(req.prompt_ids))
    usage.prompt_tokens = len(req.prompt_ids)
    return _deltas(loop_, tokenizer, metrics, req, stop_ids, usage, is_gone, rids, q, t0)


async def _deltas(loop_, tokenizer, metrics, req, stop_ids, usage, is_gone, rids, q, t0) -> AsyncIterator[Delta]:
    name = metrics.name
    choices = [_Choice(i, tokenizer, req) for i in range(req.n)]
    left = req.n
    try:
        while left:
            try:
                i, o = await asyncio.wait_for(q.get(), timeout=1.0) if is_gone else (await q.get())
            except asyncio.TimeoutError:
                if await is_gone():
                    return
                continue
            if isinstance(o, EngineError):
                raise APIError(500, o.message, type_="server_error")
            ch = choices[i]
            if ch.done:
                continue
            now = time.perf_counter()
            if ch.last_t is None:
                if i == 0:
                    metrics.ttft.labels(name).observe(now - t0)
            else:
                metrics.itl.labels(name).observe(now - ch.last_t)
            ch.last_t = now
            metrics.gen_tokens.labels(name).inc()
            usage.completion_tokens += 1
            ended_by_id = o.finished and o.finish_reason == "stop" and o.token_id in stop_ids
            text = "" if ended_by_id else ch.text.push(o.token_id)
            finish = o.finish_reason if o.finished else None
            if ch.text.stopped and not o.finished:  # a stop string: this choice is done; free its sequence
                loop_.abort([rids[i]])
                finish = "stop"
            if finish is not None:
                text += ch.text.finish()
                ch.done = True
                left -= 1
                metrics.finished.labels(name, finish).inc()
            reasoning, content = ch.split(text, last=finish is not None)
            lp = []
            if req.logprobs is not None and o.logprob is not None:
                lp = [(o.token_id, o.logprob, list(o.top_logprobs or []))]
            yield Delta(i, content, reasoning, lp, finish)
    finally:
        loop_.abort([r for r, c in zip(rids, choices, strict=True) if not c.done])
