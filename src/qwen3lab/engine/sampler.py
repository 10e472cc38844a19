"""Next-token choice: greedy, or temperature / top-k / top-p sampling with HF generate's semantics.

Order as in transformers' sampling warpers: logits / temperature, then top-k (keep every logit >= the
k-th largest, so ties at the boundary stay), then top-p on what is left (sort ascending, drop the tokens
whose cumulative probability is <= 1 - top_p, always keep the most likely one), then one draw from the
softmax with the task's own torch.Generator (a seed makes it reproducible). temperature 0 = argmax of the
raw logits (the first index on a tie, like torch.argmax and HF greedy search).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None = a fresh nondeterministic seed

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise InputError(f"temperature must be a number >= 0 (0 = greedy), got {t!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise InputError(f"top_p must be a number in (0, 1] (1 = off), got {p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InputError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _loaded_kernels():
    """qwen3lab.fast's C++ kernels when a fast model already loaded them (sampling never starts a build)."""
    from ..fast.build import loaded

    return loaded()


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [..., V] (float) scaled by 1/temperature with the top-k / top-p rejects set to -inf."""
    x = logits / temperature
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]  # [..., 1] the k-th largest
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1)  # ascending
        cum = torch.softmax(sorted_x, dim=-1).cumsum(dim=-1)
        drop = cum <= 1.0 - top_p
        drop[..., -1] = False  # the most likely token always survives
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return x


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from logits [V]."""
    if params.greedy:
        return int(torch.argmax(logits))
    x = filter_logits(logits.float(), params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of logits [B, V], each row with its own settings; greedy rows share one argmax."""
    assert logits.shape[0] == len(params) == len(generators)
    if all(p.greedy for p in params):
        k = _loaded_kernels()
        if k is not None and logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16) \
                and logits.is_contiguous():
            return k.argmax_rows(logits)  # one pass over the logits as they are (qwen3lab.fast kernels)
        # one host sync for the whole batch; argmax over float32 is ~2x faster on CPU than over bfloat16
        return torch.argmax(logits.float(), dim=-1).tolist()
    return [sample(logits[b], p, g) for b, (p, g) in enumerate(zip(params, generators, strict=True))]
