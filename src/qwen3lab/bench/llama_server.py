"""llama.cpp's server as a same-run peer of `bench serve` (`--peer llama.cpp`).

llama-server (built by `make peer`, backends/gguf.py) is started on a free loopback port with the checkpoint's
GGUF in the dtype's type (bf16 -> BF16, float32 -> F32, int8 -> Q8_0, int4 -> Q4_0), the same thread count as
ours, as many parallel slots as the highest concurrency (continuous batching is llama-server's default), a KV
cache of the activation dtype (float32: f16, its default), and a context of slots x (max_tokens + 512) so every
request fits its slot. The load is then the same as ours: the same prompts, streamed /v1/completions with
temperature 0 and ignore_eos, so each request makes exactly max_tokens tokens.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx

from ..backends.gguf import BUILD_HINT, gguf, missing, tool
from ..errors import InputError

KV = {"bfloat16": "bf16", "float32": "f16", "float16": "f16", "int8": "bf16", "int4": "bf16"}


def why_not(dtype: str) -> str | None:
    """Why llama-server cannot run here (one line), or None."""
    why = missing(tools=("llama-server",))
    if why is None and dtype not in KV:
        why = f"no llama.cpp type for --dtype {dtype}"
    return why if why is None or "make peer" in why else f"{why}: {BUILD_HINT}"


def start(model: str, dtype: str, threads: int | None, slots: int, max_tokens: int, port: int, log):
    """llama-server in a subprocess; returns (process, base url, served name) once /health answers."""
    path = gguf(Path(model), dtype, log)
    threads = threads or max(1, os.cpu_count() or 1)
    name = Path(model).name
    cmd = [str(tool("llama-server")), "-m", str(path), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * (max_tokens + 512)),
           "-ctk", KV[dtype], "-ctv", KV[dtype], "-a", name, "--no-webui"]
    log_file = open(os.environ.get("QWEN3LAB_LLAMA_SERVER_LOG", os.devnull), "w")  # noqa: SIM115 - the server's
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise InputError(f"llama-server exited with code {proc.returncode} before answering: {' '.join(cmd)}")
        try:  # /health answers before the completion route is ready: wait for one real completion
            body = {"model": name, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
            if httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200:
                return proc, url, name
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise InputError(f"llama-server did not answer /health within 300 s: {' '.join(cmd)}")
