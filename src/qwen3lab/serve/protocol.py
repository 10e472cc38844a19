"""OpenAI request fields -> one checked `GenRequest`; every refusal is an `APIError` naming the field.

Requests are parsed by hand from the JSON body (not pydantic models) so that each error says which field is
wrong in OpenAI's error shape {"error": {"message", "type", "param", "code"}} with the field as `param`, as
the OpenAI API and vLLM do. Sampling values go through engine/sampler.py's checks, the one place they are
validated, and their messages are kept.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

from ..engine.sampler import SamplingParams, check_max_tokens
from ..errors import InputError

MAX_N = 16  # choices per request; each one is a sequence in the engine
MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_TOP_LOGPROBS = 20  # OpenAI's limit (chat); completions allow 5, we allow 20 for both


class APIError(Exception):
    """An HTTP error with OpenAI's body; `param` is the request field at fault (None when none is)."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


@dataclass
class GenRequest:
    """What one /v1/completions or /v1/chat/completions request asks for, checked."""

    prompt_ids: list[int]
    sampling: SamplingParams
    max_tokens: int | None  # None: up to the end of the context
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # top alternatives per token (0: only the chosen token's); None: none
    echo_model: str = ""
    chat: bool = False
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _opt_int(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise bad(name, f"must be an integer {rng}, got {v!r}")
    return int(v)


def _opt_bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"must be true or false, got {v!r}")
    return v


def _sampling(body: dict) -> SamplingParams:
    vals = {"temperature": body.get("temperature"), "top_p": body.get("top_p"), "top_k": body.get("top_k"),
            "seed": body.get("seed")}
    # OpenAI's defaults: temperature 1, top_p 1; top_k -1 (vLLM) or 0 means off
    t = 1.0 if vals["temperature"] is None else vals["temperature"]
    p = 1.0 if vals["top_p"] is None else vals["top_p"]
    k = 0 if vals["top_k"] in (None, -1) else vals["top_k"]
    for name, v in (("temperature", t), ("top_p", p), ("top_k", k), ("seed", vals["seed"])):
        try:
            SamplingParams.make(**{name: v})
        except InputError as e:
            raise bad(name, str(e)) from None
    return SamplingParams(t, k, p, vals["seed"])


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad("stop", f"must be a non-empty string or a list of them, got {v!r}")
    if len(items) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} stop strings, got {len(items)}")
    return items


def _logprobs(body: dict, chat: bool) -> int | None:
    if chat:
        if not _opt_bool(body, "logprobs"):
            if body.get("top_logprobs") is not None:
                raise bad("top_logprobs", "needs logprobs: true")
            return None
        return _opt_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    return _opt_int(body, "logprobs", 0, MAX_TOP_LOGPROBS)


def parse_common(body: Any, chat: bool) -> dict[str, Any]:
    """The fields both endpoints share, checked; the prompt is the caller's (it differs per endpoint)."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    if not isinstance(body.get("model", ""), str):
        raise bad("model", f"must be a string, got {body.get('model')!r}")
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    max_tokens, where = None, names[-1]
    for name in names:
        if body.get(name) is not None:
            max_tokens, where = body[name], name
            break
    if max_tokens is None and not chat:
        max_tokens = 16  # OpenAI's completions default; chat's is the rest of the context (the caller's)
    if max_tokens is not None:
        try:
            max_tokens = check_max_tokens(max_tokens, where)
        except InputError as e:
            raise bad(where, str(e)) from None
    so = body.get("stream_options")
    if so is not None and (not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool)):
        raise bad("stream_options", f"must be an object like {{\"include_usage\": true}}, got {so!r}")
    stream = _opt_bool(body, "stream")
    if so is not None and not stream:
        raise bad("stream_options", "is only allowed with stream: true")
    return dict(sampling=_sampling(body), max_tokens=max_tokens, stop=_stop(body),
                n=_opt_int(body, "n", 1, MAX_N) or 1, stream=stream,
                include_usage=bool(so and so.get("include_usage")), logprobs=_logprobs(body, chat),
                echo_model=body.get("model") or "", chat=chat, ignore_eos=_opt_bool(body, "ignore_eos"))


def completion_prompt(body: dict, tokenizer) -> list[int]:
    """/v1/completions' `prompt`: one string or one list of token ids (a batch of prompts is refused)."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise bad("prompt", "is empty")
        return tokenizer.encode(p)
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        return [int(t) for t in p]
    raise bad("prompt", f"must be a non-empty string or a list of token ids (one prompt per request), "
                        f"got {str(p)[:60]!r}")


def chat_prompt(body: dict, tokenizer) -> list[int]:
    """/v1/chat/completions' `messages` through the checkpoint's chat template; enable_thinking from
    chat_template_kwargs (Qwen3's thinking switch; default on, as in the template)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", f"must be a non-empty list of messages, got {str(msgs)[:60]!r}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}]", f"must be an object with a string 'role', got {str(m)[:60]!r}")
        c = m.get("content")
        if isinstance(c, list):  # OpenAI's content parts: only text is understood
            if not all(isinstance(part, dict) and part.get("type") == "text" for part in c):
                raise bad(f"messages[{i}].content", "only text content parts are supported")
            msgs[i] = {**m, "content": "".join(str(part.get("text", "")) for part in c)}
        elif c is not None and not isinstance(c, str):
            raise bad(f"messages[{i}].content", f"must be a string, got {type(c).__name__}")
    kw = body.get("chat_template_kwargs") or {}
    if not isinstance(kw, dict):
        raise bad("chat_template_kwargs", f"must be an object, got {kw!r}")
    try:
        return tokenizer.encode_chat(msgs, **kw)
    except InputError as e:
        raise bad("messages", str(e)) from None
