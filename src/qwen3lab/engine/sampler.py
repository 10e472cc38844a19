"""Next-token choice: greedy, or temperature / top-k / top-p sampling with HF generate's semantics.

Order as in transformers' sampling warpers: logits / temperature, then top-k (keep every logit >= the
k-th largest, so ties at the boundary stay), then top-p on what is left (sort ascending, drop the tokens
whose cumulative probability is <= 1 - top_p, always keep the most likely one), then one draw from the
softmax with the task's own torch.Generator (a seed makes it reproducible). temperature 0 = argmax of the
raw logits (the first index on a tie, like torch.argmax and HF greedy search).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..fast.build import loaded

# The smallest temperature above 0. Sampling divides float32 logits by it: below ~1e-38 the divisor itself
# rounds to 0 in float32 (the issue's --temperature 1e-300 gave inf / NaN probabilities), and at 1e-2 a logit
# of 1e4 becomes 1e6, far from float32's 3.4e38, so softmax stays finite. It is vLLM's _MAX_TEMP too (it raises
# smaller temperatures to it); below it sampling is greedy in all but name, so 0 says that honestly.
MIN_TEMPERATURE = 1e-2
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes a uint64


def _name(name: str, cli: bool) -> str:
    """An option as the caller spells it: --top-p (command line) or top_p (Python), as RunSpec does."""
    return f"--{name.replace('_', '-')}" if cli else name


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _got(v) -> str:
    """The bad value for a message, shortened when huge (a 5000-digit int must not flood the terminal)."""
    if _is_int(v) and abs(v) >= 10**40:  # repr() of a 5000-digit int raises (Python's int/str limit)
        return f"an integer of {int(v).bit_length()} bits"
    r = repr(v)
    return r if len(r) <= 40 else f"{r[:20]}...{r[-10:]} ({len(r)} chars)"


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int past float64's range
        return False


def check_temperature(t, cli: bool = False) -> float:
    if not _is_real(t) or not _finite(t) or not (t == 0 or t >= MIN_TEMPERATURE):
        raise InputError(f"{_name('temperature', cli)} must be 0 (greedy) or a finite number >= "
                         f"{MIN_TEMPERATURE}, got {_got(t)}")
    return float(t)


def check_top_k(k, cli: bool = False) -> int:
    if not _is_int(k) or k < 0:
        raise InputError(f"{_name('top_k', cli)} must be an integer >= 0 (0 = off), got {_got(k)}")
    return int(k)


def check_top_p(p, cli: bool = False) -> float:
    if not _is_real(p) or not 0 < p <= 1:  # NaN fails the comparison too
        raise InputError(f"{_name('top_p', cli)} must be a number in (0, 1] (1 = off), got {_got(p)}")
    return float(p)


def check_seed(seed, cli: bool = False) -> int | None:
    if seed is None:
        return None
    if not _is_int(seed) or not 0 <= seed <= SEED_MAX:
        raise InputError(f"{_name('seed', cli)} must be an integer in 0..2**64-1 (none: a fresh random seed), "
                         f"got {_got(seed)}")
    return int(seed)


def check_max_tokens(n, name: str = "max_steps", cli: bool = False) -> int:
    """A count of new tokens: an integer >= 1 (0 would generate nothing, yet still load and prefill)."""
    if not _is_int(n) or n < 1:
        raise InputError(f"{_name(name, cli)} must be an integer >= 1, got {_got(n)}")
    return int(n)


def _checked(temperature, top_k, top_p, seed, cli: bool) -> tuple:
    return (check_temperature(temperature, cli), check_top_k(top_k, cli), check_top_p(top_p, cli),
            check_seed(seed, cli))


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. Built here only: every value is checked (one clear InputError naming the
    parameter) and stored as a plain float / int, whether it came from the CLI (`make(..., cli=True)`) or
    Python."""

    temperature: float = 0.0  # 0 = greedy, else >= MIN_TEMPERATURE
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None = a fresh nondeterministic seed; else 0..2**64-1
    # what LLM.generate (vLLM's shape) reads; the token-level paths take their own max_steps / stop arguments
    max_tokens: int = 16  # new tokens at most (vLLM's default)
    stop: tuple[str, ...] = ()  # stop strings (a str or a list of them is accepted); the text is cut before one
    logprobs: int | None = None  # None = none; k = the chosen token's logprob and the k most likely

    def __post_init__(self):
        # numpy scalars and the like become plain Python numbers, so torch sees exactly what was checked
        checked = _checked(self.temperature, self.top_k, self.top_p, self.seed, cli=False)
        for name, v in zip(("temperature", "top_k", "top_p", "seed"), checked, strict=True):
            object.__setattr__(self, name, v)
        object.__setattr__(self, "max_tokens", check_max_tokens(self.max_tokens, "max_tokens"))
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if isinstance(stop, (bytes, bytearray)) or not hasattr(stop, "__iter__") \
                or not all(isinstance(x, str) and x for x in stop):
            raise InputError(f"stop must be a non-empty str or a list of them, got {_got(self.stop)}")
        object.__setattr__(self, "stop", tuple(stop))
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise InputError(f"logprobs must be None or an integer in 0..20, got {_got(self.logprobs)}")

    @classmethod
    def make(cls, temperature=0.0, top_k=0, top_p=1.0, seed=None, *, cli: bool = False) -> SamplingParams:
        """Like the constructor, but a refusal names the options as the caller spells them (cli=True:
        `--top-p`)."""
        return cls(*_checked(temperature, top_k, top_p, seed, cli))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _loaded_kernels():
    """qwen3lab.fast's C++ kernels when a fast model already loaded them (sampling never starts a build)."""

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
