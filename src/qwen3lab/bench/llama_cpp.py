"""llama.cpp as a same-run peer of `bench generate` (`--peer llama.cpp`).

Notable:
- where llama.cpp is, whether it is built (`make peer`), and the checkpoint as a GGUF of the dtype's type
  (BF16, F32, F16, Q8_0, Q4_0: ours int8 has one float32 scale per row, int4 one per 128 weights; Q8_0 / Q4_0
  one float16 scale per 32) come from backends/gguf.py; when the peer is not built it is skipped with one line
  saying how to build it; nothing here builds it.
- figures come from llama-bench (JSON): prefill = `-p L -n 0` (tok/s over the prompt, depth 0, as ours' TTFT
  rate); decode = `-p 0 -n N -d P`, N tokens generated after a P-token context, batch 1, as ours' decode record
  `batch=1 prompt=P new=N`. The KV cache is the activation dtype (bf16 / f16; int8, int4: bf16, as ours;
  float32: f16, as llama-bench has no f32 cache). Threads: the same count as ours. Records carry impl
  "llama.cpp" and the case strings of ours, so each pairs with ours' record of the same phase, case and dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..backends.gguf import gguf, missing, run_tool, tool  # noqa: F401 - missing: the bench asks it
from ..errors import InputError
from .report import make_record

IMPL = "llama.cpp"
# llama-bench takes no f32 KV cache (f16, bf16 and quantised types only): float32 runs keep its default, f16
CACHE_TYPE = {"bfloat16": "bf16", "float32": "f16", "float16": "f16", "int8": "bf16", "int4": "bf16"}


def _bench(model: Path, args: list[str], threads: int, reps: int, cache: str) -> list[dict[str, Any]]:
    cmd = [str(tool("llama-bench")), "-m", str(model), "-t", str(threads), "-r", str(reps),
           "-ctk", cache, "-ctv", cache, "-o", "json", *args]
    out = run_tool(cmd, "llama-bench " + " ".join(args))
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        raise InputError(f"llama.cpp peer: llama-bench printed no JSON ({out[:200]!r})") from None


def run(path: Path, device: torch.device, dtype: str, prompt_lens, batches, new_tokens: int, decode_prompt_len: int,
        runs: int, log) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """llama.cpp's records for `dtype` (prefill per prompt length, decode at batch 1) and facts for the settings."""
    if device.type != "cpu":
        raise InputError(f"--peer llama.cpp runs on the CPU here, got --device {device}")
    model = gguf(path, dtype, log)
    threads = torch.get_num_threads()
    cache = CACHE_TYPE[dtype]
    records = []
    pp = _bench(model, ["-p", ",".join(str(L) for L in prompt_lens), "-n", "0"], threads, runs, cache)
    for t in pp:
        L = int(t["n_prompt"])
        tps = float(t["avg_ts"])
        records.append(make_record("generate", IMPL, "prefill", f"prompt={L} batch=1", device, dtype,
                                     tok_per_s=tps, ttft_ms=1e3 * L / tps, prompt_len=L, batch=1))
    if 1 in batches:  # llama-bench generates one sequence; batched decode is llama-batched-bench's, not run here
        tg = _bench(model, ["-p", "0", "-n", str(new_tokens), "-d", str(decode_prompt_len)], threads, runs, cache)
        for t in tg:
            tps = float(t["avg_ts"])
            records.append(make_record(
                "generate", IMPL, "decode", f"batch=1 prompt={decode_prompt_len} new={new_tokens}", device, dtype,
                tok_per_s=tps, latency_ms=1e3 / tps, prompt_len=decode_prompt_len, batch=1, new_tokens=new_tokens))
    info = {"gguf": model.name, "kv_cache": cache, "threads": threads,
            "build": (pp[0].get("build_commit") if pp else None), "cpu_info": (pp[0].get("cpu_info") if pp else None)}
    return records, info
