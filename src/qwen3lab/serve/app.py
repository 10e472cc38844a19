"""The FastAPI app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health and /metrics.

`make_app(model, ...)` wraps a loaded Qwen3ForCausalLM in an LLMEngine (engine/llm_engine.py: paged KV, prefix
caching, continuous batching), steps it on one thread (engine_loop.py) from the app's lifespan, and
answers in OpenAI's shapes: streamed answers are server-sent events ending in `data: [DONE]`; every error is
{"error": {"message", "type", "param", "code"}}. With api_key, every route but /health needs
`Authorization: Bearer KEY`. Uvicorn's graceful shutdown (SIGTERM) lets running requests finish before the
lifespan stops the engine thread and calls `on_shutdown` (the CLI: stop the tensor-parallel ranks). When the
engine can run no more (a lost rank, engine_loop.py) a stream in progress ends with an error event in OpenAI's
shape and `data: [DONE]`, /health answers 503, and `on_fatal` tells the server to exit.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.llm_engine import LLMEngine
from .engine_loop import EngineLoop
from .generation import Delta, Usage, new_id, run_request
from .metrics import Metrics
from .protocol import APIError, GenRequest, chat_prompt, completion_prompt, parse_common


def _logprobs_obj(deltas: list, tokenizer, chat: bool) -> dict | None:
    if not deltas:
        return None
    tok = tokenizer.decode
    if chat:
        return {"content": [{"token": tok([t]), "logprob": lp, "bytes": list(tok([t]).encode()),
                             "top_logprobs": [{"token": tok([a]), "logprob": b, "bytes": list(tok([a]).encode())}
                                              for a, b in top]} for t, lp, top in deltas]}
    tokens = [tok([t]) for t, _, _ in deltas]
    offsets = [sum(len(x) for x in tokens[:k]) for k in range(len(tokens))]  # within this completion's text
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in deltas],
            "top_logprobs": [{tok([a]): b for a, b in top} for _, _, top in deltas], "text_offset": offsets}


class Server:
    def __init__(self, model, name: str, max_num_seqs: int, kv_memory_gib: float | None, max_queue: int | None,
                 on_fatal=None):
        self.model, self.name, self.tokenizer = model, name, model.tokenizer
        self.engine = LLMEngine(model, max_num_seqs=max_num_seqs, kv_memory_gib=kv_memory_gib)
        self.loop = EngineLoop(self.engine, max_queue or max_num_seqs * 4, on_fatal)
        self.metrics = Metrics(name)
        self.stop_ids = frozenset(model.eos_token_ids)
        self.ctx = model.config.max_position_embeddings
        self.created = int(time.time())

    def request(self, body, chat: bool) -> GenRequest:
        f = parse_common(body, chat)
        if f["echo_model"] and f["echo_model"] != self.name:
            raise APIError(404, f"model: the model `{f['echo_model']}` does not exist; this server serves "
                                f"`{self.name}`", param="model", code="model_not_found")
        ids = chat_prompt(body, self.tokenizer) if chat else completion_prompt(body, self.tokenizer)
        if len(ids) >= self.ctx:
            raise APIError(400, f"prompt: {len(ids)} tokens, the context length is {self.ctx}; shorten it",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        if f["max_tokens"] is not None and len(ids) + f["max_tokens"] > self.ctx:
            p = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
            raise APIError(400, f"{p}: {len(ids)} prompt tokens + {f['max_tokens']} is past the context length "
                                f"{self.ctx}", param=p, code="context_length_exceeded")
        if f["max_tokens"] is None:  # chat's default: the rest of the context, as far as the KV memory holds it
            kv_tokens = self.engine.blocks.num_blocks * self.engine.blocks.block_size
            f["max_tokens"] = max(1, min(self.ctx, kv_tokens) - len(ids))
        return GenRequest(prompt_ids=ids, **f)

    def _stops(self, req: GenRequest) -> frozenset[int]:
        return frozenset() if req.ignore_eos else self.stop_ids

    def _chunk(self, rid: str, req: GenRequest, choices: list[dict], usage=None) -> str:
        obj = "chat.completion.chunk" if req.chat else "text_completion"
        out = {"id": rid, "object": obj, "created": int(time.time()), "model": self.name, "choices": choices}
        if req.include_usage:
            out["usage"] = usage
        return f"data: {json.dumps(out, ensure_ascii=False)}\n\n"

    def _choice_delta(self, d: Delta, req: GenRequest) -> dict:
        lp = _logprobs_obj(d.logprobs, self.tokenizer, req.chat)
        if not req.chat:
            return {"index": d.index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}
        delta = {}
        if d.reasoning:
            delta["reasoning_content"] = d.reasoning
        if d.text or not d.reasoning:
            delta["content"] = d.text
        return {"index": d.index, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}

    async def stream(self, req: GenRequest) -> AsyncIterator[str]:
        rid, usage = new_id("chatcmpl" if req.chat else "cmpl"), Usage()
        gen = run_request(self.loop, self.tokenizer, self.metrics, req, self._stops(req), usage)
        try:
            async with contextlib.aclosing(gen):
                if req.chat:  # OpenAI opens each choice with its role
                    for i in range(req.n):
                        yield self._chunk(rid, req, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}])
                async for d in gen:
                    if d.text or d.reasoning or d.finish_reason or d.logprobs:
                        yield self._chunk(rid, req, [self._choice_delta(d, req)])
        except APIError as e:  # the engine failed mid-stream: the 200 is sent, so the error is an event
            yield f"data: {json.dumps(e.body(), ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
            return
        if req.include_usage:
            yield self._chunk(rid, req, [], usage.as_dict())
        yield "data: [DONE]\n\n"

    async def complete(self, req: GenRequest, http: Request) -> dict:
        rid, usage = new_id("chatcmpl" if req.chat else "cmpl"), Usage()
        text, reasoning = [""] * req.n, [""] * req.n
        lps, finish = [[] for _ in range(req.n)], [None] * req.n
        gen = run_request(self.loop, self.tokenizer, self.metrics, req, self._stops(req), usage,
                          http.is_disconnected)
        async with contextlib.aclosing(gen):
            async for d in gen:
                text[d.index] += d.text
                reasoning[d.index] += d.reasoning
                lps[d.index] += d.logprobs
                finish[d.index] = d.finish_reason or finish[d.index]
        choices = []
        for i in range(req.n):
            lp = _logprobs_obj(lps[i], self.tokenizer, req.chat)
            if req.chat:
                msg = {"role": "assistant", "content": text[i], "reasoning_content": reasoning[i] or None}
                choices.append({"index": i, "message": msg, "logprobs": lp, "finish_reason": finish[i]})
            else:
                choices.append({"index": i, "text": text[i], "logprobs": lp, "finish_reason": finish[i]})
        return {"id": rid, "object": "chat.completion" if req.chat else "text_completion",
                "created": int(time.time()), "model": self.name, "choices": choices, "usage": usage.as_dict()}


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def make_app(model, served_model_name: str = "qwen3lab", max_num_seqs: int = 256, kv_memory_gib: float | None = None,
             api_key: str | None = None, max_queue: int | None = None, on_shutdown=None, on_fatal=None) -> FastAPI:
    server = Server(model, served_model_name, max_num_seqs, kv_memory_gib, max_queue, on_fatal)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        server.loop.start()
        yield
        server.loop.stop()
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(title="qwen3lab", lifespan=lifespan)
    app.state.server = server

    async def auth(request: Request):
        # a dependency, not @app.middleware: Starlette's BaseHTTPMiddleware wraps streamed bodies and cancels them
        if api_key is not None and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                           type_="authentication_error", code="invalid_api_key")

    keyed = [Depends(auth)]

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return _error(e)

    async def body_of(request: Request):
        try:
            return json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None

    async def generate(request: Request, chat: bool):
        req = server.request(await body_of(request), chat)
        if req.stream:
            return StreamingResponse(server.stream(req), media_type="text/event-stream")
        return JSONResponse(await server.complete(req, request))

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.get("/v1/models", dependencies=keyed)
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "qwen3lab", "max_model_len": server.ctx}]}

    @app.get("/health")
    async def health():
        if server.loop.dead is not None:
            return _error(APIError(503, f"the engine cannot run: {server.loop.dead}", type_="server_error",
                                   code="engine_unavailable"))
        return Response(status_code=200)

    @app.get("/metrics", dependencies=keyed)
    async def metrics():
        return Response(server.metrics.render(server.loop.stats()), media_type="text/plain; version=0.0.4")

    return app
