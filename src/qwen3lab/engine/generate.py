"""generate(): one prompt to a stream of tokens, stopping on stop ids, stop strings, max_steps or context end.

`TokenStream` is the token-level iterator (ids in, ids out; no tokenizer). `generate` adds text: it decodes
incrementally, holds back text that could be the start of a stop string, cuts the text where a stop string
begins, and calls `stream(token_id, text_delta)` for every token as it is made (text_delta may be "" while
a multi-byte character or a possible stop string is incomplete; the last call releases what was held).

tokens_per_s is the decode rate: tokens after the first over the time after the first (the first token's
time is the prefill, reported as prefill_s).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from ..checks import check_int, shorten
from ..errors import InputError
from ..models.torch_model import Qwen3LMHeadModel
from ..tokenizer import IncrementalDecoder
from .runner import batch_infer_one_round, check_prompt
from .sampler import SamplingParams
from .task import InferTask, stop_id_set, token_id_list


@dataclass
class GenerateResult:
    token_ids: list[int]  # generated tokens (not the prompt); a stop id that ended it is included
    text: str  # their text, without the stop id's and cut before a stop string
    prompt_tokens: int
    finish_reason: str  # "stop" (stop id), "stop_string", "length" (max_steps) or "context"
    prefill_s: float  # time to the first token
    decode_s: float  # time for the rest

    @property
    def tokens_per_s(self) -> float:
        n = len(self.token_ids)
        if n > 1 and self.decode_s > 0:
            return (n - 1) / self.decode_s
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


class TokenStream:
    """Iterate to get the generated token ids one at a time; `task`, `prefill_s`, `decode_s` afterwards."""

    def __init__(self, model: Qwen3LMHeadModel, prompt_ids: Sequence[int], max_steps: int = 128,
                 sampling: SamplingParams | None = None, stop_ids: Iterable[int] = ()):
        max_steps = check_int(max_steps, "max_steps")
        prompt = token_id_list(prompt_ids, "prompt")
        check_prompt(prompt, model.cfg)
        # size the cache exactly: prompt + max_steps (clipped to the context); no growth during the run
        self.task = InferTask(prompt, SamplingParams() if sampling is None else sampling,
                              stop_ids=stop_id_set(stop_ids), max_new_tokens=max_steps)
        self.task.cache = model.new_cache(len(prompt) + max_steps)
        self.model = model
        self.prefill_s = 0.0
        self.decode_s = 0.0

    def __iter__(self) -> Iterator[int]:
        t0 = time.perf_counter()
        first = True
        while not self.task.finished:
            tok = batch_infer_one_round(self.model, [self.task])[0]
            t1 = time.perf_counter()
            if first:
                self.prefill_s, first = t1 - t0, False
            else:
                self.decode_s += t1 - t0
            t0 = t1
            yield tok

    def stop(self, reason: str) -> None:
        self.task.finish(reason)


def stop_string_list(stop_strings) -> list[str]:
    """Stop strings: one non-empty str or an iterable of them."""
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if isinstance(stop_strings, (bytes, bytearray)) or not hasattr(stop_strings, "__iter__"):
        raise InputError(f"stop_strings must be str or a list of str, got {type(stop_strings).__name__} "
                         f"{shorten(stop_strings)}")
    out = list(stop_strings)
    for s in out:
        if not isinstance(s, str) or not s:
            raise InputError(f"stop strings must be non-empty str, got {shorten(s)}")
    return out


def generate(model: Qwen3LMHeadModel, prompt_ids: Sequence[int], *, max_steps: int = 128,
             sampling: SamplingParams | None = None, stop_ids: Iterable[int] = (), stop_strings: Iterable[str] = (),
             tokenizer=None, stream: Callable[[int, str], None] | None = None) -> GenerateResult:
    """Generate up to max_steps tokens after prompt_ids. Text needs a tokenizer (qwen3lab.tokenizer.Tokenizer);
    without one, text is "" and stop strings are refused."""
    stop_strings = stop_string_list(stop_strings)
    if stop_strings and tokenizer is None:
        raise InputError("stop strings need a tokenizer (this model has none); give stop token ids instead")
    if stream is not None and not callable(stream):
        raise InputError(f"stream must be a callable stream(token_id, text) or None, got {type(stream).__name__} "
                         f"{shorten(stream)}")
    stop_ids = stop_id_set(stop_ids)
    ts = TokenStream(model, prompt_ids, max_steps, sampling, stop_ids)
    text = TextStops(tokenizer, stop_strings) if tokenizer is not None else None
    out: list[int] = []
    for tok in ts:
        out.append(tok)
        delta = ""
        if text is not None:
            if tok not in stop_ids:
                delta = text.push(tok)
                if text.stopped:
                    ts.stop("stop_string")
            if ts.task.finished:
                delta += text.finish()  # release what was held back for a possible stop string
        if stream is not None:
            stream(tok, delta)
    return GenerateResult(
        token_ids=out, text=text.text if text is not None else "", prompt_tokens=ts.task.num_prompt,
        finish_reason=ts.task.finish_reason or "length", prefill_s=ts.prefill_s, decode_s=ts.decode_s,
    )


class TextStops:
    """Incremental text with stop strings: push(token) -> the text that may be shown now."""

    def __init__(self, tokenizer, stop_strings: list[str]):

        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = stop_strings
        self.full = ""  # everything decoded so far
        self.shown = 0  # chars of `full` already handed out
        self.stopped = False
        self.text = ""  # the final text once finished
        self.done = False

    def push(self, tok: int) -> str:
        self.full += self.decoder.push(tok)
        return self._release(final=False)

    def finish(self) -> str:
        if self.done:
            return ""
        self.done = True
        if not self.stopped:
            self.full += self.decoder.flush()
        delta = self._release(final=True)
        if not self.stopped:
            self.text = self.full
        return delta

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        cut = min((i for i in (self.full.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = self.full[:cut]
            delta = self.full[self.shown:cut] if cut > self.shown else ""
            self.shown = max(self.shown, cut)
            return delta
        safe = len(self.full) if final else len(self.full) - self._held()
        delta = self.full[self.shown:safe] if safe > self.shown else ""
        self.shown = max(self.shown, safe)
        return delta

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.full)), best, -1):
                if self.full.endswith(s[:n]):
                    best = n
                    break
        return best
