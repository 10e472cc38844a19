"""RoPE parameters from a Qwen3Config: inverse frequencies and the cos/sin scale (YaRN).

Computed in float64 NumPy; each backend builds its own cos/sin tables from these. Qwen3 rotates
half-split pairs (channel j with j + Dh/2), not interleaved pairs.

YaRN, as Qwen3 documents it for contexts past 32k (`rope_scaling: {"rope_type": "yarn", "factor": 4.0,
"original_max_position_embeddings": 32768}`): frequencies below the beta_slow..beta_fast correction
range are interpolated by `factor`, those above it are kept, a linear ramp blends the two, and cos/sin
are multiplied by 0.1*ln(factor)+1. Same formulas as transformers' `_compute_yarn_parameters`.
"""

from __future__ import annotations

import math

import numpy as np


def rope_parameters(cfg) -> tuple[np.ndarray, float]:
    """(inv_freq [Dh/2] float64, attention_scaling) for the config's rope type."""
    dim = cfg.head_dim
    base = float(cfg.rope_theta)
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq, 1.0
    rtype = rs["rope_type"]
    if rtype == "linear":
        return inv_freq / float(rs["factor"]), 1.0
    if rtype == "dynamic":
        # Dynamic NTK only changes frequencies past max_position_embeddings; within it, default RoPE.
        return inv_freq, 1.0
    if rtype == "yarn":
        return _yarn(cfg, inv_freq, dim, base)
    raise ValueError(f"unsupported rope_type {rtype!r}")


def _yarn(cfg, inv_freq: np.ndarray, dim: int, base: float) -> tuple[np.ndarray, float]:
    rs = cfg.rope_scaling
    orig = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings
    factor = rs.get("factor")
    if factor is None:
        factor = cfg.max_position_embeddings / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rs.get("attention_factor")
    if attn is None:
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            attn = mscale(factor, rs["mscale"]) / mscale(factor, rs["mscale_all_dim"])
        else:
            attn = mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(n_rot: float) -> float:
        # the channel pair whose wavelength makes n_rot turns over the original context
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp  # 1 keeps the original frequency, 0 interpolates it
    inv = (inv_freq / factor) * (1.0 - extrapolation) + inv_freq * extrapolation
    return inv, float(attn)


def cos_sin(cfg, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables [len(positions), Dh] in float64, half-split layout (freqs repeated twice)."""
    inv_freq, scale = rope_parameters(cfg)
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T, Dh/2]
    ang = np.concatenate([ang, ang], axis=-1)  # [T, Dh]
    return np.cos(ang) * scale, np.sin(ang) * scale
