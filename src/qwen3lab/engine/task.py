"""InferTask: one sequence being generated — its tokens, its own KV cache and sampling settings, and
whether it is finished. Plain data: the runner (engine/runner.py) feeds it and appends to it."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..checks import check_int, shorten
from ..errors import InputError
from ..models.kv_cache import KVCache
from ..models.paged_cache import PagedSeqCache
from .sampler import SamplingParams, make_generator


def is_id(t) -> bool:
    """An integer token id (numpy / torch integer scalars too); bool is not one, though Python says it is."""
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def token_id_list(ids, what: str = "prompt") -> list[int]:
    """Token ids as a list of Python ints: a sequence of integers, or a 1-D numpy array / torch tensor.

    bytes is refused although it is a sequence of ints (b"hello" is text, not ids), and so is a str; floats
    and bools are refused rather than truncated. The range against the vocabulary is the runner's check
    (runner.check_ids), which knows the model."""
    if isinstance(ids, (np.ndarray, torch.Tensor)):
        if ids.ndim != 1:
            raise InputError(f"{what}: token ids must be a flat sequence, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    if isinstance(ids, (str, bytes, bytearray, memoryview)):
        hint = "; pass a str for text" if not isinstance(ids, str) else ""
        raise InputError(f"{what}: token ids must be a sequence of integers, got {type(ids).__name__} "
                         f"{shorten(ids)}{hint}")
    if not isinstance(ids, Sequence):
        raise InputError(f"{what} must be a str or a sequence of token ids, got {type(ids).__name__} {shorten(ids)}")
    for i, t in enumerate(ids):
        if not is_id(t):
            raise InputError(f"{what}: invalid token id {shorten(t)} at index {i}: ids must be integers, "
                             f"got {type(t).__name__}")
    return [int(t) for t in ids]


def stop_id_set(stop_ids, what: str = "stop_ids") -> frozenset[int]:
    """Stop token ids: one integer or an iterable of them (no str, bytes, floats or bools), as a frozenset."""
    if is_id(stop_ids):
        return frozenset([int(stop_ids)])
    if isinstance(stop_ids, (str, bytes, bytearray)) or not hasattr(stop_ids, "__iter__"):
        raise InputError(f"{what} must be token ids (integers), got {type(stop_ids).__name__} {shorten(stop_ids)}")
    ids = list(stop_ids)
    bad = [t for t in ids if not is_id(t) or t < 0]
    if bad:
        raise InputError(f"{what}: invalid stop id {shorten(bad[0])}: stop ids must be integers >= 0")
    return frozenset(int(t) for t in ids)


@dataclass
class InferTask:
    tokens: list[int]  # prompt + generated so far; the cache holds the first cache.length of them
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()  # a generated token in here finishes the task (it is kept)
    max_new_tokens: int | None = None  # finish after this many generated tokens (None: only stop / context)
    cache: PagedSeqCache | KVCache | None = None  # model.new_cache on the first round: prompt + max_new_tokens
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "context"
    generator: torch.Generator | None = field(default=None, repr=False)  # made from sampling.seed on first use
    num_prompt: int = field(init=False)

    def __post_init__(self):
        # types here; ids against the vocabulary (and an empty prompt) when fed, where the model is known
        self.tokens = token_id_list(self.tokens, "InferTask tokens")
        self.stop_ids = stop_id_set(self.stop_ids, "InferTask stop_ids")
        self.check_fields("InferTask")
        self.num_prompt = len(self.tokens)

    def check_fields(self, what: str) -> None:
        """The fields a caller may have reassigned since construction still have their types; the runner
        checks them before a round, since a bad one found after the forward would leave the cache advanced
        past the tokens."""
        if not isinstance(self.tokens, list):
            raise InputError(f"{what} tokens must be a list of token ids, got {type(self.tokens).__name__}")
        if not isinstance(self.sampling, SamplingParams):
            raise InputError(f"{what} sampling must be a SamplingParams, got {type(self.sampling).__name__} "
                             f"{shorten(self.sampling)}")
        if not isinstance(self.stop_ids, frozenset):
            self.stop_ids = stop_id_set(self.stop_ids, f"{what} stop_ids")
        if self.max_new_tokens is not None:
            self.max_new_tokens = check_int(self.max_new_tokens, f"{what} max_new_tokens")
        if self.cache is not None and not isinstance(self.cache, (PagedSeqCache, KVCache)):
            raise InputError(f"{what} cache must be a PagedSeqCache (model.new_cache) or None, got "
                             f"{type(self.cache).__name__}")

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    def rng(self, device: torch.device) -> torch.Generator | None:
        """This task's random generator (None when greedy), on the device the logits live on."""
        if self.sampling.greedy:
            return None
        if self.generator is None:
            self.generator = make_generator(self.sampling.seed, device)
        return self.generator

    def finish(self, reason: str) -> None:
        self.finished, self.finish_reason = True, reason
