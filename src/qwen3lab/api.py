"""`qwen3lab.load`: one entry point to every backend, by name.

Backends: "torch" (our eager model), "torch-fast" (the same model through qwen3lab.fast: fused projections
and the C++ kernels, CPU only; dtype "int8" / "int4" = bfloat16 activations with those weights), "numpy"
(the float64 oracle), "hf" (transformers). Quantised weights exist only for torch-fast: every other backend
refuses them with a message that names the backend. The torch backends' device / dtype / quant checks are
runspec.RunSpec's.
"""

from __future__ import annotations

import os
from pathlib import Path

from .checks import check_int, shorten  # noqa: F401  (public here too: qwen3lab.api.check_int)
from .errors import InputError, Qwen3LabError

BACKENDS = ("torch", "torch-fast", "numpy", "hf")
QUANT_BACKEND = "torch-fast"  # the one backend with quantised (int8 / int4) weights


def check_path(path, name: str = "path") -> Path:
    """A str or os.PathLike naming a file system path; bytes, ints, lists (what os.fspath would take or
    choke on) are refused with the argument's name, and so is a NUL character (no path can hold one)."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"{name} must be a str or os.PathLike path, got {shorten(path)} ({type(path).__name__})")
    p = os.fspath(path)
    if not isinstance(p, str):  # a PathLike whose __fspath__ returns bytes
        raise InputError(f"{name} must be a str path, got a PathLike giving {type(p).__name__} {shorten(p)}")
    if not p:
        raise InputError(f"{name} is empty: give a directory or file path")
    if "\0" in p:
        raise InputError(f"{name} {shorten(p)} holds a NUL character: not a valid path")
    return Path(p)


def resolve_model_path(path: str | Path | None, name: str = "path") -> Path:
    """A checkpoint dir; None or "default" means the embedded default model (made on first use)."""
    p = None if path is None else check_path(path, name)
    if p is None or str(p) == "default":
        from .make_model import ensure_default_model

        return ensure_default_model()
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except OSError as e:  # e.g. ENAMETOOLONG, which Path.exists does not swallow
        raise Qwen3LabError(f"{name} {shorten(str(p))}: cannot use as a checkpoint directory ({e.strerror})") from None
    if not exists:
        raise Qwen3LabError(f"{p}: no such checkpoint directory")
    if not is_dir:
        raise Qwen3LabError(f"{p}: expected a checkpoint directory (config.json + *.safetensors), got a file")
    return p


def check_backend_dtype(backend: str, dtype: str | None, quant: str | None = None,
                        group_size: int | None = None) -> None:
    """Quantised weights (dtype "int8" / "int4", or quant=) are the fast path's; refuse them, naming the
    backend, anywhere else."""
    from .runspec import QUANTS

    q = dtype.lower() if isinstance(dtype, str) and dtype.lower() in QUANTS else None
    if q and backend != QUANT_BACKEND:
        raise InputError(f"backend {backend!r} has no {q} dtype: {q} weights (bfloat16 activations) run on "
                         f"the fast path, backend {QUANT_BACKEND!r} (e.g. qwen3lab verify --candidate "
                         f"{QUANT_BACKEND} --dtype {q})")
    for name, value in (("quant", quant), ("group_size", group_size)):
        if value is not None and backend != QUANT_BACKEND:
            raise InputError(f"backend {backend!r} has no {name} option: {name}={value!r} runs on backend "
                             f"{QUANT_BACKEND!r}")


def load(path: str | Path | None = None, backend: str = "torch", device: str = "cpu", dtype: str | None = None,
         quant: str | None = None, group_size: int | None = None):
    """Load a checkpoint dir as a backend with `.run(input_ids, taps=None, graft=None)`.

    backend: "torch" (ours, eager, default float32), "torch-fast" (ours through qwen3lab.fast, CPU: default
    float32; "bfloat16"; "int8" / "int4" = bfloat16 activations + those weights; or quant="int8" / "int4"
    with float32 / bfloat16 activations; int4's group_size 32 or 128), "numpy" (the float64 oracle), "hf"
    (transformers).
    """
    if backend not in BACKENDS:
        raise Qwen3LabError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    check_backend_dtype(backend, dtype, quant, group_size)
    if backend in ("torch", "torch-fast"):
        from .models.torch_model import TorchBackend

        spec = TorchBackend.spec_for(device, dtype or "float32", backend == "torch-fast", quant, group_size)
        return TorchBackend.from_pretrained(resolve_model_path(path), spec=spec)
    path = resolve_model_path(path)
    if backend == "numpy":
        from .models.numpy_ref import NumpyBackend

        return NumpyBackend.from_pretrained(path, dtype=dtype or "float64")
    from .models.hf import HFBackend

    return HFBackend(path, dtype=dtype or "float32", device=device)
