"""`qwen3lab.load`: one entry point to every backend, by name."""

from __future__ import annotations

from pathlib import Path

from .errors import Qwen3LabError

BACKENDS = ("torch", "numpy", "hf")


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


def load(path: str | Path | None = None, backend: str = "torch", device: str = "cpu", dtype: str | None = None):
    """Load a checkpoint dir as a backend with `.run(input_ids, taps=None, graft=None)`.

    backend: "torch" (ours, default float32), "numpy" (the float64 oracle), "hf" (transformers).
    """
    path = resolve_model_path(path)
    if backend == "torch":
        from .models.torch_model import TorchBackend

        return TorchBackend.from_pretrained(path, device=device, dtype=dtype or "float32")
    if backend == "numpy":
        from .models.numpy_ref import NumpyBackend

        return NumpyBackend.from_pretrained(path, dtype=dtype or "float64")
    if backend == "hf":
        from .models.hf import HFBackend

        return HFBackend(path, dtype=dtype or "float32", device=device)
    raise Qwen3LabError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
