"""ForwardBatch: what one forward of Qwen3LMHeadModel is asked to do -- the public contract between the model and
whatever drives it (the engine's scheduler, TorchBackend, the benches, tests).

    batch = ForwardBatch.single(ids, cache=cache, start=cache.length)        # one sequence
    batch = ForwardBatch.pack([(cache_a, start_a, ids_a), (None, 0, ids_b)])  # several, packed
    logits = model(batch)                     # [R, V]: one row per logits_rows entry (all N when None)

Layout: the new tokens of every sequence are back to back in one packed stream of N tokens (`input_ids`,
`positions` [N]); `spans` say which rows belong to which sequence and where its KV cache (models/paged_cache.py)
stands; `logits_rows` picks the rows whose logits are wanted (decode: the last of each sequence). Attention
is the only per-sequence op; `plans()` gives each span's attention facts (its rows, causal rule) once per
forward for every layer.

Rules (checked by plans()): a span with a cache continues it (start == cache.length) and fits its capacity;
a span without a cache attends over its own tokens only and starts at position 0. A span's cache is a
PagedSeqCache (models/paged_cache.py: a block table over a pool, the engine's shared one or a sequence's own:
what every path makes) or a contiguous KVCache (still accepted, as the contiguous reference the paged paths
are tested against: tests/test_paged_paths.py). plans() builds the paged index tensors once per forward: a decode
batch's block tables (PagedDecode, read by the C++ paged decode kernel or the gather + SDPA fallback) or a
prefill's slots (PagedSeqCache.prepare).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .kv_cache import KVCache
from .paged_cache import PagedDecode, PagedSeqCache

Cache = KVCache | PagedSeqCache


@dataclass
class Span:
    """One sequence's slice of a packed batch: `length` new tokens at positions start..start+length-1.
    cache None means no KV cache: attention over this span's own tokens only (start must be 0)."""

    cache: Cache | None
    start: int
    length: int


@dataclass
class AttnPlan:
    """Per-forward attention facts for one span, shared by every layer (built by ForwardBatch.plans)."""

    cache: Cache | None
    start: int
    T: int
    offset: int  # first row of this span in the packed [1, N, ...] stream
    is_causal: bool
    mask: torch.Tensor | None  # [T, S] bool (True = may attend), only for a prefill after a cached past
    paged: PagedDecode | None = None  # every span a paged decode: the batch's tables (one object for all plans)

    @property
    def decode(self) -> bool:
        """One new token continuing a contiguous cache: what the single-query decode attention kernel takes
        (a paged cache goes through SDPA over its gathered blocks)."""
        return self.T == 1 and isinstance(self.cache, KVCache)

    @property
    def paged_decode(self) -> bool:
        """One new token continuing a paged cache: a batch of these is one kernel call (or one gather + one SDPA)
        per layer, through `paged`."""
        return self.T == 1 and isinstance(self.cache, PagedSeqCache)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [N] long: every span's new tokens back to back
    positions: torch.Tensor  # [N] long: each token's position in its own sequence
    spans: list[Span]
    logits_rows: torch.Tensor | None = None  # [R] long: rows of the packed stream that need logits; None: all

    @classmethod
    def single(cls, ids, cache: Cache | None = None, start: int = 0, last_only: bool = False,
               device: str | torch.device | None = None) -> ForwardBatch:
        """One sequence: its new tokens `ids` at positions start.. (continuing `cache` when given)."""
        return cls.pack([(cache, start, ids)], last_only=last_only, device=device)

    @classmethod
    def pack(cls, seqs: Sequence[tuple[Cache | None, int, Sequence[int] | torch.Tensor]], last_only: bool = True,
             device: str | torch.device | None = None) -> ForwardBatch:
        """Several sequences (cache, start, new ids) packed into one stream; last_only: logits of each
        sequence's last row only (what sampling needs)."""
        ids_all: list[int] = []
        positions: list[int] = []
        spans, rows = [], []
        for cache, start, ids in seqs:
            if isinstance(ids, torch.Tensor):
                device = device if device is not None else ids.device
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # tensors, arrays, lists alike
            ids = ids if isinstance(ids, list) else [ids]  # a 0-d tensor's tolist() is one int
            ids_all += ids
            positions += range(int(start), int(start) + len(ids))
            spans.append(Span(cache, int(start), len(ids)))
            rows.append(len(ids_all) - 1)
        as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        return cls(as_t(ids_all), as_t(positions), spans, as_t(rows) if last_only else None)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    def plans(self, device: torch.device) -> list[AttnPlan]:
        """One AttnPlan per span: where its rows start, and the causal rule (is_causal for a fresh prefill; a
        bottom-right aligned [T, S] mask for a prefill after a cached past; none for one token). Checks the
        batch's rules (module docstring)."""
        assert sum(s.length for s in self.spans) == self.num_tokens, ([s.length for s in self.spans],
                                                                      self.num_tokens)
        return attention_plans(self.spans, device)

    def advance_caches(self) -> None:
        """After the forward: each span's cache now holds its new tokens."""
        for s in self.spans:
            if s.cache is not None:
                s.cache.advance(s.length)


def attention_plans(spans: Sequence[Span], device: torch.device) -> list[AttnPlan]:
    """ForwardBatch.plans for spans alone (the benches time one attention layer over such spans)."""
    plans, off = [], 0
    for s in spans:
        T = s.length
        assert T > 0
        if s.cache is None:
            assert s.start == 0, "a span without a cache starts at position 0"
        else:
            assert s.start == s.cache.length and s.start + T <= s.cache.capacity, (s.start, s.cache)
        past = s.start if s.cache is not None else 0
        mask = None
        if T > 1 and past > 0:  # bottom-right aligned causal mask: query i sees keys 0..past+i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(past)
        plans.append(AttnPlan(s.cache, s.start, T, off, is_causal=T > 1 and past == 0, mask=mask))
        off += T
    paged = PagedDecode.of([p.cache for p in plans], device) if all(p.T == 1 for p in plans) else None
    for p in plans:
        p.paged = paged
        if paged is None and isinstance(p.cache, PagedSeqCache):
            p.cache.prepare(p.start, p.T, device)  # write()'s slots and table, once for every layer
    return plans
