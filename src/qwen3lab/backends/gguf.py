"""llama.cpp built by `make peer`: where it is, whether it is there, and a checkpoint as a GGUF for it.

Used by the llama.cpp verify candidate (backends/llama_cpp.py) and by the benches that run llama.cpp in the
same run as ours (bench/llama_cpp.py, bench/serve.py). Nothing here builds llama.cpp: `make peer`
(benchmarks/peers/build_llama_cpp.sh) builds it once, from the llama-cpp-python sdist on PyPI, into a cache
outside the repo: $QWEN3LAB_PEERS or ~/.cache/qwen3lab/peers. When it is missing, `missing()` says so in one
line with how to build it.

A checkpoint becomes a GGUF through llama.cpp's own converter (convert_hf_to_gguf.py with its gguf-py), once
per checkpoint and type, cached beside the build under a key of the directory, its config and its weight
files' sizes and times: bfloat16 -> BF16, float32 -> F32, float16 -> F16, int8 -> Q8_0, int4 -> Q4_0
(llama-quantize from the BF16 file: a float16 scale per 32 weights).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import InputError

GGUF_TYPE = {"bfloat16": "bf16", "float32": "f32", "float16": "f16", "int8": "q8_0", "int4": "q4_0"}
BUILD_HINT = "build it once with `make peer` (about 10-15 minutes on 2 cores; cached outside the repo)"
TOOLS = ("llama-bench", "llama-quantize")


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values held as uint16 bits -> float32 (exact: the bits are float32's high half)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits as uint16, rounded to nearest even (as torch and ggml round)."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def cache_dir() -> Path:
    return Path(os.environ.get("QWEN3LAB_PEERS") or Path.home() / ".cache" / "qwen3lab" / "peers")


def home() -> Path:
    """The llama.cpp build (a symlink to the versioned build `make peer` made)."""
    return cache_dir() / "llama.cpp"


def tool(name: str) -> Path:
    return home() / "build" / "bin" / name


def lib_dir() -> Path:
    """Where libllama.so and libggml*.so are (what llama-cpp-python is pointed at: LLAMA_CPP_LIB_PATH)."""
    return home() / "build" / "bin"


def missing(tools: tuple[str, ...] = TOOLS, library: bool = False) -> str | None:
    """Why the peer cannot run here (one line), or None. library: the shared library and the Python bindings
    are needed too (the verify candidate)."""
    root = home()
    for t in tools:
        if not os.access(tool(t), os.X_OK):
            return f"llama.cpp is not built in {root} ({t} missing): {BUILD_HINT}"
    if not (root / "src" / "convert_hf_to_gguf.py").is_file():
        return f"llama.cpp's convert_hf_to_gguf.py is missing from {root / 'src'}: {BUILD_HINT}"
    if library:
        if not (lib_dir() / "libllama.so").is_file():
            return f"llama.cpp's shared library is not in {lib_dir()} (libllama.so missing): {BUILD_HINT}"
        try:
            import importlib.util

            if importlib.util.find_spec("llama_cpp") is None:
                return f"the llama-cpp-python bindings are not installed for {sys.executable}: {BUILD_HINT}"
        except ValueError:
            return f"the llama-cpp-python bindings are not importable: {BUILD_HINT}"
    return None


def run_tool(cmd: list[str], what: str, env: dict[str, str] | None = None, timeout: float = 3600) -> str:
    """Run a llama.cpp tool; its failure is one line with the tail of what it printed."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise InputError(f"llama.cpp peer: {what} did not finish within {timeout:.0f} s") from None
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        how = f"exit {res.returncode}"
        if res.returncode < 0:  # killed by a signal, often with nothing printed
            try:
                how = f"killed by {signal.Signals(-res.returncode).name}"
            except ValueError:
                how = f"killed by signal {-res.returncode}"
            if res.returncode == -signal.SIGILL:
                how += (": an instruction this CPU refuses (a build for another CPU? `make peer` rebuilds for "
                        "this one)")
        raise InputError(f"llama.cpp peer: {what} failed ({how}){': ' if tail else ''}{' | '.join(tail)}")
    return res.stdout


def _model_key(path: Path) -> str:
    """Changes whenever the checkpoint does: its resolved path, config.json and every weight file's size/mtime."""
    h = hashlib.sha256(str(path.resolve()).encode())
    h.update((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def gguf(path: Path, dtype: str, log: Callable[[str], None]) -> Path:
    """The GGUF of checkpoint `path` in llama.cpp's type for `dtype`, converted (and quantised) once, cached."""
    if dtype not in GGUF_TYPE:
        raise InputError(f"llama.cpp peer: no GGUF type for dtype {dtype!r}; one of {', '.join(GGUF_TYPE)}")
    path = Path(path)
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
        run_tool([sys.executable, str(root / "src" / "convert_hf_to_gguf.py"), str(path), "--outtype", base_kind,
                  "--outfile", str(tmp)], "convert_hf_to_gguf.py", env=env)
        tmp.replace(base)  # the cache holds a whole file or none
    if kind != base_kind:
        log(f"llama.cpp peer: quantising the GGUF to {kind.upper()} with llama-quantize")
        tmp = target.with_suffix(".tmp")
        run_tool([str(tool("llama-quantize")), str(base), str(tmp), kind.upper()], "llama-quantize")
        tmp.replace(target)
    return target
