"""Qwen3's reasoning split: text inside <think>...</think> goes to `reasoning_content`, the rest to `content`.

As vLLM's Qwen3 reasoning parser: the output is reasoning only if a </think> ends it (a leading <think> is
dropped; with enable_thinking the template may already have opened it); output with no </think> is all
content. Streaming cannot wait for the end, so it routes text to reasoning while it started with <think>
(or `opened`: the prompt ended in <think>, as thinking-only templates do) until </think> arrives; a tag
split across two deltas is held back until it is whole, so no partial "</thi" leaks into either channel; an
unclosed <think> has then been streamed as reasoning, where the whole-text split calls it content.
"""

from __future__ import annotations

START, END = "<think>", "</think>"


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning or None, content) of a finished output."""
    if END not in text:
        return None, text
    reasoning, _, content = text.partition(END)
    reasoning = reasoning.removeprefix(START) if reasoning.startswith(START) else reasoning
    return reasoning.strip("\n") or None, content.lstrip("\n")


def _partial_tag(s: str, tag: str) -> int:
    """Length of the longest tail of s that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(s)), 0, -1):
        if s.endswith(tag[:n]):
            return n
    return 0


class ReasoningStream:
    """push(delta) -> (reasoning_delta, content_delta); finish() releases what is held."""

    def __init__(self, opened: bool = False):
        self.state = "reasoning" if opened else "start"  # start -> (reasoning -> after_end ->) content
        self.buf = ""

    def push(self, delta: str) -> tuple[str, str]:
        self.buf += delta
        r = c = ""
        if self.state == "start":
            if len(self.buf) < len(START) and START.startswith(self.buf):
                return "", ""  # may still become <think>
            if self.buf.startswith(START):
                self.buf, self.state = self.buf[len(START):], "reasoning"
            else:
                self.state = "content"
        if self.state == "reasoning":
            if END in self.buf:
                r, _, self.buf = self.buf.partition(END)
                self.state = "after_end"
            else:
                keep = _partial_tag(self.buf, END)
                r, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return r, ""
        if self.state == "after_end":  # the newlines after </think> belong to neither channel
            self.buf = self.buf.lstrip("\n")
            if self.buf:
                self.state = "content"
        if self.state == "content":
            c, self.buf = self.buf, ""
        return r, c

    def finish(self) -> tuple[str, str]:
        held, self.buf = self.buf, ""
        return (held, "") if self.state == "reasoning" else ("", held)
