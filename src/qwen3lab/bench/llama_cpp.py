"""llama.cpp as a same-run peer of `bench generate` (`--peer llama.cpp`).

Notable:
- llama.cpp is built once by `make peer` (benchmarks/peers/build_llama_cpp.sh, from the llama-cpp-python sdist on
  PyPI, which vendors llama.cpp) into a cache outside the repo: $QWEN3LAB_PEERS or ~/.cache/qwen3lab/peers. When
  it is not there the peer is skipped with one line saying how to build it; nothing here builds it.
- the checkpoint is written as a GGUF by llama.cpp's own converter (convert_hf_to_gguf.py with its gguf-py), once
  per checkpoint and type, cached beside the build under a key of the directory, its config and its weight files'
  sizes and times: bfloat16 -> BF16, float32 -> F32, float16 -> F16, int8 -> Q8_0, int4 -> Q4_0 (llama.cpp's
  llama-quantize from the BF16 file: int8 / int4 with a float16 scale per 32 weights; ours int8 one float32
  scale per row, int4 one float32 scale per 128 weights).
- figures come from llama-bench (JSON): prefill = `-p L -n 0` (tok/s over the prompt, depth 0, as ours' TTFT
  rate); decode = `-p 0 -n N -d P`, N tokens generated after a P-token context, batch 1, as ours' decode record
  `batch=1 prompt=P new=N`. The KV cache is the activation dtype (bf16 / f16; int8, int4: bf16, as ours;
  float32: f16, as llama-bench has no f32 cache). Threads: the same count as ours. Records carry impl
  "llama.cpp" and the case strings of ours, so each pairs with ours' record of the same phase, case and dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .report import make_record

IMPL = "llama.cpp"
GGUF_TYPE = {"bfloat16": "bf16", "float32": "f32", "float16": "f16", "int8": "q8_0", "int4": "q4_0"}
# llama-bench takes no f32 KV cache (f16, bf16 and quantised types only): float32 runs keep its default, f16
CACHE_TYPE = {"bfloat16": "bf16", "float32": "f16", "float16": "f16", "int8": "bf16", "int4": "bf16"}
BUILD_HINT = "build it once with `make peer` (about 10 minutes on 2 cores; cached outside the repo)"


def cache_dir() -> Path:
    return Path(os.environ.get("QWEN3LAB_PEERS") or Path.home() / ".cache" / "qwen3lab" / "peers")


def home() -> Path:
    return cache_dir() / "llama.cpp"


def missing() -> str | None:
    """Why the peer cannot run here (one line), or None."""
    root = home()
    for tool in ("llama-bench", "llama-quantize"):
        if not os.access(root / "build" / "bin" / tool, os.X_OK):
            return f"llama.cpp is not built in {root} ({tool} missing): {BUILD_HINT}"
    if not (root / "src" / "convert_hf_to_gguf.py").is_file():
        return f"llama.cpp's convert_hf_to_gguf.py is missing from {root / 'src'}: {BUILD_HINT}"
    return None


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None, timeout: float = 3600) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise InputError(f"llama.cpp peer: {what} did not finish within {timeout:.0f} s") from None
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise InputError(f"llama.cpp peer: {what} failed (exit {res.returncode}): {' | '.join(tail)}")
    return res.stdout


def _model_key(path: Path) -> str:
    """Changes whenever the checkpoint does: its resolved path, config.json and every weight file's size/mtime."""
    h = hashlib.sha256(str(path.resolve()).encode())
    h.update((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def gguf(path: Path, dtype: str, log) -> Path:
    """The GGUF of checkpoint `path` in llama.cpp's type for `dtype`, converted (and quantised) once, cached."""
    if dtype not in GGUF_TYPE:
        raise InputError(f"llama.cpp peer: no GGUF type for dtype {dtype!r}; one of {', '.join(GGUF_TYPE)}")
    out_dir = cache_dir() / "gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    key = _model_key(path)
    kind = GGUF_TYPE[dtype]
    target = out_dir / f"{path.name}-{key}-{kind}.gguf"
    if target.is_file():
        return target
    root = home()
    base_kind = kind if kind in ("bf16", "f32", "f16") else "bf16"
    base = out_dir / f"{path.name}-{key}-{base_kind}.gguf"
    if not base.is_file():
        log(f"llama.cpp peer: converting {path} to GGUF ({base_kind}) with llama.cpp's convert_hf_to_gguf.py")
        tmp = base.with_suffix(".tmp")
        env = {**os.environ, "PYTHONPATH": str(root / "src" / "gguf-py")}
        _run([sys.executable, str(root / "src" / "convert_hf_to_gguf.py"), str(path), "--outtype", base_kind,
              "--outfile", str(tmp)], "convert_hf_to_gguf.py", env=env)
        tmp.replace(base)  # the cache holds a whole file or none
    if kind != base_kind:
        log(f"llama.cpp peer: quantising the GGUF to {kind.upper()} with llama-quantize")
        tmp = target.with_suffix(".tmp")
        _run([str(root / "build" / "bin" / "llama-quantize"), str(base), str(tmp), kind.upper()], "llama-quantize")
        tmp.replace(target)
    return target


def _bench(model: Path, args: list[str], threads: int, reps: int, cache: str) -> list[dict[str, Any]]:
    cmd = [str(home() / "build" / "bin" / "llama-bench"), "-m", str(model), "-t", str(threads), "-r", str(reps),
           "-ctk", cache, "-ctv", cache, "-o", "json", *args]
    out = _run(cmd, "llama-bench " + " ".join(args))
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
