"""Deterministic random weights with the real shapes, scaled so activations stay realistic.

No Qwen3 weights can be downloaded here, so tests and the default model use these. Scaling:
projections have std 1/sqrt(fan_in) so each keeps its input's magnitude; o_proj and down_proj are
further divided by sqrt(2 * layers) so the residual stream grows slowly over depth, as in trained
models; norm weights are 1 + 0.1 * noise (all-ones would hide a skipped norm weight); embeddings are
small next to what the layers add, as in trained checkpoints. Each tensor gets its own generator
seeded from (seed, name), so a tensor does not change when the layer count or dtype does.
"""

from __future__ import annotations

import hashlib
import math

import torch

from .shapes import expected_shapes


def _generator(seed: int, name: str) -> torch.Generator:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(h & (2**63 - 1))


def _std(cfg, name: str, shape: tuple[int, ...]) -> float:
    if name.endswith("norm.weight"):
        return 0.1  # around 1.0, see below
    if "embed_tokens" in name or name == "lm_head.weight":
        return 1.0 / math.sqrt(cfg.hidden_size)
    fan_in = shape[-1]
    std = 1.0 / math.sqrt(fan_in)
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std /= math.sqrt(2 * cfg.num_hidden_layers)
    if name.endswith("bias"):
        std = 0.02
    return std


def random_weights(cfg, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """{hf_name: tensor} for every tensor of the checkpoint (lm_head only when untied)."""
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(cfg).items():
        t = torch.randn(shape, generator=_generator(seed, name), dtype=torch.float32) * _std(cfg, name, shape)
        if name.endswith("norm.weight"):
            t += 1.0
        out[name] = t.to(dtype)
    return out
