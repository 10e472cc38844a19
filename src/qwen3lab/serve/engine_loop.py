"""One thread runs the engine; HTTP handlers (asyncio) add and abort requests and read their tokens.

LLMEngine is thread-safe (add_request / abort from the event loop, step() from this thread; its own lock is not
held during the forward, so adding a request never waits for one). Our lock guards only `routes` (request id
-> its asyncio queue). The thread steps while anything is unfinished and sleeps on an Event otherwise. Each step's
outputs go to the asyncio.Queue of their request with loop.call_soon_threadsafe (asyncio queues are not
thread-safe). A request counts against `max_queue` from add() until its last token or its abort: past
that, add() answers 429 with Retry-After instead of queueing without bound.

A DistError (a tensor-parallel rank is gone: models/tp_run.py) is fatal, unlike any other step error: the
engine can run nothing more, so every request in flight ends with a 500, every later one is answered 503,
the thread ends and `on_fatal(message)` tells the server to shut down. While idle the thread also asks the
model (`check_alive`, when it has one) whether its spawned ranks still live, so a dead follower ends an idle
server too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from ..errors import DistError, InputError
from .protocol import APIError

log = logging.getLogger("qwen3lab.serve")


class EngineError:
    """Put on a request's queue when the engine raised during a step: the request ends with a 500."""

    def __init__(self, message: str):
        self.message = message


class EngineLoop:
    def __init__(self, engine, max_queue: int, on_fatal=None):
        self.engine = engine
        self.on_fatal = on_fatal  # called (on this thread) with the message when the engine can run no more
        self.dead: str | None = None  # that message, once it happened
        self._check_alive = getattr(engine.model, "check_alive", None)
        self.max_queue = max_queue
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.routes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}  # id -> (loop, q, index)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="qwen3lab-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=30)

    @property
    def in_flight(self) -> int:
        return len(self.routes)

    def add(self, request_ids: list[str], queue: asyncio.Queue, prompt_ids: list[int], params: list,
            max_tokens: int, stop_ids: frozenset[int], logprobs: int | None) -> None:
        """Queue one sequence per id (the n choices of one request), their outputs to `queue` as (index,
        output). All or none: an InputError on any aborts those already added and becomes a 400."""
        if self.in_flight + len(request_ids) > self.max_queue:
            raise APIError(429, f"the server is busy: {self.in_flight} sequences in flight, the limit is "
                                f"{self.max_queue} (--max-queue); retry shortly",
                           type_="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        added = []
        try:
            for i, (rid, p) in enumerate(zip(request_ids, params, strict=True)):
                with self.lock:  # under the lock _die takes: a route is either failed there or refused here
                    if self.dead is not None:
                        raise APIError(503, f"the engine cannot run: {self.dead}; the server is shutting down",
                                       type_="server_error", code="engine_unavailable")
                    self.routes[rid] = (loop, queue, i)  # before the engine can step it
                self.engine.add_request(rid, prompt_ids, p, max_tokens, stop_ids=stop_ids, logprobs=logprobs)
                added.append(rid)
        except InputError as e:
            with self.lock:
                for rid in request_ids:
                    self.routes.pop(rid, None)
            for rid in added:
                self.engine.abort(rid)
            raise APIError(400, f"prompt: {e}", param="prompt") from None
        self.wake.set()

    def abort(self, request_ids: list[str]) -> None:
        """Free these sequences now (a client went away, or a stop string ended the text)."""
        for rid in request_ids:
            with self.lock:
                known = self.routes.pop(rid, None) is not None
            if known:
                self.engine.abort(rid)

    def stats(self) -> dict[str, Any]:
        return dict(self.engine.stats())

    def _run(self) -> None:
        while not self.stopping:
            if not self.engine.has_unfinished():
                self.wake.wait(0.5)
                self.wake.clear()
                try:
                    if self._check_alive is not None and not self.stopping:
                        self._check_alive()
                except DistError as e:
                    return self._die(e)
                continue
            try:
                outs = self.engine.step()
                sends = []
                with self.lock:
                    for o in outs:
                        route = self.routes.get(o.request_id)
                        if route is None:  # aborted since the step began
                            continue
                        if o.finished:
                            del self.routes[o.request_id]
                        sends.append((route, o))
            except DistError as e:
                return self._die(e)
            except Exception as e:  # noqa: BLE001 - one bad step must end its requests with an error, not the server
                log.exception("engine step failed")
                self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
                continue
            for (loop, q, i), o in sends:
                loop.call_soon_threadsafe(q.put_nowait, (i, o))

    def _die(self, e: DistError) -> None:
        log.error("the engine cannot run any more: %s", e)
        with self.lock:
            self.dead = str(e)
        self._fail_all(f"the engine cannot run any more: {e}")
        if self.on_fatal is not None:
            self.on_fatal(self.dead)

    def _fail_all(self, message: str) -> None:
        with self.lock:
            routes, self.routes = self.routes, {}
        for rid in routes:
            self.engine.abort(rid)
        for loop, q, i in routes.values():
            loop.call_soon_threadsafe(q.put_nowait, (i, EngineError(message)))
