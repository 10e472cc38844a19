"""One engine round: every task's unfed tokens go through ONE packed forward, then each task samples.

A task whose cache is empty is prefilled (all its tokens); the others are decoded (the token sampled last
round, or several if the caller appended more). All of them share one [1, N, D] stream, so each linear
layer is a single GEMM over the batch; attention runs per task over its own KV cache (models/torch_model.py).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from ..errors import InputError
from ..models.batch import ForwardBatch
from ..models.torch_model import Qwen3CausalLM
from .sampler import sample_rows
from .task import InferTask

DEFAULT_RESERVE = 256  # cache room beyond the prompt when a task has no max_new_tokens (grows if needed)


def check_ids(tokens, cfg, what: str = "prompt") -> None:
    """Every id an integer in 0..vocab_size-1; the message names the first bad one and its index."""
    for i, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < cfg.vocab_size:
            raise InputError(f"{what}: invalid token id {t!r} at index {i}: ids must be integers in "
                             f"0..{cfg.vocab_size - 1} (vocab_size)")


def check_prompt(tokens, cfg, what: str = "prompt") -> None:
    """Clear errors for an empty prompt, an id outside the vocabulary, or no room left in the context."""
    ctx = cfg.max_position_embeddings
    if len(tokens) == 0:
        raise InputError(f"{what} is empty: give at least one token")
    check_ids(tokens, cfg, what)
    if len(tokens) >= ctx:
        raise InputError(f"{what} has {len(tokens)} tokens: at or past the context length {ctx} "
                         f"(max_position_embeddings), no room to generate")


def batch_infer_one_round(model: Qwen3CausalLM, tasks: Sequence[InferTask]) -> list[int]:
    """Feed each task its tokens not yet in its cache, sample its next token, append it; return them in order.

    Sets `finished` (reason "stop", "length" or "context") on a task whose new token is a stop id, reaches
    max_new_tokens, or fills the context. Finished tasks must not be passed again.
    """
    if not tasks:
        return []
    cfg = model.cfg
    seqs = []  # (cache, start, new ids) of each task
    for n, task in enumerate(tasks):
        what = f"task {n}"
        if task.finished:
            raise InputError(f"{what} is finished ({task.finish_reason}); leave it out of the round")
        if task.cache is None:
            check_prompt(task.tokens, cfg, what)
            room = task.max_new_tokens if task.max_new_tokens is not None else DEFAULT_RESERVE
            task.cache = model.new_cache(len(task.tokens) + room)
        new = task.tokens[task.cache.length:]
        if not new:
            raise InputError(f"{what}: nothing to feed, its cache already holds all {len(task.tokens)} tokens")
        if task.cache.length:  # tokens appended since the last round (usually the one sampled then)
            check_ids(new, cfg, f"{what} (tokens after position {task.cache.length})")
        seqs.append((task.cache, task.cache.reserve(len(new)), [int(t) for t in new]))
    dev = model.device
    logits = model(ForwardBatch.pack(seqs, last_only=True, device=dev))  # [B, V]: each task's last position
    out = sample_rows(logits, [t.sampling for t in tasks], [t.rng(dev) for t in tasks])
    ctx = cfg.max_position_embeddings
    for task, tok in zip(tasks, out, strict=True):
        task.tokens.append(tok)
        if tok in task.stop_ids:
            task.finish("stop")
        elif task.max_new_tokens is not None and len(task.generated) >= task.max_new_tokens:
            task.finish("length")
        elif len(task.tokens) >= ctx:
            task.finish("context")
    return out
