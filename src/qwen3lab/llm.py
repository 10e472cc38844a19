"""LLM: the offline API in vLLM's shape -- every prompt through the scheduler at once, outputs in order.

    from qwen3lab import LLM, SamplingParams
    llm = LLM("./qwen3-demo", dtype="bfloat16")
    for out in llm.generate(["Hello", [9707, 11]], SamplingParams(max_tokens=32, temperature=0)):
        print(out.outputs[0].text, out.outputs[0].token_ids, out.outputs[0].finish_reason)

It sits beside qwen3.py (it loads a Qwen3ForCausalLM) and drives engine/llm_engine.py: a str prompt is
tokenized as is (no chat template), eos ids always stop, stop strings cut the text before them (and end the
request: finish_reason "stop", as vLLM).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .checks import shorten
from .engine.llm_engine import LLMEngine
from .engine.sampler import SamplingParams
from .errors import InputError
from .qwen3 import Qwen3ForCausalLM


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length"
    logprobs: list[dict[int, float]] | None = None  # per token: {id: logprob} of the chosen + top ones


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True

    # shortcuts to the one completion
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


class LLM:
    """A checkpoint loaded once, an LLMEngine over it; generate() runs a whole list of prompts."""

    def __init__(self, model, dtype: str = "bfloat16", device: str = "cpu", quant: str | None = None,
                 fast: bool = True, max_num_seqs: int = 256, kv_memory_gib: float | None = None,
                 block_size: int = 16, max_num_batched_tokens: int = 512, enable_prefix_caching: bool = True,
                 ndev: int = 1):
        """model: a checkpoint dir, or a Qwen3ForCausalLM already loaded. ndev > 1: tensor parallel over that many
        ranks (Qwen3ForCausalLM.from_pretrained; kv_memory_gib is then per rank)."""
        self.model = model if isinstance(model, Qwen3ForCausalLM) else \
            Qwen3ForCausalLM.from_pretrained(model, device=device, dtype=dtype, quant=quant, fast=fast, ndev=ndev)
        self.engine = LLMEngine(self.model, max_num_seqs=max_num_seqs, kv_memory_gib=kv_memory_gib,
                                block_size=block_size, max_num_batched_tokens=max_num_batched_tokens,
                                enable_prefix_caching=enable_prefix_caching)
        self._next = 0

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. prompts: a str, a list of token ids, or a list of those;
        sampling_params: one for all, or one per prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Sequence):
            raise InputError(f"prompts must be a list of str / token-id lists, got {type(prompts).__name__} "
                             f"{shorten(prompts)}")
        params = sampling_params if sampling_params is not None else SamplingParams()
        params = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise InputError(f"{len(params)} sampling_params for {len(prompts)} prompts: give one, or one each")
        tok = self.model.tokenizer
        eos = frozenset(self.model.eos_token_ids)
        outs, ids = [], []
        for p, sp in zip(prompts, params, strict=True):  # all checked before any request is queued
            if not isinstance(sp, SamplingParams):
                raise InputError(f"sampling_params must be SamplingParams, got {type(sp).__name__}")
            if sp.stop and tok is None:
                raise InputError("stop strings need a tokenizer (this model has none)")
            pid = self.model.encode(p)
            rid = f"llm-{self._next}"
            self._next += 1
            outs.append(RequestOutput(rid, p if isinstance(p, str) else None, pid,
                                      [CompletionOutput(0, "", [], None, [] if sp.logprobs is not None else None)]))
            ids.append(pid)
        by_id = {o.request_id: (o, sp) for o, sp in zip(outs, params, strict=True)}
        try:
            for o, pid, sp in zip(outs, ids, params, strict=True):
                self.engine.add_request(o.request_id, pid, sp, sp.max_tokens, eos, sp.logprobs)
            self._run(by_id)
        finally:  # an error (or Ctrl-C) leaves no request behind in the engine
            for rid in by_id:
                self.engine.abort(rid)
        return outs

    def _run(self, by_id) -> None:
        tok = self.model.tokenizer
        while self.engine.has_unfinished():
            for so in self.engine.step():
                o, sp = by_id[so.request_id]
                c = o.outputs[0]
                c.token_ids.append(so.token_id)
                if c.logprobs is not None:
                    c.logprobs.append({so.token_id: so.logprob, **dict(so.top_logprobs or [])})
                if so.finished:
                    c.finish_reason = so.finish_reason
                if c.finish_reason is not None and not so.finished:  # cut by a stop string, then aborted
                    continue
                if tok is None or not (sp.stop or so.finished):
                    continue  # text only when a stop string may need it, or at the end
                shown = c.token_ids[:-1] if so.finish_reason == "stop" else c.token_ids  # not the stop id
                c.text = tok.decode(shown)
                cut = min((i for i in (c.text.find(s) for s in sp.stop) if i >= 0), default=-1)
                if cut >= 0:
                    c.text, c.finish_reason = c.text[:cut], "stop"
                    self.engine.abort(so.request_id)
