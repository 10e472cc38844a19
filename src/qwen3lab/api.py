"""`qwen3lab.load`: one entry point to every backend, by name.

Backends: "torch" (our eager model), "torch-fast" (the same model through qwen3lab.fast: fused projections
and the C++ streaming kernels, CPU only; dtype "int8" = bfloat16 activations with int8 weights), "numpy"
(the float64 oracle), "hf" (transformers). dtype "int8" exists only for torch-fast: every other backend
refuses it with a message that names the backend.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError, Qwen3LabError

BACKENDS = ("torch", "torch-fast", "numpy", "hf")
INT8_BACKEND = "torch-fast"  # the one backend with int8 weights


def resolve_model_path(path: str | Path | None) -> Path:
    """A checkpoint dir; None or "default" means the embedded default model (made on first use)."""
    if path is None or str(path) == "default":
        from .make_model import ensure_default_model

        return ensure_default_model()
    p = Path(path)
    if not p.exists():
        raise Qwen3LabError(f"{p}: no such checkpoint directory")
    if not p.is_dir():
        raise Qwen3LabError(f"{p}: expected a checkpoint directory (config.json + *.safetensors), got a file")
    return p


def check_int8(backend: str, dtype: str | None) -> None:
    """dtype "int8" means int8 weights on the fast path; refuse it, naming the backend, anywhere else."""
    if isinstance(dtype, str) and dtype.lower() == "int8" and backend != INT8_BACKEND:
        raise InputError(f"backend {backend!r} has no int8 dtype: int8 weights (bfloat16 activations) run on "
                         f"the fast path, backend {INT8_BACKEND!r} (e.g. qwen3lab verify --candidate "
                         f"{INT8_BACKEND} --dtype int8)")


def _device_type(device) -> str:
    import torch

    try:
        return torch.device(device).type
    except (RuntimeError, TypeError) as e:
        raise InputError(f"invalid device {device!r}: {e}") from None


def load(path: str | Path | None = None, backend: str = "torch", device: str = "cpu", dtype: str | None = None,
         quant: str | None = None):
    """Load a checkpoint dir as a backend with `.run(input_ids, taps=None, graft=None)`.

    backend: "torch" (ours, eager, default float32), "torch-fast" (ours through qwen3lab.fast, CPU: default
    float32; "bfloat16"; "int8" = bfloat16 activations + int8 weights; or quant="int8" with float32 /
    bfloat16 activations), "numpy" (the float64 oracle), "hf" (transformers).
    """
    if backend not in BACKENDS:
        raise Qwen3LabError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    check_int8(backend, dtype)
    if quant is not None and backend != INT8_BACKEND:
        raise InputError(f"backend {backend!r} has no quant option: quant={quant!r} runs on backend "
                         f"{INT8_BACKEND!r}")
    path = resolve_model_path(path)
    if backend in ("torch", "torch-fast"):
        from .models.torch_model import TorchBackend, dtype_and_quant

        fast = backend == "torch-fast"
        dt, quant = dtype_and_quant(dtype or "float32", quant, int8_dtype=fast)
        if fast and _device_type(device) != "cpu":
            raise InputError(f"backend 'torch-fast' runs on the CPU only (its kernels are CPU ones), got device "
                             f"{device!r}; use backend 'torch' on {device}")
        return TorchBackend.from_pretrained(path, device=device, dtype=dt, fast=fast, quant=quant)
    if backend == "numpy":
        from .models.numpy_ref import NumpyBackend

        return NumpyBackend.from_pretrained(path, dtype=dtype or "float64")
    from .models.hf import HFBackend

    return HFBackend(path, dtype=dtype or "float32", device=device)
