"""What every backend returns, and the input checks every backend shares."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError


@dataclass
class RunResult:
    logits: np.ndarray  # [T, V]
    taps: dict[str, np.ndarray] = field(default_factory=dict)  # tap name -> canonical-shape array


def check_input_ids(input_ids, cfg, max_len: int | None = None) -> np.ndarray:
    """Token ids as an int64 array [T]; clear errors for empty input, bad ids, or too long a prompt."""
    ids = np.asarray(input_ids)
    if ids.ndim != 1:
        raise InputError(f"input_ids must be a flat list of token ids, got shape {tuple(ids.shape)}")
    if ids.size == 0:
        raise InputError("input_ids is empty: give at least one token")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"input_ids must be integers, got dtype {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= cfg.vocab_size)]
    if bad.size:
        raise InputError(f"invalid token id {int(bad[0])}: ids must be in 0..{cfg.vocab_size - 1} (vocab_size)")
    limit = cfg.max_position_embeddings if max_len is None else max_len
    if ids.size > limit:
        raise InputError(f"{ids.size} tokens exceed the context length {limit} (max_position_embeddings)")
    return ids.astype(np.int64)
