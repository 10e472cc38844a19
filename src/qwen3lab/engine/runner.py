"""One engine round: every task's unfed tokens go through ONE packed forward, then each task samples.

A task whose cache is empty is prefilled (all its tokens); the others are decoded (the token sampled last
round, or several if the caller appended more). All of them share one [1, N, D] stream, so each linear
layer is a single GEMM over the batch; attention runs per task over its own KV cache
(model.new_cache: a paged cache over the task's own pool, models/paged_cache.py).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from ..checks import shorten
from ..errors import InputError
from ..models.batch import ForwardBatch
from ..models.torch_model import Qwen3LMHeadModel
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


def check_tasks(tasks) -> list[InferTask]:
    """The round's tasks as a list: InferTask objects with fields of the right types, each once, no two
    sharing a KV cache (one task twice would feed its tokens twice into one cache and corrupt it), none
    finished."""
    if isinstance(tasks, (str, bytes, bytearray)) or not isinstance(tasks, Sequence):
        raise InputError(f"tasks must be a sequence of InferTask (from new_task), got {type(tasks).__name__} "
                         f"{shorten(tasks)}")
    tasks = list(tasks)
    where: dict[int, int] = {}  # id of a task or of its cache -> the task's index
    for n, task in enumerate(tasks):
        if not isinstance(task, InferTask):
            raise InputError(f"task {n} is not an InferTask (make one with new_task), got {type(task).__name__} "
                             f"{shorten(task)}")
        task.check_fields(f"task {n}")
        if task.finished:
            raise InputError(f"task {n} is finished ({task.finish_reason}); leave it out of the round")
        if id(task) in where:
            raise InputError(f"tasks {where[id(task)]} and {n} are the same task: a task may appear once in a "
                             f"round (its tokens would go into its cache twice)")
        if task.cache is not None and id(task.cache) in where:
            raise InputError(f"tasks {where[id(task.cache)]} and {n} share one KV cache: each task needs its own")
        where[id(task)] = n
        if task.cache is not None:
            where[id(task.cache)] = n
    return tasks


def batch_infer_one_round(model: Qwen3LMHeadModel, tasks: Sequence[InferTask]) -> list[int]:
    """Feed each task its tokens not yet in its cache, sample its next token, append it; return them in order.

    Sets `finished` (reason "stop", "length" or "context") on a task whose new token is a stop id, reaches
    max_new_tokens, or fills the context. Finished tasks must not be passed again, nor one task twice.
    """
    tasks = check_tasks(tasks)
    if not tasks:
        return []
    cfg = model.cfg
    for n, task in enumerate(tasks):  # every task's input checked before any cache is made or grown
        what = f"task {n}"
        if task.cache is None:
            check_prompt(task.tokens, cfg, what)
        elif task.cache.length >= len(task.tokens):
            raise InputError(f"{what}: nothing to feed, its cache already holds all {len(task.tokens)} tokens")
        elif len(task.tokens) > cfg.max_position_embeddings:
            raise InputError(f"{what} has {len(task.tokens)} tokens: past the context length "
                             f"{cfg.max_position_embeddings} (max_position_embeddings)")
        else:  # tokens appended since the last round (usually the one sampled then)
            check_ids(task.tokens[task.cache.length:], cfg, f"{what} (tokens after position {task.cache.length})")
    dev = model.device
    gens = [t.rng(dev) for t in tasks]  # before any cache work: a failure after the forward would corrupt them
    seqs = []  # (cache, start, new ids) of each task
    for task in tasks:
        if task.cache is None:
            room = task.max_new_tokens if task.max_new_tokens is not None else DEFAULT_RESERVE
            task.cache = model.new_cache(len(task.tokens) + room)
        new = task.tokens[task.cache.length:]
        seqs.append((task.cache, task.cache.reserve(len(new)), [int(t) for t in new]))
    logits = model(ForwardBatch.pack(seqs, last_only=True, device=dev))  # [B, V]: each task's last position
    out = sample_rows(logits, [t.sampling for t in tasks], gens)
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
