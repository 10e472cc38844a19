"""LLMEngine: many requests, one paged KV pool, one packed forward per step (what the server and LLM run).

    engine = LLMEngine(model)                      # a Qwen3ForCausalLM (qwen3.py); its .model is the nn.Module
    engine.add_request("r1", prompt_ids, SamplingParams(), max_tokens=64)
    while engine.has_unfinished():
        for out in engine.step():                  # StepOutput per sequence that made a token this step
            ...

Each step: the scheduler (scheduler.py) picks the running batch and a token count per sequence (decodes,
prefill chunks, prefix-cache hits skipped); the engine packs them into one ForwardBatch whose spans carry
PagedSeqCache views (a block table over the shared KVPool, models/paged_cache.py), runs the model, samples
for every sequence whose prompt is now fully fed, and finishes those that hit a stop id or max_tokens (or
the context length: reason "length").

Threads: add_request / abort come from the server's event loop thread, step() from one worker thread. One
lock guards the queues and the block manager; step() holds it while scheduling and while applying the
results, not during the forward. An abort of a sequence that is in the forward now is applied when the
forward ends (its blocks are freed then; nothing allocates blocks in between).

KV memory: kv_memory_gib, else KV_MEMORY_FRACTION of the free memory (MemAvailable, or the CUDA device's
free memory), capped at what max_num_seqs full-context sequences could use; `describe()` says what was
taken. A tensor-parallel model (models/tp_run.py TPModel, duck-typed by its `new_kv_pool`) holds its share of
the KV heads on every rank: a block is sized by one rank's share, kv_memory_gib is per rank, the free memory is
shared by the ranks on rank 0's host (cpu; one GPU a rank), and this engine (on rank 0) decides the block
count, with which the model makes every rank's pool.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..guards import available_bytes, size_text
from ..models.batch import ForwardBatch
from ..models.paged_cache import KVPool, PagedSeqCache
from .block_manager import BlockManager
from .runner import check_ids
from .sampler import SamplingParams, make_generator, sample_rows
from .scheduler import Scheduler, Sequence
from .task import stop_id_set, token_id_list

KV_MEMORY_FRACTION = 0.25  # of the free memory, when kv_memory_gib is not given
MAX_LOGPROBS = 20  # as OpenAI's top_logprobs


@dataclass
class StepOutput:
    request_id: str
    token_id: int
    logprob: float | None  # of token_id, when the request asked for logprobs
    top_logprobs: list[tuple[int, float]] | None  # the `logprobs` most likely (id, logprob), best first
    finished: bool
    finish_reason: str | None  # "stop" | "length" | None


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    avail = available_bytes()
    return avail if avail is not None else 4 << 30


class LLMEngine:
    def __init__(self, model, max_num_seqs: int = 256, kv_memory_gib: float | None = None, block_size: int = 16,
                 max_num_batched_tokens: int = 512, enable_prefix_caching: bool = True):
        self.llm = model  # Qwen3ForCausalLM (duck-typed: qwen3.py sits beside the engine, not below it)
        self.model = model.model  # Qwen3LMHeadModel
        self.cfg = self.model.cfg
        for name, v in (("max_num_seqs", max_num_seqs), ("block_size", block_size),
                        ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be an integer >= 1, got {v!r}")
        if kv_memory_gib is not None and (isinstance(kv_memory_gib, bool) or not isinstance(kv_memory_gib, (int, float))
                                          or not kv_memory_gib > 0):
            raise InputError(f"kv_memory_gib must be a number > 0 (GiB) or None, got {kv_memory_gib!r}")
        self.tp = hasattr(self.model, "new_kv_pool")  # tensor parallel: see the module doc
        per_block = self.model.kv_block_bytes(block_size) if self.tp else \
            KVPool.block_bytes(self.cfg, block_size, self.model.dtype)
        budget = int(kv_memory_gib * 2**30) if kv_memory_gib is not None else \
            int(_free_bytes(self.model.device) * KV_MEMORY_FRACTION) // self._sharers()
        cap = max_num_seqs * -(-self.cfg.max_position_embeddings // block_size)  # nobody could use more
        num_blocks = min(budget // per_block, cap)
        if num_blocks < 1:
            raise InputError(f"kv_memory_gib={kv_memory_gib}: {size_text(budget)} holds no KV block "
                             f"({size_text(per_block)} each); give more")
        self.kv_source = ("kv_memory_gib" + (" per rank" if self.tp else "")) if kv_memory_gib is not None else \
            f"{KV_MEMORY_FRACTION:.0%} of free memory" + (f" / {self._sharers()} ranks" if self._sharers() > 1 else "")
        self.pool = self.model.new_kv_pool(num_blocks, block_size) if self.tp else \
            KVPool.for_model(self.cfg, num_blocks, block_size, self.model.dtype, self.model.device)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.lock = threading.Lock()
        self.seqs: dict[str, Sequence] = {}
        self._in_flight: set[str] = set()
        self._aborted: set[str] = set()
        self._arrivals = 0
        self.generated_tokens = 0
        self.fed_tokens = 0  # tokens the model was fed (prefill chunks + decodes): prefix hits skip work here

    def _sharers(self) -> int:
        """How many ranks draw on the free memory this process sees (1 but for tensor parallel on cpu)."""
        return getattr(self.model, "memory_sharers", 1)

    def describe(self) -> str:
        """One line for the start-up log: the KV pool's size and where it came from."""
        bs = self.blocks.block_size
        return (f"KV cache: {self.blocks.num_blocks} blocks x {bs} tokens = {self.blocks.num_blocks * bs} tokens, "
                f"{size_text(self.pool.nbytes())} {str(self.model.dtype).removeprefix('torch.')} on "
                f"{self.model.device}{f' on each of {self.model.world} ranks' if self.tp else ''} "
                f"({self.kv_source}); prefix caching "
                f"{'on' if self.blocks.enable_prefix_caching else 'off'}")

    # ---- requests ------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids, params: SamplingParams, max_tokens: int,
                    stop_ids: frozenset[int] | None = None, logprobs: int | None = None) -> None:
        """Queue a request; every check runs first, so a refused request leaves nothing behind."""
        if not isinstance(request_id, str) or not request_id:
            raise InputError(f"request_id must be a non-empty str, got {request_id!r}")
        if not isinstance(params, SamplingParams):
            raise InputError(f"params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InputError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= MAX_LOGPROBS):
            raise InputError(f"logprobs must be an integer in 0..{MAX_LOGPROBS} or None, got {logprobs!r}")
        prompt = token_id_list(prompt_ids, "prompt")
        if not prompt:
            raise InputError("prompt is empty: give at least one token")
        check_ids(prompt, self.cfg, "prompt")
        ctx = self.cfg.max_position_embeddings
        if len(prompt) >= ctx:
            raise InputError(f"prompt has {len(prompt)} tokens: at or past the context length {ctx} "
                             f"(max_position_embeddings), no room to generate")
        total = min(len(prompt) + max_tokens, ctx)
        if self.blocks.blocks_for(total) > self.blocks.num_blocks:
            raise InputError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) need "
                             f"{self.blocks.blocks_for(total)} KV blocks; the KV memory holds "
                             f"{self.blocks.num_blocks} ({self.blocks.num_blocks * self.blocks.block_size} tokens)")
        stops = stop_id_set(stop_ids if stop_ids is not None else (), "stop_ids")
        with self.lock:
            if request_id in self.seqs:
                raise InputError(f"request_id {request_id!r} is already running")
            seq = Sequence(request_id, prompt, len(prompt), params, max_tokens, stops, logprobs, self._arrivals)
            self._arrivals += 1
            self.seqs[request_id] = seq
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Drop a request (a client went away): its blocks are freed now, or right after the forward that is
        using them. An unknown or finished id is ignored."""
        with self.lock:
            seq = self.seqs.get(request_id)
            if seq is None:
                return
            if request_id in self._in_flight:
                self._aborted.add(request_id)
                return
            self._finish(seq, None)

    def has_unfinished(self) -> bool:
        with self.lock:
            return self.scheduler.has_unfinished()

    def _finish(self, seq: Sequence, reason: str | None) -> None:
        seq.finished, seq.finish_reason = True, reason
        self.scheduler.remove(seq)
        self.seqs.pop(seq.request_id, None)

    # ---- one step ------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Schedule, run one forward over the batch, sample; the outputs of this step (one per sequence that
        finished its prompt or decoded; a sequence mid-way through a chunked prefill gives none)."""
        with self.lock:
            batch = self.scheduler.schedule()
            self._in_flight = {s.request_id for s in batch.seqs}
        if not batch.seqs:
            return []
        dev = self.model.device
        spans = [(PagedSeqCache(self.pool, s.block_table, start), start, s.tokens[start:start + n])
                 for s, n, start in zip(batch.seqs, batch.num_tokens, batch.starts, strict=True)]
        logits = self.model(ForwardBatch.pack(spans, last_only=True, device=dev))  # [B, V]
        with self.lock:
            self.fed_tokens += batch.total
            outs = self._apply(batch, logits)
            for rid in self._aborted:
                if rid in self.seqs:
                    self._finish(self.seqs[rid], None)
            self._in_flight, self._aborted = set(), set()
        return outs

    def _apply(self, batch, logits: torch.Tensor) -> list[StepOutput]:
        ready, rows = [], []
        for i, (s, n) in enumerate(zip(batch.seqs, batch.num_tokens, strict=True)):
            s.num_computed += n
            self.blocks.commit_full(s.block_table, s.tokens, s.num_computed)
            if s.num_computed == len(s.tokens) and s.request_id not in self._aborted:
                ready.append(s)
                rows.append(i)
        if not ready:
            return []
        lg = logits[rows]  # [R, V]
        gens = []
        for s in ready:
            if not s.params.greedy and s.generator is None:
                s.generator = make_generator(s.params.seed, lg.device)
            gens.append(s.generator)
        toks = sample_rows(lg, [s.params for s in ready], gens)
        want = [s.logprobs is not None for s in ready]
        lp = torch.log_softmax(lg.float(), dim=-1) if any(want) else None  # [R, V]
        outs = []
        ctx = self.cfg.max_position_embeddings
        for r, (s, tok) in enumerate(zip(ready, toks, strict=True)):
            s.tokens.append(tok)
            self.generated_tokens += 1
            reason = None
            if tok in s.stop_ids:
                reason = "stop"
            elif s.num_generated >= s.max_tokens or len(s.tokens) >= ctx:
                reason = "length"
            logprob = top = None
            if want[r]:
                logprob = float(lp[r, tok])
                if s.logprobs:
                    v, ix = torch.topk(lp[r], s.logprobs)
                    top = list(zip(ix.tolist(), v.tolist(), strict=True))
            outs.append(StepOutput(s.request_id, tok, logprob, top, reason is not None, reason))
            if reason is not None:
                self._finish(s, reason)
        return outs

    def stats(self) -> dict:
        with self.lock:
            sch, bm = self.scheduler, self.blocks
            return {"running": len(sch.running), "waiting": len(sch.waiting), "kv_blocks_total": bm.num_blocks,
                    "kv_blocks_used": bm.num_used, "prefix_hits": bm.prefix_hits,
                    "prefix_queries": bm.prefix_queries, "prompt_tokens": sch.prompt_tokens,
                    "cached_prompt_tokens": sch.cached_prompt_tokens, "generated_tokens": self.generated_tokens,
                    "preemptions": sch.preemptions, "fed_tokens": self.fed_tokens}
