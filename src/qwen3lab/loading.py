"""`qwen3lab.load`: one entry point to every backend, by name.

Backends: "torch" (our eager model), "torch-fast" (the same model through qwen3lab.fast: fused projections
and the C++ kernels, CPU only; dtype "int8" / "int4" = bfloat16 activations with those weights), "numpy"
(the float64 oracle), "hf" (transformers). Quantised weights exist only for torch-fast: every other backend
refuses them with a message that names the backend. The torch backends' device / dtype / quant checks are
runspec.RunSpec's.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError, Qwen3LabError
from .paths import resolve_model_path
from .runspec import QUANTS

BACKENDS = ("torch", "torch-fast", "numpy", "hf")
QUANT_BACKEND = "torch-fast"  # the one backend with quantised (int8 / int4) weights


def check_backend_dtype(backend: str, dtype: str | None, quant: str | None = None,
                        group_size: int | None = None) -> None:
    """Quantised weights (dtype "int8" / "int4", or quant=) are the fast path's; refuse them, naming the
    backend, anywhere else."""
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
    # each backend imported when asked for: a NumPy-only verify need not import torch, nor anyone transformers
    if backend in ("torch", "torch-fast"):
        from .models.torch_model import TorchBackend

        spec = TorchBackend.spec_for(device, dtype or "float32", backend == "torch-fast", quant, group_size)
        return TorchBackend.from_pretrained(resolve_model_path(path), spec=spec)
    path = resolve_model_path(path)
    if backend == "numpy":
        from .models.numpy_ref import NumpyBackend

        return NumpyBackend.from_pretrained(path, dtype=dtype or "float64")
    from .backends.hf import HFBackend

    return HFBackend(path, dtype=dtype or "float32", device=device)
