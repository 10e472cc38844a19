"""Megatron-style parallel leaves: each holds its rank's slice of a weight; the communication is explicit.

- column-parallel (q/k/v, gate/up): a plain nn.Linear over the rank's output rows; no communication (its
  output stays sharded, e.g. the rank's attention heads).
- RowParallelLinear (o_proj, down_proj): the rank's input columns, then ONE all_reduce (sum) of [N, D].
- AllReduceSum: wraps a block whose ranks each hold part of a sum (expert-parallel MoE: each rank runs its
  local experts, the partial [N, D] outputs are summed once).
- VocabParallelEmbedding: rows of the vocabulary; ids outside the slice give zeros, then one all_reduce.
- ParallelLMHead: the rank's vocabulary rows of lm_head; logits all-gathered to [.., V] on every rank.

Every collective is timed into STATS (seconds, calls, bytes) so the bench can report the collective cost.
`skip_reduce` plants a sharding bug for tests (the all_reduce of a row-parallel leaf left out).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class CollectiveStats:
    seconds: float = 0.0
    calls: int = 0
    bytes: int = 0

    def reset(self) -> None:
        self.seconds, self.calls, self.bytes = 0.0, 0, 0


STATS = CollectiveStats()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the ranks in place (timed). A float64 leaf reduces in float64; others in their dtype."""
    t0 = time.perf_counter()
    dist.all_reduce(x)
    STATS.seconds += time.perf_counter() - t0
    STATS.calls += 1
    STATS.bytes += x.numel() * x.element_size()
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's x along the last dim (timed): [..., V/w] -> [..., V]."""
    t0 = time.perf_counter()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    STATS.seconds += time.perf_counter() - t0
    STATS.calls += 1
    STATS.bytes += x.numel() * x.element_size() * len(parts)
    return torch.cat(parts, dim=-1)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r @ W_r^T) (+ bias once): W_r [out, in/w] the rank's input columns."""

    skip_reduce = False  # planted bug for tests: the all_reduce left out

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rank: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in/w]
        # the bias is added after the sum, so only rank 0 holds it (each rank would add it otherwise)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None and rank == 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # [..., out] partial sum
        return y if self.skip_reduce else all_reduce(y)


class AllReduceSum(nn.Module):
    """The wrapped block's output summed over the ranks (expert parallel: each rank's local experts)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        y = self.block(x, *args)
        return y if RowParallelLinear.skip_reduce else all_reduce(y)


class VocabParallelEmbedding(nn.Module):
    """The rank's rows [lo, hi) of the embedding; other ids embed to zero; one all_reduce completes it."""

    def __init__(self, weight: torch.Tensor, lo: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [V/w, D]
        self.lo, self.hi = lo, lo + weight.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.lo) & (ids < self.hi)
        local = torch.where(mine, ids - self.lo, torch.zeros_like(ids))
        x = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)  # [N, D]
        return all_reduce(x)


class ParallelLMHead(nn.Module):
    """logits = all_gather(h @ W_r^T): W_r [V/w, D] the rank's vocabulary rows (tied: the embedding's)."""

    def __init__(self, weight: torch.Tensor | nn.Parameter):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return all_gather_last(F.linear(h, self.weight))  # [..., V]
