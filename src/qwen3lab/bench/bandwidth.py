"""Memory bandwidth of this machine and the decode roofline it implies.

Notable:
- bandwidth is measured the way a decode step uses memory: streaming a buffer far larger than the
  caches once. `read` is the faster of a torch sum and, on CPU, the fast kernels' streaming read (reads N
  bytes), `copy` a tensor copy (reads N, writes N: counted as 2N). Best of several repeats, after a
  warm-up that also faults the pages in.
- the roofline is the decode rate at which weight (and KV cache) traffic alone would saturate that
  bandwidth: every decode step reads every weight once (embedding rows aside: one row per token), the
  lm_head fully, the KV cache of each sequence, and for MoE only the experts the step's tokens hit
  (expected distinct experts for a batch of B tokens: E * (1 - (1 - K/E)^B)).
- int8 / int4 (weight-only, what `--dtype int8` / `int4` runs: qwen3lab.fast.quant): every projection matrix
  (q/k/v, o, gate/up, down, experts, lm_head) is read as 1 byte per weight plus one float32 scale per output
  row (int8), or half a byte per weight plus one float32 scale per group of 128 along the row (int4, the
  default group size); the norms and the MoE router stay bfloat16, as do the KV cache and the embedding rows
  (a gather).
- the paired roofline (PairedProbe, paired_fraction): the bench also runs a decode with one probe read between
  every two steps and gives each step's fraction of the roofline at the bandwidth read right around it; the
  median over steps is the figure that does not depend on when the separate probes ran.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch

from ..fast.build import kernels
from ..runspec import default_group
from ..shapes import expected_shapes
from .timing import clock

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
# weight-only formats: (activation / KV / unquantised-tensor dtype, bytes per weight, bytes per scale, weights
# per scale: None = one scale per output row)
QUANT_FORMATS = {"int8": ("bfloat16", 1, 4, None), "int4": ("bfloat16", 0.5, 4, 128)}


def _quantised(name: str, shape) -> bool:
    """Whether qwen3lab.fast.quant quantises this checkpoint tensor: the 2-D projections, not the
    embedding (a gather), not the MoE router (`mlp.gate`, it decides which experts run), not the norms."""
    return len(shape) == 2 and name != "model.embed_tokens.weight" and not name.endswith(".mlp.gate.weight")


@dataclass
class Bandwidth:
    read_gbs: float  # best of a torch sum and the kernels' streaming read of a large buffer: bytes read / s, 1e9
    copy_gbs: float  # tensor copy: (bytes read + bytes written) / s
    nbytes: int
    repeats: int
    method: str = "best of torch sum / copy"

    def as_dict(self) -> dict[str, Any]:
        return {"read_gbs": round(self.read_gbs, 2), "copy_gbs": round(self.copy_gbs, 2),
                "buffer_bytes": self.nbytes, "repeats": self.repeats, "method": self.method}


def _probe_buffer(device: torch.device, nbytes: int | None) -> torch.Tensor:
    """The float32 buffer a probe streams: `nbytes` (default well past any last-level cache, and large enough on
    a GPU to amortise launch latency), every page touched now, not in the timing."""
    if nbytes is None:
        nbytes = (2 << 30) if device.type == "cuda" else (512 << 20)
    with torch.inference_mode():
        return torch.ones(nbytes // 4, dtype=torch.float32, device=device)


def measure_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> Bandwidth:
    """Best-of-`repeats` streaming bandwidth in GB/s (1e9 bytes) for reads (sum) and copies."""
    src = _probe_buffer(device, nbytes)
    n = src.numel()
    with torch.inference_mode():
        dst = torch.empty_like(src)
        dst.copy_(src)
        best_sum = best_copy = float("inf")
        for _ in range(repeats + 1):  # the first round is a warm-up
            t0 = clock(device)
            s = src.sum()
            t1 = clock(device)
            dst.copy_(src)
            t2 = clock(device)
            best_sum, best_copy = min(best_sum, t1 - t0), min(best_copy, t2 - t1)
        assert abs(float(s) - n) <= 1e-3 * n  # the sum really read every element
        stream = _kernel_read_seconds(src, repeats) if device.type == "cpu" else None
        del src, dst
    read = n * 4 / best_sum / 1e9
    method = "best of torch sum / copy"
    if stream is not None and n * 4 / stream / 1e9 > read:
        read, method = n * 4 / stream / 1e9, "best of torch sum, qwen3lab streaming read / copy"
    return Bandwidth(read_gbs=read, copy_gbs=2 * n * 4 / best_copy / 1e9, nbytes=n * 4, repeats=repeats,
                     method=method)


class PairedProbe:
    """The bandwidth probe taken between decode steps, for a roofline paired with each step.

    Each call reads a `nbytes` buffer once with a torch sum and, on CPU with the kernels, once with their
    streaming read, and returns the faster time (as measure_bandwidth takes the faster method: in one fast minute
    the sum read 84 GB/s where the streaming read stayed at 52). A decode step and the reads right after it run
    within ~50 ms of each other, so their ratio does not depend on which minute the bench's separate probes fell
    in (this VM's bandwidth moves between 42 and 84 GB/s from minute to minute). The buffer lives only as long
    as the probe."""

    def __init__(self, device: torch.device, nbytes: int | None = None):
        self.device = device
        self.src = _probe_buffer(device, nbytes)
        self.nbytes = self.src.numel() * 4
        k = kernels() if device.type == "cpu" else None
        self._reads = [torch.sum] + ([k.stream_read] if k is not None else [])
        self.read_seconds()  # warm-up

    def read_seconds(self) -> float:
        best = float("inf")
        for read in self._reads:
            t0 = clock(self.device)
            read(self.src)
            best = min(best, clock(self.device) - t0)
        return best

    def close(self) -> None:
        del self.src


def paired_fraction(step_s: list[float], read_s: list[float], step_bytes: list[float], read_nbytes: int
                    ) -> tuple[float, float]:
    """(median over steps of the roofline fraction, median read GB/s) for decode steps timed alternately with
    reads: step i took step_s[i] and read step_bytes[i]; read_s[i] and read_s[i + 1] are the reads just before
    and just after it (len(read_s) == len(step_s) + 1). Step i's roofline time is step_bytes[i] at the mean
    bandwidth of its two reads, and its fraction that time over step_s[i]."""
    assert len(read_s) == len(step_s) + 1 and len(step_bytes) == len(step_s) and step_s
    fractions, gbs = [], []
    for i, (t, b) in enumerate(zip(step_s, step_bytes, strict=True)):
        bw = read_nbytes / ((read_s[i] + read_s[i + 1]) / 2)  # bytes / s around this step
        fractions.append(b / bw / t)
        gbs.append(bw / 1e9)
    return statistics.median(fractions), statistics.median(gbs)


def _kernel_read_seconds(src: torch.Tensor, repeats: int) -> float | None:
    """Best time of the fast kernels' streaming read of `src` (None without the kernels). On CPU a torch
    sum reads more slowly than the decode kernels stream weights (Qwen3-0.6B bf16 decode then showed ~118 %
    of a sum-based roofline), so the roofline takes the faster of the two as the machine's bandwidth."""

    k = kernels()
    if k is None:
        return None
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = clock(src.device)
        k.stream_read(src)
        best = min(best, clock(src.device) - t0)
    return best


def expected_experts_hit(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts chosen by `tokens` tokens routing uniformly at random."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def decode_bytes(cfg, dtype: str, context: int, batch: int = 1,
                 bytes_per_param: float | None = None) -> dict[str, float]:
    """Bytes one decode step of `batch` sequences at `context` positions reads from memory.

    Returns weights_bytes (shared by the batch; quantisation scales included), kv_bytes (all sequences),
    embed_bytes (rows gathered). dtype: a float dtype, or "int8" / "int4" (QUANT_FORMATS: quantised projections
    with their float32 scales, bfloat16 for the rest). `bytes_per_param` overrides a float dtype's weight element
    size; the KV cache stays at `dtype`.
    """
    act, qbytes, sbytes, group = QUANT_FORMATS.get(dtype, (dtype, None, 0, None))
    if act not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join([*DTYPE_BYTES, *QUANT_FORMATS])}")
    esize = DTYPE_BYTES[act]
    wsize = esize if bytes_per_param is None else bytes_per_param
    shapes = expected_shapes(cfg, include_lm_head=True)
    if group is not None:  # the group fast/quant.py picks for these shapes (runspec.default_group)
        group = default_group(s[1] for n, s in shapes.items() if _quantised(n, s)) or group
    weights = 0.0
    for name, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        if name == "model.embed_tokens.weight":
            continue  # a gather: one row per token, counted below
        if qbytes is not None and _quantised(name, shape):
            scales = shape[0] if group is None else n // group  # per output row, or per group of a row
            nbytes = n * qbytes + scales * sbytes
        else:
            nbytes = n * (esize if qbytes is not None else wsize)
        if ".mlp.experts." in name:
            # every expert tensor of a layer has the same size: scale by the fraction of experts hit
            hit = expected_experts_hit(cfg.num_experts, cfg.num_experts_per_tok, batch)
            weights += nbytes * hit / cfg.num_experts
        else:
            weights += nbytes
    embed = batch * cfg.hidden_size * esize
    kv = batch * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context * esize
    return {"weights_bytes": weights, "kv_bytes": float(kv), "embed_bytes": float(embed)}


def roofline_tok_per_s(cfg, dtype: str, bandwidth_gbs: float, context: int, batch: int = 1,
                       bytes_per_param: float | None = None) -> float:
    """Decode tokens/s (all sequences of the batch together) if memory traffic were the only cost."""
    return batch * bandwidth_gbs * 1e9 / step_bytes(cfg, dtype, context, batch, bytes_per_param)


def step_bytes(cfg, dtype: str, context: int, batch: int = 1, bytes_per_param: float | None = None) -> float:
    """All the bytes one decode step reads (decode_bytes summed)."""
    b = decode_bytes(cfg, dtype, context, batch, bytes_per_param)
    return b["weights_bytes"] + b["kv_bytes"] + b["embed_bytes"]
