"""Dtype labels as adapters report them: torch's ("torch.bfloat16"), ggml's ("f16", "q4_k_m") and the usual
short forms, all read as one canonical label ("bfloat16", "float16", "q4_k"). verify's tolerance table
(verify/tolerances.py) is keyed by these labels and refuses any label it does not know."""

from __future__ import annotations

ALIASES = {"fp64": "float64", "double": "float64", "fp32": "float32", "float": "float32", "fp16": "float16",
           "half": "float16", "bf16": "bfloat16", "f32": "float32", "f16": "float16", "f64": "float64",
           "q4_k_m": "q4_k", "q4_k_s": "q4_k"}


def normalize_dtype(dtype: str | None) -> str:
    """"torch.BFloat16" / "bf16" -> "bfloat16"; None -> "float32" (an adapter that says nothing)."""
    d = str(dtype or "float32").replace("torch.", "").lower()
    return ALIASES.get(d, d)
