"""`qwen3lab bench serve`: N streamed completions against an OpenAI-compatible server, as vLLM's serving benchmark.

Either starts `qwen3lab serve` in a subprocess on a free loopback port (--model) or uses a running server
(--url). For each concurrency (or request rate, Poisson arrivals) it sends N requests from a fixed prompt
set, streamed, temperature 0 and ignore_eos so every request makes exactly --max-tokens tokens, and reports
requests/s, output tok/s, TTFT and inter-token latency (between streamed chunks) p50/p90/p99, as a table
and one JSON line. One warm-up request runs first (it builds the kernels of a fresh server).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from typing import Any

import httpx

from ..errors import InputError
from .machine import machine_info
from .report import emit_json
from .timing import percentile

PROMPTS = [
    "Explain why the sky is blue in a few sentences.",
    "Write a short poem about a lighthouse keeper.",
    "List three differences between TCP and UDP.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Summarise the plot of Hamlet for a ten-year-old.",
    "How does a hash table handle collisions?",
    "Give me a recipe for a simple tomato soup.",
    "Describe the water cycle step by step.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, dtype: str, threads: int | None, max_num_seqs: int, extra: list[str]):
    """`qwen3lab serve` in a subprocess; returns (process, base url) once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-c", "from qwen3lab.cli import main; main()", "serve", "--model", model,
           "--dtype", dtype, "--port", str(port), "--max-num-seqs", str(max_num_seqs), *extra]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise InputError(f"the server exited with code {proc.returncode} before answering: {' '.join(cmd)}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise InputError(f"the server did not answer /health within 600 s: {' '.join(cmd)}")


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
    if not times:
        return {"error": "no text streamed"}
    return {"ttft": times[0] - t0, "itl": [b - a for a, b in zip(times[:-1], times[1:], strict=True)], "tokens": tokens,
            "latency": times[-1] - t0}


async def run_load(url: str, model: str, n: int, concurrency: int | None, rate: float | None,
                   max_tokens: int, seed: int = 0) -> dict[str, Any]:
    """n requests, at most `concurrency` in flight, or started at `rate` per second (Poisson)."""
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency or n)
    # a fresh connection per request (loopback: well under a millisecond): llama-server closes a kept-alive
    # connection after a few requests, and a POST on a connection the server just closed fails, not retried
    limits = httpx.Limits(max_connections=(concurrency or n) + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await _one(client, url, model, PROMPTS[0], 4)  # warm-up

        async def task(i: int):
            async with sem:
                return await _one(client, url, model, PROMPTS[i % len(PROMPTS)], max_tokens)

        t0 = time.perf_counter()
        tasks = []
        for i in range(n):
            tasks.append(asyncio.create_task(task(i)))
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = [r["ttft"] * 1e3 for r in ok]
    itl = [x * 1e3 for r in ok for x in r["itl"]]
    out = {"concurrency": concurrency, "request_rate": rate, "requests": n, "failed": len(errors),
           "wall_s": round(wall, 3), "output_tokens": sum(r["tokens"] for r in ok), "requests_per_s": len(ok) / wall,
           "output_tok_per_s": sum(r["tokens"] for r in ok) / wall}
    for name, xs in (("ttft_ms", ttft), ("itl_ms", itl)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = percentile(xs, q) if xs else None
    if errors:
        out["first_error"] = errors[0]
    return out


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    m = report["machine"]
    t = Table(title=f"qwen3lab bench serve · {report['settings']['model']} · {m['cpu']} · "
                    f"{report['settings']['max_tokens']} new tokens", title_justify="left")
    cols = ["impl", "concurrency", "request_rate", "requests", "failed", "requests_per_s", "output_tok_per_s",
            "ttft_ms_p50", "ttft_ms_p90", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p90", "itl_ms_p99"]
    for c in cols:
        t.add_column(c.replace("_", " "), justify="right")
    for r in report["results"]:
        t.add_row(*["-" if r.get(c) is None else f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c])
                    for c in cols])
    Console(width=max(160, Console().width)).print(t)


def bench_serve(url: str | None, model: str | None, dtype: str, threads: int | None, num_requests: int,
                concurrency: str, request_rate: float | None, max_tokens: int, served_model_name: str | None,
                json_path: str | None, max_num_seqs: int = 256, ndev: int = 1, no_fast: bool = False,
                peer: str | None = None) -> dict[str, Any]:

    if (url is None) == (model is None):
        raise InputError("bench serve needs exactly one of --url (a running server) or --model (start one)")
    if peer is not None and model is None:
        raise InputError("--peer llama.cpp starts llama-server on the same checkpoint: give --model, not --url")
    levels = [None] if request_rate else [int(c) for c in concurrency.split(",")]
    notes = []
    peer_skip = None
    if peer is not None:
        from . import llama_server

        peer_skip = llama_server.why_not(dtype)
        if peer_skip:
            notes.append(f"peer skipped: {peer_skip}")
            print(f"note: peer skipped: {peer_skip}", file=sys.stderr)
    proc = None
    if url is None:
        extra = (["--ndev", str(ndev)] if ndev != 1 else []) + (["--no-fast"] if no_fast else [])
        proc, url = start_server(model, dtype, threads, max_num_seqs, extra)
    try:
        name = served_model_name or httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        results = [{"impl": "qwen3lab", **asyncio.run(run_load(url, name, num_requests, c, request_rate, max_tokens))}
                   for c in levels]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    if peer is not None and not peer_skip:
        slots = max(c or num_requests for c in levels)
        lproc, lurl, lname = llama_server.start(model, dtype, threads, slots, max_tokens, free_port(),
                                                lambda m: print(m, file=sys.stderr))
        try:
            results += [{"impl": "llama.cpp", **asyncio.run(run_load(lurl, lname, num_requests, c, request_rate,
                                                                     max_tokens))} for c in levels]
        finally:
            lproc.terminate()
            lproc.wait(timeout=60)
    report = {"bench": "serve", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
              "settings": {"url": url, "model": model or name, "dtype": dtype, "max_tokens": max_tokens,
                           "num_requests": num_requests, "server_threads": threads, "ndev": ndev if proc else None,
                           "no_fast": no_fast if proc else None, "peer": peer, "notes": notes,
                           "client_pid": os.getpid()}, "results": results}
    print_table(report)
    emit_json(report, json_path)
    return report
