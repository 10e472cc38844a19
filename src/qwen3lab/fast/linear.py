"""Linear layers for the fast path: the checkpoint's [N, K] weight, y = x @ W.T, through the C++ kernels.

Notable:
- `FastLinear` (bfloat16 / float32 weights), `Int8Linear` (int8 weights, one float32 scale per output
  row) and `Int4Linear` (packed int4, one float32 scale per group of 32 / 128 weights along K; its docstring
  gives the exact format) are drop-in replacements for bias-free nn.Linear; `optimize` / `quantise`
  (fast/speedup.py, fast/quant.py) swap them in from outside the model file.
- Few rows (decode: up to SMALL_M tokens in the packed batch) go to the streaming kernel `linear_small`; more
  rows (prefill) with bfloat16 activations to whichever GEMM measured faster on this CPU (fast/tune.py):
  `linear_large` (bf16 / int8 widened to float32 a band of rows at a time + BLAS sgemm) or torch's bf16 matmul
  (int8: gemm.py `int8_gemm_bf16`); float32 activations with many rows to sgemm (F.linear, or `linear_large` for int8).
- `weight` stays a Parameter for the HF-named modules; a fused module (qkv_proj, gate_up_proj) holds its
  weight as a non-persistent buffer instead, so `parameters()` and `state_dict()` still list each checkpoint
  tensor exactly once (the HF modules' Parameters are row views of it).
- Without the kernels (fast/build.py) the same modules run PyTorch ops: F.linear, and for int8 / int4 a float32
  F.linear over the dequantised weight (the same arithmetic as the kernel, slower).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import pages
from ..errors import InputError
from ..runspec import GROUP_SIZES
from . import tune
from .build import kernels
from .gemm import band_rows_for, int8_gemm_bf16

SMALL_M = 32  # rows up to which the streaming kernel beats the many-row GEMMs (bench_fast_kernels.py; on Zen 4 ~24)
_KERNEL_DTYPES = (torch.bfloat16, torch.float32)  # the activations / weights the kernels take
def _rows(x: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Size]:
    """x [..., K] as contiguous rows [M, K] (what the kernels take), and its leading shape to restore."""
    x2 = x.reshape(-1, K)
    return (x2 if x2.is_contiguous() else x2.contiguous()), x.shape[:-1]


def _quant_kernels(x: torch.Tensor):
    """The kernels for a quantised linear over x, or None: they take CPU float32 / bfloat16 activations."""
    k = kernels()
    return k if k is not None and x.is_cpu and x.dtype in _KERNEL_DTYPES else None


class FastLinear(nn.Module):
    """Bias-free linear over a bfloat16 or float32 weight [N, K] (shared, not copied)."""

    def __init__(self, weight: torch.Tensor, fused: bool = False):
        super().__init__()
        assert weight.dim() == 2, weight.shape
        if fused:
            self.register_buffer("weight", weight.detach(), persistent=False)
        else:
            self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the kernels take x [..., K] as it is and return [..., N] (kernels.cpp rows_of): no Python reshaping
        k = kernels()
        W = self.weight
        if k is None or x.dtype != W.dtype or W.dtype not in _KERNEL_DTYPES or not x.is_cpu:
            return F.linear(x, W)
        if x.numel() <= SMALL_M * self.in_features:
            return k.linear_small(x, W, None)
        if W.dtype == torch.bfloat16 and tune.choose("bfloat16") == "ours":
            return k.linear_large(x, W, None, band_rows_for(self.in_features))
        return F.linear(x, W)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}"


class Int8Linear(nn.Module):
    """Bias-free linear over int8 weights [N, K] with float32 scales [N]: y = (x @ q.T) * scale, computed in
    float32 and returned in x's dtype."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, fused: bool = False):
        super().__init__()
        assert qweight.dtype == torch.int8 and qweight.dim() == 2, (qweight.dtype, qweight.shape)
        assert scale.dtype == torch.float32 and scale.shape == qweight.shape[:1], (scale.dtype, scale.shape)
        if fused:
            self.register_buffer("weight", qweight, persistent=False)
            self.register_buffer("scale", scale, persistent=False)
        else:
            self.weight = nn.Parameter(qweight, requires_grad=False)
            self.scale = nn.Parameter(scale, requires_grad=False)
        self.out_features, self.in_features = qweight.shape

    @classmethod
    def from_float(cls, weight: torch.Tensor, fused: bool = False, rows: int = 2048,
                   file_ranges: list[tuple[int, int]] | None = None) -> Int8Linear:
        """Symmetric per-output-row quantisation: scale = max|w| / 127, q = round(w / scale). Done `rows` rows
        at a time, so a large matrix (a 151936-row lm_head) never exists in float32 all at once. With
        `file_ranges` (qwen3lab.pages.file_ranges()) each block's memory-mapped file pages are given back as
        soon as it is quantised: a tied 311 MB embedding is then never resident whole beside its int8 copy."""
        N, K = weight.shape
        q = torch.empty(N, K, dtype=torch.int8, device=weight.device)  # [N, K]
        scale = torch.empty(N, dtype=torch.float32, device=weight.device)  # [N]
        with torch.no_grad():
            for a in range(0, N, rows):
                block = weight[a:a + rows].detach()
                w = block.float()
                s = w.abs().amax(dim=1) / 127.0
                s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row stays zero
                scale[a:a + rows] = s
                q[a:a + rows] = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
                if file_ranges is not None:
                    pages.release([block], file_ranges)
        return cls(q, scale, fused=fused)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.scale[:, None]).to(dtype)

    def rows(self, start: int, n: int) -> Int8Linear:
        """Output rows start..start+n-1 as their own module over views of this one's weight and scales."""
        return Int8Linear(self.weight[start:start + n], self.scale[start:start + n])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = _quant_kernels(x)
        if k is not None and x.numel() <= SMALL_M * self.in_features:  # decode: x [..., K] as it is
            return k.linear_small(x, self.weight, self.scale)
        x2, lead = _rows(x, self.in_features)
        if k is not None:
            if x2.dtype == torch.bfloat16 and tune.choose("int8") == "torch":
                y = int8_gemm_bf16(x2, self.weight, self.scale)
            else:
                y = k.linear_large(x2, self.weight, self.scale, band_rows_for(self.in_features))
        else:
            # what the kernels compute, in float32 over the dequantised weight. (torch's _weight_int8pack_mm was
            # measured and not used: it rounds the scales to x's dtype and streamed int8 at 12 GB/s with bf16
            # inputs, 2.3 GB/s with float32 ones, on the machine the kernels were tuned on.)
            y = F.linear(x2.float(), self.dequantized()).to(x.dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype=int8 (per-row scales)"


# ---- int4 ----------------------------------------------------------------------------------------------------
INT4_GROUPS = GROUP_SIZES  # group sizes the kernels take (both multiples of the 32-weight packing block)


def check_int4_group(shape, group_size: int) -> None:
    """InputError naming the weight shape unless group_size is one the kernels take and divides K."""
    K = shape[1]
    if group_size not in INT4_GROUPS or K % group_size:
        raise InputError(f"int4: group size {group_size} does not fit weight of shape {list(shape)}: it must be "
                         f"one of {', '.join(map(str, INT4_GROUPS))} and divide K = {K}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 q [N, K] in -8..7 (K a multiple of 32) -> uint8 [N, K // 2] in llama.cpp Q4_0's nibble order: within
    each block of 32 consecutive weights of a row, 16 bytes, byte j's low nibble weight j + 8, its high nibble
    weight j + 16 (+ 8)."""
    N, K = q.shape
    assert K % 32 == 0, q.shape
    n = (q.to(torch.int16) + 8).to(torch.uint8).view(N, K // 32, 2, 16)  # [N, blocks, lo/hi half, 16]
    return (n[:, :, 0] | (n[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] (pack_int4's layout) -> int8 q [N, K] in -8..7."""
    N, half = packed.shape
    b = packed.view(N, half // 16, 1, 16)  # [N, blocks, 1, 16]
    n = torch.cat((b & 15, b >> 4), dim=2)  # [N, blocks, 2, 16]: weights j, then j + 16
    return n.reshape(N, 2 * half).to(torch.int8) - 8


def quantise_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float w [N, K] -> (q int8 [N, K] in -8..7, scales float32 [N, K // group_size]) by Int4Linear's rule."""
    N, K = w.shape
    g = w.float().view(N, K // group_size, group_size)  # [N, groups, G]
    m = g.gather(2, g.abs().argmax(dim=2, keepdim=True))  # [N, groups, 1]: the largest |w|, with its sign
    s = m / -8.0
    s = torch.where(m != 0, s, torch.ones_like(s))  # an all-zero group: scale 1, zeros
    q = torch.round(g / s).clamp_(-8, 7).to(torch.int8)
    return q.view(N, K), s.view(N, K // group_size)


class Int4Linear(nn.Module):
    """Bias-free linear over weight-only int4, symmetric, group-wise along K (the input dim).

    Format: group size G in {32, 128}, G divides K. Per group of G weights of a row: m = the weight with the largest
    |w| (signed), scale = m / -8 (llama.cpp Q4_0's rule: m itself becomes -8; an all-zero group gets scale 1 and
    zeros), q = clamp(round(w / scale), -8, 7) (round to nearest, ties to even). `scales` float32 [N, K // G].
    `qweight` uint8 [N, K // 2]: within each block of 32 consecutive weights of a row (G is a multiple of 32),
    16 bytes, byte j's low nibble = weight j, high nibble = weight j + 16, nibble = q + 8 (Q4_0's nibble layout).
    The dequantised weight is w' = q * scale (float32), and y = x @ w'.T is accumulated in float32 and rounded
    once to x's dtype (bfloat16 or float32 activations).

    Rounding: every element is within |scale| / 2 of w except those clamped from 8 to 7 (w on the opposite side
    of m with |w| > 15/16 |m|), which are within |scale|.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, fused: bool = False):
        super().__init__()
        assert qweight.dtype == torch.uint8 and qweight.dim() == 2, (qweight.dtype, qweight.shape)
        N, K = qweight.shape[0], 2 * qweight.shape[1]
        assert group_size in INT4_GROUPS and K % group_size == 0, (group_size, qweight.shape)
        assert scales.dtype == torch.float32 and scales.shape == (N, K // group_size), (scales.dtype, scales.shape)
        if fused:
            self.register_buffer("weight", qweight, persistent=False)
            self.register_buffer("scales", scales, persistent=False)
        else:
            self.weight = nn.Parameter(qweight, requires_grad=False)
            self.scales = nn.Parameter(scales, requires_grad=False)
        self.group_size = group_size
        self.out_features, self.in_features = N, K

    @property
    def qweight(self) -> torch.Tensor:
        return self.weight

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = 128, fused: bool = False, rows: int = 2048,
                   file_ranges: list[tuple[int, int]] | None = None) -> Int4Linear:
        """Quantise a float weight [N, K] by the class's rule, `rows` rows at a time (a 151936-row lm_head is
        never float32 all at once); with `file_ranges` (qwen3lab.pages.file_ranges()) each block's memory-mapped
        file pages are given back as soon as it is quantised, as Int8Linear.from_float does."""
        N, K = weight.shape
        check_int4_group(weight.shape, group_size)
        qw = torch.empty(N, K // 2, dtype=torch.uint8, device=weight.device)  # [N, K/2]
        scales = torch.empty(N, K // group_size, dtype=torch.float32, device=weight.device)  # [N, K/G]
        with torch.no_grad():
            for a in range(0, N, rows):
                block = weight[a:a + rows].detach()
                q, s = quantise_int4(block, group_size)
                qw[a:a + rows] = pack_int4(q)
                scales[a:a + rows] = s
                if file_ranges is not None:
                    pages.release([block], file_ranges)
        return cls(qw, scales, group_size, fused=fused)

    def rows(self, start: int, n: int) -> Int4Linear:
        """Output rows start..start+n-1 as their own module over views of this one's weight and scales."""
        return Int4Linear(self.weight[start:start + n], self.scales[start:start + n], self.group_size)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = unpack_int4(self.weight).float().view(self.out_features, -1, self.group_size)  # [N, groups, G]
        return (q * self.scales[:, :, None]).view(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = _quant_kernels(x)
        if k is not None and x.numel() <= SMALL_M * self.in_features:  # decode: x [..., K] as it is
            return k.linear_q4(x, self.weight, self.scales, self.group_size)
        x2, lead = _rows(x, self.in_features)
        if k is not None:
            # always the dequantised-band sgemm, no tune.py choice: torch's _weight_int4pack_mm_for_cpu was
            # slower at every M measured (bench_fast_kernels.py --quant int4; Zen 3, 2 threads, M = 64:
            # 703 vs 558 ms for 8 layers' weights) and rounds the scales to x's dtype. On that machine the
            # streaming linear_q4 was faster still at M = 64 (341 ms) and 128 (1031 vs 1190): its sgemm is
            # slow; a "stream vs band" measurement per CPU is left to do.
            y = k.linear_q4_large(x2, self.weight, self.scales, self.group_size, band_rows_for(self.in_features))
        else:  # what the kernels compute, in float32 over the dequantised weight
            y = F.linear(x2.float(), self.dequantized()).to(x.dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"dtype=int4 (group size {self.group_size})")
