"""The two GEMM helpers a many-row (prefill) linear uses, shared by linear.py (which runs them) and tune.py
(which times them to choose): in a module of their own so neither of those imports the other."""

from __future__ import annotations

import torch
import torch.nn.functional as F

BAND_BYTES = 8 << 20  # float32 band of widened weight rows for linear_large (2048 rows of 1024: ~3% over 1024)


def band_rows_for(K: int) -> int:
    return max(16, BAND_BYTES // (4 * K))


def int8_gemm_bf16(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, band_rows: int = 2048) -> torch.Tensor:
    """y = (x @ q.T) * scale for bfloat16 x [M, K] and int8 q [N, K] through torch's bfloat16 matmul: q widened to
    bfloat16 a band of rows at a time (exact: |q| <= 127), the product rounded to bf16, scaled in float32, rounded
    again. The band (4 MB at K = 1024) bounds the extra memory; a 151936-row lm_head is never bf16 all at once."""
    M, N = x.shape[0], q.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)  # [M, N]
    for a in range(0, N, band_rows):
        yb = F.linear(x, q[a:a + band_rows].to(x.dtype))  # [M, band]
        y[:, a:a + band_rows] = yb.float().mul_(scale[a:a + band_rows])
    return y
