"""Helpers the server tests share: a SIGTERM sent mid-stream, and many streams at once through the openai client."""

from __future__ import annotations

import asyncio
import json
import signal
import threading

import httpx


def sigterm_mid_stream(proc, url: str, max_tokens: int, model: str | None = None) -> dict:
    """Start a streamed completion of max_tokens (ignore_eos), send the server SIGTERM once its first chunk came,
    read the stream to its end; returns the last JSON chunk (it carries the usage). The stream must end with
    `data: [DONE]`."""
    body = {"prompt": "a", "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    if model is not None:
        body["model"] = model
    lines: list[str] = []
    first = threading.Event()

    def read():
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                first.set()

    th = threading.Thread(target=read)
    th.start()
    assert first.wait(30), "no first chunk"
    proc.send_signal(signal.SIGTERM)
    th.join(timeout=60)
    data = [x for x in lines if x.startswith("data: ")]
    assert data[-1] == "data: [DONE]", data[-3:]
    return json.loads(data[-2][6:])


def concurrent_completions(url: str, api_key: str, prompts: list[str], max_tokens: list[int]) -> list[str]:
    """Every prompt streamed at once (greedy) through the official openai client; the texts in order."""
    import openai  # the test extra; imported here so modules that skip without it still import this file

    async def one(c, p, k):
        text = ""
        async for ch in await c.completions.create(model="tiny", prompt=p, max_tokens=k, temperature=0, stream=True):
            text += ch.choices[0].text if ch.choices else ""
        return text

    async def all_of():
        c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)
        return await asyncio.gather(*[one(c, p, k) for p, k in zip(prompts, max_tokens, strict=True)])

    return asyncio.run(all_of())
